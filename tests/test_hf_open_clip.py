"""Hugging Face ``transformers`` and ``open_clip`` image towers as vpeft backbones (issue 11).

Tiny random-init models from configs (no hub is reachable): the view finds blocks, q/k/v and the
head by structure; methods change only their parameters; zero init equals the base; merging is
exact and gives the plain architecture back; save/load is the identity; the CLI trains them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import vpeft
from datagen import write_list_dataset
from vpeft.backbones import get_view
from vpeft.backbones.factory import create_backbone
from vpeft.cli import main

tf = pytest.importorskip("transformers", reason="hf backbones need transformers (vpeft[hf])")
open_clip = pytest.importorskip("open_clip", reason="open_clip towers need open_clip_torch")

from vpeft.backbones.hf import HFImageClassifier  # noqa: E402
from vpeft.backbones.open_clip import PackedAttention  # noqa: E402

SIZE = 32
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           image_size=SIZE, patch_size=8)
OC_ARCH = "vpeft-tiny-vit"
OC_CFG = {"embed_dim": 16,
          "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "patch_size": 8,
                         "head_width": 16},
          "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2,
                       "layers": 1}}


@pytest.fixture(scope="module", autouse=True)
def tiny_open_clip_arch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Register a tiny open_clip architecture (open_clip's own model-config mechanism)."""
    path = tmp_path_factory.mktemp("oc") / f"{OC_ARCH}.json"
    path.write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(path)


def make(kind: str) -> nn.Module:
    """A tiny model of ``kind`` with a 3-class head, in eval mode, seeded."""
    torch.manual_seed(0)
    if kind == "open_clip":
        return create_backbone(f"open_clip:{OC_ARCH}", num_classes=3).eval()
    models = {
        "vit-cls": lambda: tf.ViTForImageClassification(tf.ViTConfig(**VIT, num_labels=3)),
        "vit": lambda: tf.ViTModel(tf.ViTConfig(**VIT)),
        "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**VIT)),
        "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VIT)),
        "swin": lambda: tf.SwinModel(tf.SwinConfig(image_size=SIZE, patch_size=4, embed_dim=16,
                                                   depths=[1, 1], num_heads=[2, 2],
                                                   window_size=4)),
    }
    return HFImageClassifier(models[kind](), num_classes=3).eval()


KINDS = ["vit-cls", "vit", "dinov2", "clip", "swin", "open_clip"]
# expected (depth, block widths, head path) per kind
EXPECTED = {
    "vit-cls": (2, [32, 32], "model.classifier"),
    "vit": (2, [32, 32], "head"),
    "dinov2": (2, [32, 32], "head"),
    "clip": (2, [32, 32], "head"),
    "swin": (2, [16, 32], "head"),
    "open_clip": (2, [32, 32], "head"),
}


def x_in(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def method_args(kind: str, method: str, model: nn.Module) -> dict:
    """LoRA on q and v: the fused open_clip qkv by default, HF's separate q/v found by the view."""
    if method == "lora" and kind != "open_clip":
        return {"rank": 2, "targets": tuple(sorted(get_view(model).separate_qkv_paths("qv")))}
    if method == "lora":
        return {"rank": 2}
    if method == "adapter":  # HF/open_clip attentions return tuples: adapters after the MLP
        return {"positions": ("mlp",)}
    return {}


@pytest.mark.parametrize("kind", KINDS)
def test_view_finds_blocks_projections_and_head(kind: str) -> None:
    model = make(kind)
    view = get_view(model)
    depth, dims, head = EXPECTED[kind]
    assert view.family == ("open_clip" if kind == "open_clip" else "hf")
    assert view.depth == depth and view.block_dims == dims and view.heads == [head]
    assert view.mlp is not None
    if kind == "open_clip":
        assert view.qkv == "attn.qkv" and view.qkv_separate is None
    else:  # three separate Linears per block, found by structure
        assert view.qkv is None and len(view.separate_qkv_paths()) == 3 * depth
        for p in view.separate_qkv_paths():
            assert isinstance(model.get_submodule(p), nn.Linear)
    assert model(x_in()).shape == (2, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_head_trains_by_default(kind: str) -> None:
    model = vpeft.adapt(make(kind), "bitfit")
    head = model.get_classifier()
    assert all(p.requires_grad for p in head.parameters())
    model(x_in()).sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["lora", "bitfit", "adapter"])
@pytest.mark.parametrize("kind", KINDS)
def test_method_trains_only_its_parameters(kind: str, method: str) -> None:
    base = make(kind)
    ref = base(x_in())
    model = vpeft.adapt(copy.deepcopy(base), method, **method_args(kind, method, base)).eval()
    torch.testing.assert_close(model(x_in()), ref, atol=1e-6, rtol=0)  # zero init equals base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):  # the second step moves LoRA's A, whose gradient is 0 while B is 0
        opt.zero_grad()
        nn.functional.cross_entropy(model(x_in()), torch.tensor([0, 1])).backward()
        opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    state = vpeft.core.state.get_state(model)
    allowed = trainable | state.added_keys  # what the method marked trainable or added
    assert changed and changed <= allowed, sorted(changed - allowed)
    assert changed - state.head_keys, "the method's own parameters never moved"


def _random_lora(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_(0, 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_merge_is_exact_and_strict_loads(kind: str) -> None:
    base = make(kind)
    model = vpeft.adapt(copy.deepcopy(base), "lora", **method_args(kind, "lora", base)).eval()
    _random_lora(model)
    adapted = model(x_in())
    assert (adapted - base(x_in())).abs().max() > 1e-3  # the update is on the forward path
    merged = vpeft.merge(model)
    torch.testing.assert_close(merged(x_in()), adapted, atol=1e-5, rtol=0)
    assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
    plain = make(kind)
    plain.load_state_dict(merged.state_dict(), strict=True)
    torch.testing.assert_close(plain(x_in()), adapted, atol=1e-5, rtol=0)
    restored = vpeft.unmerge(merged)
    torch.testing.assert_close(restored(x_in()), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["lora", "bitfit"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_identity(kind: str, method: str, tmp_path: Path) -> None:
    base = make(kind)
    model = vpeft.adapt(copy.deepcopy(base), method, **method_args(kind, method, base)).eval()
    _random_lora(model)
    with torch.no_grad():
        model.get_classifier().weight.add_(1.0)
    vpeft.save(model, tmp_path / "run")
    loaded = vpeft.load(make(kind), tmp_path / "run").eval()
    torch.testing.assert_close(loaded(x_in()), model(x_in()), atol=0, rtol=0)


def test_open_clip_lora_q_v_choice_and_plain_tower_load() -> None:
    base = make("open_clip")
    model = vpeft.adapt(copy.deepcopy(base), "lora", rank=2, qkv="qv").eval()
    _random_lora(model)
    model(x_in()).sum().backward()
    lora = model.visual.transformer.resblocks[0].attn.qkv
    assert lora.lora_A.grad.abs().sum() > 0  # trained through the packed projection
    merged = vpeft.merge(model)
    e = 32
    w0 = base.visual.transformer.resblocks[0].attn.in_proj_weight
    w1 = merged.visual.transformer.resblocks[0].attn.in_proj_weight
    assert not torch.equal(w0[:e], w1[:e]) and not torch.equal(w0[2 * e:], w1[2 * e:])
    assert torch.equal(w0[e:2 * e], w1[e:2 * e])  # k untouched
    tower = open_clip.create_model(OC_ARCH).visual  # a plain open_clip image tower
    tower.load_state_dict(merged.visual.state_dict(), strict=True)


@pytest.mark.parametrize("batch_first", [True, False])
def test_packed_attention_equals_multihead_attention(batch_first: bool) -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 2, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)  # 5 tokens
    causal = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    additive = torch.randn(5, 5)
    expected = [mha(x, x, x, need_weights=False, attn_mask=m)[0] for m in (None, causal, additive)]
    packed = PackedAttention(copy.deepcopy(mha)).eval()
    for m, want in zip((None, causal, additive), expected):
        torch.testing.assert_close(packed(x, x, x, need_weights=False, attn_mask=m)[0], want)
    with pytest.raises(ValueError, match="self-attention"):
        packed(x, torch.randn_like(x), x)


# -- command line -------------------------------------------------------------------------------
FAST = ["--epochs", "2", "--batch-size", "8", "--num-workers", "0", "--img-size", str(SIZE)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_list_dataset(tmp_path_factory.mktemp("data"),
                              {"train800": 24, "val200": 8, "test": 12}, classes=3)


def _cli(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _train_and_eval(capsys, data: Path, out: Path, model_args: list, method: str,
                    margs: list) -> None:
    code, stdout, err = _cli(capsys, "train", *model_args, *FAST, "--data", data, "--method",
                             method, *margs, "--out", out)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == method and 0 <= results["top1"] <= 100
    code, stdout, err = _cli(capsys, "eval", "--run", out, "--num-workers", "0")
    assert code == 0, err
    assert json.loads(stdout)["top1"] == results["top1"]


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_cli_trains_hf_folder(method: str, data: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "hf-vit"
    torch.manual_seed(0)
    tf.ViTForImageClassification(tf.ViTConfig(**VIT, num_labels=5)).save_pretrained(folder)
    # q and v leaf names as this transformers version spells them, read from the view
    qv = sorted({p.rsplit(".", 1)[1] for p in get_view(make("vit")).separate_qkv_paths("qv")})
    margs = ["--method-args", "rank=2", f"targets=[{','.join(qv)}]"] if method == "lora" else []
    _train_and_eval(capsys, data, tmp_path / "run", ["--model", f"hf:{folder}"], method, margs)


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_cli_trains_open_clip_tower(method: str, data: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(OC_ARCH).state_dict(), weights)
    margs = ["--method-args", "rank=2"] if method == "lora" else []
    _train_and_eval(capsys, data, tmp_path / "run",
                    ["--model", f"open_clip:{OC_ARCH}", "--weights", weights], method, margs)


@pytest.mark.parametrize("spec, message", [("hf:/no/such/folder", "cannot build hf:"),
                                           ("open_clip:no-such-arch", "unknown open_clip")])
def test_cli_bad_spec_is_one_line(spec: str, message: str, data: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture) -> None:
    code, _, err = _cli(capsys, "train", "--model", spec, *FAST, "--data", data,
                        "--method", "bitfit", "--out", tmp_path / "run")
    assert code == 2 and message in err and "Traceback" not in err

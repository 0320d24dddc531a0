"""Every registered method through :func:`vpeft.explain.explain` on a tiny backbone it applies to
(the first of its rows in ``tests/rows``): finite maps at the image's resolution, adapted maps
equal to the base's for a zero-initialised method, maps that move when the method's weights move,
and at least one per-block attribution that sees the method's parameters.

Also the hierarchical and other token families: Swin (windowed attention: no rollout, said why)
and EVA (global attention with rotary embeddings: rollout works)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vpeft
from vpeft.explain import explain

from conftest import IMG, NUM_CLASSES, tiny_model
from rows import all_rows


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: a second intra-op thread only adds contention on a loaded machine
    torch.set_num_threads(1)


_FIRST_ROW = {}
for _row in all_rows():
    _FIRST_ROW.setdefault(_row.method, _row)


def _cases() -> list:
    cases = []
    for info in vpeft.list_methods():
        row = _FIRST_ROW.get(info.name)
        options, kind = (row.options, row.backbones[0]) if row else ({}, "vit")
        missing = vpeft.get_method(info.name).missing_requirements()
        marks = pytest.mark.skipif(bool(missing), reason=f"{info.name} needs {missing}")
        cases.append(pytest.param(info.name, options, kind, id=f"{info.name}-{kind}",
                                  marks=marks))
    return cases


def _image(folder: Path) -> tuple[Path, tuple[int, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    size = (IMG + 8, IMG + 4)  # (H, W), not the model's input size
    rng = np.random.default_rng(0)
    path = folder / "img.png"
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path, size


def _maps(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "maps.npz") as f:
        return {k: f[k] for k in f.files}


def _perturb(model: torch.nn.Module, names: list[str], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in names:
            p = params[n]
            p.add_(torch.randn(p.shape, generator=g) * (0.1 * float(p.abs().mean()) + 0.05))


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2,
                            weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def _attributions(summary: dict) -> dict[str, float]:
    """The largest figure of each per-block quantity in a summary."""
    found = {k: max(abs(v) for v in summary[k].values())
             for k in ("update", "added_output") if k in summary}
    if "prompt_mass" in summary:
        found["prompt_mass"] = max(v for v in summary["prompt_mass"] if v is not None)
    blocks = summary.get("ablation", {}).get("blocks")
    if blocks:
        found["ablation"] = max(abs(b["delta_loss"]) for b in blocks.values())
    return found


@pytest.mark.parametrize(("method", "options", "kind"), _cases())
def test_every_method_explains(method: str, options: dict, kind: str, tmp_path: Path) -> None:
    adapted = vpeft.adapt(tiny_model(kind), method, **options)
    state = vpeft.get_state(adapted)
    base = tiny_model(kind)
    image, size = _image(tmp_path / "images")
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, IMG, IMG, generator=g), torch.arange(4) % NUM_CLASSES)]
    before = explain(adapted, base, image, tmp_path / "before", batches=batches, ig_steps=2,
                     figures=False)
    maps = _maps(tmp_path / "before")
    kinds = {k.split("/")[1] for k in maps}
    assert {"gradcam", "ig"} <= kinds
    assert "rollout" in kinds or "rollout" in before["absent"]
    for key, a in maps.items():
        if "/prompts/" not in key:
            assert a.shape == size and np.isfinite(a).all(), key
    if state.method.zero_init:  # nothing changed yet: the same maps, every size figure 0
        for kind_ in kinds - {"prompts"}:
            np.testing.assert_allclose(maps[f"img.png/{kind_}/adapted"],
                                       maps[f"img.png/{kind_}/base"], atol=1e-4)
        for key in ("update", "added_output"):
            assert all(v == pytest.approx(0, abs=1e-6) for v in before.get(key, {}).values())

    # a few training steps move everything the method trains (a random perturbation would not
    # do: VQT's new head columns and side-tune's curriculum keep an untrained method silent)
    trained = [n for n, p in adapted.named_parameters()
               if p.requires_grad and n not in state.head_keys]
    _train(adapted, *batches[0])
    after = explain(adapted, base, image, tmp_path / "after", batches=batches, ig_steps=0,
                    figures=False)
    moved = _maps(tmp_path / "after")
    changed = [k for k in moved if k.endswith("/adapted") and "/prompts/" not in k
               and not np.allclose(moved[k], maps[k], atol=1e-4)]
    assert changed, f"no adapted map moved when {method}'s weights moved"
    found = _attributions(after)
    if trained:
        assert max(found.values(), default=0.0) > 1e-3, (method, found, after["absent"])
    else:  # nothing outside the head: every per-block quantity absent, each with its reason
        assert not found and {"update", "added_output", "ablation"} <= set(after["absent"])


def test_vqt_block_switched_off_is_the_head_without_its_queries() -> None:
    """VQT's block modules feed the widened head: switching block 1 off drops its query columns,
    which is the adapted model with those columns' weights at zero."""
    from vpeft.explain import switch_off_block

    full = vpeft.adapt(tiny_model("vit"), "vqt", num_tokens=2)
    _perturb(full, [n for n, p in full.named_parameters() if p.requires_grad])
    base = tiny_model("vit")
    view = vpeft.get_view(base)
    off = switch_off_block(full, base, view, 1)
    zeroed = vpeft.adapt(tiny_model("vit"), "vqt", num_tokens=2)
    zeroed.load_state_dict(full.state_dict())
    head = zeroed.get_submodule(view.heads[0]).base
    d = view.block_dims[1]
    with torch.no_grad():
        head.weight[:, head.in_features - 2 * d:] = 0  # block 1's group: the last 2 x D inputs
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(off.eval()(x), zeroed.eval()(x), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(off(x), full.eval()(x), atol=1e-4)
        off(x)  # a second pass: the stash starts empty again
        torch.testing.assert_close(off(x), zeroed(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["eva", "eva-separate"])
def test_eva_attention_is_captured_exactly_and_rolls_out(kind: str) -> None:
    """EVA (rotary embeddings, SwiGLU): the captured attention is the one EVA's own unfused path
    computes (after the rotation), and rollout gives distributions over its patches."""
    from vpeft.explain import capture_attention, rollout_map, token_layout

    model = tiny_model(kind)
    view = vpeft.get_view(model)
    seen = []
    hooks = [model.get_submodule(view.block_part(i, "attn")).attn_drop.register_forward_hook(
        lambda m, a, out: seen.append(out.mean(1))) for i in range(view.depth)]
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
        with capture_attention(model, view) as att:
            out = model(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, ref)
    for a, s in zip(att.maps, seen[:view.depth]):
        torch.testing.assert_close(a, s, atol=1e-5, rtol=1e-4)
    m = rollout_map(att, token_layout(view, (IMG, IMG)), pooled_by_prefix=True)
    assert m.shape == (2, IMG // view.patch_size, IMG // view.patch_size) and (m >= 0).all()
    torch.testing.assert_close(m.sum((1, 2)), torch.ones(2))


@pytest.mark.parametrize("kind", ["swin", "hf-swin", "hf-vit"])
def test_other_token_families(kind: str, tmp_path: Path) -> None:
    """Swin attends within windows: Grad-CAM on its last stage's grid, rollout absent with the
    reason; a Hugging Face ViT (its view has no token layout) gets both, on the patch grid."""
    from conftest import TINY

    if kind not in TINY:
        pytest.skip(f"{kind} needs transformers")
    adapted = vpeft.adapt(tiny_model(kind), "lora")
    image, size = _image(tmp_path / "images")
    summary = explain(adapted, tiny_model(kind), image, tmp_path / "out", ig_steps=0,
                      figures=False)
    maps = _maps(tmp_path / "out")
    assert maps["img.png/gradcam/adapted"].shape == size
    assert np.isfinite(maps["img.png/gradcam/adapted"]).all()
    assert maps["img.png/gradcam/adapted"].max() == pytest.approx(1.0)  # not an all-zero map
    if "swin" in kind:
        assert "rollout" not in summary["images"][0]["maps"]
        assert "windows" in summary["absent"]["rollout"]
    else:
        assert "rollout" in summary["images"][0]["maps"]


def test_gradient_rollout_is_chefers_rule_on_timms_own_attention() -> None:
    """Gradient-weighted rollout against the rule computed by hand from timm's unfused attention
    (its probabilities and their gradients, read at attn_drop): R = I, R += mean_h((dA * A)^+) R,
    the class token's row over the patches; and it depends on the class."""
    from vpeft.explain import token_layout
    from vpeft.explain.gradmaps import gradient_rollout

    model = vpeft.adapt(tiny_model("vit"), "lora")
    _train(model, torch.randn(8, 3, IMG, IMG), torch.arange(8) % NUM_CLASSES)
    view = vpeft.get_view(model)
    layout = token_layout(view, (IMG, IMG))
    x, target = torch.randn(2, 3, IMG, IMG), torch.tensor([1, 3])
    ours = gradient_rollout(model, view, x, target, layout, pooled_by_prefix=True)
    seen = []

    def keep(m, a, out):
        out.retain_grad()
        seen.append(out)

    hooks = [model.get_submodule(view.block_part(i, "attn")).attn_drop.register_forward_hook(keep)
             for i in range(view.depth)]
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model(x).gather(1, target.view(-1, 1)).sum().backward()
    for h in hooks:
        h.remove()
    joint = torch.eye(layout.num_image_tokens).expand(2, -1, -1)
    for a in seen:
        joint = joint + (a.grad * a).clamp_min(0).mean(1).detach() @ joint
    ref = joint[:, 0, 1:]
    ref = (ref / ref.sum(-1, keepdim=True)).view(2, *layout.grid)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    other = gradient_rollout(model, view, x, torch.tensor([2, 0]), layout, pooled_by_prefix=True)
    assert not torch.allclose(ours, other, atol=1e-4)

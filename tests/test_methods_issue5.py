"""Behaviour of visual-prompt, prefix, vqt, side-tune, lst, noah and glora beyond the matrix."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

import vpeft
from vpeft.core.side import FeatureTap
from vpeft.methods.addition.prefix import PrefixAttention, export_prefixes
from vpeft.methods.addition.visual_prompt import PadPrompter, VisualPromptConfig
from vpeft.methods.unified.noah import set_subnet
from vpeft.methods.unified.noah_search import Choice, NOAHSpace

from conftest import NUM_CLASSES, TINY_DIMS, real_deit, tiny_model

KINDS = ("vit", "deit-distilled", "vit-avgpool-reg")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def final_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens the head's pooling reads (the final norm's input)."""
    seen = []
    handle = model.norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(x)
    handle.remove()
    return seen[0]


# -- token methods -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["vpt-shallow", "vpt-deep", "prefix", "vqt"])
def test_token_methods_keep_the_token_layout(method: str, kind: str) -> None:
    base, model = tiny_model(kind), vpeft.adapt(tiny_model(kind), method)
    assert model.forward_features(X).shape == base.forward_features(X).shape
    assert final_tokens(model, X).shape == final_tokens(base, X).shape
    assert model(X).shape == (2, NUM_CLASSES)
    if method == "vqt":  # queries never touch the backbone's tokens
        torch.testing.assert_close(model.forward_features(X), base.forward_features(X))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_prefix_attention_with_no_prefix_equals_timm(fused: bool, qk_norm: bool) -> None:
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
    attn.fused_attn = fused
    wrapped = PrefixAttention(copy.deepcopy(attn), num_tokens=0, init_std=0.02)
    x = torch.randn(2, 7, 48)
    mask = torch.rand(7, 7) > 0.3
    mask.fill_diagonal_(True)
    torch.testing.assert_close(wrapped(x), attn(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(wrapped(x, attn_mask=mask), attn(x, attn_mask=mask),
                               rtol=1e-6, atol=1e-6)
    if fused:  # the same kernel on the same inputs: bit for bit
        assert torch.equal(wrapped(x), attn(x))


def test_prefix_attention_attends_over_prefixes() -> None:
    torch.manual_seed(0)
    attn = Attention(48, num_heads=3, qkv_bias=True).eval()
    wrapped = PrefixAttention(attn, num_tokens=4, init_std=1.0)
    x = torch.randn(2, 5, 48)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 16).permute(2, 0, 3, 1, 4)
    pk, pv = (t.view(1, 4, 3, 16).transpose(1, 2) for t in (wrapped.prefix_k, wrapped.prefix_v))
    k, v = torch.cat([pk.expand(2, -1, -1, -1), k], 2), torch.cat([pv.expand(2, -1, -1, -1), v], 2)
    o = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1) @ v
    torch.testing.assert_close(wrapped(x), attn.proj(o.transpose(1, 2).reshape(2, 5, 48)))


def test_prefix_export_drops_the_mlp(tmp_path) -> None:
    model = vpeft.adapt(tiny_model(), "prefix", num_tokens=3, reparam_hidden=16)
    with torch.no_grad():
        for p in model.prefix_encoder.parameters():
            p.normal_(std=0.5)
    before = model(X)
    export_prefixes(model)
    assert not hasattr(model, "prefix_encoder")
    torch.testing.assert_close(model(X), before)
    vpeft.save(model, tmp_path)
    assert vpeft.read_config(tmp_path)["config"]["reparam_hidden"] == 0
    assert vpeft.read_config(tmp_path)["params"] == 2 * 2 * 3 * 48 + 48 * NUM_CLASSES + NUM_CLASSES
    torch.testing.assert_close(vpeft.load(tiny_model(), tmp_path)(X), before)


@pytest.mark.parametrize("method", ["prefix", "vqt", "lst", "side-tune", "noah"])
def test_methods_needing_tokens_refuse_a_convnet(method: str) -> None:
    convnet = timm.create_model("convnext_atto", pretrained=False, num_classes=NUM_CLASSES)
    # the ConvNeXt view has blocks but no token sequence (nor attention)
    with pytest.raises(vpeft.MissingPartError, match=r"needs .*(sequence_tokens|attn)"):
        vpeft.adapt(convnet, method)


# -- visual prompt -------------------------------------------------------------------------------
def test_visual_prompt_frame_matches_the_paper() -> None:
    cfg = VisualPromptConfig()
    assert cfg.frame(224, 224) == 30 and cfg.frame(32, 32) == 4 and cfg.frame(8, 8) == 1
    prompter = PadPrompter(3, 224, 224, 30, 1.0)
    assert sum(p.numel() for p in prompter.parameters()) == 69_840  # Bahng et al.'s count
    inside = prompter.prompt()[..., 30:-30, 30:-30]
    assert inside.abs().sum() == 0 and prompter.prompt()[..., :30, :].abs().sum() > 0


def test_visual_prompt_on_a_convnet_uses_a_root_hook(tmp_path) -> None:
    def convnet() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model("convnext_atto", pretrained=False, num_classes=NUM_CLASSES).eval()

    base, model = convnet(), vpeft.adapt(convnet(), "visual-prompt", img_size=32)
    assert not torch.allclose(model(X), base(X))
    loss = model(X).sum()
    loss.backward()
    assert model.visual_prompt.top.grad is not None
    vpeft.save(model, tmp_path)
    torch.testing.assert_close(vpeft.load(convnet(), tmp_path)(X), model(X))
    torch.testing.assert_close(copy.deepcopy(model)(X), model(X))


# -- side methods ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["side-tune", "lst", "vqt"])
def test_memory_saving_methods_never_backprop_through_the_backbone(method: str, kind: str) -> None:
    model = vpeft.adapt(tiny_model(kind), method).train()
    assert vpeft.get_method(method).memory_saving
    view, outputs, grad_mode = vpeft.get_view(model), [], []

    def record(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        outputs.append(out)
        grad_mode.append(torch.is_grad_enabled())

    blocks = [model.get_submodule(p) for p in view.blocks]
    hooks = [(b.base if isinstance(b, FeatureTap) else b).register_forward_hook(record)
             for b in blocks]
    model(X).logsumexp(-1).mean().backward()
    for h in hooks:
        h.remove()
    assert len(outputs) >= view.depth and not any(o.requires_grad for o in outputs[: view.depth])
    if method == "lst":  # the backbone runs under torch.no_grad()
        assert not any(grad_mode)
    state = vpeft.get_state(model)
    for name, p in model.named_parameters():
        method_or_head = name in state.added_keys or name in state.head_keys
        assert (p.grad is not None) == method_or_head, name


def test_lst_gates_start_balanced_and_side_output_starts_at_zero() -> None:
    model = vpeft.adapt(tiny_model(), "lst")
    ladder = model.norm
    assert torch.allclose(torch.sigmoid(ladder.gates / ladder.temperature), torch.tensor(0.5))
    assert ladder.up.weight.abs().sum() == 0 and ladder.downs[0].out_features == 48 // 8


# -- NOAH -----------------------------------------------------------------------------------------
def test_noah_supernet_subnet_equals_the_retrained_architecture() -> None:
    supernet = vpeft.adapt(tiny_model(), "noah", supernet=True)
    with torch.no_grad():
        for p in supernet.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    choice = Choice(adapter=(4, 0), lora=(2, 8), prompt=(0, 5))  # sizes below the maxima and 0
    set_subnet(supernet, choice.adapter, choice.lora, choice.prompt)
    subnet = vpeft.adapt(tiny_model(), "noah", **choice.options())
    canon = {n.replace("base.", ""): p for n, p in supernet.named_parameters()}
    with torch.no_grad():  # weight sharing: the subnet is the leading slice of every tensor
        for n, p in subnet.named_parameters():
            p.copy_(canon[n.replace("base.", "")][tuple(slice(0, s) for s in p.shape)])
    torch.testing.assert_close(subnet(X), supernet(X))
    assert vpeft.summary(subnet).trainable_no_head == NOAHSpace(2, 48).params(choice)


# -- GLoRA ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_glora_merge_and_unmerge_are_exact(qkv_bias: bool) -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES,
                              qkv_bias=qkv_bias, **TINY_DIMS).eval()
    with torch.no_grad():  # timm starts biases at zero, where GLoRA leaves D out
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(std=0.1)
    # as the CLI passes it: entries split at spaces, items within an entry at ';'
    per_layer = "A=lora2;B=vector;C=lora3;D=scalar;E=vector A=scalar;B=lora4;C=none;D=none " \
                "A=lora4 A=none;B=none;C=vector;D=vector;E=scalar"
    vpeft.adapt(model, "glora", targets=("qkv", "fc1"), per_layer=per_layer)
    assert hasattr(model.blocks[1].attn.qkv, "D") == qkv_bias  # D only where there is a bias
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "head" not in n:
                p.normal_(std=0.1)
    out = model(X)
    merged = vpeft.merge(model)
    adapted = [m for n, m in merged.named_modules() if n.endswith(("qkv", "fc1"))]
    assert adapted and all(type(m) is nn.Linear for m in adapted)
    torch.testing.assert_close(merged(X), out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vpeft.unmerge(merged)(X), out, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="is not one of"):
        vpeft.adapt(tiny_model(), "glora", B="lora0")


# -- real weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method, options", [
    ("visual-prompt", {}), ("prefix", {"reparam_hidden": 64}), ("vqt", {}), ("side-tune", {}),
    ("lst", {}), ("noah", {"adapter": (8,), "lora": (4,), "prompt": (5,)}), ("glora", {}),
])
def test_training_on_real_deit_lowers_the_loss(method: str, options: dict) -> None:
    """The method's own parameters lower the loss: the head stays frozen, so a method whose
    modules learn nothing cannot pass on the head's progress."""
    torch.manual_seed(0)
    vqt = method == "vqt"  # VQT re-creates the head, so it refuses train_head=False
    model = vpeft.adapt(real_deit(), method, train_head=vqt, **options).train()
    if vqt:
        # its widened head starts with zero weights on the query features, which would leave
        # the queries without gradient under a frozen head: give those columns fixed weights
        with torch.no_grad():
            model.head.base.weight[:, model.embed_dim:].normal_(std=0.02)
        model.head.requires_grad_(False)
    assert not any(p.requires_grad for p in model.get_submodule("head").parameters())
    x, y = torch.randn(2, 3, 224, 224), torch.arange(2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                            weight_decay=0.0)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

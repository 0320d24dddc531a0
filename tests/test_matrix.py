"""The shared method matrix: every registered method x tiny backbones, the same checks for all.

A method joins by adding a row in ``tests/rows/`` (its options and closed-form parameter count).
"""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

import vpeft
from vpeft.core.surgery import NotMergeableError, Wrapper

from conftest import IMG, NUM_CLASSES, TINY, tiny_model
from rows import Dims, Row, all_rows

ROWS = all_rows()
CASES = [pytest.param(r, b, id=f"{r.id}-{b}") for r in ROWS for b in r.backbones]


def _out_width(layer: torch.nn.Module) -> int:
    return getattr(layer, "out_features", None) or layer.out_channels


def _first_layer(mlp: torch.nn.Module) -> torch.nn.Module:
    """The MLP's first Linear or conv (fc1, open_clip's c_fc): its width is the hidden one."""
    return next(m for m in mlp.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


@functools.cache
def dims(kind: str) -> Dims:
    """The closed-form formulas' dimensions of tiny ``kind``, read from its view."""
    model = tiny_model(kind)
    view = vpeft.get_view(model)
    blocks = [model.get_submodule(b) for b in view.blocks]
    hiddens = tuple(_out_width(_first_layer(b.get_submodule(view.mlp))) if view.mlp else 0
                    for b in blocks)
    attn = blocks[0].get_submodule(view.attn) if view.attn and blocks else None
    patch_embed = getattr(model, "patch_embed", None)
    return Dims(
        D=view.embed_dim or view.block_dims[0],
        L=view.depth,
        H=hiddens[0] if hiddens else 0,
        heads=getattr(attn, "num_heads", 0),
        prefix=view.num_prefix_tokens,
        patches=getattr(patch_embed, "num_patches", 0),
        patch=view.patch_size or 0,
        img=IMG,
        family=view.family,
        qkv_bias=TINY[kind][1].get("qkv_bias", True),
        qkv_fused=view.qkv is not None,
        layer_scale=bool(TINY[kind][1].get("init_values")),
        norm_pre=bool(TINY[kind][1].get("pre_norm")),
        widths=tuple(view.block_dims),
        hiddens=hiddens,
        model=model,
    )


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, IMG, IMG, generator=g)


def adapted(row: Row, kind: str) -> torch.nn.Module:
    return vpeft.adapt(tiny_model(kind), row.method, **row.options)


def train_steps(model: torch.nn.Module, steps: int = 3) -> set[str]:
    """A few AdamW steps on a fixed batch, so every trainable tensor moves off its init.

    Weight decay is off, so a tensor moves only through its gradient. Returns the names of the
    trainable tensors that got a non-zero gradient in at least one step.
    """
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.0)
    x, y = images(8), torch.arange(8) % NUM_CLASSES
    live: set[str] = set()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        live |= {n for n, p in params.items() if p.grad is not None and p.grad.any()}
        opt.step()
    model.eval()
    return live


def _installed(package: str) -> bool:
    try:
        importlib.import_module(package)
    except ImportError:
        return False
    return True


def test_every_method_has_a_row():
    """Rows of methods that need an optional package exist only where it is installed."""
    covered = {r.method for r in ROWS}
    missing = [
        m.name
        for m in vpeft.list_methods()
        if m.name not in covered
        and all(_installed(p) for p in getattr(vpeft.get_method(m.name), "requires", ()))
    ]
    assert not missing, f"methods without a row in tests/rows/: {missing}"


@pytest.mark.parametrize("row,kind", CASES)
def test_forward_shape_and_zero_init(row: Row, kind: str):
    base = tiny_model(kind)
    model = adapted(row, kind).eval()
    x = images()
    with torch.no_grad():
        out, ref = model(x), base(x)
    assert out.shape == (4, NUM_CLASSES)
    assert torch.isfinite(out).all()
    zero_init = (
        row.zero_init if row.zero_init is not None else vpeft.get_state(model).method.zero_init
    )
    if zero_init:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@functools.cache
def unreachable(kind: str) -> frozenset[str]:
    """Parameters of the plain model that no classification forward uses (DINOv2's
    ``mask_token``, for masked-image pre-training): even ``full`` cannot train them."""
    model = tiny_model(kind).train().requires_grad_(True)
    model(images(2)).sum().backward()
    return frozenset(n for n, p in model.named_parameters() if p.grad is None)


@pytest.mark.parametrize("row,kind", CASES)
def test_only_method_params_and_head_train(row: Row, kind: str):
    model = adapted(row, kind)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    loss = torch.nn.functional.cross_entropy(model(images(8)), torch.arange(8) % NUM_CLASSES)
    loss.backward()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert p.grad is None, f"frozen parameter {n} got a gradient"
    model.zero_grad()
    live = train_steps(model)
    dead = sorted(trainable - live - unreachable(kind))
    assert not dead, f"trainable tensors that never got a gradient: {dead}"
    after = model.state_dict()
    params = dict(model.named_parameters())
    for k, v in after.items():
        if k in trainable and k not in unreachable(kind):
            assert not torch.equal(v, before[k]), f"trainable {k} did not change"
        elif k in params or v.is_floating_point():
            assert torch.equal(v, before[k]), f"frozen {k} changed"
    head = vpeft.get_state(model).head_keys
    assert trainable & head, "the head must train by default"


@pytest.mark.parametrize("row,kind", CASES)
def test_parameter_count_matches_closed_form(row: Row, kind: str):
    model = adapted(row, kind)
    s = vpeft.summary(model)
    assert s.trainable_no_head == row.count(dims(kind))
    head = sum(
        p.numel()
        for n, p in model.named_parameters()
        if n in vpeft.get_state(model).head_keys and p.requires_grad
    )
    assert s.trainable == s.trainable_no_head + head


@pytest.mark.parametrize("row,kind", CASES)
def test_save_load_round_trip(row: Row, kind: str, tmp_path):
    model = adapted(row, kind)
    train_steps(model, steps=1)
    vpeft.save(model, tmp_path / "adapter")
    restored = vpeft.load(tiny_model(kind), tmp_path / "adapter").eval()
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), restored(x))
    saved = vpeft.read_config(tmp_path / "adapter")
    assert saved["method"] == row.method


@pytest.mark.parametrize("row,kind", CASES)
def test_merge_and_characteristics(row: Row, kind: str):
    base = tiny_model(kind)
    model = adapted(row, kind)
    method = vpeft.get_state(model).method
    train_steps(model, steps=2)
    x = images()
    with torch.no_grad():
        ref = model(x)
    base_types = [(n, type(m)) for n, m in base.named_modules()]
    if not method.mergeable:
        with pytest.raises(NotMergeableError):
            vpeft.merge(model)
        assert method.inference_overhead, "a method that is not mergeable has inference overhead"
        if not method.structure_preserving:
            assert [(n, type(m)) for n, m in model.named_modules()] != base_types
        return
    merged = vpeft.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x), ref), "merge() must leave the adapted model as it was"
    plain_structure = [(n, type(m)) for n, m in merged.named_modules()] == base_types and (
        merged.state_dict().keys() == base.state_dict().keys()
    )
    assert plain_structure == method.structure_preserving, "structure_preserving claim is wrong"
    if method.structure_preserving:
        plain = tiny_model(kind)
        plain.load_state_dict(merged.state_dict(), strict=True)  # loadable by timm alone
        with torch.no_grad():
            torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)
    restored = vpeft.unmerge(merged)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), ref, rtol=1e-5, atol=1e-5)
    assert [(n, type(m)) for n, m in restored.named_modules()] == [
        (n, type(m)) for n, m in model.named_modules()
    ]


@pytest.mark.parametrize("row,kind", CASES)
def test_new_parameters_follow_the_model(row: Row, kind: str):
    """What a method adds is created in the base's floating dtype and on its device."""
    model = vpeft.adapt(tiny_model(kind).double(), row.method, **row.options).eval()
    wrong = {n: t.dtype for n, t in model.state_dict().items()
             if t.is_floating_point() and t.dtype != torch.float64}
    assert not wrong, f"tensors not in the model's float64: {wrong}"
    with torch.no_grad():
        out = model(images().double())
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    meta = vpeft.adapt(tiny_model(kind).to("meta"), row.method, **row.options)
    off = [n for n, t in meta.state_dict().items() if not t.is_meta]
    assert not off, f"tensors not on the model's meta device: {off}"


def innermost(module: torch.nn.Module) -> torch.nn.Module:
    """The original module under any stack of vpeft wrappers."""
    while isinstance(module, Wrapper):
        module = module.base
    return module


@pytest.mark.parametrize("row,kind", CASES)
def test_memory_saving_claim(row: Row, kind: str):
    """``memory_saving`` <=> no block keeps activations for backward: at every block either the
    block itself (inside any wrapper) computes without autograd, or what its place hands on needs
    no gradient. (A side network may return its trainable stream at the block's place while the
    block runs under ``no_grad``, E3VA; VQT's blocks compute its query tokens with autograd but
    hand on frozen tokens.)
    """
    model = adapted(row, kind)
    view = vpeft.get_view(tiny_model(kind))  # the blocks' paths, read from the plain model
    inner: dict[int, list[bool]] = {i: [] for i in range(view.depth)}  # a block may run twice
    outer: dict[int, list[bool]] = {i: [] for i in range(view.depth)}

    def needs_grad(flags: list[bool]):  # Hugging Face layers return tuples: the first is output
        return lambda m, i, o: flags.append(
            bool((o[0] if isinstance(o, tuple) else o).requires_grad))

    hooks = [h for i, b in enumerate(view.blocks) for h in (
        innermost(model.get_submodule(b)).register_forward_hook(needs_grad(inner[i])),
        model.get_submodule(b).register_forward_hook(needs_grad(outer[i])),
    )]
    model.train()
    model(images(2))
    for h in hooks:
        h.remove()
    assert all(outer.values()), "blocks did not run"
    kept = [any(inner[i]) and any(outer[i]) for i in range(view.depth)]
    assert (not any(kept)) == vpeft.get_state(model).method.memory_saving


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in ROWS if "vit" in r.backbones])
def test_task_on_a_shared_backbone_trains_alone(row: Row):
    """As a task of a MultiTaskModel the method trains without touching the backbone or another
    task, and computes what the standalone adapted model computes with the same tensors."""
    backbone = tiny_model("vit").eval()
    tasks = vpeft.MultiTaskModel(backbone)
    other = tasks.add("other", "lora", rank=2)
    with torch.no_grad():
        other.blocks[0].attn.qkv.lora_B.normal_()
    x = images()
    with torch.no_grad():
        before = backbone(x), other.eval()(x)
    trainable = [n for n, p in other.named_parameters() if p.requires_grad]
    model = tasks.add("task", row.method, **row.options)
    assert [n for n, p in other.named_parameters() if p.requires_grad] == trainable
    assert not any(p.requires_grad for p in backbone.parameters())
    train_steps(model)
    with torch.no_grad():
        torch.testing.assert_close((backbone(x), other(x)), before, rtol=0, atol=0)
        standalone = adapted(row, "vit")
        standalone.load_state_dict(vpeft.adapter_state_dict(model), strict=False)
        torch.testing.assert_close(tasks(x, task="task"), standalone.eval()(x))
    own = tasks.parameter_counts()["task"]
    assert own >= vpeft.summary(model).trainable

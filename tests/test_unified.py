"""NOAH and GLoRA against their official code; the generic search hook; declared requirements."""

from __future__ import annotations

import math
import random

import pytest
import timm
import torch
from torch import nn

import vpeft
from vpeft.bench.runner import available
from vpeft.bench.suites import MethodEntry
from vpeft.engine.evolution import evolution_search
from vpeft.methods.unified.glora import GLoRAConfig, SuperGLoRALinear
from vpeft.methods.unified.glora_search import GLoRASpace
from vpeft.methods.unified.noah import NOAHConfig, QuickGELU
from vpeft.methods.unified.noah_search import Choice, NOAHSpace
from vpeft.registry import list_methods

from conftest import TINY_DIMS, tiny_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def spaces() -> dict[str, object]:
    view = vpeft.get_view(tiny_model())
    return {"noah": NOAHSpace.for_view(view), "glora": GLoRASpace.for_view(view, rank=[2, 4])}


# -- the official defaults --------------------------------------------------------------------
def test_space_defaults_are_the_official_vtab_ones() -> None:
    # experiments/NOAH/supernet/supernet-B_prompt_VTAB.yaml on ViT-B's 12 blocks
    vit12 = timm.create_model("vit_tiny_patch16_224", pretrained=False,
                              **{**TINY_DIMS, "depth": 12})
    noah = NOAHSpace.for_view(vpeft.get_view(vit12))
    assert (noah.adapter, noah.lora, noah.prompt) == ((1, 5, 10),) * 3
    assert noah.depths == (3, 6, 9, 12)
    assert noah.supernet_options() == {"supernet": True, "max_adapter": 10, "max_lora": 10,
                                       "max_prompt": 10}
    cfg = NOAHConfig()  # the plain method: the top of the same space, NOAH's dropout 0.1
    assert (cfg.adapter, cfg.lora, cfg.prompt, cfg.dropout) == ((10,), (10,), (10,), 0.1)
    # GLoRA/evolution.py: --rank 4; A, B: LoRA_4 / vector / constant / none; C: no constant
    glora = GLoRASpace.for_view(vpeft.get_view(vit12))
    assert glora.rank == (GLoRAConfig().max_rank,) == (4,)
    assert glora.choices("A") == glora.choices("B") == ("lora4", "vector", "scalar", "none")
    assert glora.choices("C") == ("lora4", "vector", "none")
    assert glora.choices("D") == glora.choices("E") == ("vector", "scalar", "none")
    assert len(glora.layers) == 12 * 4  # every Linear of the blocks, as set_glora


# -- NOAH's modules as the official supernet ----------------------------------------------------
def test_noah_adapter_is_quickgelu_with_xavier_init_and_changes_the_output() -> None:
    base = tiny_model()
    model = vpeft.adapt(tiny_model(), "noah", adapter=(8,), lora=(0,), prompt=(0,))
    branch = model.blocks[0].mlp.branch
    assert isinstance(branch.act, QuickGELU)
    bound = math.sqrt(6 / (48 + 8))  # Xavier-uniform of an 8 x 48 weight
    assert 0.5 * bound < branch.down.weight.abs().max() <= bound
    assert 0 < branch.down.bias.abs().max() < 1e-4  # N(0, 1e-6)
    assert not torch.allclose(model(X), base(X))  # the official adapter does not start at zero


def block_inputs(model: nn.Module) -> list[int]:
    """Token counts entering each original timm block."""
    seen: list[int] = []
    for b in model.modules():
        if isinstance(b, timm.models.vision_transformer.Block):
            b.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    model(X)
    return seen


@pytest.mark.parametrize("prompt, expected", [
    ((5, 0), [5, 5]),  # block 0's prompts stay in the sequence through block 1
    ((5, 3), [5, 3]),  # block 1 replaces them with its own
    ((0, 3), [0, 3]),
])
def test_noah_prompts_replace_the_previous_ones_and_persist(prompt, expected) -> None:
    tokens = block_inputs(tiny_model())[0]
    model = vpeft.adapt(tiny_model(), "noah", adapter=(0,), lora=(0,), prompt=prompt)
    assert block_inputs(model) == [tokens + n for n in expected]
    assert model.forward_features(X).shape[1] == tokens  # the last block drops them


def test_noah_supernet_with_prompt_carry_equals_the_subnet() -> None:
    supernet = vpeft.adapt(tiny_model(), "noah", supernet=True)
    space = spaces()["noah"]
    choice = Choice(adapter=(1, 0), lora=(5, 10), prompt=(5, 0))
    space.set_subnet(supernet, choice)
    subnet = vpeft.adapt(tiny_model(), "noah", **space.subnet_options(choice))
    canon = {n.replace("base.", ""): p for n, p in supernet.named_parameters()}
    with torch.no_grad():  # weight sharing: the subnet is the leading slice of every tensor
        for n, p in subnet.named_parameters():
            p.copy_(canon[n.replace("base.", "")][tuple(slice(0, s) for s in p.shape)])
    torch.testing.assert_close(subnet(X), supernet(X))
    assert vpeft.summary(subnet).trainable_no_head == space.params(choice)


# -- GLoRA's supernet -------------------------------------------------------------------------
def shared_slice(layer: SuperGLoRALinear, name: str, shape: torch.Size) -> torch.Tensor:
    """The supernet tensor a subnet parameter ``name`` (``A``, ``A_down``, ``E`` ...) reads."""
    t, _, part = name.partition("_")
    if t in ("D", "E"):
        return getattr(layer, t)[: shape[0]] if shape else getattr(layer, t)[0]
    if part:  # lora<r>: the first r columns of down / rows of up
        full = getattr(layer, name)
        return full[tuple(slice(0, s) for s in shape)]
    down = getattr(layer, f"{t}_down")
    return down[:, :1] if shape else down[0, 0]  # vector: first column; scalar: first entry


def test_glora_supernet_subnet_equals_the_retrained_subnet() -> None:
    supernet = vpeft.adapt(tiny_model(), "glora", supernet=True)
    space = spaces()["glora"]
    with torch.no_grad():
        for p in supernet.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    choice = space.sample(random.Random(3))
    assert len({f for layer in choice for f in layer}) > 4  # a mix of forms and ranks
    space.set_subnet(supernet, choice)
    subnet = vpeft.adapt(tiny_model(), "glora", **space.subnet_options(choice))
    layers = dict(supernet.named_modules())
    with torch.no_grad():
        for n, p in subnet.named_parameters():
            if not p.requires_grad or "head" in n:
                continue
            path, _, name = n.rpartition(".")
            p.copy_(shared_slice(layers[path], name, p.shape).reshape(p.shape))
        subnet.head.load_state_dict(supernet.head.state_dict())
    torch.testing.assert_close(subnet(X), supernet(X))
    assert vpeft.summary(subnet).trainable_no_head == space.params(choice)


def test_glora_up_matrices_start_xavier_uniform() -> None:
    model = vpeft.adapt(tiny_model(), "glora")
    up = model.blocks[0].attn.qkv.A_up  # (4, 48)
    bound = math.sqrt(6 / (4 + 48))
    assert 1 / math.sqrt(48) < up.abs().max() <= bound  # above Kaiming(a=sqrt 5)'s 1/sqrt(in)


# -- the generic search ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["noah", "glora"])
def test_evolution_respects_the_budget_for_every_space(method: str) -> None:
    space, seen = spaces()[method], []

    def evaluate(c) -> float:  # prefers big subnets: the budget is what stops it
        seen.append(c)
        return float(space.params(c))

    low, high = space.bounds()
    budget = (low + high) // 3
    result = evolution_search(evaluate, budget, space, epochs=4, population=12, select=4,
                              mutation=6, crossover=6)
    assert len(seen) > 12 and all(space.params(c) <= budget for c in seen)
    assert result.params == space.params(result.choice) <= budget
    assert result.score == max(space.params(c) for c in seen)
    assert len(result.history) == 4 and result.history == sorted(result.history)
    with pytest.raises(ValueError, match="no subnet"):
        evolution_search(evaluate, budget, space, min_params=high + 1, epochs=1, population=4)


def test_space_bounds_are_the_extreme_subnets() -> None:
    noah, glora = spaces()["noah"], spaces()["glora"]
    least, most = Choice((1, 0), (1, 0), (1, 0)), Choice((10, 10), (10, 10), (10, 10))
    assert noah.bounds() == (noah.params(least), noah.params(most))
    none = tuple(("none",) * 5 for _ in glora.layers)
    top = tuple(("lora4", "lora4", "lora4", "vector", "vector") for _ in glora.layers)
    assert glora.bounds() == (glora.params(none), glora.params(top)) and glora.params(none) == 0


def test_methods_declare_what_they_need(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {r.name: r for r in list_methods()}
    assert rows["hf:lora"].requires == ("peft",)
    assert rows["noah"].searchable and rows["glora"].searchable
    assert not rows["lora"].searchable and rows["lora"].requires == ()
    assert rows["hf:lora"].as_dict()["requires"] == ["peft"]
    # the runner asks the method, it does not know hf:lora: any method lacking a package skips
    monkeypatch.setattr(vpeft.get_method("hf:lora"), "requires", ("vpeft_no_such_package",))
    assert not available(MethodEntry("hf-lora"))
    assert available(MethodEntry("bitfit"))
    monkeypatch.setattr(vpeft.get_method("bitfit"), "requires", ("vpeft_no_such_package",))
    assert not available(MethodEntry("bitfit"))

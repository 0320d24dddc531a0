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

    # the method's own tensors (the head only where it trains nothing else: linear probing)
    trained = [n for n, p in adapted.named_parameters()
               if p.requires_grad and n not in state.head_keys]
    _perturb(adapted, trained or [n for n, p in adapted.named_parameters() if p.requires_grad])
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

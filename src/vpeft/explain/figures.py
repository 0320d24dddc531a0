"""PNG figures of the explanations (matplotlib, no display needed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

TITLES = {"rollout": "attention rollout", "grad-rollout": "gradient-weighted rollout",
          "gradcam": "Grad-CAM", "ig": "Integrated Gradients"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def _gray(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 2 else image[..., :3].mean(axis=-1)


def _overlay(ax, image: np.ndarray, heat: np.ndarray, cmap: str, vmin: float, vmax: float,
             title: str, fig) -> None:
    """``heat`` over the image in grey (so the colours are the map's), with a colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    ax.imshow(_gray(image), cmap="gray")
    ax.imshow(heat, cmap=cmap, alpha=0.55, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    bar = fig.colorbar(ScalarMappable(Normalize(vmin, vmax), cmap), ax=ax, fraction=0.046,
                       pad=0.03)
    bar.ax.tick_params(labelsize=7)


def image_figure(path: Path, image: np.ndarray, maps: dict[str, dict[str, np.ndarray]],
                 caption: str) -> None:
    """One row per map kind: the image, the base model's map, the adapted model's map and
    their difference (adapted - base), each map already scaled to [0, 1]."""
    plt = _plt()
    kinds = list(maps)
    fig, axes = plt.subplots(len(kinds), 4, figsize=(13, 3.0 * len(kinds)), squeeze=False)
    for r, (row, kind) in enumerate(zip(axes, kinds)):
        m = maps[kind]
        row[0].imshow(image, cmap="gray" if image.ndim == 2 else None)
        row[0].set_xticks([])
        row[0].set_yticks([])
        row[0].set_ylabel(TITLES.get(kind, kind), fontsize=10)
        first = r == 0
        row[0].set_title("image" if first else "", fontsize=9)
        _overlay(row[1], image, m["base"], "jet", 0, 1, "base (head only)" if first else "", fig)
        _overlay(row[2], image, m["adapted"], "jet", 0, 1, "adapted" if first else "", fig)
        _overlay(row[3], image, m["diff"], "RdBu_r", -1, 1,
                 "adapted - base (red: more)" if first else "", fig)
    fig.suptitle(caption, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def prompt_figure(path: Path, image: np.ndarray, maps: np.ndarray, caption: str,
                  limit: int = 8) -> None:
    """Which patches attend to each added token the most: one overlay per token (the first
    ``limit``, four a row), each already scaled to [0, 1]."""
    plt = _plt()
    n = min(limit, len(maps))
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows), squeeze=False)
    for j, ax in enumerate(axes.flat):
        if j < n:
            _overlay(ax, image, maps[j], "jet", 0, 1, f"prompt token {j}", fig)
        else:
            ax.axis("off")
    fig.suptitle(caption, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _relative(module: str, block: str) -> str:
    return module[len(block) + 1:] or "(block)" if module.startswith(block) else module


def attribution_figures(out: Path, summary: dict[str, Any], blocks: list[str],
                        method: str) -> list[str]:
    """A bar chart of every per-block quantity that applies, and a heat map (module x block)
    of the per-module ones. Returns the files written."""
    plt = _plt()
    depth = len(blocks)
    per_block: dict[str, np.ndarray] = {}
    heat: dict[str, tuple[list[str], np.ndarray]] = {}
    labels = {"update": "||dW|| / ||W||", "added_output": "added output / residual",
              "prompt_mass": "attention mass on prompt/prefix tokens",
              "ablation": "loss change when off"}
    for key in ("update", "added_output"):
        values = summary.get(key)
        if not isinstance(values, dict):
            continue
        rows: dict[str, np.ndarray] = {}
        totals = np.zeros(depth)
        for module, v in values.items():
            i = next((k for k, b in enumerate(blocks)
                      if module == b or module.startswith(b + ".")), None)
            if i is None:
                continue
            rel = re.sub(r"\s+", " ", _relative(module, blocks[i]))
            rows.setdefault(rel, np.full(depth, np.nan))[i] = v
            totals[i] = np.hypot(totals[i], v) if key == "update" else totals[i] + v
        if rows:
            per_block[key] = totals
            heat[key] = (list(rows), np.stack(list(rows.values())))
    mass = summary.get("prompt_mass")
    if isinstance(mass, list):
        per_block["prompt_mass"] = np.array([np.nan if v is None else v for v in mass])
    abl = summary.get("ablation")
    if isinstance(abl, dict) and abl.get("blocks"):
        vals = np.full(depth, np.nan)
        for i, r in abl["blocks"].items():
            vals[int(i)] = r["delta_loss"]
        per_block["ablation"] = vals
    written = []
    if per_block:
        fig, axes = plt.subplots(1, len(per_block), figsize=(4.2 * len(per_block), 3.4),
                                 squeeze=False)
        for ax, (key, vals) in zip(axes[0], per_block.items()):
            ax.bar(np.arange(depth), np.nan_to_num(vals), color="tab:blue")
            ax.set_xlabel("block", fontsize=9)
            ax.set_title(labels[key], fontsize=9)
            ax.tick_params(labelsize=8)
            ax.set_xticks(np.arange(depth))
        fig.suptitle(f"{method}: which blocks' added parameters matter", fontsize=10)
        fig.tight_layout()
        _save(fig, out / "attribution_blocks.png")
        plt.close(fig)
        written.append("attribution_blocks.png")
    if heat:
        fig, axes = plt.subplots(1, len(heat), figsize=(5.5 * len(heat), 1.2 + 0.45 *
                                 max(len(r) for r, _ in heat.values())), squeeze=False)
        for ax, (key, (rows, grid)) in zip(axes[0], heat.items()):
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(rows)), rows, fontsize=8)
            ax.set_xticks(range(depth))
            ax.tick_params(axis="x", labelsize=8)
            ax.set_xlabel("block", fontsize=9)
            ax.set_title(labels[key], fontsize=9)
            fig.colorbar(im, ax=ax).ax.tick_params(labelsize=7)
        fig.suptitle(f"{method}: per module and block", fontsize=10)
        fig.tight_layout()
        _save(fig, out / "attribution_heatmap.png")
        plt.close(fig)
        written.append("attribution_heatmap.png")
    return written

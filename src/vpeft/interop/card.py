"""Model cards: the ``README.md`` beside every saved adapter.

It says what the adapter is (base model, method and options, trainable parameters), how it did
(data and metrics from the run's ``results.json``, when the folder is a run) and the command that
made it. :func:`write_card` is called by ``vpeft.save`` and again when a run writes its results;
a ``README.md`` the user wrote (without vpeft's marker line) is never replaced.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
MARKER = "<!-- vpeft model card: rewritten by vpeft; remove this line to keep your own text -->"
RESULTS_NAME = "results.json"  # what a run folder holds beside its adapter (engine.rundir)
RUN_CONFIG_NAME = "config.yaml"
# results.json fields shown, in this order, when present
_RESULT_FIELDS = ("data", "task", "train_split", "split", "top1", "miou", "pixel_accuracy",
                  "eval_loss", "eval_images", "epochs",
                  "batch_size", "lr", "seed", "img_size", "trainable_params",
                  "trainable_params_no_head", "total_params", "train_seconds",
                  "images_per_second", "device", "precision")


def current_command() -> str:
    """This process's command line, with vpeft's entry points shown as ``vpeft``."""
    argv = list(sys.argv) or ["python"]
    name = Path(argv[0]).name
    argv[0] = "vpeft" if name in ("vpeft", "cli.py", "__main__.py") else name
    return shlex.join(argv)


def _previous_command(path: Path) -> str | None:
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "## Command" and i + 3 < len(lines):
            return lines[i + 3].strip() or None
    return None


def render_card(meta: dict[str, Any], results: dict[str, Any] | None, command: str | None,
                note: str = "", reproduce: str = "") -> str:
    """The card's Markdown for adapter metadata ``meta`` (vpeft's ``adapter_config.json``)."""
    base, config = meta.get("base", {}), meta.get("config", {})
    arch = base.get("architecture", "?")
    lines = [MARKER, "", "---", "library_name: vpeft", "tags: [vpeft, peft, "
             f"{meta.get('method', '?')}, image-classification]", f"base_model: {arch}", "---",
             "", f"# {meta.get('method', '?')} adapter for {arch}", ""]
    if note:
        lines += [note, ""]
    lines += ["## Base model", "",
              f"- architecture: `{arch}` ({base.get('class', '?')})",
              f"- classes: {base.get('num_classes', '?')}",
              f"- layer shapes hash: `{base.get('shape_hash', '?')}`", "",
              "## Method", "", f"- method: `{meta.get('method', '?')}`",
              f"- options: `{json.dumps(config, sort_keys=True)}`",
              f"- trainable parameters saved (with the head): {meta.get('params', '?'):,}"
              if isinstance(meta.get("params"), int) else "- trainable parameters: ?", ""]
    if results:
        lines += ["## Data and metrics", "", "| field | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(results[k])} |" for k in _RESULT_FIELDS if k in results]
        lines.append("")
    lines += ["## Command", "", "```", command or "(not recorded)", "```", ""]
    if reproduce:
        lines += [f"Reproduce it from this folder's resolved config: `{reproduce}`", ""]
    lines += ["## Use", "", "```python", "import timm, vpeft",
              f"model = timm.create_model({arch!r}, pretrained=True, "
              f"num_classes={base.get('num_classes')})",
              "model = vpeft.load(model, 'THIS_FOLDER')", "```", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_card(directory: str | Path, command: str | None = None, note: str = "",
               meta: dict[str, Any] | None = None) -> Path | None:
    """Write (or refresh) ``directory/README.md`` for the vpeft adapter saved there.

    ``command`` defaults to the one already on the card, else this process's. Returns the path,
    or ``None`` when the folder holds a README.md of the user's own (left as it is).
    """
    from vpeft.core.checkpoint import atomic_write_text, read_config

    folder = Path(directory)
    path = folder / CARD_NAME
    if path.is_file() and MARKER not in path.read_text(errors="replace"):
        return None
    meta = meta if meta is not None else read_config(folder)
    results_path = folder / RESULTS_NAME
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    command = command or _previous_command(path) or current_command()
    run_config = folder / RUN_CONFIG_NAME
    reproduce = f"vpeft train --config {RUN_CONFIG_NAME}" if run_config.is_file() else ""
    atomic_write_text(path, render_card(meta, results, command, note, reproduce))
    return path

"""Hugging Face PEFT's adapter folders: export vpeft LoRA / DoRA to them, load them into vpeft.

PEFT's layout is ``adapter_model.safetensors`` + ``adapter_config.json`` (``peft_type``,
``target_modules``, ``r``, ``lora_alpha``, ``modules_to_save`` ...). Export writes it through PEFT
itself (``get_peft_model`` on a plain copy of the base, the tensors copied in, ``save_pretrained``),
so ``PeftModel.from_pretrained(timm.create_model(...), DIR)`` computes what the vpeft model does.

What the export can express is decided by the adapted modules, not by the method's name: every
module vpeft added must be a LoRA pair on a Linear (:class:`~vpeft.methods.partial.lora.LoRALinear`,
with DoRA's magnitude: ``DoRALinear``) or on a plain Conv2d (``LowRankConv``, ``DoRAConv``), and
nothing else may be trained but the head. vpeft's per-part form on a fused ``qkv`` (``qkv='qv'``:
one ``A``, ``B`` pair for q and one for v) is exact in PEFT's terms as one LoRA of rank ``P r``:
``A`` the stacked ``A``s, ``B`` block-diagonal (part ``i``'s ``B`` on its output rows and on
``A``'s rows ``i r .. (i+1) r``, zeros elsewhere, so the k rows get no update), with
``rank_pattern`` / ``alpha_pattern`` keeping ``alpha / r`` where layers differ. DoRA's magnitude
rows outside the parts are the base rows' norms, so their ratio is 1 as in vpeft.

Loading goes the other way for any PEFT tuner that ``hf:<tuner>`` knows: the PEFT config becomes
that method's options, the tuner is injected by PEFT, and the saved tensors are copied in.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from vpeft.backbones.base import get_view
from vpeft.core.checkpoint import CheckpointError
from vpeft.core.conv import LowRankConv
from vpeft.core.state import STATE_ATTR, adapt, adapter_state_dict, get_state, trainable_keys
from vpeft.core.surgery import replace_module, wrappers
from vpeft.interop.card import write_card
from vpeft.methods.partial.dora import DoRAConv, DoRALinear
from vpeft.methods.partial.lora import LoRALinear

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
ADAPTER = "default"  # PEFT's adapter name; saved files leave it out of the tensor names
_PEFT_PREFIX = "base_model.model."
_EXPRESSIBLE = (LoRALinear, DoRALinear, LowRankConv, DoRAConv)
_OWN_TENSORS = ("lora_A", "lora_B", "magnitude")


class NotExpressibleError(ValueError):
    """The adapter has parts that PEFT's LoRA cannot express."""


def is_peft_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a Hugging Face PEFT adapter (its config has a ``peft_type``)."""
    path = Path(directory) / PEFT_CONFIG
    if not path.is_file():
        return False
    try:
        return "peft_type" in json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False


# -- export ---------------------------------------------------------------------------------------
def _check_expressible(model: nn.Module) -> list[tuple[str, nn.Module]]:
    state = get_state(model)
    method = state.config.method
    if state.merged is not None:
        raise ValueError("export the adapted model, not the merged one (vpeft.unmerge it first)")
    layers = wrappers(model)
    why = [f"{p} is a {type(w).__name__}" for p, w in layers if type(w) not in _EXPRESSIBLE]
    own = {f"{p}.{t}" for p, _ in layers for t in _OWN_TENSORS}
    extra = sorted((trainable_keys(model) | state.added_keys) - own - state.head_keys)
    why += [f"{k} is trained or added" for k in extra[:3]]
    for p, w in layers:
        base = w.base
        if isinstance(w, LowRankConv) and (type(base) is not nn.Conv2d or base.groups != 1
                                           or base.dilation != (1, 1)):
            why.append(f"{p} is a grouped, dilated or padded-as-same conv")
    if not layers:
        why.append("it adds no LoRA layer")
    if why:
        raise NotExpressibleError(
            f"method '{method}' cannot be exported to PEFT's format: PEFT's LoRA (and DoRA) "
            f"express only LoRA pairs on Linear / plain Conv2d layers plus the head; here "
            + "; ".join(why[:5]))
    return layers


def _rank(w: nn.Module) -> int:
    return w.rank * (len(w.parts) if isinstance(w, LoRALinear) else 1)


def peft_lora_config(model: nn.Module) -> dict[str, Any]:
    """The ``LoraConfig`` options that express the vpeft LoRA / DoRA adapter of ``model``."""
    layers = _check_expressible(model)
    state, view = get_state(model), get_view(model)
    ranks = {p: _rank(w) for p, w in layers}
    alphas = {p: w.scale * ranks[p] for p, w in layers}
    r, alpha = Counter((ranks[p], alphas[p]) for p, _ in layers).most_common(1)[0][0]
    drops = {w.dropout.p if w.dropout is not None else 0.0 for _, w in layers}
    if len(drops) > 1:
        raise NotExpressibleError(f"layers have different dropouts {sorted(drops)}; PEFT's "
                                  "lora_dropout is one value")
    heads = [h for h in view.heads
             if any(k.startswith(h + ".") for k in state.head_keys & trainable_keys(model))]
    return {
        "r": r, "lora_alpha": alpha, "lora_dropout": drops.pop(), "bias": "none",
        "target_modules": [p for p, _ in layers],
        "use_dora": any(isinstance(w, (DoRALinear, DoRAConv)) for _, w in layers),
        "rank_pattern": {re.escape(p): ranks[p] for p, _ in layers if ranks[p] != r},
        "alpha_pattern": {re.escape(p): alphas[p] for p, _ in layers if alphas[p] != alpha},
        "modules_to_save": heads or None,
    }


def _plain_copy(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> nn.Module:
    """A copy of the base model: every vpeft layer replaced by its (unchanged) base layer."""
    plain = copy.deepcopy(model)
    plain.__dict__.pop(STATE_ATTR, None)
    for path, _ in layers:
        replace_module(plain, path, plain.get_submodule(path).base)
    return plain


@torch.no_grad()
def _copy_into_peft(layers: list[tuple[str, nn.Module]], peft_model: nn.Module) -> None:
    inner = peft_model.base_model.model
    for path, w in layers:
        target = inner.get_submodule(path)
        a = target.lora_A[ADAPTER].weight
        b = target.lora_B[ADAPTER].weight
        if isinstance(w, LowRankConv):
            a.copy_(w.lora_A)
            b.copy_(w.lora_B.view(b.shape))
        else:
            a.copy_(w.lora_A)
            b.zero_()
            row, r = 0, w.rank
            for i, (s, e) in enumerate(w.parts):  # block-diagonal: part i's B on its rows
                b[s:e, i * r:(i + 1) * r] = w.lora_B[row:row + e - s]
                row += e - s
        if isinstance(w, (DoRALinear, DoRAConv)):
            mag = target.lora_magnitude_vector[ADAPTER].weight
            flat = mag.view(-1)
            rows = w.rows if isinstance(w, DoRALinear) else slice(None)
            flat[rows] = w.magnitude.to(mag.dtype)  # other rows keep PEFT's ||W|| (ratio 1)


def export_peft(model: nn.Module, out: str | os.PathLike, overwrite: bool = False,
                command: str | None = None) -> Path:
    """Write the vpeft LoRA / DoRA adapter of ``model`` as a Hugging Face PEFT folder ``out``.

    Raises :class:`NotExpressibleError` naming what PEFT cannot express.
    """
    from peft import LoraConfig, get_peft_model

    out = Path(out)
    if (out / PEFT_WEIGHTS).exists() and not overwrite:
        raise FileExistsError(f"{out / PEFT_WEIGHTS} exists; pass overwrite to replace it")
    layers = _check_expressible(model)
    options = peft_lora_config(model)
    state = get_state(model)
    plain = _plain_copy(model, layers)
    plain.name_or_path = state.base["architecture"]  # what PEFT writes as base_model_name_or_path
    config = LoraConfig(**options)
    peft_model = get_peft_model(plain, config)
    _copy_into_peft(layers, peft_model)
    heads = options["modules_to_save"] or []
    with torch.no_grad():
        for h in heads:  # the trained head, in PEFT's copy of it
            peft_model.base_model.model.get_submodule(h).modules_to_save[ADAPTER] \
                .load_state_dict(model.get_submodule(h).state_dict())
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    meta = {"method": state.config.method, "config": state.config.to_dict(), "base": state.base,
            "params": sum(t.numel() for t in adapter_state_dict(model).values())}
    note = ("Exported to Hugging Face PEFT's format (LoRA" + (", DoRA" if options["use_dora"]
            else "") + "). Load it with `peft.PeftModel.from_pretrained(timm.create_model("
            f"{state.base['architecture']!r}, num_classes={state.base['num_classes']}), DIR)` "
            "or with `vpeft.load(model, DIR)`.")
    (out / "README.md").unlink(missing_ok=True)  # PEFT's generic card: replaced by vpeft's
    write_card(out, command=command, note=note, meta=meta)
    return out


# -- import ---------------------------------------------------------------------------------------
def _options(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    from vpeft.registry import get_method

    names = set(get_method(method).config_cls.option_names())
    options = {k: v for k, v in cfg.items() if k in names and k != "train_head"}
    target = options.get("target_modules")
    if isinstance(target, str):  # PEFT: a regex that must match the whole name
        options["target_modules"] = [f"re:^(?:{target})$"]
    options["train_head"] = bool(cfg.get("modules_to_save"))
    return options


def load_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a Hugging Face PEFT adapter folder into the plain base ``model`` as ``hf:<tuner>``.

    Gives the outputs of ``PeftModel.from_pretrained(model, directory)``; the model is then an
    ordinary vpeft adapted model (save, merge, eval). :class:`CheckpointError` when the folder,
    its tuner or its tensors do not fit.
    """
    folder = Path(directory)
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    if get_state(model, required=False) is not None:
        raise CheckpointError(f"load the PEFT adapter at {folder} into a plain base model; this "
                              "one is already adapted")
    method = f"hf:{str(cfg['peft_type']).lower().replace('_', '-')}"
    heads = get_view(model).heads
    others = [m for m in cfg.get("modules_to_save") or [] if m not in heads]
    if others:
        raise CheckpointError(f"PEFT adapter at {folder} saves modules {others}; vpeft trains "
                              f"only the head ({heads}) beside an adapter")
    try:
        tensors = load_file(str(folder / PEFT_WEIGHTS))
        adapt(model, method, **_options(cfg, method))
    except (KeyError, TypeError, ValueError, OSError) as e:
        raise CheckpointError(f"cannot load the PEFT adapter at {folder}: {e}") from None
    names = _peft_names(model)
    unknown = sorted(k for k in tensors if _local(k) not in names)
    if unknown:
        raise CheckpointError(f"PEFT adapter at {folder} has tensors this model lacks: "
                              f"{unknown[:5]}")
    current = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in tensors.items():
            dest = current[names[_local(k)]]
            if dest.numel() != v.numel():
                raise CheckpointError(f"tensor {k} in {folder} has shape {tuple(v.shape)}, the "
                                      f"model's has {tuple(dest.shape)}")
            dest.copy_(v.view(dest.shape))
    return model


def _local(key: str) -> str:
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def _peft_names(model: nn.Module) -> dict[str, str]:
    """PEFT's saved name (adapter name left out; magnitudes also without ``.weight``) of every
    tensor vpeft would save -> its name in ``model``."""
    names: dict[str, str] = {}
    for k in adapter_state_dict(model):
        saved = k.replace(f".{ADAPTER}.", ".").removesuffix(f".{ADAPTER}")
        names[saved] = k
        names.setdefault(saved.removesuffix(".weight"), k)
    return names


def load_peft_run(directory: str | os.PathLike, data: str | None, weights: str | None):
    """What ``vpeft eval --run`` needs from a PEFT adapter folder: the timm model it names
    (``base_model_name_or_path``, with ``weights`` as its pretrained file) with the adapter
    loaded, and a config for evaluating it on ``data``. Returns ``(model, config, None)``."""
    from vpeft.engine.config import TrainConfig
    from vpeft.engine.model import build_backbone

    folder = Path(directory)
    cfg = json.loads((folder / PEFT_CONFIG).read_text())
    arch = str(cfg.get("base_model_name_or_path") or "").removeprefix("timm/")
    if not arch:
        raise CheckpointError(f"the PEFT adapter at {folder} names no base model "
                              "(base_model_name_or_path); load it with vpeft.load instead")
    if data is None:
        raise ValueError(f"{folder} is a PEFT adapter folder, which names no data: pass --data")
    tensors = load_file(str(folder / PEFT_WEIGHTS))
    heads = [v for k, v in tensors.items() if k.endswith(".weight")
             and _local(k).removesuffix(".weight") in (cfg.get("modules_to_save") or [])]
    num_classes = heads[0].shape[0] if heads else 1000  # timm's ImageNet head
    method = f"hf:{str(cfg['peft_type']).lower().replace('_', '-')}"
    config = TrainConfig(model=arch, data=str(data), method=method, out=str(folder),
                         weights=weights)
    model = build_backbone(arch, num_classes, weights, True, None, {})
    load_peft(model, folder)
    return model, config, None


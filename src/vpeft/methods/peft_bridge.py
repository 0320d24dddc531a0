"""``hf:<tuner>``: Hugging Face PEFT's tuners (LoRA, LoHa, LoKr, OFT, BOFT, IA3, VeRA,
FourierFT ...) as vpeft methods, on the same timm model, data, engine and benchmarks as vpeft's.

Each tuner is injected through PEFT's own tuner class (``LoraModel(model, config, "default")``,
what ``peft.inject_adapter_in_model`` and ``get_peft_model`` do). ``--method-args`` go to that
tuner's config (``hf:lora`` takes ``r``, ``lora_alpha``, ``use_dora`` ...; an unknown key is
refused with the tuner's keys). ``target_modules`` defaults to what the backbone view says: the
attention and MLP Linears of the blocks on a transformer, the block convs on a CNN; the classifier
head is never a target. Patterns given by the user are vpeft's (glob on the dotted name or its
suffix, ``re:``).

A tuner's characteristics are measured, never claimed: after ``apply`` one injected layer of each
kind is copied, its adapter tensors set to random values, and it is compared with its base before
(zero init) and after PEFT's ``merge`` (mergeable: same outputs; structure preserving: the base's
type and tensors come back). ``vpeft methods`` shows the same measurement on a tiny ViT.

``hf-lora`` (the old name) is ``hf:lora``. Needs ``peft`` (``pip install 'vpeft[bench]'``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import typing
from collections import Counter
from dataclasses import dataclass, fields, make_dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from vpeft.backbones.base import BackboneView, MissingPartError
from vpeft.core.config import MethodConfig
from vpeft.core.method import Method
from vpeft.core.surgery import NotMergeableError, replace_module
from vpeft.core.targeting import find_modules
from vpeft.registry import register_alias, register_family

PREFIX = "hf"
# the tuners that vpeft lists and tests on its tiny backbones (tests/rows/peft_bridge.py); any
# other PEFT tuner is reachable as hf:<name> too
LISTED = ("lora", "loha", "lokr", "oft", "boft", "ia3", "vera", "fourierft", "hra")
# PEFT config fields that vpeft decides: the task, the saved head, where the base comes from
_OWNED = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
          "auto_mapping", "modules_to_save"}
# fields that name modules: vpeft patterns, resolved to full paths before PEFT sees them
_MODULE_FIELDS = ("target_modules", "feedforward_modules", "exclude_modules")
_SIMPLE = (bool, int, float, str)


def peft():
    """The ``peft`` package, or an ``ImportError`` that says how to install it."""
    try:
        import peft as module
    except ImportError as e:
        raise ImportError("Hugging Face PEFT tuners (hf:<tuner>) need the peft package: "
                          "pip install 'vpeft[bench]'") from e
    return module


@functools.cache
def _tuners() -> dict[str, Any]:
    """PEFT's tuners that inject layers into any model: name -> PeftType."""
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return {t.value.lower(): t for t, tuner in PEFT_TYPE_TO_TUNER_MAPPING.items()
            if isinstance(getattr(tuner, "prefix", None), str)
            and not issubclass(PEFT_TYPE_TO_CONFIG_MAPPING[t], PromptLearningConfig)}


def tuner_classes(tuner: str) -> tuple[type, type]:
    """PEFT's (config class, tuner class) of ``tuner`` (``"lora"``)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    t = _tuners()[tuner]
    return PEFT_TYPE_TO_CONFIG_MAPPING[t], PEFT_TYPE_TO_TUNER_MAPPING[t]


def tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The PEFT layers injected in ``model`` (outermost only), by path."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


# -- the config: PEFT's fields, with vpeft's typing and errors --------------------------------
@dataclass
class PeftTunerConfig(MethodConfig):
    """Base of the ``hf:<tuner>`` configs; each adds its PEFT config's fields."""

    tuner: ClassVar[str] = ""

    def peft_options(self) -> dict[str, Any]:
        """The options for PEFT's config (all but vpeft's own ``train_head``)."""
        return {k: v for k, v in self.to_dict().items() if k not in MethodConfig.option_names()}


def _hint(annotation: Any) -> Any:
    """vpeft's coercion hint for a PEFT annotation: simple types and ``X | None`` stay, every
    other (lists, dicts, literals) passes through unchanged for PEFT to check."""
    inner = [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation in _SIMPLE:
        return annotation
    if len(inner) == 1 and inner[0] in _SIMPLE and type(None) in typing.get_args(annotation):
        return inner[0] | None
    return Any


def _config_class(tuner: str) -> type[PeftTunerConfig]:
    """A vpeft config dataclass with the JSON-valued fields of PEFT's config for ``tuner``."""
    peft_cls, _ = tuner_classes(tuner)
    hints = typing.get_type_hints(peft_cls)
    specs: list[tuple[str, Any, Any]] = []
    for f in fields(peft_cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if not f.init or f.name in _OWNED or not _json_value(default):
            continue
        hint = tuple[str, ...] | None if f.name in _MODULE_FIELDS else _hint(hints.get(f.name))
        if f.name == "target_modules":
            default = None  # chosen from the backbone view
        text = (f.metadata or {}).get("help", "")
        text = " ".join(text) if isinstance(text, (tuple, list)) else str(text)
        meta = {"help": " ".join(text.split())[:200]}
        specs.append((f.name, hint, dataclasses.field(
            default_factory=lambda d=default: copy.deepcopy(d), metadata=meta)))
    name = f"HF{peft_cls.__name__}"
    cls = make_dataclass(name, specs, bases=(PeftTunerConfig,), namespace={"tuner": tuner})
    cls.__module__ = __name__
    return cls


def _json_value(value: Any) -> bool:
    if value is None or isinstance(value, _SIMPLE):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_value(v) for k, v in value.items())
    return False


class _MissingPeftConfig(PeftTunerConfig):
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        peft()  # raises, saying how to install it
        raise AssertionError("unreachable")


# -- the method ---------------------------------------------------------------------------------
class PeftTuner(Method):
    """Base of the ``hf:<tuner>`` methods; :func:`tuner_method` makes one per PEFT tuner."""

    family = "reference"
    subfamily = "hugging face peft"
    requires = ("peft",)
    tuner: ClassVar[str] = ""
    _measured: ClassVar[bool] = False

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: PeftTunerConfig = self.config
        options = cfg.peft_options()
        for key in _MODULE_FIELDS:
            if key in options:
                options[key] = self.resolve(model, view, key, options[key])
        peft_cls, tuner_cls = tuner_classes(self.tuner)
        try:
            peft_config = peft_cls(**options)
        except (TypeError, ValueError) as e:
            raise ValueError(f"method '{self.name}': PEFT refused the options: {e}") from None
        try:
            tuner_cls(model, peft_config, adapter_name="default")  # injects in place
        except (TypeError, ValueError, NotImplementedError, RuntimeError) as e:
            # PEFT refuses a layer type or size (VeRA on convs, OFT blocks that do not divide)
            message = " ".join(str(e).split())
            raise MissingPartError(f"PEFT's {self.tuner} needs target layers it supports, with "
                                   f"these options: {message}", part="target_modules") from e
        _save_shared_once(model)
        self.measure(model, view)

    def resolve(self, model: nn.Module, view: BackboneView, key: str,
                patterns: list[str] | None) -> list[str] | None:
        """Full module paths for the ``key`` option (``target_modules`` ...), head excluded."""
        if patterns is not None:
            found = find_modules(model, patterns, (nn.Linear, nn.Conv2d))
            return [p for p in found if not view.in_head(p)]
        if key == "target_modules":
            return self.default_targets(model, view)
        if key == "feedforward_modules":  # IA3: scale the input of each MLP's last Linear
            return [self.default_targets(model, view, within=view.block_part(i, view.mlp))[-1]
                    for i in range(view.depth)] if view.mlp else []
        return None

    @staticmethod
    def default_targets(model: nn.Module, view: BackboneView,
                        within: str | None = None) -> list[str]:
        """Every Linear inside the blocks that reads or writes the block's token width (attention
        and MLP projections, not SwinV2's position-bias MLP), or on a backbone whose blocks hold
        none (a CNN) the block convs; never the head."""
        view.require("blocks", method=PREFIX)
        found = []
        for block, width in zip(view.blocks, view.block_dims or [0] * len(view.blocks)):
            root = within if within and within.startswith(block + ".") else block
            if within and root != within:
                continue
            found += [f"{root}.{n}" for n, m in model.get_submodule(root).named_modules()
                      if isinstance(m, nn.Linear) and width in (m.in_features, m.out_features)]
        if not found and not within:
            found = [c for c in view.convs if model.get_submodule(c).groups == 1]
        return [p for p in found if not view.in_head(p)]

    @torch.no_grad()
    def measure(self, model: nn.Module, view: BackboneView | None = None) -> None:
        """Set zero_init, mergeable, structure_preserving and inference_overhead on this
        instance from one injected layer of each kind, copied, so the model is untouched."""
        if any(p.is_meta for p in model.parameters()):  # no values to compare: the probe's
            type(self).info()  # measures the class on the probe once
            return
        zero, mergeable, plain = True, True, True
        g = torch.Generator().manual_seed(0)
        kinds: dict[tuple, tuple[str, nn.Module]] = {}
        for path, layer in tuner_layers(model):
            base = layer.get_base_layer()
            kinds.setdefault((type(layer), type(base), repr(base)), (path, layer))
        for path, layer in kinds.values():
            layer = copy.deepcopy(layer).float().eval()
            base = copy.deepcopy(layer.get_base_layer())
            x = _probe_input(base, g, view is None or view.sequence_tokens)
            try:
                zero &= torch.allclose(layer(x), base(x), rtol=1e-5, atol=1e-6)
                if isinstance(base, nn.Conv2d):  # the smallest maps of a CNN's last stage
                    layer(torch.randn(1, base.in_channels, 2, 2, generator=g))
            except RuntimeError as e:
                raise MissingPartError(f"PEFT's {self.tuner} needs target layers it can run; it "
                                       f"fails on {path} ({base}): {e}", part=path) from e
            for p in layer.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
            ref = layer(x)
            try:
                layer.merge()
            except (NotImplementedError, ValueError, RuntimeError):
                mergeable = False
                continue
            folded = layer.get_base_layer()
            mergeable &= torch.allclose(folded(x), ref, rtol=1e-4, atol=1e-5)
            plain &= type(folded) is type(base) and folded.state_dict().keys() == \
                base.state_dict().keys()
        self.zero_init = zero
        self.mergeable = mergeable
        self.structure_preserving = mergeable and plain
        self.inference_overhead = not mergeable

    @classmethod
    def info(cls):
        if not cls._measured and not cls.missing_requirements():
            cls._measured = True
            cls._measure_on_probe()
        return super().info()

    @classmethod
    def _measure_on_probe(cls) -> None:
        """The class's characteristics (for ``vpeft methods``): measured with the default
        options on a tiny random ViT; a tuner that needs options there keeps the defaults."""
        import timm

        from vpeft.core.state import adapt, get_state

        probe = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=2,
                                  img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)
        try:
            measured = get_state(adapt(probe, cls.name)).method
        except (ValueError, TypeError, RuntimeError, NotImplementedError):
            return
        for k in ("zero_init", "mergeable", "structure_preserving", "inference_overhead"):
            setattr(cls, k, getattr(measured, k))

    @torch.no_grad()
    def merge(self, model: nn.Module) -> dict[str, nn.Module]:
        if not self.mergeable:
            raise NotMergeableError(f"method '{self.name}' is not mergeable: PEFT's merge of it "
                                    "does not give the adapted model's outputs")
        removed = {}
        for path, layer in tuner_layers(model):
            layer.merge()
            replace_module(model, path, layer.get_base_layer())
            removed[path] = layer
        return removed

    @torch.no_grad()
    def unmerge(self, model: nn.Module, removed: dict[str, nn.Module]) -> None:
        for path, layer in removed.items():
            replace_module(model, path, layer)
            layer.unmerge()


def _save_shared_once(model: nn.Module) -> None:
    """Buffers of a module that several layers share (VeRA's frozen random projections) are not
    saved: PEFT builds them again from the config (its seed) on apply, and a checkpoint would
    otherwise hold them once per layer. The save/load round trip test checks they come back."""
    counts = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for m in model.modules():
        if counts[id(m)] > 1:
            m._non_persistent_buffers_set.update(m._buffers)


def _probe_input(base: nn.Module, g: torch.Generator, tokens: bool) -> torch.Tensor:
    """Random input of ``base``'s kind: maps for a conv; for a Linear, token sequences (B, N, C)
    or, on a backbone whose blocks run on maps, channels-last maps (B, H, W, C)."""
    if isinstance(base, nn.Conv2d):
        side = 2 * max(base.kernel_size) + 3
        return torch.randn(2, base.in_channels, side, side, generator=g)
    shape = (2, 3) if tokens else (2, 2, 2)
    return torch.randn(*shape, base.in_features, generator=g)


def tuner_method(tuner: str) -> type[PeftTuner]:
    """The ``hf:<tuner>`` method class (``tuner`` as in ``hf:lora``, ``hf:ln-tuning``)."""
    peft_name = tuner.replace("-", "_")
    try:
        known = _tuners()
    except ImportError:  # without peft: a method that says what it needs when configured
        config_cls: type[PeftTunerConfig] = type(f"HF{peft_name}Config", (_MissingPeftConfig,), {})
    else:
        if peft_name not in known:
            raise KeyError(f"unknown method '{PREFIX}:{tuner}': PEFT's tuners are "
                           + ", ".join(f"{PREFIX}:{t.replace('_', '-')}" for t in sorted(known)))
        config_cls = _config_class(peft_name)
    name = f"{PREFIX}:{tuner}"
    doc = f"{name}: Hugging Face PEFT's {peft_name} tuner on the same model."
    return type(f"HF{peft_name.title().replace('_', '')}", (PeftTuner,),
                {"name": name, "tuner": peft_name, "config_cls": config_cls, "__doc__": doc,
                 "__module__": __name__})


register_family(PREFIX, tuner_method, lambda: list(LISTED))
register_alias("hf-lora", f"{PREFIX}:lora")

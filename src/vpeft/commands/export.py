"""Export a trained run's adapter to another library's format.

Examples:
  vpeft export runs/cifar10-lora --format peft --out exported/cifar10-lora
  vpeft export runs/cifar10-dora --format peft --out exported/dora \\
               --weights /elsewhere/deit_tiny_patch16_224.fb_in1k.safetensors

``--format peft`` writes Hugging Face PEFT's layout (adapter_model.safetensors, adapter_config.json,
a model card README.md) for LoRA and DoRA adapters, including vpeft's q/v form on a fused qkv;
``peft.PeftModel.from_pretrained(timm.create_model(...), OUT)`` then computes what the run's model
computes. Other methods are refused with the reason.
"""

from __future__ import annotations

import argparse

HELP = "export a run's adapter (Hugging Face PEFT format)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run folder made by vpeft train")
    p.add_argument("--format", choices=["peft"], default="peft", help="target format")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write")
    p.add_argument("--weights", metavar="FILE",
                   help="backbone weights file (default: the run's), e.g. after moving machines")
    p.add_argument("--overwrite", action="store_true", help="replace an export already in DIR")


def run(args: argparse.Namespace) -> int:
    from vpeft.commands._common import check_weights_file
    from vpeft.engine.evaluate import load_run
    from vpeft.interop.card import current_command
    from vpeft.interop.peft_format import export_peft

    check_weights_file(args.weights)
    model, _, _ = load_run(args.run, args.weights)
    out = export_peft(model.eval(), args.out, overwrite=args.overwrite, command=current_command())
    print(f"wrote a PEFT adapter to {out}")
    return 0

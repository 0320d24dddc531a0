"""Serve task adapters of one backbone over HTTP (FastAPI + uvicorn).

Examples:
  vpeft serve --adapter cifar10=runs/cifar10-lora --adapter mnist=runs/mnist-lora
  vpeft serve --backbone deit_tiny_patch16_224 --weights deit_tiny.safetensors \\
              --adapter cifar10=runs/cifar10-lora --host 0.0.0.0 --port 8000

  curl -F file=@cat.png 'http://127.0.0.1:8000/predict/cifar10?top_k=3'
  curl http://127.0.0.1:8000/tasks       # tasks, methods, parameter counts
  curl http://127.0.0.1:8000/health

The backbone (model, weights, image size) is the first run's unless --backbone/--weights say
otherwise; every adapter must have been trained on it. Requests that arrive within --max-wait-ms
of each other run as one batch, across tasks. Needs the serve extra: pip install "vpeft[serve]".
"""

from __future__ import annotations

import argparse

from vpeft.commands._common import at_least, check_weights_file

HELP = "serve task adapters of one backbone over HTTP (POST /predict/<task>)"


def adapter_spec(text: str) -> tuple[str, str]:
    """``NAME=RUN`` -> ``(NAME, RUN)``."""
    name, sep, run = text.partition("=")
    if not sep or not name or not run:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_FOLDER, got {text!r}")
    return name, run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", type=adapter_spec, action="append", required=True,
                   metavar="NAME=RUN", help="a task and its run folder (repeat for more tasks)")
    p.add_argument("--backbone", metavar="NAME", help="timm model (default: the first run's)")
    p.add_argument("--weights", metavar="FILE", help="backbone weights (default: the first run's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    p.add_argument("--port", type=at_least(0), default=8000)
    p.add_argument("--max-batch", type=at_least(1), default=32, metavar="N",
                   help="most requests in one batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                   help="how long the first request of a batch waits for others (default: 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB",
                   help="largest accepted upload (default: 10)")
    p.add_argument("--threads", type=at_least(1), metavar="N", help="torch CPU threads")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is there")


def run(args: argparse.Namespace) -> int:
    import torch

    try:
        import uvicorn

        from vpeft.serve.app import create_app, load_server
    except ImportError as e:
        raise ValueError(f"vpeft serve needs the serve extra (pip install 'vpeft[serve]'): "
                         f"{e}") from None
    adapters = dict(args.adapter)
    if len(adapters) != len(args.adapter):
        raise ValueError("each --adapter NAME must be given once")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise ValueError("--max-wait-ms must be >= 0 and --max-upload-mb > 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_weights_file(args.weights)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    server = load_server(adapters, args.weights, args.backbone, device)
    app = create_app(server, max_upload=int(args.max_upload_mb * 2**20),
                     max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0

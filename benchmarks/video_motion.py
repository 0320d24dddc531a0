"""Do temporal methods use time? Frame-wise baselines vs AIM and ST-Adapter on a motion label.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/video_motion.py --out /tmp/video-motion

1. Generates (once) a motion-labelled task with :func:`vpeft.data.synthetic_video.make_motion_data`
   (``--kind zoom``: a CIFAR-10 image of ``--source`` approaches or recedes; played backwards,
   one class is the other, so frame order alone tells them apart).
2. Trains each ``--methods`` entry on the real DeiT-Tiny through the engine (``vpeft train
   --task video`` with the same options), evaluates it once on ``test``.
3. Evaluates each trained model again with every test clip's frames in a random order.
4. Measures the data loader alone (decode + TSN sampling + transforms, clips/s with 0, 1, 2
   worker processes) against the clips/s a LoRA training step consumes (its run's own figure).

Prints a Markdown table and writes ``summary.json`` to ``--out``. Runs resume: a finished run is
not trained again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vpeft.data import data_config, eval_transform
from vpeft.data.synthetic_video import MotionSpec, make_motion_data
from vpeft.engine import TrainConfig, evaluate, train
from vpeft.engine.evaluate import load_run
from vpeft.engine.runtime import make_accelerator, make_loader
from vpeft.tasks import make_task

SHARED = Path(__file__).resolve().parents[2] / "shared"


def shuffled_top1(run: Path, frames: int, workers: int, seed: int = 0) -> float:
    """Top-1 of the run's model on its test split with every clip's frames shuffled (a random
    order per clip, drawn from ``seed`` and the clip's index)."""
    model, config, classes = load_run(run)
    task = make_task("video", frames=frames, views=config.views)
    ds = task.open(config.data, config.eval_split, classes=classes)
    ds.transform = eval_transform(data_config(model, config.img_size))
    ds.shuffle_seed = seed
    acc = make_accelerator("no", cpu=True)
    loader = acc.prepare(make_loader(ds, config.batch_size, workers))
    return evaluate(task.wrap(model), loader, acc, show_progress=False).top1


def loader_rate(data: Path, frames: int, img_size: int, batch: int, workers: int,
                batches: int = 6) -> float:
    """Clips/s of the training loader alone (decode, TSN sampling, transforms, collation)."""
    import timm

    ds = make_task("video", frames=frames).open(data, "train800val200", train=True)
    probe = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=img_size)
    ds.transform = eval_transform(data_config(probe, img_size))
    loader = make_loader(ds, batch, workers, shuffle_seed=0)
    it = iter(loader)
    next(it)  # start-up (worker processes) not counted
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            x, _ = next(it)
        except StopIteration:
            break
        n += len(x)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--source", type=Path, default=SHARED / "data/vtab1k/cifar10")
    p.add_argument("--weights",
                   default=str(SHARED / "weights/deit_tiny_patch16_224.fb_in1k.safetensors"))
    p.add_argument("--kind", default="zoom")
    p.add_argument("--clips", type=int, nargs=3, default=(200, 40, 160),
                   metavar=("TRAIN800", "VAL200", "TEST"))
    p.add_argument("--size", type=int, default=32, help="frame side of the generated clips")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--methods", nargs="+", default=["linear", "lora", "aim", "st-adapter"])
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--data-only", action="store_true", help="generate the task and stop")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = args.out / "data"
    if not (data / "classes.txt").is_file():
        spec = MotionSpec(kind=args.kind, size=args.size, length=(10, 14), speed=2)
        make_motion_data(data, dict(zip(("train800", "val200", "test"), args.clips)), spec,
                         source=args.source, seed=0)
    if args.data_only:
        return
    rows = []
    for method in args.methods:
        run = args.out / "runs" / method
        r = train(TrainConfig(model="deit_tiny_patch16_224", weights=args.weights,
                              data=str(data), method=method, task="video", frames=args.frames,
                              img_size=args.img_size, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, out=str(run),
                              num_workers=args.workers, resume=True, progress=False))
        rows.append({"method": method, "top1": r["top1"],
                     "shuffled_top1": shuffled_top1(run, args.frames, args.workers),
                     "trainable_params_no_head": r["trainable_params_no_head"],
                     "train_seconds": r["train_seconds"],
                     "clips_per_second": r["images_per_second"]})
        print(json.dumps(rows[-1]), flush=True)
    rates = {w: loader_rate(data, args.frames, args.img_size, args.batch_size, w)
             for w in (0, 1, 2)}
    summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "rows": rows, "loader_clips_per_second": rates}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("| method | trainable (no head) | top-1 % | top-1 %, frames shuffled | train s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable_params_no_head']:,} | {r['top1']:.1f} | "
              f"{r['shuffled_top1']:.1f} | {r['train_seconds']:.0f} |")
    print("loader clips/s by workers:", {w: round(v, 1) for w, v in rates.items()})


if __name__ == "__main__":
    main()

"""A bounded load test of ``vpeft serve`` on the loopback address: requests/s and latency.

    nice -n 10 python benchmarks/serve_load.py --work /tmp/serve-bench --threads 2

Adapters: ``--tasks`` (default 10) run folders on the real DeiT-Tiny (224 px, 10 classes), made by
``vpeft.adapt`` with *random* adapter and head weights (the cost of serving does not depend on the
values), cycling through lora, adapter, ssf, vpt-deep and bitfit. Each is an ordinary run folder
(config.yaml, classes.txt, adapter files), so ``vpeft serve --adapter NAME=RUN`` loads it.

For each server (a separate ``vpeft serve`` process, so that its memory is its own):

* memory: resident set size (VmRSS) of the server process after warm-up requests to every task,
  with 1 adapter and with all ``--tasks`` adapters loaded;
* load: ``C`` concurrent clients (1, 4, 16) each sending one request after another for
  ``--requests`` requests per client, CIFAR-10 test images (32 px PNG, resized by the server to
  224 px); ``one task`` sends every request to the first task, ``mixed`` sends request ``i`` of
  client ``c`` to task ``(c + i) % tasks``. Reported: requests/s over the whole run, p50/p99
  latency of single requests, and the server's mean batch size (from ``GET /health``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

W = Path(__file__).resolve().parents[2] / "shared" / "weights"
WEIGHTS = W / "deit_tiny_patch16_224.fb_in1k.safetensors"
IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "vtab1k" / "cifar10"
METHODS = ["lora", "adapter", "ssf", "vpt-deep", "bitfit"]


def make_runs(work: Path, n: int, weights: Path) -> list[tuple[str, Path]]:
    """``n`` run folders of random adapters on DeiT-Tiny (made once, reused)."""
    import timm
    import torch

    import vpeft
    from vpeft.engine.config import TrainConfig
    from vpeft.engine.rundir import RunDir

    runs = []
    for i in range(n):
        method = METHODS[i % len(METHODS)]
        name, out = f"task{i}", work / f"task{i}-{method}"
        runs.append((name, out))
        if (out / "config.yaml").is_file():
            continue
        torch.manual_seed(i)
        model = timm.create_model("deit_tiny_patch16_224", pretrained=True, num_classes=10,
                                  pretrained_cfg_overlay=dict(file=str(weights)))
        vpeft.adapt(model, method)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.02)
        vpeft.save(model, out)
        folder = RunDir(out)
        folder.write_config(TrainConfig(model="deit_tiny_patch16_224", weights=str(weights),
                                        data=str(IMAGES), method=method, img_size=224, seed=0,
                                        out=str(out)))
        folder.write_classes([f"class{c}" for c in range(10)])
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Server:
    """``vpeft serve`` in a child process on a free loopback port."""

    def __init__(self, runs: list[tuple[str, Path]], threads: int, max_wait_ms: float) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "vpeft.cli", "serve", "--port", str(self.port),
               "--threads", str(threads), "--max-wait-ms", str(max_wait_ms), "--cpu"]
        for name, run in runs:
            cmd += ["--adapter", f"{name}={run}"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode()[-2000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def load(url: str, tasks: list[str], images: list[bytes], clients: int, per_client: int,
               mixed: bool) -> dict:
    latencies: list[float] = []

    async def client(c: int, http: httpx.AsyncClient) -> None:
        for i in range(per_client):
            task = tasks[(c + i) % len(tasks)] if mixed else tasks[0]
            image = images[(c * per_client + i) % len(images)]
            t0 = time.perf_counter()
            r = await http.post(f"{url}/predict/{task}?top_k=1",
                                files={"file": ("x.png", image, "image/png")})
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        before = (await http.get(url + "/health")).json()["batching"]
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        seconds = time.perf_counter() - start
        after = (await http.get(url + "/health")).json()["batching"]
    batches = after["batches"] - before["batches"]
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"clients": clients, "mixed": mixed, "requests": len(latencies),
            "requests_per_s": len(latencies) / seconds, "p50_ms": 1000 * statistics.median(
                latencies), "p99_ms": 1000 * q[98],
            "mean_batch": (after["requests"] - before["requests"]) / max(batches, 1)}


def compute_ratios(runs: list[tuple[str, Path]], images: list[bytes], batch: int,
                   repeats: int) -> dict:
    """In-process model time (no HTTP), interleaved: ``batch`` requests as ``batch`` single-image
    forwards, as one batch of one task, and as one mixed batch over every task (medians, s)."""
    import torch

    from vpeft.serve.app import load_server
    from vpeft.serve.predict import decode_image

    server = load_server(dict(runs))
    names = [n for n, _ in runs]
    items = [(server.transform(decode_image(images[i % len(images)])), 1) for i in range(batch)]
    cases = {"single": lambda: [server.predict([names[0]], [it]) for it in items],
             "one_task_batch": lambda: server.predict([names[0]] * batch, items),
             "mixed_batch": lambda: server.predict(
                 [names[i % len(names)] for i in range(batch)], items)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for k in cases:  # warm-up
        cases[k]()
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {"batch": batch, "threads": torch.get_num_threads(),
            **{k: statistics.median(v) for k, v in times.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="folder for the adapter runs")
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=16, help="requests per client")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--out", type=Path, help="also write the results as JSON")
    p.add_argument("--compute-only", type=int, metavar="BATCH",
                   help="only the in-process model time of BATCH requests (no server)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    runs = make_runs(args.work, args.tasks, args.weights)
    lines = (IMAGES / "test.txt").read_text().splitlines()[:64]
    images = [(IMAGES / line.split()[0]).read_bytes() for line in lines]
    if args.compute_only:
        import torch

        torch.set_num_threads(args.threads)
        r = compute_ratios(runs, images, args.compute_only, args.repeats)
        r["load"] = os.getloadavg()
        print(json.dumps(r))
        return
    names = [n for n, _ in runs]
    results: dict = {"load": [], "rss_mib": {}, "uptime": os.getloadavg()}

    for count in (1, len(runs)):  # memory with 1 and with every adapter
        server = Server(runs[:count], args.threads, args.max_wait_ms)
        try:
            asyncio.run(load(server.url, names[:count], images, count, 2, mixed=True))  # warm-up
            results["rss_mib"][count] = rss_mib(server.proc.pid)
            if count == len(runs):
                for mixed in (False, True):
                    for clients in args.clients:
                        r = asyncio.run(load(server.url, names, images, clients, args.requests,
                                             mixed))
                        results["load"].append(r)
                        print(json.dumps(r), flush=True)
        finally:
            server.stop()
    results["load_after"] = os.getloadavg()
    print("\n| traffic | clients | requests | requests/s | p50 ms | p99 ms | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for r in results["load"]:
        kind = f"mixed ({len(names)} tasks)" if r["mixed"] else "one task"
        print(f"| {kind} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.1f} | "
              f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']:.1f} |")
    print("\n| adapters loaded | server RSS (MiB) |\n|---|---|")
    for count, mib in results["rss_mib"].items():
        print(f"| {count} | {mib:.0f} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

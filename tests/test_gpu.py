"""The GPU benchmark and the CUDA/bf16 paths of the fused LoRA function and the memory probe.

The benchmark script runs here at a tiny size on the CPU (so it cannot rot); the CUDA tests run
where a GPU is present and are skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpeft.commands import profile as profile_cmd

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    profile_cmd.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_gpu_preset_fills_defaults_and_flags_override_it():
    args = profile_cmd.apply_preset(_args("--preset", "gpu"))
    assert (args.model, args.batch_size, args.precision, args.all, args.device) == (
        "vit_base_patch16_224", 64, "bf16", True, "cuda")
    args = profile_cmd.apply_preset(_args("--preset", "gpu", "--batch-size", "8",
                                          "--device", "cpu", "--method", "lora"))
    assert (args.batch_size, args.device, args.all, args.method) == (8, "cpu", False, ["lora"])


def test_gpu_benchmark_script_runs_tiny_on_the_cpu():
    pytest.importorskip("peft", reason="hf-lora needs the peft package")
    env = {**os.environ, "VPEFT_BENCH_TINY": "1", "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    methods = ["lora", "hf-lora", "full"]
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--no-memory",
                          *(a for m in methods for a in ("--method", m))],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert "bf16" in lines[0] and "vit_base_patch16_224" in lines[0]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in lines if line.startswith("| ") and not line.startswith("| method")}
    assert sorted(rows) == sorted(methods)
    for cells in rows.values():
        step_ms, images_s, ratio = (float(cells[i]) for i in (1, 2, 3))
        assert step_ms > 0 and images_s > 0 and ratio > 0


def test_gpu_preset_refuses_a_machine_without_cuda(monkeypatch, capsys):
    from vpeft.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["profile", "--preset", "gpu"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@cuda
@pytest.mark.parametrize("parts_of", ["qv", "all"])
def test_fused_lora_on_cuda_matches_float64_on_the_cpu(parts_of):
    from tests.test_fused import _grads, _lora, _reference

    m = _lora(parts_of, dtype=torch.float32)
    x = torch.randn(4, 9, 12, requires_grad=True)
    want = _grads(m.double(), x.double(), lambda t: _reference(m, t))
    m = m.float().cuda()
    got = _grads(m, x.cuda(), m)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-4)


@cuda
def test_fused_lora_under_cuda_bf16_autocast():
    from tests.test_fused import _grads, _lora

    m = _lora("qv", dtype=torch.float32).cuda()
    x = torch.randn(3, 9, 12, device="cuda")
    want = _grads(m, x, m)
    for p in m.parameters():
        p.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16
    out.float().backward(torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out))
    assert m.lora_A.grad.dtype == m.lora_B.grad.dtype == torch.float32
    torch.testing.assert_close(out.float(), want[0], rtol=0.05, atol=0.1)
    torch.testing.assert_close(m.lora_B.grad, want[2], rtol=0.05, atol=0.5)


@cuda
def test_memory_probe_on_cuda_in_process_and_in_a_subprocess():
    from vpeft.bench.profile import ProfileSpec, peak_memory_mb, profile

    spec = ProfileSpec(model="vit_tiny_patch16_224", img_size=64, batch_size=4, warmup=0,
                       repeats=1, device="cuda", precision="bf16")
    result = profile(spec, [("lora", {}), ("full", {})])
    rows = {r["method"]: r for r in result["methods"]}
    assert all(r["memory_measure"] == "cuda max_memory_allocated" for r in rows.values())
    assert 0 < rows["lora"]["train_memory_mb"] < rows["full"]["train_memory_mb"]
    assert result["floor"]["train_memory_mb"] > 0
    probe = peak_memory_mb(spec, "lora", {})
    assert probe["memory_measure"] == "cuda max_memory_allocated" and probe["train_memory_mb"] > 0

"""Threads and data-loader workers follow the cores this process may use, never more."""

from __future__ import annotations

import pytest
import torch

from vpeft.engine import runtime


@pytest.fixture
def cores(monkeypatch):
    """Pretend the process may use ``n`` cores (affinity) under an optional cgroup quota."""
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)

    def set_cores(n: int, quota: float | None = None) -> None:
        monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(n)))
        monkeypatch.setattr(runtime, "_cgroup_cpu_limit", lambda: quota)

    yield set_cores
    torch.set_num_threads(threads)


def test_available_cores_takes_affinity_and_cgroup_quota(cores):
    cores(16)
    assert runtime.available_cores() == 16
    cores(16, quota=2.5)  # a container limited to 2.5 CPUs on a 16-core host
    assert runtime.available_cores() == 3
    cores(2, quota=8.0)
    assert runtime.available_cores() == 2


def test_cpu_runs_load_in_process_on_few_cores_and_threads_fill_the_rest(cores):
    cores(2)
    assert runtime.default_workers(cpu=True) == 0
    assert runtime.default_workers(cpu=False) == 1
    assert runtime.balance_threads(0) == 2 == torch.get_num_threads()
    assert runtime.balance_threads(1) == 1 == torch.get_num_threads()
    cores(32)
    assert runtime.default_workers(cpu=True) == 4
    assert runtime.balance_threads(4) == 28


def test_make_loader_balances_threads_unless_the_user_fixed_them(cores, monkeypatch):
    cores(3)
    data = torch.utils.data.TensorDataset(torch.arange(4.0))
    runtime.make_loader(data, 2, num_workers=1)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runtime.make_loader(data, 2, num_workers=0)
    assert torch.get_num_threads() == 1  # the user's OMP_NUM_THREADS is kept


def test_cgroup_quota_is_read_from_cpu_max(tmp_path, monkeypatch):
    real = runtime.Path

    def fake(path: str):
        return real(tmp_path / "cpu.max") if path == "/sys/fs/cgroup/cpu.max" else real(
            tmp_path / "absent")

    monkeypatch.setattr(runtime, "Path", fake)
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runtime._cgroup_cpu_limit() == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime._cgroup_cpu_limit() is None

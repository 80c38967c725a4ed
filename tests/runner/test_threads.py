"""CPU threads, one rule for every command (dsquant.devices): the cores this process may use, less the busy
ones; restored after the work."""

from __future__ import annotations

import pytest
import torch

from dsquant import devices


def test_default_threads_counts_the_cores_this_process_may_use_not_the_hosts(monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert devices.usable_cores() == 4 and devices.default_threads() == 4


def test_busy_cores_are_left_alone_and_at_least_one_thread_runs(monkeypatch):
    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (1.3, 0.0, 0.0))
    assert devices.default_threads() == 1
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert devices.default_threads() == 1


def test_cpu_threads_sets_and_restores():
    before = torch.get_num_threads()
    with devices.cpu_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--threads 0: must be at least 1"):
        with devices.cpu_threads(0):
            pass

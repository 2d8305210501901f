"""The worker pools: as many workers as pay off, results in order, workers tied to the build."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from furiosa_build import pool
from furiosa_build.pool import CAPTURE_WORKER, COMPILE_WORKER, PoolRun, plan_workers, run_pool


@pytest.fixture
def machine(monkeypatch):
    """A machine of 2 CPUs with 24 GiB free, whatever this one is."""

    def set_machine(cpus: int = 2, free_bytes: int = 24 * 2**30) -> None:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        monkeypatch.setattr(pool.psutil, "virtual_memory", lambda: SimpleNamespace(available=free_bytes))

    set_machine()
    return set_machine


def test_a_few_short_captures_run_in_the_build_process(machine):
    used, note = plan_workers(4, items=2, unit_seconds=1.0, cost=CAPTURE_WORKER)
    assert used == 1
    assert note == "4 workers asked, 1 used (a worker starts in ~4 s, a unit takes 1.00 s)"


def test_long_captures_use_the_cpus_there_are_and_no_more(machine):
    used, note = plan_workers(8, items=13, unit_seconds=3.0, cost=CAPTURE_WORKER)
    assert used == 2 and note.startswith("8 workers asked, 2 used (2 CPUs; ")
    machine(cpus=8)
    # 7 workers finish 13 units in two rounds, as 8 would
    assert plan_workers(8, items=13, unit_seconds=3.0, cost=CAPTURE_WORKER) == (
        7, "8 workers asked, 7 used (a worker starts in ~4 s, a unit takes 3.00 s)"
    )  # fmt: skip


def test_free_memory_limits_the_workers(machine):
    machine(cpus=16, free_bytes=2 * CAPTURE_WORKER.memory_bytes)
    used, note = plan_workers(8, items=40, unit_seconds=5.0, cost=CAPTURE_WORKER)
    assert used == 2 and "2 free-memory workers" in note


def test_what_was_asked_is_kept_when_it_pays_off(machine):
    assert plan_workers(2, items=95, unit_seconds=0.05, cost=COMPILE_WORKER) == (2, None)


def test_the_pool_yields_every_result_in_order_and_records_what_it_used(machine):
    run = PoolRun()
    assert list(run_pool(abs, [-3, -1, -2], 4, "loky", "t", progress=False, cost=CAPTURE_WORKER, run=run)) == [
        (-3, 3), (-1, 1), (-2, 2)
    ]  # fmt: skip
    assert (run.requested, run.used) == (4, 1) and "4 workers asked, 1 used" in run.note

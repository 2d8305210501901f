"""The joblib worker pools of the pipeline-builder and compile stages."""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import psutil
from joblib import Parallel, delayed
from joblib.parallel import LokyBackend, MultiprocessingBackend, ParallelBackendBase
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from furiosa_build.cluster import Cluster

T = TypeVar("T")
R = TypeVar("R")

# joblib's multiprocessing backend cannot stream results back as they finish.
_NO_GENERATOR = {"multiprocessing"}
_WATCH_SECONDS = 0.5


@dataclass(frozen=True)
class WorkerCost:
    """What one worker process of a stage costs before it does any work."""

    startup_seconds: float  # starting the interpreter and importing what the stage needs
    memory_bytes: int  # its resident size once started


#: Capture workers import torch and transformers; compile workers only the compiler.
CAPTURE_WORKER = WorkerCost(startup_seconds=4.0, memory_bytes=600 * 2**20)
COMPILE_WORKER = WorkerCost(startup_seconds=0.5, memory_bytes=150 * 2**20)
_LOCAL_PROCESSES = ("loky", "multiprocessing")


@dataclass
class PoolRun:
    """How a stage's pool ran: the workers asked for, the workers used, and why fewer."""

    requested: int = 1
    used: int = 1
    note: str | None = None


def plan_workers(requested: int, items: int, unit_seconds: float, cost: WorkerCost) -> tuple[int, str | None]:
    """The number of local worker processes that finishes ``items`` units soonest.

    Capped by the CPUs this process may use and by the memory available for workers; a
    pool pays ``cost.startup_seconds`` before its first result, so with few or short units
    fewer workers (or none: the units then run in the build process) finish sooner.
    Returns the count and, when it is below ``requested``, the reason in words.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    memory = max(1, psutil.virtual_memory().available // cost.memory_bytes)
    cap = max(1, min(requested, items, cpus, memory))

    def finish(n: int) -> float:
        return (cost.startup_seconds if n > 1 else 0.0) + math.ceil(items / n) * unit_seconds

    best = min(range(1, cap + 1), key=lambda n: (finish(n), n))
    if best >= requested:
        return best, None
    limits = {"units": items, "CPUs": cpus, "free-memory workers": memory}
    bound = [f"{v} {k}" for k, v in limits.items() if v < requested]
    why = f"{', '.join(bound)}; " if best == cap and bound else ""
    return best, (f"{requested} workers asked, {best} used ({why}a worker starts in ~{cost.startup_seconds:g} s, "
                  f"a unit takes {unit_seconds:.2f} s)")  # fmt: skip


def run_pool(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    backend: str | Cluster,
    desc: str,
    progress: bool,
    cost: WorkerCost = COMPILE_WORKER,
    run: PoolRun | None = None,
    label: Callable[[T], str] = str,
) -> Iterator[tuple[T, R]]:
    """Apply ``fn`` to every item, yielding (item, result) pairs in order behind a
    progress bar.

    With a local process backend and more than one worker, the first item runs in the
    build process, which times it; the rest go to as many workers as pay off
    (:func:`plan_workers`; ``run`` records the count).  The pool's processes are
    released once the last result is in, and die with the build if it is killed.
    On a :class:`~furiosa_build.cluster.Cluster` every item goes to its workers, and a
    failed one ends the pool with a one-line error naming ``desc`` and ``label(item)``.
    """
    items = list(items)
    run = run if run is not None else PoolRun()
    run.requested = run.used = workers
    if not items:
        return
    bar = tqdm(total=len(items), desc=desc, disable=not progress)
    if not isinstance(backend, str):
        yield from _on_cluster(fn, items, backend, desc, label, run, bar)
        return
    if backend in _LOCAL_PROCESSES and workers > 1 and len(items) > 1:
        start = time.perf_counter()
        yield items[0], fn(items[0])
        bar.update()
        run.used, run.note = plan_workers(workers, len(items) - 1, time.perf_counter() - start, cost)
        items = items[1:]
    n_jobs = min(run.used, len(items))
    streaming = "list" if backend in _NO_GENERATOR else "generator"
    parallel = Parallel(n_jobs=n_jobs, backend=_backend(backend, n_jobs), return_as=streaming)
    results = parallel(delayed(fn)(item) for item in items)
    for item, result in zip(items, results, strict=True):
        yield item, result
        bar.update()
    bar.close()
    if backend == "loky" and n_jobs > 1:
        _release_loky_workers()


def _on_cluster(fn: Callable[[T], R], items: list[T], cluster: Cluster, desc: str, label: Callable[[T], str],
                run: PoolRun, bar: tqdm) -> Iterator[tuple[T, R]]:
    """The items' results from the cluster's workers, in order; ``run`` says where they ran."""
    results = cluster.map(fn, items, desc, label)
    for item, result in zip(items, results, strict=True):
        yield item, result
        bar.update()
    bar.close()
    run.used, run.note = cluster.workers(), f"on {cluster.where()}"


def _backend(name: str, n_jobs: int) -> str | ParallelBackendBase:
    """The joblib backend; local process pools get workers that die with the build."""
    if name not in _LOCAL_PROCESSES or n_jobs == 1:
        return name
    kind = LokyBackend if name == "loky" else MultiprocessingBackend
    return kind(initializer=_exit_with_parent, initargs=(os.getpid(),))


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this process as soon as the build process ``parent`` is
    gone (killed, or ended without shutting its pool down); otherwise idle workers holding
    torch would outlive it by minutes."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="furiosa-parent-watch", daemon=True).start()


def _release_loky_workers() -> None:
    """Shut down loky's reusable workers now instead of after their 300 s idle timeout:
    a capture worker holds torch and transformers (about 350 MB each), which the
    following stages of the build do not need."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(reuse=True).shutdown(wait=True)

"""The joblib worker pools of the pipeline-builder and compile stages."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from joblib import Parallel, delayed
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

# joblib's multiprocessing backend cannot stream results back as they finish.
_NO_GENERATOR = {"multiprocessing"}
_WATCH_SECONDS = 0.5


def run_pool(fn: Callable[[T], R], items: Iterable[T], workers: int, backend: str, desc: str, progress: bool) -> Iterator[tuple[T, R]]:
    """Apply ``fn`` to every item in a pool of at most ``workers`` (never more than items),
    yielding (item, result) pairs in order behind a progress bar; the pool's processes
    are released once the last result is in, and die with the build if it is killed."""
    items = list(items)
    if not items:
        return
    n_jobs = min(workers, len(items))
    streaming = "list" if backend in _NO_GENERATOR else "generator"
    task = _DiesWithParent(fn, os.getpid())
    results = Parallel(n_jobs=n_jobs, backend=backend, return_as=streaming)(delayed(task)(item) for item in items)
    yield from zip(items, tqdm(results, total=len(items), desc=desc, disable=not progress), strict=True)
    if backend == "loky" and n_jobs > 1:
        _release_loky_workers()


@dataclass(frozen=True)
class _DiesWithParent(Generic[T, R]):
    """``fn`` wrapped so that a worker process started by the build exits as soon as the
    build process is gone (killed, or ended without shutting its pool down); otherwise
    idle loky workers holding torch would outlive it by minutes."""

    fn: Callable[[T], R]
    parent: int

    def __call__(self, item: T) -> R:
        if os.getppid() == self.parent and os.getpid() != self.parent:
            _watch_parent(self.parent)
        return self.fn(item)


_watching: int | None = None


def _watch_parent(parent: int) -> None:
    """Start (once per process) a thread that ends this process when ``parent`` is gone."""
    global _watching
    if _watching == os.getpid():
        return
    _watching = os.getpid()

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

"""The joblib worker pools of the pipeline-builder and compile stages."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from joblib import Parallel, delayed
from tqdm.auto import tqdm

T = TypeVar("T")
R = TypeVar("R")

# joblib's multiprocessing backend cannot stream results back as they finish.
_NO_GENERATOR = {"multiprocessing"}


def run_pool(fn: Callable[[T], R], items: Iterable[T], workers: int, backend: str, desc: str, progress: bool) -> Iterator[tuple[T, R]]:
    """Apply ``fn`` to every item in a pool of at most ``workers`` (never more than items),
    yielding (item, result) pairs in order behind a progress bar; the pool's processes
    are released once the last result is in."""
    items = list(items)
    if not items:
        return
    n_jobs = min(workers, len(items))
    streaming = "list" if backend in _NO_GENERATOR else "generator"
    results = Parallel(n_jobs=n_jobs, backend=backend, return_as=streaming)(delayed(fn)(item) for item in items)
    yield from zip(items, tqdm(results, total=len(items), desc=desc, disable=not progress), strict=True)
    if backend == "loky" and n_jobs > 1:
        _release_loky_workers()


def _release_loky_workers() -> None:
    """Shut down loky's reusable workers now instead of after their 300 s idle timeout:
    a capture worker holds torch and transformers (about 350 MB each), which the
    following stages of the build do not need."""
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor(reuse=True).shutdown(wait=True)

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


def run_pool(fn: Callable[[T], R], items: Iterable[T], workers: int, backend: str, desc: str, progress: bool) -> Iterator[R]:
    """Apply ``fn`` to every item in a pool of at most ``workers`` (never more than items),
    yielding results in order behind a progress bar."""
    items = list(items)
    if not items:
        return iter(())
    streaming = "list" if backend in _NO_GENERATOR else "generator"
    parallel = Parallel(n_jobs=min(workers, len(items)), backend=backend, return_as=streaming)
    results = parallel(delayed(fn)(item) for item in items)
    return iter(tqdm(results, total=len(items), desc=desc, disable=not progress))

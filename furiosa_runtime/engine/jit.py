"""JIT compilation of buckets: the engine compiles, while it serves, the prefill buckets its
traffic asks for (furiosa-llm's experimental ``enable_jit_compilation``).

**Demand.**  A new request's prompt of ``n`` tokens names the bucket that would serve it
best: one row of attention ``n`` rounded up to a multiple of ``jit_unit_size``, at most the
longest decode bucket (the longest context the artifact serves).  The request counts for
that bucket when no prefill bucket the engine has or is compiling serves it as cheaply
(``smallest_bucket``'s cost, batch x attention): its prompt is longer than every prefill
bucket, or the smallest that holds it pads more.  The ``jit_threshold``-th request counting
for a bucket starts its compilation; a bucket is compiled at most once per run (one that
failed is not retried; the warning says why).  furiosa-llm describes ``jit_unit_size`` as
"the number of stages compiled together"; here what is compiled per bucket is its
attention size, so the unit is the granularity of JIT buckets' attention sizes (at least
2, as the reference requires).

**Serving while a bucket compiles.**  With JIT on, a prompt longer than every prefill bucket
is admitted even with chunked prefill off (it is the traffic JIT is for): its first
positions are prefilled in the largest prefill bucket and the rest computed one position
per decode step beside the other requests' rows, the path the scheduler already takes for
a context that outgrew the prefill buckets (a preempted long sequence).  It gives the same
tokens, only more slowly, and never waits on a compiler that may fail or take minutes;
requests admitted once the bucket is in are prefilled in it.  Prompts longer than the
longest decode bucket or the KV cache are still refused.

**Workers.**  Buckets compile in separate processes, at most ``jit_max_workers`` at once:
``python -m furiosa_build.jit`` (see there), which rebuilds the bucket with the artifact's
recorded build settings, proves them by reproducing the artifact's own programs, and uses
the compile cache at ``cache_dir`` (the builds' default cache, so what they compiled is
reused).  The runtime never imports furiosa_build or torch; without them installed,
``enable_jit_compilation=True`` is refused in one line, as it is for an embedding
artifact.  The engine polls its workers before every step; a finished bucket is verified
(its entry's digests, and every program against the loaded weights, as at load) and added
to the simulator, runner and scheduler between two steps: nothing stops.

**Recording.**  Workers write each bucket to the artifact's JIT store, the sibling folder
``<artifact>.jit`` (``npu/jit_store.py``), so an engine started later with JIT on serves it
from the start; a recorded entry that is damaged or was compiled for another build of the
artifact is ignored with a warning and compiled again when traffic asks.  When the store
cannot be written (a read-only folder), buckets are compiled into a temporary folder and
serve this run only, which one warning says.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from furiosa_runtime.npu.artifact import Artifact, ArtifactError, Bucket, Pipeline, smallest_bucket
from furiosa_runtime.npu.isa import Program
from furiosa_runtime.npu.jit_store import artifact_digest, read_entry, store_path

logger = logging.getLogger(__name__)

CACHE_DIR = Path.home() / ".cache" / "furiosa" / "llm"  # the builds' default compile cache
DEFAULT_JIT_THRESHOLD = 8
DEFAULT_JIT_MAX_WORKERS = 1
DEFAULT_JIT_UNIT_SIZE = 2
WORKER_MODULE = "furiosa_build.jit"
WORKER_PACKAGES = ("furiosa_build", "torch", "transformers")  # what the worker process imports

#: Called with a verified bucket's pipeline and programs to serve it from the next step on.
AddBucket = Callable[[Pipeline, dict[str, Program]], None]


@dataclass(frozen=True)
class JitConfig:
    """The JIT settings (furiosa-llm's names; validated by ``arg_checks.check_jit``)."""

    threshold: int = DEFAULT_JIT_THRESHOLD
    max_workers: int = DEFAULT_JIT_MAX_WORKERS
    unit_size: int = DEFAULT_JIT_UNIT_SIZE
    cache_dir: Path = CACHE_DIR


def check_jit_applies(artifact: Artifact, path: Path) -> None:
    """Refuse in one line JIT compilation where it cannot apply: an embedding artifact, or a
    Python without the packages the worker process imports."""
    task = artifact.model_metadata.task
    if task != "generate":
        raise ValueError(f"enable_jit_compilation: JIT compiles prefill buckets for the prompts of generate artifacts; "
                         f"{path} is an {task} artifact")  # fmt: skip
    missing = [name for name in WORKER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(f"enable_jit_compilation: the JIT worker ({WORKER_MODULE}) needs {', '.join(missing)}, not "
                         "installed here (pip install 'furiosa-build[build]'); or set enable_jit_compilation=False")  # fmt: skip


class BucketCompiler:
    """Watches the prompts an engine admits and compiles the prefill buckets they ask for
    (see the module docstring); ``add`` serves each verified bucket."""

    def __init__(self, path: Path, artifact: Artifact, config: JitConfig, add: AddBucket) -> None:
        check_jit_applies(artifact, path)
        self.path, self.artifact, self.config, self._add = path, artifact, config, add
        self.digest = artifact_digest(path)
        self.store = store_path(path)
        self.buckets = list(artifact.generator_config.prefill_buckets)  # served, JIT ones included
        self.longest = max(b.attention_size for b in artifact.generator_config.decode_buckets)
        self.demand: Counter[Bucket] = Counter()
        self.failed: set[Bucket] = set()
        self._scratch = tempfile.TemporaryDirectory(prefix="furiosa-jit-")  # worker logs; entries when the store is read-only
        self.out = self._writable_store() or Path(self._scratch.name)
        self.pool = WorkerPool(config.max_workers, self._command, Path(self._scratch.name))
        self._load_recorded()

    # -- demand ---------------------------------------------------------------------------
    def observe(self, prompt_len: int) -> None:
        """Count an admitted prompt for the bucket that would serve it better, if any, and
        start that bucket's compilation at the threshold."""
        bucket = self._wanted(prompt_len)
        if bucket is None:
            return
        self.demand[bucket] += 1
        if self.demand[bucket] == self.config.threshold:
            logger.info("JIT: compiling prefill bucket %dx%d of %s in the background (jit_threshold=%d prompts asked for it)",
                        bucket.batch_size, bucket.attention_size, self.path, self.config.threshold)  # fmt: skip
            self.pool.submit(bucket)

    def _wanted(self, prompt_len: int) -> Bucket | None:
        """The bucket that serves ``prompt_len`` tokens more cheaply than every bucket served
        or compiling (None when there is none, or it failed to compile)."""
        unit = self.config.unit_size
        attention = min(-(-prompt_len // unit) * unit, self.longest)
        wanted = Bucket.prefill(1, attention)
        have = smallest_bucket([*self.buckets, *self.pool.pending], 1, prompt_len)
        if (have is not None and have.batch_size * have.attention_size <= attention) or wanted in self.failed:
            return None
        return wanted

    # -- compiled buckets -----------------------------------------------------------------
    def poll(self) -> None:
        """Serve the buckets whose workers have finished; warn about those that failed."""
        for bucket, error, seconds in self.pool.finished():
            name = bucket.pipeline_name(self.artifact.metadata.name)
            problem = error if error is not None else self._take(self.out / name)
            if problem is not None:
                self.failed.add(bucket)
                logger.warning("JIT: prefill bucket %dx%d of %s not added: %s; its prompts stay on the artifact's buckets",
                               bucket.batch_size, bucket.attention_size, self.path, problem)  # fmt: skip
                continue
            recorded = "recorded in" if self.out == self.store else "for this run only, in"
            logger.info("JIT: prefill bucket %dx%d of %s added after %.1f s of compilation, %s %s",
                        bucket.batch_size, bucket.attention_size, self.path, seconds, recorded, self.out / name)  # fmt: skip

    def _take(self, folder: Path) -> str | None:
        """Verify the entry in ``folder`` and serve its bucket; the problem if it is refused."""
        try:
            pipeline, programs = read_entry(folder, self.artifact, self.digest)
            self._add(pipeline, programs)
        except ArtifactError as err:
            return str(err)
        self.buckets.append(pipeline.bucket)
        return None

    def _load_recorded(self) -> None:
        """Serve the buckets recorded in the store for this artifact; ignore the others."""
        if not self.store.is_dir():
            return
        for folder in sorted(p for p in self.store.iterdir() if not p.name.startswith(".")):  # dot names: scratch
            problem = self._take(folder)
            if problem is not None:
                logger.warning("%s; ignored, compiled again when traffic asks for it", problem)
            else:
                logger.info("JIT: serving the prefill bucket recorded in %s", folder)

    def _writable_store(self) -> Path | None:
        """The store, when new buckets can be recorded there (it, or the folder it would be
        made in, is writable); else None, after one warning."""
        where = self.store if self.store.exists() else self.store.parent
        if os.access(where, os.W_OK):
            return self.store
        logger.warning("JIT: cannot record compiled buckets in %s (%s is not writable); they serve this run only", self.store, where)
        return None

    def _command(self, bucket: Bucket) -> list[str]:
        out = self.out / bucket.pipeline_name(self.artifact.metadata.name)
        return [sys.executable, "-m", WORKER_MODULE, str(self.path), "-pb", f"{bucket.batch_size},{bucket.attention_size}",
                "--out", str(out), "--cache-dir", str(self.config.cache_dir)]  # fmt: skip

    def close(self) -> None:
        """Stop the workers and remove the temporary folder."""
        self.pool.close()
        self._scratch.cleanup()


class WorkerPool:
    """At most ``max_workers`` worker processes at once, one per bucket; later buckets wait
    in order.  ``finished`` never blocks; the processes are killed when the pool is closed or
    garbage-collected, or the interpreter exits."""

    def __init__(self, max_workers: int, command: Callable[[Bucket], list[str]], logs: Path) -> None:
        self.max_workers, self.command, self.logs = max_workers, command, logs
        self.queue: deque[Bucket] = deque()
        self.running: dict[Bucket, tuple[subprocess.Popen[bytes], float]] = {}  # bucket -> (process, start time)
        self._finalizer = weakref.finalize(self, _kill, self.running)

    @property
    def pending(self) -> list[Bucket]:
        """The buckets queued or compiling."""
        return [*self.queue, *self.running]

    def submit(self, bucket: Bucket) -> None:
        self.queue.append(bucket)
        self._start()

    def finished(self) -> list[tuple[Bucket, str | None, float]]:
        """(bucket, error line or None, seconds) of every worker that has exited since."""
        done = []
        for bucket, (process, start) in list(self.running.items()):
            if process.poll() is None:
                continue
            del self.running[bucket]
            error = None if process.returncode == 0 else self._last_line(bucket) or f"worker exited with {process.returncode}"
            done.append((bucket, error, time.monotonic() - start))
        self._start()
        return done

    def close(self) -> None:
        self.queue.clear()
        self._finalizer()

    def _start(self) -> None:
        while self.queue and len(self.running) < self.max_workers:
            bucket = self.queue.popleft()
            with open(self._log(bucket), "wb") as log:
                process = subprocess.Popen(self.command(bucket), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=log, env=_worker_env())  # fmt: skip
            self.running[bucket] = (process, time.monotonic())

    def _log(self, bucket: Bucket) -> Path:
        return self.logs / f"b{bucket.batch_size}-attn{bucket.attention_size}.log"

    def _last_line(self, bucket: Bucket) -> str | None:
        """The worker's last line on stderr (its one-line error)."""
        lines = [line for line in self._log(bucket).read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].removeprefix("error: ") if lines else None


def _worker_env() -> dict[str, str]:
    """The environment of a worker: this one, with the folder furiosa_build was found in
    first on the path, so the worker runs the very build package the check found."""
    spec = importlib.util.find_spec("furiosa_build")
    assert spec is not None and spec.submodule_search_locations, "check_jit_applies found furiosa_build"
    root = str(Path(next(iter(spec.submodule_search_locations))).parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def _kill(running: dict[Bucket, tuple[subprocess.Popen[bytes], float]]) -> None:
    for process, _ in running.values():
        process.kill()
        process.wait()
    running.clear()

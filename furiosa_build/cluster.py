"""Cluster backends of the worker pools: ``build.backend=ray`` and ``build.backend=dask``.

A build with a cluster backend sends its capture and compile units to the workers of a
Ray or Dask cluster: the one at ``build.cluster.address`` (``ray://host:port`` or
``host:port`` for Ray, ``tcp://host:port`` for a Dask scheduler), or a local one that the
build starts with ``build.cluster.num_workers`` worker processes and stops when it ends.
Dask's local cluster listens on 127.0.0.1; Ray's servers take the host's address, guarded
by Ray's auth token, and ``address="local"`` never joins a cluster that ``ray start`` left
running.  The address is probed when the build starts, so an unreachable one fails in one
line within :data:`CONNECT_SECONDS`; the cluster itself is joined (or started) on the
first unit, so a build served wholly from the cache never touches it.

Units go through each framework's own task API (``ray.remote`` tasks, ``Client.submit``)
rather than joblib's ``ray``/``dask`` backends: joblib's Ray backend runs on a pool of
actors, whose tasks are not re-run when an actor's process dies, Dask's ``retries`` re-run
only tasks that raised, never one whose worker died, and neither backend lets a failure
name its unit.  A worker runs :func:`run_unit`, which turns an exception into a one-line
:class:`UnitFailure` value, so a retry always means a lost worker (Ray's ``max_retries``;
for Dask, the unit is submitted again on ``KilledWorker``), never a unit that raised.
Workers need the same furiosa-build installed (the package and the unit, never the
weights: a unit is a bucket and a config, or a graph and compiler options); a worker
whose compiler version differs from the build's refuses the unit, since its program would
be cached under the build's key.
"""

from __future__ import annotations

import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar
from urllib.parse import urlsplit

from furiosa_build.compiler import COMPILER_VERSION
from furiosa_build.config_sections import ClusterOptions
from furiosa_build.errors import ConfigError, UnitError

T = TypeVar("T")
R = TypeVar("R")

CONNECT_SECONDS = 5.0  # the longest a build waits for a cluster address to answer
_LOCAL_HOST = "127.0.0.1"
_NO_FIXED_PORT = {"dashboard_address": ":0"}  # the scheduler's HTTP routes (no dashboard) on any free port, not 8787


@dataclass(frozen=True)
class UnitFailure:
    """What a worker returns instead of a result when its unit raised: the error in one line."""

    line: str


def run_unit(fn: Callable[[T], R], item: T, version: str) -> R | UnitFailure:
    """Worker entry: ``fn(item)``, or the one-line failure of it (never an exception, so
    that a retry means a lost worker).  ``version`` is the build's compiler version."""
    if version != COMPILER_VERSION:
        return UnitFailure(f"this worker has compiler {COMPILER_VERSION}, the build {version}; "
                           "install the same furiosa-build on every worker")  # fmt: skip
    try:
        return fn(item)
    except Exception as exc:  # noqa: BLE001  reported to the build as one line naming the unit
        return UnitFailure(exception_line(exc))


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one line: its type and the first line of its message, cut at ``limit``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    line = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def check_reachable(backend: str, address: str, timeout: float = CONNECT_SECONDS) -> None:
    """Raise a one-line ConfigError unless something answers at ``address`` within ``timeout``
    (for Ray, something speaking gRPC: ``ray.init`` retries for minutes against a port that
    accepts connections but is not a Ray server)."""
    parts = urlsplit(address if "://" in address else f"{backend}://{address}")
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=timeout) as conn:
            if backend == "ray" and not _answers_http2(conn):
                raise ConfigError(f"build.cluster.address: {address} answers, but not as a Ray cluster (no gRPC reply)")
    except TimeoutError:
        raise ConfigError(f"build.cluster.address: cannot reach {address} (no answer within {timeout:g} s)") from None
    except OSError as exc:
        reason = exc.strerror.lower() if exc.strerror else exception_line(exc)
        raise ConfigError(f"build.cluster.address: cannot reach {address} ({reason})") from None


#: An HTTP/2 client's opening (the connection preface and an empty SETTINGS frame), which a
#: gRPC server, as Ray's GCS and client servers are, answers with a SETTINGS frame of its own.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4


def _answers_http2(conn: socket.socket) -> bool:
    """Whether the server on ``conn`` answers an HTTP/2 opening with a frame header whose
    type is SETTINGS (bytes 0-2 length, byte 3 type); a timeout propagates."""
    conn.sendall(_HTTP2_PREFACE)
    header = b""
    while len(header) < 9:
        chunk = conn.recv(9 - len(header))
        if not chunk:
            return False
        header += chunk
    return header[3] == _SETTINGS_FRAME


class Cluster(ABC):
    """A Ray or Dask cluster for one build: joined (or a local one started) on the first
    :meth:`map`, left (or stopped) by :meth:`close`."""

    kind: ClassVar[str]

    def __init__(self, options: ClusterOptions, local_workers: int) -> None:
        self.address = options.address
        self.retries = options.retries
        self.local_workers = options.num_workers or local_workers
        self._joined = False

    def where(self) -> str:
        """The cluster in words, for the build report."""
        return f"the {self.kind} cluster at {self.address}" if self.address else f"a local {self.kind} cluster"

    def map(self, fn: Callable[[T], R], items: Iterable[T], stage: str, label: Callable[[T], str]) -> Iterator[R]:
        """``fn`` of every item on the cluster's workers, in order.  A unit that raised, or
        whose workers were lost more than ``retries`` times, ends the build with a
        :class:`UnitError` naming it (``compile unit <label>: <one line>``)."""
        items = list(items)
        if not self._joined:
            self._join()
            self._joined = True
        handles = [self._submit(fn, item) for item in items]
        for item, handle in zip(items, handles, strict=True):
            try:
                result = self._result(handle)
            except Exception as exc:  # noqa: BLE001  the framework gave up: workers kept dying, or the cluster went away
                raise UnitError(f"{stage} unit {label(item)}: not run ({exception_line(exc)})") from None
            if isinstance(result, UnitFailure):
                raise UnitError(f"{stage} unit {label(item)}: {result.line}")
            yield result

    def _cannot_join(self, exc: BaseException) -> ConfigError:
        """The one line for a cluster that could not be joined (or a local one started)."""
        if self.address:
            return ConfigError(f"build.cluster.address: cannot join the {self.kind} cluster at {self.address} "
                               f"({exception_line(exc)})")  # fmt: skip
        return ConfigError(f"build.backend: cannot start a local {self.kind} cluster ({exception_line(exc)})")

    @abstractmethod
    def workers(self) -> int:
        """How many units the cluster runs at once (worker processes or CPUs)."""

    def close(self) -> None:
        """Leave the cluster; stop it if this build started it."""
        if self._joined:
            self._leave()
            self._joined = False

    @abstractmethod
    def _join(self) -> None: ...

    @abstractmethod
    def _submit(self, fn: Callable[[T], R], item: T) -> Any: ...

    @abstractmethod
    def _result(self, handle: Any) -> Any: ...

    @abstractmethod
    def _leave(self) -> None: ...


class RayCluster(Cluster):
    """Units as Ray tasks (``max_retries`` re-runs a unit whose worker died)."""

    kind = "ray"

    def _join(self) -> None:
        import ray

        self._owned = not ray.is_initialized()  # a process already on Ray (a Ray task, a notebook) keeps its connection
        if self._owned:
            quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
            try:
                if self.address:
                    ray.init(address=self.address, **quiet)
                else:  # "local": a new cluster, never one that `ray start` left running on this host
                    ray.init(address="local", num_cpus=self.local_workers, include_dashboard=False, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise self._cannot_join(exc) from None
        self._task = ray.remote(run_unit).options(max_retries=self.retries, retry_exceptions=False, num_cpus=1)

    def _submit(self, fn: Callable[[T], R], item: T) -> Any:
        return self._task.remote(fn, item, COMPILER_VERSION)

    def _result(self, handle: Any) -> Any:
        import ray

        return ray.get(handle)

    def workers(self) -> int:
        import ray

        return int(ray.cluster_resources().get("CPU", 1))

    def _leave(self) -> None:
        import ray

        if self._owned:
            ray.shutdown()


class DaskCluster(Cluster):
    """Units as Dask futures.  Dask's own ``retries`` re-runs only tasks that raised, never
    one whose worker died (``KilledWorker``), so a lost unit is submitted again here."""

    kind = "dask"

    def _join(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        self._local = None
        try:
            if self.address:
                self._client = Client(self.address, timeout=CONNECT_SECONDS, set_as_default=False)
                return
            # A lost worker fails its unit at once; _result then sends it again, as on a scheduler of its own.
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._local = LocalCluster(n_workers=self.local_workers, threads_per_worker=1, processes=True,
                                           host=_LOCAL_HOST, dashboard_address=None, scheduler_kwargs=_NO_FIXED_PORT,
                                           silence_logs=logging.ERROR)  # fmt: skip
            self._client = Client(self._local, set_as_default=False)
        except (OSError, TimeoutError, RuntimeError) as exc:
            raise self._cannot_join(exc) from None

    def _submit(self, fn: Callable[[T], R], item: T) -> Any:
        return self._client.submit(run_unit, fn, item, COMPILER_VERSION, pure=False), fn, item

    def _result(self, handle: Any) -> Any:
        from distributed import KilledWorker

        future, fn, item = handle
        for _ in range(self.retries):
            try:
                return future.result()
            except KilledWorker:
                future = self._submit(fn, item)[0]
        return future.result()

    def workers(self) -> int:
        return len(self._client.scheduler_info()["workers"])

    def _leave(self) -> None:
        self._client.close()
        if self._local is not None:
            self._local.close()


_KINDS: dict[str, type[Cluster]] = {kind.kind: kind for kind in (RayCluster, DaskCluster)}


@contextmanager
def open_backend(backend: str, options: ClusterOptions, local_workers: int) -> Iterator[str | Cluster]:
    """The backend a build's pools run on: a joblib backend name as it is, or for ``ray``
    and ``dask`` a :class:`Cluster` (address probed now, joined on first use, left or
    stopped when the build ends)."""
    kind = _KINDS.get(backend)
    if kind is None:
        yield backend
        return
    if options.address:
        check_reachable(backend, options.address)
    cluster = kind(options, local_workers)
    try:
        yield cluster
    finally:
        cluster.close()

"""Scratch files and folders that carry their owner, so a crashed run's leftovers can be
told apart from a live run's and from the user's own files.

Every temporary thing the build makes next to a real output (an artifact being staged,
an old artifact being retired, a cache entry or converted model being written) is named

    .<base>.furiosa-<kind>.<host>.<pid>.<start>.<random>

where ``host`` is a short hash of the host name and ``start`` the owner's process start
time (so a recycled pid is not mistaken for the owner).  :func:`remove_stale` deletes
exactly the names of this shape whose owner on this host is gone; nothing else in a
folder is ever touched.  Names made on another host (a shared cache) are left alone.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

__all__ = ["ScratchName", "atomic_write", "make_scratch", "remove_stale", "scratch_dir"]

KINDS = ("tmp", "old")
_PATTERN = re.compile(
    r"^\.(?P<base>.+)\.furiosa-(?P<kind>tmp|old)\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.(?P<start>\d+)\.[0-9a-z]+$"
)


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """The process's start time in ms, or None when no such process exists."""
    try:
        return int(psutil.Process(pid).create_time() * 1000)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


_OWNER = (_host(), os.getpid(), _start_time(os.getpid()))


def _me() -> tuple[str, int, int | None]:
    """(host, pid, start time) of this process; recomputed after a fork."""
    global _OWNER
    if _OWNER[1] != os.getpid():
        _OWNER = (_host(), os.getpid(), _start_time(os.getpid()))
    return _OWNER


@dataclass(frozen=True)
class ScratchName:
    """A parsed scratch name."""

    base: str
    kind: str
    host: str
    pid: int
    start: int

    @classmethod
    def parse(cls, name: str) -> ScratchName | None:
        match = _PATTERN.match(name)
        if match is None:
            return None
        return cls(match["base"], match["kind"], match["host"], int(match["pid"]), int(match["start"]))

    def owner_gone(self) -> bool:
        """True when the owner ran on this host and is no longer running."""
        if self.host != _host():
            return False
        start = _start_time(self.pid)
        return start is None or abs(start - self.start) > 1000


def make_scratch(parent: Path, base: str, kind: str = "tmp") -> Path:
    """A fresh scratch path (not created) in ``parent`` owned by this process."""
    assert kind in KINDS, kind
    host, pid, start = _me()
    return parent / f".{base}.furiosa-{kind}.{host}.{pid}.{start or 0}.{secrets.token_hex(4)}"


@contextmanager
def scratch_dir(parent: Path, base: str) -> Iterator[Path]:
    """Create a scratch folder in ``parent``; it is removed if the block raises, and
    otherwise left for the caller to rename into place."""
    path = make_scratch(parent, base)
    path.mkdir(mode=0o777)  # the umask applies, as for any folder the user makes
    try:
        yield path
    except BaseException:
        remove(path)
        raise


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or all of the
    new one: a scratch file beside it, fsync, rename.  The file honours the umask."""
    tmp = make_scratch(path.parent, path.name)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def remove(path: Path) -> None:
    """Delete a scratch file or folder (best effort: it may already be gone)."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def remove_stale(parent: Path) -> list[Path]:
    """Delete the scratch items in ``parent`` whose owner process is gone; return them.

    Only names of this module's shape are considered, so the user's files are safe.
    A folder that cannot be listed is skipped.
    """
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        name = ScratchName.parse(entry.name)
        if name is not None and name.owner_gone():
            remove(Path(entry.path))
            removed.append(Path(entry.path))
    return removed


def temp_root() -> Path:
    """The system's temporary folder (for builds that run without a cache)."""
    return Path(tempfile.gettempdir())

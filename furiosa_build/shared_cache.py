"""The shared cache tier: one store of cache entries that many hosts' builds read and fill.

``build.shared_cache`` names it: a folder (an NFS or other shared mount) or an fsspec URL
(``file://``, ``memory://``, ``s3://``... whatever fsspec can open).  It sits behind each
host's local cache (:class:`furiosa_build.cache.CompileCache`): a local miss reads the
entry here, verifies it and copies it into the local cache; a unit compiled locally is
written back here, so a fleet compiles each unit once.

The layout is a local cache's (``<section>/programs/<key[:2]>/<key>.json``, the same
self-verifying entry bytes), so a local cache folder can itself serve as a shared tier.
This class only moves bytes; the cache verifies them.  Writes go to an owner-stamped
scratch name (:mod:`furiosa_build.scratch`) beside the entry and are renamed into place,
so concurrent writers on many hosts never expose a partial entry; on a local file system
the scratch file is fsynced and renamed atomically, and the scratch files of this host's
dead builds are swept from a shard before writing to it.

The tier is an optimisation: when it cannot be reached, read or written, one warning
line says so and the build goes on without it (reading, or writing, turned off).
"""

from __future__ import annotations

import posixpath
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from furiosa_build.cache import first_line, reason
from furiosa_build.scratch import atomic_write, make_scratch, remove_stale

__all__ = ["SharedTier", "check_shared_cache"]


@dataclass
class _State:
    """What every section of one tier shares: its switches and the warn-once flag."""

    reads: bool = True
    writes: bool = True
    warned: bool = False
    swept: set[str] = field(default_factory=set)  # local shard folders already swept


class SharedTier:
    """A shared store of cache entries at ``url``, or one ``section`` (sub-folder) of it."""

    def __init__(self, url: str, fs: Any, root: str, state: _State | None = None) -> None:
        self.url = url
        self._fs = fs
        self._root = root.rstrip("/") or "/"
        self._state = state or _State()

    @classmethod
    def open(cls, url: str) -> SharedTier | None:
        """The tier at ``url``; None (after one warning line) when fsspec cannot open it."""
        try:
            fs, root = _filesystem(url)
        except Exception as error:  # fsspec backends raise their own types (ImportError, ClientError...)
            warnings.warn(f"shared cache {url} cannot be opened ({_why(error)}); building without it", stacklevel=2)
            return None
        return cls(url, fs, root)

    def section(self, name: str) -> SharedTier:
        """The part of the tier behind one local cache section (``""``: the compile cache)."""
        root = posixpath.join(self._root, name) if name else self._root
        return SharedTier(self.url, self._fs, root, self._state)

    def read(self, key: str) -> bytes | None:
        """The stored bytes of ``key``, unverified; None when absent or the tier is unreadable."""
        if not self._state.reads:
            return None
        try:
            return self._fs.cat_file(self._entry(key))
        except FileNotFoundError:
            return None
        except Exception as error:  # any backend failure: the tier is off, the build goes on
            self._state.reads = False
            self._warn_once(f"shared cache {self.url} cannot be read ({_why(error)}); building without it")
            return None

    def contains(self, key: str) -> bool:
        """Cheap existence check (no verification), for planning."""
        if not self._state.reads:
            return False
        try:
            return bool(self._fs.isfile(self._entry(key)))
        except Exception:  # an unreachable tier holds nothing we can use
            return False

    def write(self, key: str, entry: bytes) -> None:
        """Store ``entry`` under ``key``: a scratch name beside it, then a rename.

        The caller checks first that no valid entry is there; two hosts writing the same
        key at once write the same bytes, so whichever rename lands last changes nothing.
        """
        if not self._state.writes:
            return
        path = self._entry(key)
        try:
            if self._is_local:
                self._write_local(Path(path), entry)
            else:
                self._write_remote(path, entry)
        except Exception as error:  # read-only, full, unreachable: stop writing, keep building
            self._state.writes = False
            self._warn_once(f"shared cache {self.url} cannot be written ({_why(error)}); building without storing to it")

    # -- internals --------------------------------------------------------------------------

    @property
    def _is_local(self) -> bool:
        return "file" in _protocols(self._fs)

    def _entry(self, key: str) -> str:
        return posixpath.join(self._root, "programs", key[:2], f"{key}.json")

    def _write_local(self, path: Path, entry: bytes) -> None:
        """fsync and atomic rename; first sweep the shard of this host's dead builds' scratch files."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if str(path.parent) not in self._state.swept:
            self._state.swept.add(str(path.parent))
            remove_stale(path.parent)
        atomic_write(path, entry)

    def _write_remote(self, path: str, entry: bytes) -> None:
        parent, name = posixpath.split(path)
        tmp = posixpath.join(parent, make_scratch(Path(parent), name).name)
        self._fs.makedirs(parent, exist_ok=True)
        try:
            self._fs.pipe_file(tmp, entry)
            self._fs.mv(tmp, path)
        except BaseException:
            _remove_remote(self._fs, tmp)
            raise

    def _warn_once(self, message: str) -> None:
        if not self._state.warned:
            self._state.warned = True
            warnings.warn(message, stacklevel=4)


def check_shared_cache(url: str) -> str | None:
    """What is wrong with a ``build.shared_cache`` value, in a few words; None when fine."""
    if not url.strip() or "\0" in url:
        return f"expected a folder or an fsspec URL (file://, memory://, s3://...), got {url!r}"
    protocol, sep, _ = url.partition("://")
    if not sep or protocol == "file":
        return None
    try:
        import fsspec

        fsspec.get_filesystem_class(protocol)
    except ImportError as error:
        return f"{url!r} needs {_why(error)}"
    except ValueError:
        return f"unknown protocol {protocol!r} in {url!r}; plain folders and file:// always work"
    return None


def _filesystem(url: str) -> tuple[Any, str]:
    """(fsspec file system, root path) of ``url``; a plain path is a local folder."""
    from fsspec.core import url_to_fs

    if "://" not in url:
        url = str(Path(url).expanduser().absolute())
    return url_to_fs(url)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _remove_remote(fs: Any, path: str) -> None:
    """Delete a remote scratch file (best effort)."""
    try:
        fs.rm_file(path)
    except Exception:  # already gone, or the tier is unreachable: nothing more to do
        pass


def _why(error: BaseException) -> str:
    """An error's reason in a few words (an OS error's in lower case, as the local cache says it)."""
    return reason(error) if isinstance(error, OSError) else first_line(error)

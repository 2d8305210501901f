"""Content-addressed compile cache.

Every compiled NPU program is stored under ``sha256(canonical program input + compiler
options + compiler version)``, so a rebuild with unchanged inputs skips the compiler and
identical blocks (one transformer layer per bucket and TP shard) compile once.

This module holds the project's one hashing helper (:func:`canonical_json`) and the one
place that defines a cache key (:func:`cache_key`); ``tests/build/test_cache.py`` pins
known digests so a silent change of key derivation is caught.

On disk an entry is ``root/programs/<key[:2]>/<key>.json``: one header line of canonical
JSON ``{"key", "sha256", "size"}`` followed by the payload bytes. The header lets
:meth:`CompileCache.get` detect truncated, corrupted or misplaced entries and recompile
instead of returning bad data; a ``decode`` hook lets the caller reject a payload it cannot
parse. Writes go to a scratch file (:mod:`furiosa_build.scratch`) in the same directory and
are renamed into place, so readers and concurrent writers only ever see whole entries, and
the scratch files of a killed build are swept by the next build writing to that shard.
Cache trouble (damage, full disk, read-only, files where folders should be) warns in one
line and never fails a build.  A cache may have a shared tier behind it
(:mod:`furiosa_build.shared_cache`): read through on a local miss, written back after a
put, its entries verified exactly like local ones.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from furiosa_build.scratch import atomic_write, remove_stale

if TYPE_CHECKING:
    from furiosa_build.shared_cache import SharedTier

__all__ = ["CacheStats", "CompileCache", "cache_key", "canonical_json", "first_line", "first_non_folder", "reason"]

_KEY_RE = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> bytes:
    """Serialise ``obj`` to bytes that are identical for equal content, across runs.

    Dict keys are sorted, separators fixed, tuples become lists, NumPy scalars become
    Python numbers (floats keep ``repr``'s shortest round-trip form) and NumPy arrays
    become ``{"__ndarray__": {"dtype", "shape", "sha256"}}`` of their little-endian
    C-order bytes. NaN/inf, non-string dict keys and unknown types raise, because a
    value with no single spelling cannot give a stable hash.
    """
    text = json.dumps(
        _normalise(obj),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return text.encode("utf-8")


def cache_key(program_input: Mapping[str, Any], options: Mapping[str, Any], compiler_version: str) -> str:
    """Return the cache key (sha256 hex) of one compile unit.

    The compiler version is part of the key so that upgrading the compiler invalidates
    every entry it could have produced differently.
    """
    document = {"input": program_input, "options": options, "compiler": compiler_version}
    return hashlib.sha256(canonical_json(document)).hexdigest()


def _normalise(obj: Any) -> Any:
    """Turn ``obj`` into plain JSON types (dict/list/str/int/float/bool/None)."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, Mapping):
        return {_dict_key(k): _normalise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_normalise(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _array_descriptor(obj)
    if isinstance(obj, np.generic):
        return _numpy_scalar(obj)
    raise TypeError(f"canonical_json cannot serialise {type(obj).__name__!r}: {obj!r}")


def _dict_key(key: Any) -> str:
    """Accept only string keys: json would turn ``1`` and ``"1"`` into the same key."""
    if isinstance(key, np.str_):
        return str(key)
    if not isinstance(key, str):
        raise TypeError(f"canonical_json needs str dict keys, got {type(key).__name__}: {key!r}")
    return key


def _numpy_scalar(value: np.generic) -> bool | int | float | str:
    """Convert a NumPy scalar (including ml_dtypes ones such as bfloat16) to Python."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.str_):
        return str(value)
    if isinstance(value, np.complexfloating):
        raise TypeError(f"canonical_json cannot serialise complex value {value!r}")
    return float(value)


def _array_descriptor(array: np.ndarray) -> dict[str, Any]:
    """Describe an array by dtype, shape and a digest of its bytes (never the values)."""
    if array.dtype.hasobject:
        raise TypeError("canonical_json cannot serialise object arrays")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array).tobytes()
    return {
        "__ndarray__": {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    }


# --------------------------------------------------------------------------- cache


@dataclass
class CacheStats:
    """Counters of one :class:`CompileCache` instance (per process, not persisted).

    ``misses`` counts every ``get`` that returned None, corrupted entries included;
    ``corrupted`` counts those that were found damaged and removed; ``shared_hits`` the
    hits that came from the shared tier (and were copied into the local cache).
    """

    hits: int = 0
    misses: int = 0
    corrupted: int = 0
    writes: int = 0
    shared_hits: int = 0


class _CorruptEntry(Exception):
    """An entry failed verification; the message says why."""


class CompileCache:
    """Directory of compiled programs addressed by :func:`cache_key`.

    ``CompileCache(None)`` is a disabled cache: ``get`` always misses and ``put`` does
    nothing, so callers need no special case. Nothing is created on disk before the
    first ``put``, so planning (``contains``) against a cache never writes.

    The cache is only an optimisation, so no cache problem ever fails a build:

    * a damaged entry (bad header or digest, a payload ``decode`` refuses, a folder where
      the entry file should be, a file where its shard folder ``programs/ab`` should be)
      is removed, reported in one warning line and treated as a miss;
    * when the cache cannot be written (full disk, read-only, a file where ``root`` or
      ``programs/`` should be) one warning line says so and the build goes on without
      storing; a file at ``root`` or ``programs/`` (not ours to delete) also turns reads
      off;
    * an entry that cannot be read (permissions) is a miss.

    ``label`` and ``redo`` name the cache in those warnings (``"capture"``,
    ``"recapturing"`` for the capture store).

    ``shared`` is the shared tier behind this cache: a local miss reads the entry there,
    verifies it (a damaged one is one warning line and a miss) and copies it here; a put
    writes it there too unless a valid entry is already there.  It works with a disabled
    local cache as well.
    """

    def __init__(
        self,
        root: Path | str | os.PathLike[str] | None,
        label: str = "compile",
        redo: str = "recompiling",
        shared: SharedTier | None = None,
    ) -> None:
        self.root: Path | None = None if root is None else Path(root).expanduser()
        self.shared = shared
        self._shared_damaged: set[str] = set()  # keys whose shared entry this instance found damaged
        self.stats = CacheStats()
        self.label = label
        self.redo = redo
        self._reads = True  # False once the layout above the shards is unusable
        self._writes = True  # False once a write failed
        self._warned = False  # one cache-level warning per instance
        self._swept = False  # shard folders cleaned of dead builds' scratch files yet?

    @property
    def enabled(self) -> bool:
        """True when the cache has a root directory."""
        return self.root is not None

    def entry_path(self, key: str) -> Path:
        """Return where ``key`` is (or would be) stored; the cache must be enabled."""
        _check_key(key)
        if self.root is None:
            raise ValueError("a disabled CompileCache has no entry paths")
        return self.root / "programs" / key[:2] / f"{key}.json"

    def contains(self, key: str) -> bool:
        """Cheap existence check, here or in the shared tier (no verification), for dry-run
        build planning."""
        _check_key(key)
        return self._contains_local(key) or (self.shared is not None and self.shared.contains(key))

    def _contains_local(self, key: str) -> bool:
        if self.root is None or not self._reads:
            return False
        try:
            return self.entry_path(key).is_file()
        except OSError:
            return False

    def get(self, key: str, decode: Callable[[bytes], Any] | None = None) -> Any:
        """Return the verified payload of ``key`` (or ``decode(payload)``), or None on a miss.

        A damaged entry is removed (best effort), reported with a warning and treated as
        a miss, so the caller recompiles instead of loading bad data.  ``decode`` is the
        caller's parser: a payload that passes the digest but that it rejects (raises)
        is damaged too, e.g. an entry written by another program under a valid header.
        """
        _check_key(key)
        self._sweep_once()
        value = self._read_verified(key, decode) if self.root is not None and self._reads else None
        if value is None and self.shared is not None:
            value = self._read_shared(key, decode)
        if value is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return value

    def put(self, key: str, payload: bytes) -> None:
        """Store ``payload`` under ``key`` atomically (scratch file, fsync, rename).

        Concurrent writers of the same key both succeed; the last rename wins and, since
        equal keys mean equal content, the result is one valid entry.  A write that fails
        warns once and turns writing off for this instance; the build goes on.  The entry
        is also written back to the shared tier, unless a valid one is there already.
        """
        _check_key(key)
        self._put_local(key, payload)
        if self.shared is not None:
            self._write_back(key, payload)

    def _put_local(self, key: str, payload: bytes) -> None:
        if self.root is None or not self._writes:
            return
        path = self.entry_path(key)
        try:
            self._make_shard(key, path.parent)
            if path.is_dir() and not path.is_symlink():  # a damaged entry a reader did not meet
                self._discard(key, path, "it is a folder, not a file")
            atomic_write(path, _header(key, payload) + payload)
        except OSError as error:
            self._stop_writing(error, path)
            return
        self.stats.writes += 1

    # -- internals --------------------------------------------------------------------------

    def _read_shared(self, key: str, decode: Callable[[bytes], Any] | None) -> Any:
        """Read through to the shared tier: a verified entry is copied into the local cache
        and returned; a damaged one warns and is a miss (the write-back replaces it)."""
        assert self.shared is not None
        data = self.shared.read(key)
        if data is None:
            return None
        try:
            payload = _verify(key, data)
            value = payload if decode is None else _decoded(decode, payload)
        except _CorruptEntry as error:
            self._shared_damaged.add(key)
            warnings.warn(f"shared {self.label} cache entry {key} is corrupted ({error}); {self.redo}", stacklevel=4)
            return None
        self.stats.shared_hits += 1
        self._put_local(key, payload)
        return value

    def _write_back(self, key: str, payload: bytes) -> None:
        """Store a fresh entry in the shared tier, never over a valid one."""
        assert self.shared is not None
        if key not in self._shared_damaged:
            existing = self.shared.read(key)
            if existing is not None and _is_valid(key, existing):
                return
        self.shared.write(key, _header(key, payload) + payload)

    def _make_shard(self, key: str, shard: Path) -> None:
        """Create ``programs/ab`` (replacing a file found there)."""
        try:
            shard.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            if self._blocker(shard) != shard:
                raise
            self._discard(key, shard, f"{_rel(shard, self.root)} is a file, not a folder")
            shard.mkdir(parents=True, exist_ok=True)
        self._sweep_once()

    def _sweep_once(self) -> None:
        """Remove, from every shard folder, the scratch files of builds that died while
        writing (whatever keys this build touches); once per instance."""
        if self._swept or self.root is None:
            return
        self._swept = True
        try:
            shards = [entry.path for entry in os.scandir(self.root / "programs") if entry.is_dir(follow_symlinks=False)]
        except OSError:
            return
        for shard in shards:
            remove_stale(Path(shard))

    def _read_verified(self, key: str, decode: Callable[[bytes], Any] | None) -> Any:
        """Read and verify the entry of ``key``; None when absent, unreadable or damaged."""
        path = self.entry_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            self._discard(key, path, "it is a folder, not a file")
            return None
        except NotADirectoryError:
            self._not_a_folder(key, path)
            return None
        except OSError as error:  # permissions, I/O errors: a miss; the put that follows may repair it
            self._warn_once(f"{self.label} cache entry {key} cannot be read ({reason(error)}); {self.redo}")
            return None
        try:
            payload = _verify(key, data)
            return payload if decode is None else _decoded(decode, payload)
        except _CorruptEntry as error:
            self._discard(key, path, str(error))
            return None

    def _not_a_folder(self, key: str, path: Path) -> None:
        """A file sits where a folder of the layout should be: a shard is a damaged entry
        (removed); the root or ``programs/`` is not ours to delete, so the cache is off."""
        blocker = self._blocker(path.parent)
        if blocker == path.parent:
            self._discard(key, blocker, f"{_rel(blocker, self.root)} is a file, not a folder")
        else:
            self._reads = self._writes = False
            where = blocker if blocker is not None else path.parent
            self._warn_once(f"{self.label} cache {self.root} is unusable ({where} is not a folder); building without it")

    def _blocker(self, shard: Path) -> Path | None:
        """The top-most folder on the way to ``shard`` (itself included) that exists but is not a folder."""
        return first_non_folder(shard)

    def _discard(self, key: str, path: Path, reason: str) -> None:
        """Remove a damaged entry and warn; removal failures are ignored (best effort)."""
        self.stats.corrupted += 1
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            pass
        warnings.warn(f"{self.label} cache entry {key} is corrupted ({reason}); {self.redo}", stacklevel=4)

    def _stop_writing(self, error: OSError, path: Path) -> None:
        self._writes = False
        where = error.filename or path
        self._warn_once(f"{self.label} cache {self.root} cannot be written ({where}: {reason(error)}); "
                        "building without storing to it")  # fmt: skip

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, stacklevel=4)


def first_non_folder(path: Path) -> Path | None:
    """The top-most of ``path`` and its parents that exists but is not a folder (a file
    where the cache layout wants a folder), or None."""
    for candidate in [*reversed(path.parents), path]:
        try:
            if not stat.S_ISDIR(os.stat(candidate).st_mode):
                return candidate
        except FileNotFoundError:
            return None
        except OSError:  # permissions: the nearest place we cannot look into
            return candidate
    return None


def reason(error: OSError) -> str:
    """An OS error's reason in a few words, lower case (``no space left on device``)."""
    text = error.strerror or errno.errorcode.get(error.errno or 0) or str(error) or type(error).__name__
    return text.lower()


def _rel(path: Path, root: Path | None) -> str:
    try:
        return str(path.relative_to(root)) if root is not None else str(path)
    except ValueError:
        return str(path)


def _decoded(decode: Callable[[bytes], Any], payload: bytes) -> Any:
    """``decode(payload)``; any failure (or a None result) makes the entry corrupt."""
    try:
        value = decode(payload)
    except Exception as error:  # the caller's parser: JSON, pydantic, KeyError, ...
        raise _CorruptEntry(f"payload cannot be decoded: {first_line(error)}") from None
    if value is None:
        raise _CorruptEntry("payload decodes to nothing")
    return value


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, shortened to ``limit`` characters
    (a first line that ends in a colon announces the next ones, so they are joined to it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = " ".join(lines) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_key(key: str) -> None:
    """Reject anything but a sha256 hex digest, so a key can never escape the root."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"cache key must be 64 lowercase hex characters (sha256), got {key!r}")


def _header(key: str, payload: bytes) -> bytes:
    """Header line that makes an entry self-verifying."""
    digest = hashlib.sha256(payload).hexdigest()
    return canonical_json({"key": key, "sha256": digest, "size": len(payload)}) + b"\n"


def _is_valid(key: str, data: bytes) -> bool:
    """True when ``data`` is a whole, self-consistent entry of ``key``."""
    try:
        _verify(key, data)
    except _CorruptEntry:
        return False
    return True


def _verify(key: str, data: bytes) -> bytes:
    """Split an entry into header and payload and check both; raise _CorruptEntry."""
    line, newline, payload = data.partition(b"\n")
    if not newline:
        raise _CorruptEntry("missing header")
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _CorruptEntry("unreadable header") from None
    if not isinstance(header, dict) or not {"key", "sha256", "size"} <= header.keys():
        raise _CorruptEntry("malformed header")
    if header["key"] != key:
        raise _CorruptEntry(f"header names key {header['key']!r}")
    if header["size"] != len(payload):
        raise _CorruptEntry(f"payload is {len(payload)} bytes, header says {header['size']}")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise _CorruptEntry("payload sha256 mismatch")
    return payload

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
instead of returning bad data. Writes go to a temp file in the same directory and are
renamed into place, so readers and concurrent writers only ever see whole entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CacheStats", "CompileCache", "cache_key", "canonical_json"]

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TMP_SUFFIX = ".tmp"


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
    ``corrupted`` counts those that were found damaged and removed.
    """

    hits: int = 0
    misses: int = 0
    corrupted: int = 0
    writes: int = 0


class _CorruptEntry(Exception):
    """An entry failed verification; the message says why."""


class CompileCache:
    """Directory of compiled programs addressed by :func:`cache_key`.

    ``CompileCache(None)`` is a disabled cache: ``get`` always misses and ``put`` does
    nothing, so callers need no special case. Nothing is created on disk before the
    first ``put``, so planning (``contains``) against a cache never writes.
    """

    def __init__(self, root: Path | str | os.PathLike[str] | None) -> None:
        self.root: Path | None = None if root is None else Path(root).expanduser()
        self.stats = CacheStats()

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
        """Cheap existence check (no verification), for dry-run build planning."""
        _check_key(key)
        return self.root is not None and self.entry_path(key).is_file()

    def get(self, key: str) -> bytes | None:
        """Return the verified payload of ``key``, or None on a miss.

        A damaged entry is removed (best effort), reported with a warning and treated as
        a miss, so the caller recompiles instead of loading bad data.
        """
        _check_key(key)
        payload = self._read_verified(key) if self.root is not None else None
        if payload is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        return payload

    def put(self, key: str, payload: bytes) -> None:
        """Store ``payload`` under ``key`` atomically (temp file, fsync, rename).

        Concurrent writers of the same key both succeed; the last rename wins and, since
        equal keys mean equal content, the result is one valid entry.
        """
        _check_key(key)
        if self.root is None:
            return
        path = self.entry_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, _header(key, payload) + payload)
        self.stats.writes += 1

    def _read_verified(self, key: str) -> bytes | None:
        """Read and verify the entry of ``key``; None when absent or damaged."""
        path = self.entry_path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _verify(key, data)
        except _CorruptEntry as error:
            self._discard(key, path, str(error))
            return None

    def _discard(self, key: str, path: Path, reason: str) -> None:
        """Remove a damaged entry and warn; removal failures are ignored (best effort)."""
        self.stats.corrupted += 1
        try:
            path.unlink()
        except OSError:
            pass
        warnings.warn(f"compile cache entry {key} is corrupted ({reason}); recompiling", stacklevel=4)


def _check_key(key: str) -> None:
    """Reject anything but a sha256 hex digest, so a key can never escape the root."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"cache key must be 64 lowercase hex characters (sha256), got {key!r}")


def _header(key: str, payload: bytes) -> bytes:
    """Header line that makes an entry self-verifying."""
    digest = hashlib.sha256(payload).hexdigest()
    return canonical_json({"key": key, "sha256": digest, "size": len(payload)}) + b"\n"


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


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it."""
    tmp = tempfile.NamedTemporaryFile(
        delete=False, dir=path.parent, prefix=f".{path.stem}.", suffix=_TMP_SUFFIX
    )
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise

"""Remember what was read from a model's source files, keyed by the files' metadata.

Reading a model's config (transformers parses a GGUF header in seconds) and hashing its
files (gigabytes for a real model) are the two costs a fully cached rebuild would still
pay.  Both are pure functions of the source files, so the answer is kept in the cache
under a key made of every file's path, size, modification time and inode, the options
that change the answer, and the versions of the code that computed it.  A rebuild whose
sources did not change then reads the answer back (verified, like every cache entry)
and imports neither torch nor transformers.

Like ``make`` and ccache's direct mode, this trusts that a file whose size and
modification time are unchanged has unchanged content.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from furiosa_build.cache import CompileCache, canonical_json
from furiosa_build.sources import ModelSource


class SourceMemo:
    """A cache of facts about model sources (``<cache_dir>/sources``); None root disables it."""

    def __init__(self, root: Path | None) -> None:
        self.store = CompileCache(root, label="source memo", redo="reading the source again")
        self._pending: dict[str, bytes] = {}  # computed, not stored until the build accepts the model

    def flush(self) -> None:
        """Store what was computed since the last flush.  Called once the model has passed
        the build's checks, so a refused build writes nothing into the cache."""
        for key, payload in self._pending.items():
            self.store.put(key, payload)
        self._pending.clear()

    def get(self, what: str, source: ModelSource, options: Mapping[str, Any], compute: Callable[[], Any]) -> Any:
        """``compute()``, or what it returned before for the same files and options."""
        fingerprint = source_fingerprint(source)
        if fingerprint is None or not self.store.enabled:
            return compute()
        document = {"what": what, "files": fingerprint, "options": options, "versions": _versions()}
        key = hashlib.sha256(canonical_json(document)).hexdigest()
        if key in self._pending:
            return _value(self._pending[key])["value"]
        known = self.store.get(key, decode=_value)
        if known is not None:
            return known["value"]
        value = compute()
        self._pending[key] = canonical_json({"value": value})
        return value


def source_fingerprint(source: ModelSource) -> list[list[Any]] | None:
    """(name, size, mtime_ns, inode) of every file of ``source``; [] for a config-only
    model, None when a file cannot be examined (then nothing is remembered)."""
    if source.path is None:
        return []
    try:
        path = source.path
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
        stats = [(f, f.stat()) for f in files]
    except OSError:
        return None
    return [[os.fspath(f.resolve()), s.st_size, s.st_mtime_ns, s.st_ino] for f, s in stats]


def _value(payload: bytes) -> dict[str, Any]:
    document = json.loads(payload)
    if not isinstance(document, dict) or "value" not in document:
        raise ValueError("not a source memo entry")
    return document


@cache
def _versions() -> dict[str, str]:
    """Versions of what computes the remembered facts (read without importing it)."""
    from furiosa_build.model_cache import LOADER_VERSION

    found = {"loader": LOADER_VERSION}
    for package in ("transformers", "gguf", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "none"
    return found

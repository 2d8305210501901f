"""Explained cache misses: for each program about to compile, which part of its key changed.

A cache key is a hash, so a miss by itself says nothing.  Every program a build resolves
therefore leaves a *key record* in the cache's ``keys`` section: the parts its key was
made from (:attr:`furiosa_build.compile.CompileUnit.parts`: unit, compiler version,
options, tensor-parallel rank, dtypes, bucket, graph digest), stored as an ordinary
:class:`~furiosa_build.cache.CompileCache` entry under the program's key, so it is
digest-checked like every other entry.

``python -m furiosa_build explain ...`` (``build.explain=true``) plans the build without
compiling, and compares each unit that would compile with the *nearest* record: the same
unit (``decode block:0``, ``prefill head``...), most parts equal.  The parts that differ
are named with the cause in words.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from furiosa_build.cache import CompileCache, canonical_json
from furiosa_build.compile import CompileUnit

__all__ = ["Miss", "MissReport", "explain_misses", "key_records", "remember"]

#: Key parts in the order a miss names them: the broadest causes first.
PARTS = ("compiler", "options", "tp", "dtype", "bucket", "graph")
#: Parts whose change also changes the graph (so "graph" is not named on its own then).
_IN_GRAPH = ("dtype", "bucket")
_ENTRY = re.compile(r"[0-9a-f]{64}\.json")


def key_records(root: Path | None) -> CompileCache:
    """The store of key records beside a compile cache at ``root`` (disabled with it)."""
    return CompileCache(None if root is None else root / "keys", label="key record", redo="recording it again")


def remember(units: Iterable[CompileUnit], records: CompileCache) -> None:
    """Record the key parts of every unit that has no record yet (cheap when all do)."""
    for unit in units:
        if not records.contains(unit.key):
            records.put(unit.key, canonical_json(unit.parts))


@dataclass
class Miss:
    """One unit about to compile, and why the cache does not hold it."""

    unit: CompileUnit
    nearest: str | None  # the key of the nearest record; None when the unit was never recorded
    changed: list[str] = field(default_factory=list)  # names from PARTS
    causes: list[str] = field(default_factory=list)  # one sentence per changed part

    def render(self) -> str:
        rank = self.unit.parts["tp"]
        where = f"{self.unit.parts['unit']}" + (f" (tp rank {rank['rank']}/{rank['size']})" if rank else "")
        head = f"  {where} [{self.unit.key[:12]}]"
        if self.nearest is None:
            return f"{head}: {self.causes[0]}"
        return f"{head}: differs from cached {self.nearest[:12]} in {', '.join(self.changed) or 'nothing'}\n" + "\n".join(
            f"      {cause}" for cause in self.causes
        )


@dataclass
class MissReport:
    """Every unit a build would compile, explained."""

    unique: int
    misses: list[Miss]

    def render(self) -> str:
        if not self.misses:
            return f"programs: all {self.unique} unique programs are in the cache; nothing to compile"
        lines = [f"programs: {len(self.misses)} of {self.unique} unique programs would compile:"]
        return "\n".join([*lines, *(miss.render() for miss in self.misses)])


def explain_misses(units: Mapping[str, CompileUnit], cache: CompileCache, records: CompileCache) -> MissReport:
    """Explain each of ``units`` (unique, by key) that ``cache`` does not hold; reads only."""
    todo = [unit for key, unit in units.items() if not cache.contains(key)]
    known = _records_by_unit(records) if todo else {}
    return MissReport(len(units), [_explain(unit, known.get(unit.parts["unit"], {})) for unit in todo])


def _records_by_unit(records: CompileCache) -> dict[str, dict[str, dict[str, Any]]]:
    """Every verified key record, grouped by unit name: unit -> key -> parts."""
    grouped: dict[str, dict[str, dict[str, Any]]] = {}
    for key in _stored_keys(records):
        parts = records.get(key, decode=_parts)
        if parts is not None:
            grouped.setdefault(parts["unit"], {})[key] = parts
    return grouped


def _stored_keys(records: CompileCache) -> list[str]:
    """The keys of the entries in a store, by file name (sorted, so ties break the same way)."""
    if records.root is None:
        return []
    keys = []
    for shard in _entries(records.root / "programs"):
        if shard.is_dir(follow_symlinks=False):
            keys += [entry.name.removesuffix(".json") for entry in _entries(Path(shard.path)) if _ENTRY.fullmatch(entry.name)]
    return sorted(keys)


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except OSError:  # no records yet, or an unreadable folder: nothing to compare with
        return []


def _parts(payload: bytes) -> dict[str, Any]:
    """The decode hook of key records: a JSON object with every part (else it is damaged)."""
    parts = json.loads(payload)
    missing = {"unit", *PARTS} - parts.keys()
    if missing:
        raise ValueError(f"missing {', '.join(sorted(missing))}")
    return parts


def _explain(unit: CompileUnit, records: dict[str, dict[str, Any]]) -> Miss:
    """Compare ``unit`` with the record of its unit that shares the most parts."""
    parts = unit.parts
    if not records:
        return Miss(unit, None, causes=[f"new unit: no {parts['unit']} program was ever recorded in this cache"])
    key, nearest = max(records.items(), key=lambda item: sum(item[1][p] == parts[p] for p in PARTS))
    changed = [p for p in PARTS if nearest[p] != parts[p]]
    if "graph" in changed and any(p in changed for p in _IN_GRAPH):
        changed.remove("graph")
    causes = [_CAUSES[p](nearest[p], parts[p]) for p in changed]
    if not changed:
        causes = ["same key parts as a program compiled before, whose cache entry is gone (removed, or found damaged)"]
    return Miss(unit, key, changed, causes)


def _options(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = [f"{k}: {_show(old.get(k))} -> {_show(new.get(k))}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    return "options: compiler option " + "; ".join(diffs) + " (build.compiler_config_overrides)"


def _tp(old: dict[str, int] | None, new: dict[str, int] | None) -> str:
    def shown(tp: dict[str, int] | None) -> str:
        return "a single PE" if tp is None else f"rank {tp['rank']} of {tp['size']}"

    return f"tp: tensor-parallel placement changed from {shown(old)} to {shown(new)} (parallel.tensor_parallel_size)"


def _show(value: Any) -> str:
    return json.dumps(value) if value is not None else "unset"


_CAUSES = {
    "compiler": lambda old, new: f"compiler: compiler version {old} -> {new}; a new compiler recompiles every program",
    "options": _options,
    "tp": _tp,
    "dtype": lambda old, new: f"dtype: tensor dtypes {'/'.join(old)} -> {'/'.join(new)} (the model's dtype or auto_bfloat16_cast)",
    "bucket": lambda old, new: f"bucket: shape (batch, attention, kv_cache) {tuple(old)} -> {tuple(new)} (buckets.*)",
    "graph": lambda old, new: "graph: the captured graph changed (model config, layer count, rewriting options or capture code)",
}

"""Compile stage: de-duplicate compile units by content hash, serve them from the cache,
compile the rest in a joblib worker pool.

A unit is a supertask graph plus compiler options (and, with tensor parallelism, the PE
of the group it is for); its key is ``cache_key(graph, options, COMPILER_VERSION)``.
Identical transformer blocks of one bucket (and, with blockwise compile, of every layer)
share a key, so each is compiled once per tensor-parallel rank.  Workers receive only
the JSON graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from furiosa_build.cache import CompileCache, cache_key, canonical_json
from furiosa_build.compiler import COMPILER_VERSION, ShardSpec, compile_graph
from furiosa_build.pool import PoolRun, run_pool

if TYPE_CHECKING:
    from furiosa_build.cluster import Cluster
from furiosa_runtime.npu.isa import Program


@dataclass(frozen=True)
class CompileUnit:
    """One program to compile: a supertask kind and its canonical graph."""

    kind: str
    graph: Mapping[str, Any]
    options: Mapping[str, Any]
    salt: str = ""  # distinguishes per-layer programs when blockwise compile is off
    tp: ShardSpec | None = None  # the tensor-parallel PE this program is for
    # Not part of the key: what the unit is for, so a cache miss can be explained (explain.py).
    role: str = field(default="", compare=False)  # e.g. "decode block:0"
    bucket: tuple[int, int, int] | None = field(default=None, compare=False)  # (batch, attention, kv_cache)

    @cached_property
    def key(self) -> str:
        program_input: dict[str, Any] = {"kind": self.kind, "graph": self.graph, "salt": self.salt}
        if self.tp is not None:  # single-PE keys stay what they were
            program_input["tp"] = asdict(self.tp)
        return cache_key(program_input, self.options, COMPILER_VERSION)

    def label(self) -> str:
        """The unit in a few words, for an error: its role, bucket, tensor-parallel rank and key."""
        bucket = "" if self.bucket is None else " (batch={}, attention={}, kv_cache={})".format(*self.bucket)
        rank = "" if self.tp is None else f" tp rank {self.tp.rank}/{self.tp.size}"
        return f"{self.role or self.kind}{bucket}{rank} {self.key[:12]}"

    @cached_property
    def parts(self) -> dict[str, Any]:
        """The parts of :attr:`key`, one comparable value each, so a cache miss can say which
        changed (``explain.py``): ``graph`` is the digest of the kind, graph and salt; the
        bucket and dtypes, already inside the graph, are spelled out for the explanation."""
        graph = hashlib.sha256(canonical_json({"kind": self.kind, "graph": self.graph, "salt": self.salt})).hexdigest()
        tensors = [*self.graph.get("inputs", ()), *self.graph.get("params", ())]
        return {
            "unit": self.role or self.kind,
            "compiler": COMPILER_VERSION,
            "options": dict(self.options),
            "tp": None if self.tp is None else asdict(self.tp),
            "dtype": sorted({t["dtype"] for t in tensors}),
            "bucket": None if self.bucket is None else list(self.bucket),
            "graph": graph,
        }


@dataclass
class CompileStats:
    units: int = 0  # programs requested by all pipelines
    unique: int = 0  # after de-duplication by key
    cached: int = 0  # served from the compile cache
    compiled: int = 0  # actually compiled in this build
    shared: int | None = None  # of ``cached``, served from the shared tier (None: no shared tier)


@dataclass
class CompileResult:
    programs: dict[str, bytes] = field(default_factory=dict)
    stats: CompileStats = field(default_factory=CompileStats)
    pool: PoolRun = field(default_factory=PoolRun)  # how many compile workers ran


def compile_unit(unit: CompileUnit) -> bytes:
    """Worker entry: compile one unit to the canonical JSON bytes of its program."""
    program = compile_graph(unit.graph, unit.kind, unit.options, unit.tp)
    return canonical_json(program.model_dump(mode="json"))


def checked_program(payload: bytes) -> bytes:
    """The cache's decode hook: a cached payload must parse as a ``Program`` (else it is
    treated as a damaged entry and recompiled); returns the payload itself."""
    Program.model_validate_json(payload)
    return payload


def plan_units(units: Iterable[CompileUnit]) -> dict[str, CompileUnit]:
    """Unique units by key, in first-seen order."""
    unique: dict[str, CompileUnit] = {}
    for unit in units:
        unique.setdefault(unit.key, unit)
    return unique


def compile_all(
    units: list[CompileUnit], cache: CompileCache, workers: int, backend: str | Cluster, progress: bool
) -> CompileResult:
    unique = plan_units(units)
    result = CompileResult(stats=CompileStats(units=len(units), unique=len(unique)))
    todo: list[CompileUnit] = []
    shared_before = cache.stats.shared_hits
    for key, unit in unique.items():
        payload = cache.get(key, decode=checked_program)
        if payload is None:
            todo.append(unit)
        else:
            result.programs[key] = payload
    result.stats.cached = len(unique) - len(todo)
    if cache.shared is not None:
        result.stats.shared = cache.stats.shared_hits - shared_before
    jobs = run_pool(compile_unit, todo, workers, backend, "compile", progress, run=result.pool, label=CompileUnit.label)
    for unit, payload in jobs:
        cache.put(unit.key, payload)
        result.programs[unit.key] = payload
    result.stats.compiled = len(todo)
    return result

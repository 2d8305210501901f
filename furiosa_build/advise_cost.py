"""What a bucket grid costs: step latencies from shape-only builds, the engine's schedule on
them, and the device memory its KV cache takes.

**Why builds, not a formula.**  A bucket's step latency is what the timing model
(``furiosa_runtime/npu/timing.py``) says of the programs the compiler makes for that shape:
which instructions, fused how, sharded how (with the tensor-parallel fallbacks), with which
collectives, transfers and expert reads.  A formula of the shape would have to redo the
compiler's decisions for every architecture and layout, and be wrong where they change;
the programs answer honestly.  Capturing a bucket takes a second or more (``torch.export``
dominates), so building an artifact for every candidate *grid* is out of the question, but
building every candidate *bucket* once is not: ``Candidates`` builds the buckets the search
asks for, shape-only (``build.weights=none``), each batch of new ones into an artifact of its
own (through the build cache, so a rerun captures nothing), and keeps all their pipelines in
one artifact.  A grid is judged on a *view* of it holding just the grid's buckets: a
bucket's programs depend neither on the other buckets nor on the KV-cache size, so the view
times every step exactly as an artifact built from the grid alone would
(``tests/build/test_advise.py`` builds the advice and checks that ``simulate`` reports the
same figures to the last bit).

**Serving.**  ``Simulator`` runs the engine's own scheduler and block manager over the
traffic on the view (``TimingCore`` and ``serve_report`` of ``engine/simulate.py``), so
admission, batching, padding, preemption and the tail of the run are all in the figure.
Prefix caching is off: the requests' token ids are random, so no two share a block and the
schedule is the same, without hashing every block.  The cost of a grid is the NPU's busy
time: offline, the time to serve the traffic (the inverse of the throughput); under a
request rate, what the traffic takes of the NPU.

**Memory.**  Each PE holds its weights (the build's ``WeightReport``) and its part of the KV
cache: for every layer whose attention it runs, its KV heads, ``block_size`` slots a block,
in the artifact's KV dtype, as ``NPUSimulator`` reserves them.  Activations are planned
into SRAM by the compiler (``compiler/memory.py``) and the timing model keeps them there,
so they take no HBM.  Every grid gets the same KV cache, as many blocks as fit beside the
weights (what an engine would allocate); a grid fits when its largest bucket's blocks do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from furiosa_build.advise_traffic import Traffic
from furiosa_build.config import BuildSpec, load_spec
from furiosa_runtime.engine.serving_report import ServingReport, bucket_label
from furiosa_runtime.engine.simulate import TimingCore, serve_report
from furiosa_runtime.engine.workload import TimedRequest, make_requests
from furiosa_runtime.npu.artifact import Artifact, Bucket, open_artifact
from furiosa_runtime.npu.isa import DTYPES, Program
from furiosa_runtime.npu.step_times import StepTimes, load_programs


@dataclass(frozen=True)
class Grid:
    """A bucket grid: its prefill and its decode buckets, each by attention size then batch."""

    prefill: tuple[Bucket, ...]
    decode: tuple[Bucket, ...]

    @classmethod
    def of(cls, buckets: Iterable[Bucket]) -> Grid:
        ordered = sorted(set(buckets), key=lambda b: (b.attention_size, b.batch_size))
        return cls(tuple(b for b in ordered if b.is_prefill), tuple(b for b in ordered if not b.is_prefill))

    @property
    def buckets(self) -> tuple[Bucket, ...]:
        return self.prefill + self.decode

    @property
    def programs(self) -> int:
        """Bucket programs a build of the grid compiles: one pipeline per bucket."""
        return len(self.buckets)

    def pairs(self, phase: str) -> list[list[int]]:
        """``[[batch, attention], ...]`` of one phase, as ``conf/buckets`` spells them."""
        return [[b.batch_size, b.attention_size] for b in (self.prefill if phase == "prefill" else self.decode)]

    def blocks_needed(self, block_size: int) -> int:
        """KV blocks the largest bucket needs, plus the padding block (``BucketsConfig.min_num_blocks``)."""
        return max(b.batch_size * b.num_kv_blocks(block_size) for b in self.buckets) + 1

    def holds(self, longest_prompt: int, longest_context: int) -> bool:
        """Whether every prompt fits a prefill bucket and every request a decode bucket."""
        prefill = max((b.attention_size for b in self.prefill), default=0)
        decode = max((b.attention_size for b in self.decode), default=0)
        return prefill >= longest_prompt and decode >= longest_context

    def label(self) -> str:
        return ", ".join(bucket_label(b) for b in self.buckets)


@dataclass(frozen=True)
class Memory:
    """Device memory of one PE and what the weights and one KV block take on each PE."""

    pe_bytes: int
    weights: dict[str, int]  # PE -> bytes of its weights
    block: dict[str, int]  # PE -> bytes of one KV block on it

    def blocks(self) -> int:
        """KV blocks that fit beside the weights on every PE (0: not even the weights fit)."""
        room = [(self.pe_bytes - self.weights.get(pe, 0)) // size for pe, size in self.block.items() if size]
        return max(min(room, default=0), 0)


def kv_block_bytes(artifact: Artifact, programs: dict[str, Program]) -> dict[str, int]:
    """KV-cache bytes one block takes on each PE of the build's placement: per layer whose
    attention the PE runs, K and V of its KV heads (``NPUSimulator._allocate_kv_cache``,
    ``isa.KVCacheLayer``)."""
    gen = artifact.generator_config
    slot = gen.paged_attention_config.block_size * DTYPES[gen.kv_cache_dtype].itemsize
    layers: dict[str, dict[int, int]] = {}
    for task in (t for p in artifact.pipelines for t in p.tasks):
        program = programs[task.program]
        attention = [i for i in program.instructions if i.op == "paged_attention"]
        for layer, inst in zip(task.kv_layers, attention):
            k, v = program.values[inst.ins[1]].shape, program.values[inst.ins[2]].shape
            layers.setdefault(task.device, {})[layer] = slot * k[1] * (k[3] + v[3])  # a slot: [k heads | v heads]
    return {pe: sum(held.values()) for pe, held in layers.items()}


class Candidates:
    """Every candidate bucket built once, shape-only, under ``folder`` (each batch of new ones
    into an artifact of its own: a build costs only its new buckets), with the modelled
    seconds of one step of each (see the module docstring)."""

    def __init__(self, spec: BuildSpec, folder: Path, say: Callable[[str], None]) -> None:
        self.spec = spec
        self.folder = folder
        self.say = say
        self.built: set[Bucket] = set()
        self.parts = 0  # artifacts built so far, one folder each
        self.artifact: Artifact  # the first build's, holding every pipeline built since
        self.programs: dict[str, Program] = {}
        self.times: StepTimes
        self.weights: dict[str, int] = {}
        self.block_bytes: dict[str, int] = {}

    def add(self, buckets: Iterable[Bucket]) -> None:
        """Build the buckets not built yet."""
        new = Grid.of(set(buckets) - self.built)
        if not new.buckets:
            return
        from furiosa_build.builder import ArtifactBuilder  # imports torch: only when something is built

        self.say(f"building {new.programs} candidate bucket(s) shape-only ({len(self.built) + new.programs} in all)")
        part = self.folder / f"part{self.parts}"
        self.parts += 1
        report = ArtifactBuilder.from_spec(self._spec(self._buildable(new), part)).build_from_spec()
        artifact, files = open_artifact(part)
        self.programs.update(load_programs(files, artifact))
        if not self.built:  # every part has the same weights and KV layout
            assert report.weights is not None, "a generate build reports its weights"
            self.weights, self.block_bytes = report.weights.per_pe, kv_block_bytes(artifact, self.programs)
            self.artifact = artifact
        else:
            fresh = [p for p in artifact.pipelines if p.bucket in set(new.buckets)]
            self.artifact = self.artifact.model_copy(update={"pipelines": [*self.artifact.pipelines, *fresh]})
        self.built |= set(new.buckets)
        self.times = StepTimes(self.artifact, self.programs)

    def _buildable(self, new: Grid) -> Grid:
        """``new`` with a built bucket of each phase it lacks: a build needs both phases."""
        built = Grid.of(self.built)
        return Grid.of([*new.buckets, *(new.prefill or built.prefill[:1]), *(new.decode or built.decode[:1])])

    def seconds(self, bucket: Bucket) -> float:
        """One step of a built bucket, on the mesh the artifact is laid out on."""
        return self.times.seconds[bucket.pipeline_name(self.artifact.metadata.name)]

    def view(self, grid: Grid, num_blocks: int) -> Artifact:
        """The artifact as if built from ``grid`` with a KV cache of ``num_blocks`` blocks."""
        gen = self.artifact.generator_config
        paged = gen.paged_attention_config.model_copy(update={"num_blocks": num_blocks})
        update = {"prefill_buckets": list(grid.prefill), "decode_buckets": list(grid.decode), "paged_attention_config": paged,
                  "max_seq_len_to_capture": max(b.attention_size for b in grid.buckets)}  # fmt: skip
        pipelines = [p for p in self.artifact.pipelines if p.bucket in set(grid.buckets)]
        return self.artifact.model_copy(update={"generator_config": gen.model_copy(update=update), "pipelines": pipelines})

    def _spec(self, grid: Grid, folder: Path) -> BuildSpec:
        """The user's build spec with these buckets, shape-only, into ``folder``, quiet."""
        data = self.spec.model_dump()
        data["buckets"].update(prefill=grid.pairs("prefill"), decode=grid.pairs("decode"), paged_attention_num_blocks=None,
                               max_seq_len_to_capture=max(b.attention_size for b in grid.buckets))  # fmt: skip
        data["build"].update(weights="none", save_dir=str(folder), progress=False, dry_run=False, explain=False)
        return load_spec(data)


@dataclass(frozen=True)
class Served:
    """A grid's modelled serving of the traffic: the report, and the NPU's busy seconds."""

    report: ServingReport
    busy_seconds: float


class Simulator:
    """Modelled serving of the traffic on any grid of built candidates, remembered per grid."""

    def __init__(self, candidates: Candidates, traffic: Traffic, num_blocks: int, seed: int) -> None:
        self.candidates = candidates
        self.traffic = traffic
        self.num_blocks = num_blocks
        self.seed = seed
        self.served: dict[Grid, Served] = {}
        self._requests: list[TimedRequest] | None = None

    def __call__(self, grid: Grid) -> Served:
        if grid not in self.served:
            self.candidates.add(grid.buckets)
            view = self.candidates.view(grid, self.num_blocks)
            core = TimingCore(view, self.candidates.times, view.scheduler_config, enable_prefix_caching=False)
            if self._requests is None:  # token ids as simulate draws them: same seed, same vocabulary
                self._requests = make_requests(list(self.traffic.shapes), core.vocab_size, 0, self.seed)
            label = self.traffic.workload + (", offline" if self.traffic.offline else "")
            self.served[grid] = Served(serve_report(core, self._requests, label), core.stats.seconds)
        return self.served[grid]

    def cost(self, grid: Grid) -> float:
        """NPU seconds the grid takes to serve the traffic (lower is better)."""
        return self(grid).busy_seconds

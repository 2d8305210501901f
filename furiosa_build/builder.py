"""``ArtifactBuilder``: the public build API, running load -> capture -> compile ->
partition -> package.

Capture runs in a joblib pool of ``num_pipeline_builder_workers`` (each worker gets a
bucket and the model config, never the weights); compilation runs in a pool of
``num_compile_workers`` over de-duplicated, cache-checked units.  With ``build.backend``
``ray`` or ``dask`` both pools run on a cluster's workers instead (``cluster.py``).
"""

from __future__ import annotations

import functools
import json
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from furiosa_build import supertask as capture_stage
from furiosa_build.cache import CompileCache
from furiosa_build.cluster import Cluster, open_backend
from furiosa_build.compile import CompileStats, CompileUnit, compile_all, plan_units
from furiosa_build.compiler import COMPILER_VERSION, DEFAULT_OPTIONS, ShardSpec
from furiosa_build.compiler.quantize import quantized_options
from furiosa_build.compiler.shard import cut, fallback_notes
from furiosa_build.config import BuildSpec, fit_to_model, spec_from_builder_args
from furiosa_build.errors import ConfigError, io_error
from furiosa_build.explain import MissReport, explain_misses, key_records, remember
from furiosa_build.load import (
    LoadedModel,
    LoadRequest,
    ShapeOnlyModel,
    load,
    load_pooling,
)
from furiosa_build.package import (
    check_param_file,
    prepare_save_dir,
    write_artifact,
    write_param_file,
)
from furiosa_build.partition import (
    Placement,
    ProgramParams,
    TensorSlice,
    build_pipeline,
)
from furiosa_build.pool import CAPTURE_WORKER, PoolRun, run_pool
from furiosa_build.quantization_plan import PlannedWeights, planned_scheme
from furiosa_build.quantized_checkpoint import FIELD as QUANTIZED_FIELD
from furiosa_build.quantized_checkpoint import (
    QuantizationError,
    QuantizedCheckpoint,
    QuantizedWeights,
)
from furiosa_build.safetensors_file import TensorSpec
from furiosa_build.shared_cache import SharedTier
from furiosa_build.source_memo import SourceMemo
from furiosa_build.sources import resolve_source
from furiosa_build.weight_sources import WeightSource
from furiosa_runtime.npu.artifact import (
    Bucket,
    GeneratorConfig,
    ModelMetadata,
    Pipeline,
    QuantizationConfig,
)
from furiosa_runtime.npu.isa import Constant, ParamShard, Program
from furiosa_runtime.npu.step_times import kv_cache_bytes
from furiosa_runtime.npu.timing import StepModel, build_placement_seconds

FURIOSA_LLM_VERSION = "0.1.0"


@dataclass
class BuildReport:
    """What a build did: for the closing summary and for tests."""

    save_dir: Path | None
    pipelines: int
    compile: CompileStats
    seconds: dict[str, float] = field(default_factory=dict)
    artifact_bytes: int = 0
    weights: WeightReport | None = None
    step_seconds: list[tuple[Bucket, float]] = field(default_factory=list)  # modelled NPU latency per bucket
    kv_cache: dict[str, int] = field(default_factory=dict)  # KV cache bytes each PE of replica 0 reserves
    sharding: list[str] = field(default_factory=list)  # tensor-parallel fallbacks (compiler/shard.py)
    pools: dict[str, PoolRun] = field(default_factory=dict)  # workers each stage ran with

    def render(self) -> str:
        stats = self.compile
        reused = stats.units - stats.unique
        lines = [
            f"pipelines: {self.pipelines}",
            f"programs: {stats.units} requested, {stats.unique} unique ({reused} reused by blockwise/bucket sharing), "
            f"{stats.compiled} compiled, {stats.cached} served from cache"
            + ("" if stats.shared is None else f" ({stats.shared} of them from the shared cache)"),
            "seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()) + f", total {sum(self.seconds.values()):.2f}",
        ]
        if self.pools:
            lines.append("workers: " + ", ".join(f"{stage} {run.used}" for stage, run in self.pools.items()))
            lines += [f"  {stage}: {run.note}" for stage, run in self.pools.items() if run.note]
        if self.weights is not None:
            lines.append(self.weights.render())
        if self.kv_cache:
            lines.append(f"KV cache per PE: max {_size(max(self.kv_cache.values()))} over {len(self.kv_cache)} PEs")
        if self.sharding:
            lines.append("tensor parallelism: all-gathered and computed whole on every PE: " + "; ".join(self.sharding))
        if self.step_seconds:
            lines.append("modelled step latency on the NPU (one replica; an estimate, see furiosa_runtime/npu/timing.py):")
            lines += [_latency_line(bucket, seconds) for bucket, seconds in self.step_seconds]
        if self.save_dir is not None:
            lines.append(f"artifact: {self.save_dir} ({self.artifact_bytes / 2**20:.1f} MiB)")
        return "\n".join(lines)


@dataclass
class WeightReport:
    """Weight bytes each PE of data-parallel replica 0 stores, against the whole model's."""

    per_pe: dict[str, int]
    total: int  # every weight and constant the pipelines bind, unsharded
    replicated: int  # what a rank holds beyond 1/tp of the tensors it reads: whole tensors, shared KV-head chunks
    tensor_parallel_size: int

    @classmethod
    def of(cls, pipelines: list[Pipeline], slices: list[TensorSlice], specs: dict[str, TensorSpec], tp: int) -> WeightReport:
        """From the specs of the artifact's tensors (nothing read): bytes are dtype size x shape."""
        held: dict[str, set[str]] = {}
        for task in (t for p in pipelines for t in p.tasks):
            held.setdefault(task.device, set()).update(task.params.values())
        nbytes = {name: int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize for name, (dtype, shape) in specs.items()}
        chunk = {s.source: nbytes[s.name] for s in slices}
        full = {s.source: chunk[s.source] * (s.layout.parts if s.layout else 1) for s in slices}
        replicated = sum(chunk[source] - full[source] / tp for source in full)
        per_pe = {pe: sum(nbytes[name] for name in names) for pe, names in sorted(held.items())}
        return cls(per_pe, sum(full.values()), int(replicated), tp)

    def render(self) -> str:
        tp = self.tensor_parallel_size
        return (
            f"weights per PE: max {_size(max(self.per_pe.values()))} over {len(self.per_pe)} PEs of a replica "
            f"(model {_size(self.total)}; tp={tp}: 1/{tp} = {_size(self.total / tp)} + {_size(self.replicated)} "
            "replicated per PE holding every layer)"
        )  # fmt: skip


def _latency_line(bucket: Bucket, seconds: float) -> str:
    tokens = bucket.batch_size * (bucket.input_len if bucket.is_prefill else 1)
    return f"  {bucket.phase:7s} batch={bucket.batch_size} attention={bucket.attention_size}: {seconds * 1e3:.3f} ms ({tokens / seconds:,.0f} tokens/s)"


def _size(nbytes: float) -> str:
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.2f} GiB"
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


@dataclass
class BuildPlan:
    """A dry run: what would be built, and how much of it the cache already holds."""

    buckets: list[Bucket]
    pipelines: list[str]
    supertasks_per_pipeline: int
    units: int
    unique: int
    cached: int

    def render(self) -> str:
        lines = ["buckets:"]
        lines += [f"  {b.phase:7s} batch={b.batch_size} attention={b.attention_size} kv_cache={b.kv_cache_size}" for b in self.buckets]
        lines.append("pipelines:")
        lines += [f"  {p}" for p in self.pipelines]
        lines.append(f"supertasks per pipeline: {self.supertasks_per_pipeline}")
        lines.append(f"programs: {self.units} requested, {self.unique} unique, {self.cached} already in the cache, "
                     f"{self.unique - self.cached} to compile")  # fmt: skip
        return "\n".join(lines)


def _on_workers(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a build entry point with its pools' backend open in ``self._backend``: for
    ``ray`` or ``dask`` a cluster whose address is probed now, joined on first use and
    left (a local one stopped) when the entry point returns."""

    @functools.wraps(method)
    def run(self: ArtifactBuilder, *args: Any, **kwargs: Any) -> Any:
        if self._backend is not None:
            return method(self, *args, **kwargs)
        opts = self.spec.build
        local_workers = max(opts.num_pipeline_builder_workers, opts.num_compile_workers)
        with open_backend(opts.backend, opts.cluster, local_workers) as backend:
            self._backend = backend
            try:
                return method(self, *args, **kwargs)
            finally:
                self._backend = None

    return run


class ArtifactBuilder:
    """Build an artifact for a model (see the reference's ``ArtifactBuilder``)."""

    _backend: str | Cluster | None = None  # where the pools run while an entry point runs (_on_workers)

    def __init__(self, model_id_or_path: str | None, devices: str = "npu:0", name: str = "", **kwargs: Any) -> None:
        self.spec = spec_from_builder_args(model_id_or_path, devices, name, kwargs, {})
        self.pools: dict[str, PoolRun] = {}  # how each stage's worker pool ran, for the report

    @classmethod
    def from_spec(cls, spec: BuildSpec) -> ArtifactBuilder:
        builder = cls.__new__(cls)
        builder.spec = spec
        builder.pools = {}
        return builder

    def build(self, save_dir: str | Path, **kwargs: Any) -> BuildReport:
        """Build into ``save_dir``; keyword arguments are those of the reference's ``build()``.

        A mistake raises ConfigError (a ValueError), a file-system failure BuildIOError (an
        OSError); either message is one line naming the field or path.
        """
        spec = spec_from_builder_args(None, "", "", {}, {**kwargs, "save_dir": save_dir}, base=self.spec)
        try:
            return ArtifactBuilder.from_spec(spec).build_from_spec()
        except OSError as exc:  # disk full, read-only, permissions...: one line naming the path
            raise io_error(exc, f"building {spec.build.save_dir}") from None

    # -- stages ------------------------------------------------------------------------------
    @property
    def save_dir(self) -> Path:
        return Path(self.spec.build.save_dir or f"artifacts/{self.spec.model.name}")

    def _cache_root(self, section: str = "") -> Path | None:
        """Where a section of the cache lives (None when the build runs without a cache)."""
        root = self.spec.build.cache_dir
        return Path(root).expanduser() / section if root else None

    def _cache(self) -> CompileCache:
        """The content-addressed store of compiled programs."""
        return CompileCache(self._cache_root(), shared=self._shared(""))

    @cached_property
    def _shared_tier(self) -> SharedTier | None:
        """``build.shared_cache``, opened once per build (so its trouble warns once)."""
        url = self.spec.build.shared_cache
        return SharedTier.open(url) if url else None

    def _shared(self, section: str) -> SharedTier | None:
        """The shared tier's part behind the local cache section ``section``."""
        return None if self._shared_tier is None else self._shared_tier.section(section)

    def _load_request(self) -> LoadRequest:
        m = self.spec.model
        source = resolve_source(m.model_id_or_path, m.hf_config is not None)
        return LoadRequest(source, m.hf_config, m.num_hidden_layers, m.seed_for_random_weight, m.auto_bfloat16_cast,
                           m.trust_remote_code, m.task, m.pooling, self._source_memo)  # fmt: skip

    @cached_property
    def _source_memo(self) -> SourceMemo:
        """Config reads and source hashes remembered in the cache (``source_memo.py``)."""
        return SourceMemo(self._cache_root("sources"))

    def _buckets(self) -> list[Bucket]:
        buckets = [*self.spec.buckets.prefill_buckets(), *self.spec.buckets.decode_buckets()]
        return list(dict.fromkeys(buckets))

    def _slice_last_token(self) -> bool:
        b = self.spec.buckets
        return bool(b.calculate_logit_only_for_last_token in (None, True) or b.add_prefill_last_block_slice)

    def _signatures(self, hf_config: dict[str, Any]) -> list[capture_stage.Signature]:
        types = capture_stage.layer_types(hf_config)
        return capture_stage.block_signatures(types, self.spec.build.num_blocks_per_supertask)

    def _capture(self, hf_config: dict[str, Any], stage_times: dict[str, float]) -> list[capture_stage.CaptureResult]:
        """Capture every bucket: from the cache when the same capture was done before."""
        signatures = self._signatures(hf_config)
        pooling = load_pooling(self._load_request())
        units = [
            capture_stage.CaptureUnit(hf_config, bucket, tuple(dict.fromkeys(signatures)), self.spec.buckets.paged_attention_block_size, self._slice_last_token(), pooling)
            for bucket in self._buckets()
        ]  # fmt: skip
        with _timed(stage_times, "capture"):
            store = CompileCache(self._cache_root("captures"), label="capture", redo="recapturing", shared=self._shared("captures"))
            keys = [capture_stage.capture_key(u) for u in units]
            cached = {k: store.get(k, decode=capture_stage.decode_result) for k in keys}
            todo = [u for u, k in zip(units, keys) if cached[k] is None]
            opts = self.spec.build
            if todo and opts.backend == "multiprocessing":
                import furiosa_build.capture  # noqa: F401  forked workers then share torch's pages
            jobs = run_pool(_capture_one, todo, opts.num_pipeline_builder_workers, self._backend or opts.backend, "capture",
                            opts.progress, cost=CAPTURE_WORKER, run=self.pools.setdefault("capture", PoolRun()),
                            label=_capture_label)  # fmt: skip
            fresh = {}
            for unit, result in jobs:
                key = capture_stage.capture_key(unit)
                store.put(key, capture_stage.encode_result(result))
                fresh[key] = result
            return [fresh[k] if k in fresh else cached[k] for k in keys]

    def _shard_specs(self, hf_config: dict[str, Any]) -> list[ShardSpec | None]:
        """One entry per tensor-parallel rank; ``[None]`` for single-PE programs."""
        tp = self.spec.parallel.tensor_parallel_size
        if tp == 1:
            return [None]
        _, kv_heads = capture_stage.attention_heads(hf_config)
        return [ShardSpec(tp, rank, min(tp, kv_heads), int(hf_config["vocab_size"])) for rank in range(tp)]

    @cached_property
    def _checkpoint(self) -> QuantizedCheckpoint | None:
        """The quantized checkpoint of ``build.quantize_artifact_path``, opened once (headers only)."""
        path = self.spec.build.quantize_artifact_path
        return None if path is None else QuantizedCheckpoint.open(path)

    def _check_checkpoint(self, hf_config: dict[str, Any]) -> None:
        """Refuse quantization (a checkpoint or a planned scheme) for a pooling model, and a
        checkpoint of another model or of another scheme than ``quantization.scheme`` (once
        ``fit_to_model`` has made ``model.task`` concrete)."""
        scheme, task = self.spec.quantization.scheme, self.spec.model.task
        if self._checkpoint is None:
            if scheme != "none" and task != "generate":
                raise QuantizationError(f"quantization.scheme: {scheme} applies to generate models, not to model.task {task}")
            return
        if task != "generate":
            raise QuantizationError(f"{QUANTIZED_FIELD}: quantized checkpoints apply to generate models, not to model.task {task}")
        if scheme not in ("none", self._checkpoint.scheme.scheme):
            raise QuantizationError(f"quantization.scheme: {scheme}, but the checkpoint in {QUANTIZED_FIELD} is "
                                    f"{self._checkpoint.scheme.scheme}; leave quantization=none to take the checkpoint's")  # fmt: skip
        self._checkpoint.check_model(hf_config)

    def _quantization(self, captures, hf_config) -> QuantizationConfig | None:
        """The quantized linears: the checkpoint's scheme and modules (every decoder layer's
        tensors checked), else ``quantization.scheme`` planned over every linear layer of the
        decoder layers (a shape-only build), else None."""
        if self._checkpoint is not None:
            return self._checkpoint.for_model(captures[0].layers_path, capture_stage.num_layers(hf_config))
        if self.spec.quantization.scheme == "none":
            return None
        graphs = [captures[0].blocks[sig].graph.to_json() for sig in dict.fromkeys(self._signatures(hf_config))]
        return planned_scheme(self.spec.quantization.scheme, graphs)

    def _weight_source(self, loaded: LoadedModel | ShapeOnlyModel, quantization: QuantizationConfig | None, captures, hf_config) -> WeightSource:
        """Where the artifact's tensors come from: the quantized checkpoint, the model with the
        planned quantized linears' specs (shape-only), or the model as loaded."""
        if self._checkpoint is not None:
            return QuantizedWeights(self._checkpoint, loaded.weights())
        if quantization is not None:
            return PlannedWeights(loaded.weights(), quantization, captures[0].layers_path, capture_stage.num_layers(hf_config))
        return loaded.weights()

    def _compile_units(self, captures, hf_config) -> tuple[list[CompileUnit], list[dict[str, list[str]]]]:
        """Compile units of every pipeline and, per pipeline, role -> unit key of each rank.
        Units of a quantized build get the compile option ``quantization`` (``compiler/quantize.py``)."""
        options = {**DEFAULT_OPTIONS, **(self.spec.build.compiler_config_overrides or {})}
        quantization = self._quantization(captures, hf_config)
        blockwise = self.spec.build.use_blockwise_compile
        shards = self._shard_specs(hf_config)
        units, roles = [], []
        for cap in captures:
            graphs = {"embed": (cap.embed, ""), "head": (cap.head, "")}
            for g, sig in enumerate(self._signatures(hf_config)):
                graphs[f"block:{g}"] = (cap.blocks[sig], "" if blockwise else f"group{g}")
            mine = {}
            for role, (task, salt) in graphs.items():
                graph = self._graph_json(task, cap)
                bucket = (cap.bucket.batch_size, cap.bucket.attention_size, cap.bucket.kv_cache_size)
                quantized = quantized_options(task.kind, quantization)
                unit_options = options if quantized is None else {**options, "quantization": quantized}
                mine[role] = [CompileUnit(task.kind, graph, unit_options, salt, shard, f"{cap.bucket.phase} {role}", bucket)
                              for shard in shards]  # fmt: skip
            units.extend(u for ranks in mine.values() for u in ranks)
            roles.append({role: [u.key for u in ranks] for role, ranks in mine.items()})
        return units, roles

    def _graph_json(self, task: capture_stage.Supertask, cap: capture_stage.CaptureResult) -> dict[str, Any]:
        """The compiler input of a supertask; with ``embed_all_constants_into_graph`` the
        buffer values travel inside it (and into the program) instead of the weight file."""
        graph = task.graph.to_json()
        if self.spec.build.embed_all_constants_into_graph:
            graph["constants"] = {
                rel: Constant.infer(rel, cap.constants[rel.removeprefix("const:")]).model_dump(exclude={"name"})
                for rel in task.constant_params
            }
        return graph

    def _planned_units(self) -> tuple[list[capture_stage.CaptureResult], dict[str, Any], list[CompileUnit]]:
        """Captures, model config and compile units of the build, without compiling."""
        self.spec, hf_config = fit_to_model(self.spec, self._load_request())  # model.task made concrete, model checked
        self._source_memo.flush()
        self._check_checkpoint(hf_config)
        captures = self._capture(hf_config, {})
        units, _ = self._compile_units(captures, hf_config)
        return captures, hf_config, units

    @_on_workers
    def explain(self) -> MissReport:
        """Why each program about to compile is not in the cache (``build.explain``); compiles nothing."""
        _, _, units = self._planned_units()
        return explain_misses(plan_units(units), self._cache(), key_records(self._cache_root()))

    @_on_workers
    def plan(self) -> BuildPlan:
        """Capture and hash every program without compiling (``build.dry_run``)."""
        captures, hf_config, units = self._planned_units()
        unique = plan_units(units)
        cache = self._cache()
        return BuildPlan(
            buckets=self._buckets(),
            pipelines=[c.bucket.pipeline_name(self.spec.model.name) for c in captures],
            supertasks_per_pipeline=2 + len(self._signatures(hf_config)),
            units=len(units),
            unique=len(unique),
            cached=sum(cache.contains(k) for k in unique),
        )

    @_on_workers
    def build_from_spec(self) -> BuildReport:
        """Run every stage and write the artifact to ``save_dir``."""
        times: dict[str, float] = {}
        opts = self.spec.build
        prepare_save_dir(self.save_dir)
        if opts.param_file_path:
            check_param_file(Path(opts.param_file_path).expanduser())
        _ = self._checkpoint  # opens its headers: a missing or unreadable checkpoint is refused before anything is written
        self.spec, hf_config = fit_to_model(self.spec, self._load_request())  # model.task made concrete, model checked
        self._source_memo.flush()
        self._check_checkpoint(hf_config)  # opens the checkpoint: an unreadable one is refused before the load
        if opts.weights == "none":
            return self._build_loaded(ShapeOnlyModel(hf_config, self.spec.model.task), times)
        with _timed(times, "load"):
            models = self._cache_root("models")
            loaded = load(self._load_request(), models)
            self._source_memo.flush()
            models = None if loaded.temporary else models  # converted outside the cache: removed below
            if opts.param_file_path:
                write_param_file(loaded.weights_file, Path(opts.param_file_path).expanduser())
        try:
            return self._build_loaded(loaded, times)
        finally:
            if models is None and opts.cleanup:
                shutil.rmtree(loaded.folder.parent, ignore_errors=True)

    def _build_loaded(self, loaded: LoadedModel | ShapeOnlyModel, times: dict[str, float]) -> BuildReport:
        opts = self.spec.build
        hf_config = loaded.hf_config
        captures = self._capture(hf_config, times)
        units, roles = self._compile_units(captures, hf_config)
        with _timed(times, "compile"):
            compiled = compile_all(units, self._cache(), opts.num_compile_workers, self._backend or opts.backend, opts.progress)
            self.pools["compile"] = compiled.pool
            remember(plan_units(units).values(), key_records(self._cache_root()))
        with _timed(times, "partition"):
            pipelines, slices = self._pipelines(captures, roles, hf_config, compiled.programs)
        with _timed(times, "package"):
            quantization = self._quantization(captures, hf_config)
            artifact_fields = self._artifact_fields(hf_config, pipelines, quantization)
            used = {key for p in pipelines for key in (t.program for t in p.tasks)}
            programs = {k: v for k, v in compiled.programs.items() if k in used}
            parsed = {k: Program.model_validate_json(v) for k, v in programs.items()}
            specs, tensor = self._tensors(slices, captures, self._weight_source(loaded, quantization, captures, hf_config))
            weights = WeightReport.of(pipelines, slices, specs, self.spec.parallel.tensor_parallel_size)
            slots = self.spec.buckets.num_blocks() * self.spec.buckets.paged_attention_block_size
            kv = kv_cache_bytes(pipelines, parsed, slots, self.spec.quantization.kv_cache_dtype)
            self._check_pe_memory(weights.per_pe, kv)
            size = write_artifact(self.save_dir, artifact_fields, programs, specs, tensor if opts.weights == "included" else None,
                                  loaded.tokenizer_files())  # fmt: skip
        report = BuildReport(self.save_dir, len(pipelines), compiled.stats, times, size, weights,
                             self._step_seconds(pipelines, parsed, artifact_fields), kv_cache=kv)  # fmt: skip
        report.sharding = fallback_notes(programs.values())
        report.pools = dict(self.pools)
        if opts.progress:
            print(report.render())
        return report

    def _pipelines(self, captures, roles, hf_config, programs: dict[str, bytes]) -> tuple[list[Pipeline], list[TensorSlice]]:
        """Every bucket's pipeline, and the tensor slices their tasks bind."""
        layers = capture_stage.num_layers(hf_config)
        par = self.spec.parallel
        stages = tuple(par.layers_per_stage(layers))
        placement = Placement(par.mesh(self.spec.hardware), layers, self.spec.build.num_blocks_per_supertask, stages)
        signatures = self._signatures(hf_config)
        params = {key: _program_params(programs[key]) for r in roles for keys in r.values() for key in keys}
        pipelines, slices = [], []
        for cap, keys in zip(captures, roles):
            pipeline, bound = build_pipeline(self.spec.model.name, cap, signatures, placement, keys, params)
            pipelines.append(pipeline)
            slices.extend(bound)
        return pipelines, list(dict.fromkeys(slices))

    def _tensors(self, slices: list[TensorSlice], captures, source: WeightSource) -> tuple[dict[str, TensorSpec], Callable[[str], np.ndarray]]:
        """Exactly the weights and constants that some task binds, cut into tensor-parallel
        chunks: the spec of each (chunk shapes from the layout, nothing read) and a function
        making one at a time.  It reads a source tensor when first asked for one of its
        tensors and keeps it (one tensor) while its chunks, adjacent in name order
        (``name``, ``name@tpR/N``), are cut; captured constants (small) stay in memory."""
        constants = {f"const:{k}": v for cap in captures for k, v in cap.constants.items()}
        available = source.specs()
        full: dict[str, TensorSpec] = {}
        for name in sorted({s.source for s in slices}):
            if name in constants:
                full[name] = (constants[name].dtype, tuple(constants[name].shape))
            elif name in available:
                full[name] = available[name]
            else:
                raise ValueError(f"weight {name} needed by the compiled graph is missing from the model")
        specs: dict[str, TensorSpec] = {}
        parts: dict[str, TensorSlice] = {}
        for s in slices:
            assert parts.setdefault(s.name, s).layout == s.layout, f"{s.name} is cut two ways"
            dtype, shape = full[s.source]
            specs[s.name] = (dtype, shape if s.layout is None else _chunk_shape(shape, s.layout))
        memo: dict[str, np.ndarray] = {}  # the last source tensor read

        def tensor(name: str) -> np.ndarray:
            s = parts[name]
            if s.source in constants:
                whole = constants[s.source]
            else:
                if s.source not in memo:
                    memo.clear()
                    memo[s.source] = source.tensor(s.source)
                whole = memo[s.source]
            return whole if s.layout is None else np.ascontiguousarray(cut(whole, s.layout, s.chunk))

        return specs, tensor

    def _step_seconds(self, pipelines: list[Pipeline], programs: dict[str, Program], fields: dict[str, Any]) -> list[tuple[Bucket, float]]:
        """The modelled NPU latency of one step of every bucket, where the build placed it."""
        generator = GeneratorConfig.model_validate(fields["generator_config"])
        model = StepModel(programs, self.spec.hardware, generator.paged_attention_config.block_size,
                          ModelMetadata.model_validate(fields["model_metadata"]).weight_dtype, generator.kv_cache_dtype)  # fmt: skip
        return [(p.bucket, build_placement_seconds(p, model)) for p in pipelines]

    def _check_pe_memory(self, weights: dict[str, int], kv: dict[str, int]) -> None:
        """Refuse an artifact whose weights and KV cache (bytes of each PE of replica 0; the
        other replicas hold the same) overflow a PE's share of HBM, which the simulator would
        refuse to load; one line naming what to change."""
        hw = self.spec.hardware
        for pe in sorted(weights.keys() | kv.keys()):
            w, k = weights.get(pe, 0), kv.get(pe, 0)
            if w + k > hw.pe_hbm_bytes:
                field = "buckets.paged_attention_num_blocks" if w <= hw.pe_hbm_bytes else "parallel.devices"
                raise ConfigError(f"{field}: {pe} would hold {_size(w + k)} (weights {_size(w)}, KV cache {_size(k)} of "
                                  f"{self.spec.buckets.num_blocks()} blocks in {self.spec.quantization.kv_cache_dtype}) but a PE "
                                  f"has {_size(hw.pe_hbm_bytes)} (1/{hw.pes_per_device} of the HBM); use fewer KV blocks or "
                                  "smaller buckets, a smaller quantization.kv_cache_dtype, or more PEs")  # fmt: skip

    def _artifact_fields(self, hf_config: dict[str, Any], pipelines: list[Pipeline], quantization: QuantizationConfig | None) -> dict[str, Any]:
        spec = self.spec
        eos = hf_config.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return {
            "metadata": {
                "artifact_id": str(uuid.uuid4()),
                "name": spec.model.name,
                "timestamp": int(time.time()),
                "version": {"furiosa_llm": FURIOSA_LLM_VERSION, "furiosa_compiler": COMPILER_VERSION},
            },
            "devices": spec.parallel.devices,
            "generator_config": {
                "prefill_buckets": [b.model_dump() for b in spec.buckets.prefill_buckets()],
                "decode_buckets": [b.model_dump() for b in spec.buckets.decode_buckets()],
                "max_seq_len_to_capture": spec.buckets.max_seq_len_to_capture,
                "paged_attention_config": {"num_blocks": spec.buckets.num_blocks(), "block_size": spec.buckets.paged_attention_block_size},
                "kv_cache_dtype": spec.quantization.kv_cache_dtype,
                "kv_cache_sharing_across_beams_config": beams.model_dump() if (beams := spec.buckets.kv_cache_sharing_across_beams_config) else None,
            },
            "hf_config": hf_config,
            "model_metadata": {
                "pretrained_id": spec.model.model_id_or_path or f"random:{hf_config.get('model_type')}",
                "architecture": (hf_config.get("architectures") or [hf_config.get("model_type", "unknown")])[0],
                "task": spec.model.task,
                "pooling": load_pooling(self._load_request()),
                "num_hidden_layers": capture_stage.num_layers(hf_config),
                "trust_remote_code": spec.model.trust_remote_code,
                "eos_token_ids": eos_ids,
                "weights": spec.build.weights,
                "quantization": quantization and quantization.model_dump(),
            },
            "model_rewriting_config": {
                "do_decompositions_for_model_rewrite": spec.build.do_decompositions_for_model_rewrite,
                "use_blockwise_compile": spec.build.use_blockwise_compile,
                "num_blocks_per_supertask": spec.build.num_blocks_per_supertask,
                "embed_all_constants_into_graph": spec.build.embed_all_constants_into_graph,
                "calculate_logit_only_for_last_token": self._slice_last_token(),
                "add_prefill_last_block_slice": spec.buckets.add_prefill_last_block_slice,
                "compiler_config_overrides": spec.build.compiler_config_overrides,
            },
            "parallel_config": {
                "tensor_parallel_size": spec.parallel.tensor_parallel_size,
                "pipeline_parallel_size": spec.parallel.pipeline_parallel_size,
                "data_parallel_size": spec.parallel.mesh(spec.hardware).dp,
                "num_blocks_per_pp_stage": spec.parallel.layers_per_stage(capture_stage.num_layers(hf_config)),
            },
            "scheduler_config": spec.scheduler.model_dump(),
            "hardware": spec.hardware.model_dump(),
            "pipelines": [p.model_dump(mode="json") for p in pipelines],
        }


def _chunk_shape(shape: tuple[int, ...], layout: ParamShard) -> tuple[int, ...]:
    """The shape of one chunk :func:`cut` makes under ``layout`` (every segment split alike)."""
    width = sum(w // p for w, p in layout.widths(shape[layout.dim]))
    return (*shape[: layout.dim], width, *shape[layout.dim + 1 :])


def _program_params(payload: bytes) -> ProgramParams:
    """The parameters a compiled program reads, with their tensor-parallel layouts."""
    program = json.loads(payload)
    layouts = (program.get("tensor_parallel") or {}).get("params", {})
    names = [p["name"][2:] for p in program["params"]]
    return {name: ParamShard(**layouts[name]) if name in layouts else None for name in names}


def _capture_label(unit: capture_stage.CaptureUnit) -> str:
    """A capture unit in a few words, for an error: its bucket."""
    b = unit.bucket
    return f"{b.phase} (batch={b.batch_size}, attention={b.attention_size}, kv_cache={b.kv_cache_size})"


def _capture_one(unit: capture_stage.CaptureUnit) -> capture_stage.CaptureResult:
    """Worker entry of the pipeline-builder pool; torch is imported only where capture runs."""
    from furiosa_build.capture import capture

    return capture(unit)


@contextmanager
def _timed(times: dict[str, float], stage: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - start

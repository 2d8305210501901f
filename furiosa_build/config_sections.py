"""The sections of a :class:`furiosa_build.config.BuildSpec`, one per Hydra config group in ``conf/``.

``model`` (:class:`ModelConfig`), ``buckets`` (:class:`BucketsConfig`), ``parallel``
(:class:`ParallelSpec`), ``scheduler`` (:class:`SchedulerSpec`), ``build``
(:class:`BuildOptions`) and ``quantization`` (:class:`QuantizationSpec`).  Each section
checks what its own values decide and raises :class:`Invalid` naming the field below it,
which ``furiosa_build.config.load_spec`` turns into a one-line ``ConfigError`` naming the
dotted field.
"""

from __future__ import annotations

import importlib.util
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from furiosa_build.compiler import DEFAULT_OPTIONS
from furiosa_build.errors import show_value
from furiosa_build.model_checks import model_type_problem
from furiosa_build.quantization_plan import PLANNED_SCHEMES
from furiosa_build.shared_cache import check_shared_cache
from furiosa_runtime.npu.artifact import Bucket, PoolingConfig, split_layers
from furiosa_runtime.npu.hardware import RNGD, HardwareSpec, Mesh, plan_mesh

#: The compiler options a user may override, with their type and default.
COMPILER_CONFIG_OVERRIDES: dict[str, tuple[type, Any]] = {k: (type(v), v) for k, v in DEFAULT_OPTIONS.items()}

_JOBLIB_BACKENDS = ("loky", "threading", "multiprocessing", "sequential")
_CLUSTER_BACKENDS = ("dask", "ray")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_EXPECTED_BY_TYPE: dict[type, str] = {bool: "a boolean (true or false)", int: "an integer", str: "a string"}


class Invalid(ValueError):
    """Raised inside validators: ``where`` is the path below the model being validated.

    ``load_spec`` joins it to pydantic's location of that model, so a check written in
    ``BucketsConfig`` reports ``buckets.decode[1]`` without knowing where it is nested.
    """

    def __init__(self, where: tuple[str | int, ...], problem: str) -> None:
        super().__init__(problem)
        self.where = where
        self.problem = problem


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_supported(field: str, value: Any, default: Any) -> None:
    """Refuse a reference option that this implementation only supports at its default."""
    if value != default:
        shown = default if isinstance(default, str) else show_value(default)
        raise Invalid((field,), f"not supported yet (only {shown})")


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    """What to build from: a local folder, a GGUF file, ``pkg:`` file, or a config with random weights.

    ``task`` is ``generate`` (a decoder with an LM head), ``embed`` (an encoder whose
    head pools the token states into one vector) or ``auto`` (the default): ``embed`` for
    an encoder-only architecture (BERT, RoBERTa, XLM-R, DistilBERT, MPNet...) or a
    sentence-transformers folder (``modules.json``), ``generate`` otherwise; see
    :func:`furiosa_build.model_checks.resolve_task`.  A validated spec holds the concrete
    task whenever the model's config can be read without transformers (``hf_config``, a
    folder's ``config.json``); otherwise (a GGUF file) the builder resolves it right after
    reading the config, in :func:`furiosa_build.config.fit_to_model`, before capture; the
    artifact records the concrete task.
    ``pooling`` overrides, for ``embed``, what the model's sentence-transformers files say
    (null: read them; mean + normalize when there are none).
    """

    name: str
    model_id_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    seed_for_random_weight: int | None = None
    num_hidden_layers: int | None = Field(default=None, gt=0, le=2**16)
    auto_bfloat16_cast: bool = False
    trust_remote_code: bool = False
    task: Literal["auto", "generate", "embed"] = "auto"
    pooling: PoolingConfig | None = None

    @field_validator("seed_for_random_weight")
    @classmethod
    def _seed_fits_torch(cls, seed: int | None) -> int | None:
        # torch.manual_seed takes [-2**63, 2**64) and wraps negatives onto the top half, so
        # -1 and 2**64 - 1 would draw the same weights: accept each seed once.
        if seed is not None and not 0 <= seed < SEED_LIMIT:
            raise Invalid((), f"must be an integer in [0, 2**64) (torch.manual_seed's range), got {show_value(seed)}")
        return seed

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, name: str) -> str:
        # The name becomes a directory name and part of every pipeline name.
        if not _NAME.match(name):
            raise Invalid((), f"expected letters, digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}")
        return name

    @field_validator("hf_config")
    @classmethod
    def _hf_config_has_type(cls, hf_config: dict[str, Any] | None) -> dict[str, Any] | None:
        if hf_config is None:
            return None
        if not isinstance(hf_config.get("model_type"), str):
            raise Invalid((), "must contain 'model_type' (a string such as 'llama')")
        return hf_config

    @model_validator(mode="after")
    def _known_model_type(self) -> ModelConfig:
        # A folder with remote code may name its own model type; everything else must be one
        # that transformers can build (checked here instead of deep inside AutoConfig).
        if self.hf_config is not None and not (self.trust_remote_code and self.model_id_or_path):
            problem = model_type_problem(self.hf_config["model_type"])
            if problem:
                raise Invalid(("hf_config", "model_type"), problem)
        return self


SEED_LIMIT = 2**64


# --------------------------------------------------------------------------- buckets


#: Upper bounds that keep every count a 32-bit integer in the compiled programs and the runtime.
MAX_TOKENS = 2**31 - 1
MAX_BATCH = 2**16


class BeamsConfig(Section):
    """furiosa-llm's ``KvCacheSharingAcrossBeamsConfig``: the decode buckets are built for
    ``beam_width`` beams per sequence, and beam search requests generate at most
    ``max_new_tokens`` tokens (the runtime refuses other widths and longer requests)."""

    beam_width: int = Field(ge=2, le=MAX_BATCH)
    max_new_tokens: int = Field(gt=0, le=MAX_TOKENS)


class BucketsConfig(Section):
    """Static shapes to compile, as ``(batch_size, attention_size)`` pairs, and the paged KV cache.

    With ``kv_cache_sharing_across_beams_config`` every decode pair ``(batch, attention)``
    is built as ``(batch * beam_width, attention)``, as the reference does: one row per beam.
    """

    prefill: list[tuple[int, int]] = Field(default_factory=list)
    decode: list[tuple[int, int]] = Field(default_factory=list)
    max_seq_len_to_capture: int = Field(default=2048, gt=0, le=MAX_TOKENS)
    paged_attention_num_blocks: int | None = Field(default=None, gt=0, le=MAX_TOKENS)
    paged_attention_block_size: int = Field(default=1, gt=0, le=MAX_TOKENS)
    calculate_logit_only_for_last_token: bool | None = None
    add_prefill_last_block_slice: bool = False
    kv_cache_sharing_across_beams_config: BeamsConfig | None = None

    @field_validator("prefill", "decode", mode="before")
    @classmethod
    def _pairs_to_tuples(cls, value: Any) -> Any:
        """YAML and the CLI give ``[batch, attention]`` lists; the schema keeps tuples."""
        if not isinstance(value, (list, tuple)):
            return value
        pairs = []
        for index, item in enumerate(value):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise Invalid((index,), f"expected a pair [batch_size, attention_size], got {show_value(item)}")
            pairs.append(tuple(item))
        return pairs

    @model_validator(mode="after")
    def _check(self) -> BucketsConfig:
        if self.decode and not self.prefill:
            raise Invalid(("prefill",), "empty while buckets.decode is not; give at least one prefill bucket "
                          "(or leave both empty for one (1, max_seq_len_to_capture) bucket each)")
        for phase in ("prefill", "decode"):
            self._check_phase(phase)
        self._check_num_blocks()
        return self

    def _check_phase(self, phase: str) -> None:
        seen: dict[tuple[int, int], int] = {}
        for index, (batch, attention) in enumerate(getattr(self, phase)):
            where = (phase, index)
            if batch <= 0 or attention <= 0:
                raise Invalid(where, f"batch_size and attention_size must be positive, got ({batch}, {attention})")
            if batch > MAX_BATCH:
                raise Invalid(where, f"batch_size {batch} is larger than {MAX_BATCH}")
            beams = self.kv_cache_sharing_across_beams_config
            if phase == "decode" and beams is not None and batch * beams.beam_width > MAX_BATCH:
                raise Invalid(where, f"batch_size {batch} x beam_width {beams.beam_width} is larger than {MAX_BATCH}")
            if attention > self.max_seq_len_to_capture:
                raise Invalid(where, f"attention_size {attention} exceeds buckets.max_seq_len_to_capture="
                              f"{self.max_seq_len_to_capture}")
            if phase == "decode" and attention < 2:
                raise Invalid(where, "attention_size must be at least 2 for a decode bucket (one cached token "
                              f"plus the new one), got {attention}")
            if (batch, attention) in seen:
                raise Invalid(where, f"duplicate of buckets.{phase}[{seen[(batch, attention)]}] ({batch}, {attention})")
            seen[(batch, attention)] = index

    def _check_num_blocks(self) -> None:
        if self.paged_attention_block_size > self.max_seq_len_to_capture:
            raise Invalid(("paged_attention_block_size",), f"{self.paged_attention_block_size} is larger than "
                          f"buckets.max_seq_len_to_capture={self.max_seq_len_to_capture}; a KV block never holds "
                          "more than one sequence")  # fmt: skip
        needed = self.min_num_blocks()
        given = self.paged_attention_num_blocks
        if given is not None and given < needed:
            raise Invalid(("paged_attention_num_blocks",), f"{given} blocks cannot hold the largest bucket; need at "
                          f"least {needed} (batch_size * ceil(attention_size / paged_attention_block_size) + 1 "
                          "padding block), or null for that default")

    def _pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The prefill and decode pairs to build, decode batches times the beam width."""
        prefill, decode = list(self.prefill), list(self.decode)
        if not prefill and not decode:
            prefill = decode = [(1, self.max_seq_len_to_capture)]
        beams = self.kv_cache_sharing_across_beams_config
        width = beams.beam_width if beams is not None else 1
        return prefill, [(b * width, a) for b, a in decode]

    def prefill_buckets(self) -> list[Bucket]:
        """The prefill buckets; with no buckets at all, one of ``(1, max_seq_len_to_capture)``."""
        return [Bucket.prefill(b, a) for b, a in self._pairs()[0]]

    def decode_buckets(self) -> list[Bucket]:
        """The decode buckets; with no buckets at all, one of ``(1, max_seq_len_to_capture)``."""
        return [Bucket.decode(b, a) for b, a in self._pairs()[1]]

    def min_num_blocks(self) -> int:
        """KV blocks the largest bucket needs, plus block 0 that the runtime keeps for padding."""
        prefill, decode = self._pairs()
        size = self.paged_attention_block_size
        return max(b * math.ceil(a / size) for b, a in prefill + decode) + 1

    def num_blocks(self) -> int:
        """``paged_attention_num_blocks`` if given, else just enough for the largest bucket."""
        return self.paged_attention_num_blocks or self.min_num_blocks()


# --------------------------------------------------------------------------- parallel


class ParallelSpec(Section):
    """Devices (``npu:0``, ``npu:0,npu:1``, ``npu:0:3``, ``npu:0:0-3``) and the
    tensor/pipeline/data parallel degrees; ``data_parallel_size`` null uses every PE."""

    devices: str = "npu:0"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int | None = None
    num_blocks_per_pp_stage: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParallelSpec:
        tp, pp, dp = self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size
        if tp < 1 or tp & (tp - 1):
            raise Invalid(("tensor_parallel_size",), f"must be a power of two (1, 2, 4, 8, ...), got {tp}")
        if pp < 1:
            raise Invalid(("pipeline_parallel_size",), f"must be at least 1, got {pp}")
        if dp is not None and dp < 1:
            raise Invalid(("data_parallel_size",), f"must be at least 1 or null, got {dp}")
        if self.devices != self.devices.strip():
            raise Invalid(("devices",), f"unexpected whitespace in {self.devices!r}")
        stages = self.num_blocks_per_pp_stage
        if stages is not None and (len(stages) != pp or min(stages) < 1):
            raise Invalid(("num_blocks_per_pp_stage",), f"expected {pp} positive layer counts (one per pipeline "
                          f"stage, parallel.pipeline_parallel_size={pp}), got {show_value(stages)}")  # fmt: skip
        return self

    def mesh(self, hw: HardwareSpec = RNGD) -> Mesh:
        """The PEs of ``devices`` (on NPUs described by ``hw``) as replicas x stages x
        tensor-parallel shards; Invalid names the parallel field that does not fit."""
        try:
            return plan_mesh(self.devices, self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size, hw)
        except ValueError as exc:
            field, _, problem = str(exc).partition(": ")
            raise Invalid(("parallel", field), problem) from None

    def layers_per_stage(self, layers: int) -> list[int]:
        """Decoder layers of each pipeline stage: as given, or split equally."""
        return list(self.num_blocks_per_pp_stage or split_layers(layers, self.pipeline_parallel_size))


# --------------------------------------------------------------------------- scheduler


class SchedulerSpec(Section):
    """Scheduler defaults stored in the artifact (furiosa-llm's ``SchedulerConfig``)."""

    npu_queue_limit: int = Field(default=2, ge=1)
    max_processing_samples: int = Field(default=65536, ge=1)
    spare_blocks_ratio: float = 0.2
    is_offline: bool = False
    prefill_chunk_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SchedulerSpec:
        if not 0.0 <= self.spare_blocks_ratio < 1.0:
            raise Invalid(("spare_blocks_ratio",), f"must be in [0, 1), got {self.spare_blocks_ratio}")
        return self


class SweepOptions(Section):
    """What a sweep's report ranks its jobs by (``furiosa_build/sweep_report.py``): modelled
    serving of ``workload`` (the grammar of ``python -m furiosa_runtime simulate``), with
    ``num_prompts`` requests sent at once.  Not part of what a job builds."""

    workload: str = "fixed:128:128"
    num_prompts: int = Field(default=64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SweepOptions:
        from furiosa_runtime.engine.workload import WorkloadError, parse_workload

        try:
            parse_workload(self.workload, self.num_prompts, None)
        except WorkloadError as err:
            raise Invalid(("workload",), str(err)) from None
        return self


# --------------------------------------------------------------------------- quantization


class QuantizationSpec(Section):
    """How weights and the KV cache are stored on the device (``conf/quantization/``).

    ``scheme`` none keeps the model's weights (or takes the scheme of the checkpoint in
    ``build.quantize_artifact_path``); another scheme quantizes every linear layer of the
    decoder layers (:mod:`furiosa_build.quantization_plan`).  A shape-only build plans it
    from the config alone; a build with weights takes 8-bit weights only from a checkpoint
    of that scheme.  ``kv_cache_dtype`` is how the paged KV cache is stored: the memory
    the build plans for it, the bytes the timing model charges for reading it, and the
    functional simulator's storage.  f32 (the default) keeps the simulator's numerics equal
    to transformers in float32; RNGD itself stores bf16 or fp8.
    """

    scheme: str = "none"
    kv_cache_dtype: Literal["f32", "bf16", "f8_e4m3fn"] = "f32"

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, scheme: str) -> str:
        allowed = ("none", *PLANNED_SCHEMES)
        if scheme not in allowed:
            raise Invalid((), f"unknown {scheme!r}; allowed: {', '.join(allowed)} (fp8-static only from a checkpoint, "
                          "build.quantize_artifact_path)")  # fmt: skip
        return scheme


def check_quantization(quantization: QuantizationSpec, build: BuildOptions) -> None:
    """A scheme needs a shape-only build or a checkpoint: a build with weights never invents
    8-bit weights and their scales (``Invalid`` names ``quantization.scheme``)."""
    if quantization.scheme != "none" and build.weights == "included" and build.quantize_artifact_path is None:
        raise Invalid(("quantization", "scheme"), f"{quantization.scheme} needs its 8-bit weights from a checkpoint when the "
                      "build includes weights: make one with python -m furiosa_build.quantize and give it as "
                      "build.quantize_artifact_path, or plan the model without weights (build.weights=none)")  # fmt: skip


# --------------------------------------------------------------------------- build


class ClusterOptions(Section):
    """The cluster of ``build.backend=ray|dask`` (``furiosa_build/cluster.py``).

    ``address`` null: a local cluster that the build starts and stops, with
    ``num_workers`` worker processes (null: the larger of the two ``num_*_workers``).
    ``retries``: how often a unit whose worker was lost is sent again.
    """

    address: str | None = None  # ray: ray://host:port or host:port; dask: tcp://host:port
    num_workers: int | None = Field(default=None, ge=1)
    retries: int = Field(default=3, ge=0)


class BuildOptions(Section):
    """How the build runs (workers, backend, cache) and where the artifact goes."""

    save_dir: str | None = None
    num_pipeline_builder_workers: int = Field(default=1, ge=1)
    num_compile_workers: int = Field(default=1, ge=1)
    backend: str = "loky"
    cluster: ClusterOptions = Field(default_factory=ClusterOptions)
    cache_dir: str | None = "~/.cache/furiosa/llm"
    shared_cache: str | None = None  # a folder or fsspec URL many hosts share, behind cache_dir (shared_cache.py)
    param_file_path: str | None = None
    param_saved_format: str = "safetensors"
    cleanup: bool = True
    use_blockwise_compile: bool = True
    num_blocks_per_supertask: int = Field(default=1, ge=1)
    embed_all_constants_into_graph: bool = False
    compiler_config_overrides: dict[str, Any] | None = None
    do_decompositions_for_model_rewrite: bool = False
    quantize_artifact_path: str | None = None
    weights: Literal["included", "none"] = "included"  # none: a shape-only artifact, for planning and simulation
    dry_run: bool = False
    explain: bool = False  # print why each program about to compile misses the cache, compile nothing (explain.py)
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> BuildOptions:
        if self.shared_cache is not None and (problem := check_shared_cache(self.shared_cache)):
            raise Invalid(("shared_cache",), problem)
        for field in ("save_dir", "param_file_path", "quantize_artifact_path"):
            value = getattr(self, field)
            if value is not None and not value.strip():
                raise Invalid((field,), f"expected a path, got {value!r}" + (" (null: artifacts/<model.name>)" if field == "save_dir" else ""))
            if value is not None and "\0" in value:
                raise Invalid((field,), f"a path cannot contain a NUL character, got {show_value(value)}")
        _check_backend(self.backend)
        _check_cluster(self.backend, self.cluster)
        if self.param_saved_format not in ("safetensors", "pt"):
            raise Invalid(("param_saved_format",), f"expected one of safetensors, pt, got {self.param_saved_format!r}")
        _not_supported("param_saved_format", self.param_saved_format, "safetensors")
        _not_supported("do_decompositions_for_model_rewrite", self.do_decompositions_for_model_rewrite, False)
        _check_compiler_overrides(self.compiler_config_overrides or {})
        if self.weights == "none" and self.param_file_path is not None:
            raise Invalid(("param_file_path",), "a shape-only build (build.weights=none) has no weights to save; "
                          "leave build.param_file_path unset")  # fmt: skip
        return self

    def compiler_options(self) -> dict[str, Any]:
        """Every overridable compiler option, with the user's overrides applied."""
        options = {key: default for key, (_, default) in COMPILER_CONFIG_OVERRIDES.items()}
        options.update(self.compiler_config_overrides or {})
        return options


def _check_backend(backend: str) -> None:
    """joblib's local backends always; dask and ray only when their packages are importable
    (their clusters are joined in ``furiosa_build/cluster.py``)."""
    where = ("backend",)
    if backend in _JOBLIB_BACKENDS:
        return
    if backend in _CLUSTER_BACKENDS:
        package = "distributed" if backend == "dask" else backend  # dask's cluster scheduler and client
        if importlib.util.find_spec(package) is None:
            raise Invalid(where, f"{backend!r} is not installed (pip install {package}); available now: "
                          f"{', '.join(_JOBLIB_BACKENDS)}")
        return
    raise Invalid(where, f"unknown {backend!r}; allowed: {', '.join(_JOBLIB_BACKENDS + _CLUSTER_BACKENDS)}")


_ADDRESS_FORMS = {"ray": "ray://host:port or host:port", "dask": "tcp://host:port"}


def _check_cluster(backend: str, cluster: ClusterOptions) -> None:
    """Cluster settings only for a cluster backend; an address in its backend's form, and a
    local cluster's size only without one."""
    if backend not in _CLUSTER_BACKENDS:
        for field in ("address", "num_workers"):
            if getattr(cluster, field) is not None:
                raise Invalid(("cluster", field), f"used only with build.backend=ray or dask, not {backend!r}")
        return
    address = cluster.address
    if address is None:
        return
    where = ("cluster", "address")
    if cluster.num_workers is not None:
        raise Invalid(("cluster", "num_workers"), "sizes the local cluster; the cluster at build.cluster.address "
                      "has its own workers (leave it null)")
    scheme, _, rest = address.rpartition("://")
    host, _, port = rest.rpartition(":")
    schemes = ("ray", "") if backend == "ray" else ("tcp",)
    if scheme not in schemes or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise Invalid(where, f"expected {_ADDRESS_FORMS[backend]} for build.backend={backend}, got {address!r}")
    if scheme == "ray" and importlib.util.find_spec("grpc") is None:
        raise Invalid(where, "a ray:// address needs Ray Client (pip install 'ray[client]'), or give the "
                      "cluster's host:port")


def _check_compiler_overrides(overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        where = ("compiler_config_overrides", key)
        if key not in COMPILER_CONFIG_OVERRIDES:
            raise Invalid(where, f"not supported yet (only {', '.join(COMPILER_CONFIG_OVERRIDES)})")
        kind, _ = COMPILER_CONFIG_OVERRIDES[key]
        if type(value) is not kind:
            raise Invalid(where, f"expected {_EXPECTED_BY_TYPE[kind]}, got {show_value(value)}")

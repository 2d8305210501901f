"""The typed build configuration: one schema for Hydra, the CLI and the Python API.

A build is described by a :class:`BuildSpec` whose sections mirror the Hydra config
groups in ``conf/``::

    model:     what to build from (ModelConfig)        conf/model/*.yaml
    buckets:   static shapes and paged attention        conf/buckets/*.yaml
    parallel:  devices and parallelism degrees          conf/parallel/*.yaml
    scheduler: defaults stored for the runtime scheduler conf/scheduler/*.yaml
    build:     how the build runs and where it writes   conf/build/*.yaml

Everything is checked before any work starts; a problem raises :class:`ConfigError`
with a single line ``<dotted.field>: <what is wrong and what is allowed>``.  Options of
the reference API that are not implemented yet are accepted only at their default
value and refused otherwise with ``<field>: not supported yet (only <default>)``.

The flat parameter names of furiosa-llm's ``ArtifactBuilder.__init__`` and
``ArtifactBuilder.build`` map onto this schema as follows (``BUILDER_PARAM_LOCATION``;
``spec_from_builder_args`` applies it)::

    ArtifactBuilder(...)                      config path
    model_id_or_path                          model.model_id_or_path
    name                                      model.name
    devices                                   parallel.devices
    tensor_parallel_size                      parallel.tensor_parallel_size
    pipeline_parallel_size                    parallel.pipeline_parallel_size
    data_parallel_size                        parallel.data_parallel_size
    num_blocks_per_pp_stage                   parallel.num_blocks_per_pp_stage
    prefill_buckets                           buckets.prefill
    decode_buckets                            buckets.decode
    max_seq_len_to_capture                    buckets.max_seq_len_to_capture
    paged_attention_num_blocks                buckets.paged_attention_num_blocks
    paged_attention_block_size                buckets.paged_attention_block_size
    calculate_logit_only_for_last_token       buckets.calculate_logit_only_for_last_token
    add_prefill_last_block_slice              buckets.add_prefill_last_block_slice
    kv_cache_sharing_across_beams_config      buckets.kv_cache_sharing_across_beams_config
    num_hidden_layers                         model.num_hidden_layers
    seed_for_random_weight                    model.seed_for_random_weight
    auto_bfloat16_cast (kwargs)               model.auto_bfloat16_cast
    trust_remote_code (kwargs)                model.trust_remote_code
    hf_config (kwargs)                        model.hf_config
    task (kwargs)                             model.task
    pooling (kwargs)                          model.pooling
    default_scheduler_config                  scheduler (the whole section)
    prefill_chunk_size (kwargs)               scheduler.prefill_chunk_size
    quantize_artifact_path                    build.quantize_artifact_path
    compiler_config_overrides                 build.compiler_config_overrides
    do_decompositions_for_model_rewrite       build.do_decompositions_for_model_rewrite
    use_blockwise_compile                     build.use_blockwise_compile
    num_blocks_per_supertask                  build.num_blocks_per_supertask
    embed_all_constants_into_graph            build.embed_all_constants_into_graph

    ArtifactBuilder.build(...)
    save_dir                                  build.save_dir
    num_pipeline_builder_workers              build.num_pipeline_builder_workers
    num_compile_workers                       build.num_compile_workers
    cache_dir                                 build.cache_dir
    param_file_path                           build.param_file_path
    param_saved_format                        build.param_saved_format
    _cleanup                                  build.cleanup
    backend (kwargs)                          build.backend
    dry_run (kwargs)                          build.dry_run
    progress (kwargs)                         build.progress

Deliberate difference from the reference: ``tensor_parallel_size`` defaults to 1 (the
reference defaults to 4), so that the plainest build is a single-PE program per task.
As in the reference, ``data_parallel_size`` left null fills the remaining PEs of
``devices`` with replicas (``conf/parallel/single.yaml`` therefore names one PE).

Parallel settings are checked in two steps: ``ParallelSpec`` checks what the config alone
decides (device strings, power-of-two tp, tp * pp * dp against the PEs of the devices);
``check_model_fit`` checks what depends on the model (heads and vocabulary divisible by
tp, stages against the decoder depth) as soon as the model's config is read, before
capture or compilation.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from furiosa_build.compiler import DEFAULT_OPTIONS, LoweringError
from furiosa_build.load import LoadError
from furiosa_build.sources import SourceError, resolve_source
from furiosa_build.supertask import attention_heads, num_layers
from furiosa_runtime.artifact import Bucket, PoolingConfig, split_layers
from furiosa_runtime.hardware import Mesh, plan_mesh

__all__ = [
    "BUILDER_PARAM_LOCATION",
    "BUILD_METHOD_PARAMS",
    "COMPILER_CONFIG_OVERRIDES",
    "USER_ERRORS",
    "BucketsConfig",
    "BuildOptions",
    "BuildSpec",
    "ConfigError",
    "ModelConfig",
    "ParallelSpec",
    "SchedulerSpec",
    "allowed_keys",
    "check_model_fit",
    "default_artifact_name",
    "load_spec",
    "spec_from_builder_args",
]


class ConfigError(ValueError):
    """A build configuration that cannot be used, as one line: ``<dotted.field>: <problem>``."""


#: Exceptions that are the user's fault: entry points print them as one line, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, SourceError, LoadError, LoweringError)

#: The compiler options a user may override, with their type and default.
COMPILER_CONFIG_OVERRIDES: dict[str, tuple[type, Any]] = {k: (type(v), v) for k, v in DEFAULT_OPTIONS.items()}

_JOBLIB_BACKENDS = ("loky", "threading", "multiprocessing", "sequential")
_CLUSTER_BACKENDS = ("dask", "ray")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Invalid(ValueError):
    """Raised inside validators: ``where`` is the path below the model being validated.

    ``load_spec`` joins it to pydantic's location of that model, so a check written in
    ``BucketsConfig`` reports ``buckets.decode[1]`` without knowing where it is nested.
    """

    def __init__(self, where: tuple[str | int, ...], problem: str) -> None:
        super().__init__(problem)
        self.where = where
        self.problem = problem


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _not_supported(field: str, value: Any, default: Any) -> None:
    """Refuse a reference option that this implementation only supports at its default."""
    if value != default:
        shown = default if isinstance(default, str) else _show(default)
        raise _Invalid((field,), f"not supported yet (only {shown})")


# --------------------------------------------------------------------------- model


class ModelConfig(_Section):
    """What to build from: a local folder, a GGUF file, ``pkg:`` file, or a config with random weights.

    ``task`` is ``generate`` (a decoder with an LM head) or ``embed`` (an encoder whose
    head pools the token states into one vector).  ``pooling`` overrides, for ``embed``,
    what the model's sentence-transformers files say (null: read them; mean + normalize
    when there are none).
    """

    name: str
    model_id_or_path: str | None = None
    hf_config: dict[str, Any] | None = None
    seed_for_random_weight: int | None = None
    num_hidden_layers: int | None = Field(default=None, gt=0)
    auto_bfloat16_cast: bool = False
    trust_remote_code: bool = False
    task: Literal["generate", "embed"] = "generate"
    pooling: PoolingConfig | None = None

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, name: str) -> str:
        # The name becomes a directory name and part of every pipeline name.
        if not _NAME.match(name):
            raise _Invalid((), f"expected letters, digits, '.', '_' or '-' (starting with a letter or digit), got {name!r}")
        return name

    @field_validator("hf_config")
    @classmethod
    def _hf_config_has_type(cls, hf_config: dict[str, Any] | None) -> dict[str, Any] | None:
        if hf_config is not None and not isinstance(hf_config.get("model_type"), str):
            raise _Invalid((), "must contain 'model_type' (a string such as 'llama')")
        return hf_config


# --------------------------------------------------------------------------- buckets


class BucketsConfig(_Section):
    """Static shapes to compile, as ``(batch_size, attention_size)`` pairs, and the paged KV cache."""

    prefill: list[tuple[int, int]] = Field(default_factory=list)
    decode: list[tuple[int, int]] = Field(default_factory=list)
    max_seq_len_to_capture: int = Field(default=2048, gt=0)
    paged_attention_num_blocks: int | None = Field(default=None, gt=0)
    paged_attention_block_size: int = Field(default=1, gt=0)
    calculate_logit_only_for_last_token: bool | None = None
    add_prefill_last_block_slice: bool = False
    kv_cache_sharing_across_beams_config: dict[str, Any] | None = None

    @field_validator("prefill", "decode", mode="before")
    @classmethod
    def _pairs_to_tuples(cls, value: Any) -> Any:
        """YAML and the CLI give ``[batch, attention]`` lists; the schema keeps tuples."""
        if not isinstance(value, (list, tuple)):
            return value
        pairs = []
        for index, item in enumerate(value):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise _Invalid((index,), f"expected a pair [batch_size, attention_size], got {_show(item)}")
            pairs.append(tuple(item))
        return pairs

    @model_validator(mode="after")
    def _check(self) -> BucketsConfig:
        _not_supported("kv_cache_sharing_across_beams_config", self.kv_cache_sharing_across_beams_config, None)
        if self.decode and not self.prefill:
            raise _Invalid(("prefill",), "empty while buckets.decode is not; give at least one prefill bucket "
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
                raise _Invalid(where, f"batch_size and attention_size must be positive, got ({batch}, {attention})")
            if attention > self.max_seq_len_to_capture:
                raise _Invalid(where, f"attention_size {attention} exceeds buckets.max_seq_len_to_capture="
                               f"{self.max_seq_len_to_capture}")
            if phase == "decode" and attention < 2:
                raise _Invalid(where, "attention_size must be at least 2 for a decode bucket (one cached token "
                               f"plus the new one), got {attention}")
            if (batch, attention) in seen:
                raise _Invalid(where, f"duplicate of buckets.{phase}[{seen[(batch, attention)]}] ({batch}, {attention})")
            seen[(batch, attention)] = index

    def _check_num_blocks(self) -> None:
        needed = self.min_num_blocks()
        given = self.paged_attention_num_blocks
        if given is not None and given < needed:
            raise _Invalid(("paged_attention_num_blocks",), f"{given} blocks cannot hold the largest bucket; need at "
                           f"least {needed} (batch_size * ceil(attention_size / paged_attention_block_size) + 1 "
                           "padding block), or null for that default")

    def _pairs(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        if not self.prefill and not self.decode:
            default = (1, self.max_seq_len_to_capture)
            return [default], [default]
        return list(self.prefill), list(self.decode)

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


class ParallelSpec(_Section):
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
            raise _Invalid(("tensor_parallel_size",), f"must be a power of two (1, 2, 4, 8, ...), got {tp}")
        if pp < 1:
            raise _Invalid(("pipeline_parallel_size",), f"must be at least 1, got {pp}")
        if dp is not None and dp < 1:
            raise _Invalid(("data_parallel_size",), f"must be at least 1 or null, got {dp}")
        if self.devices != self.devices.strip():
            raise _Invalid(("devices",), f"unexpected whitespace in {self.devices!r}")
        self.mesh()
        stages = self.num_blocks_per_pp_stage
        if stages is not None and (len(stages) != pp or min(stages) < 1):
            raise _Invalid(("num_blocks_per_pp_stage",), f"expected {pp} positive layer counts (one per pipeline "
                           f"stage, parallel.pipeline_parallel_size={pp}), got {_show(stages)}")  # fmt: skip
        return self

    def mesh(self) -> Mesh:
        """The PEs of ``devices`` as replicas x stages x tensor-parallel shards."""
        try:
            return plan_mesh(self.devices, self.tensor_parallel_size, self.pipeline_parallel_size, self.data_parallel_size)
        except ValueError as exc:
            field, _, problem = str(exc).partition(": ")
            raise _Invalid((field,), problem) from None

    def layers_per_stage(self, layers: int) -> list[int]:
        """Decoder layers of each pipeline stage: as given, or split equally."""
        return list(self.num_blocks_per_pp_stage or split_layers(layers, self.pipeline_parallel_size))


def _tp_misfit(tp: int, heads: int, kv_heads: int, vocab: int) -> str | None:
    """Why a tensor-parallel group of ``tp`` cannot split this model, or None if it can."""
    if heads % tp:
        return f"does not divide the model's {heads} attention heads"
    if kv_heads % tp and tp % kv_heads:
        return f"and the model's {kv_heads} key/value heads do not divide one another"
    if vocab % tp:
        return f"does not divide the model's vocabulary of {vocab} tokens"
    return None


def check_model_fit(parallel: ParallelSpec, blocks_per_supertask: int, hf_config: Mapping[str, Any]) -> None:
    """Check the parallel settings against the model's config; raise ConfigError naming the field."""
    heads, kv_heads = attention_heads(dict(hf_config))
    vocab = int(hf_config.get("vocab_size", 1))
    tp = parallel.tensor_parallel_size
    problem = _tp_misfit(tp, heads, kv_heads, vocab)
    if problem:
        pes = len(parallel.mesh().pes)
        fits = [t for t in (2**i for i in range(8)) if t <= pes and not _tp_misfit(t, heads, kv_heads, vocab)]
        raise ConfigError(f"parallel.tensor_parallel_size: {tp} {problem}; allowed here: {', '.join(map(str, fits))}")
    layers = num_layers(dict(hf_config))
    stages = parallel.num_blocks_per_pp_stage
    if stages is None and parallel.pipeline_parallel_size > layers:
        raise ConfigError(f"parallel.pipeline_parallel_size: {parallel.pipeline_parallel_size} stages for a model of "
                          f"{layers} decoder layers; at most {layers}")  # fmt: skip
    if stages is not None and sum(stages) != layers:
        raise ConfigError(f"parallel.num_blocks_per_pp_stage: {_show(stages)} sums to {sum(stages)}, but the model "
                          f"has {layers} decoder layers")  # fmt: skip
    per_stage = parallel.layers_per_stage(layers)
    if any(sum(per_stage[: s + 1]) % blocks_per_supertask for s in range(len(per_stage) - 1)):
        raise ConfigError(f"parallel.num_blocks_per_pp_stage: stages {per_stage} would split a supertask of "
                          f"build.num_blocks_per_supertask={blocks_per_supertask} layers")  # fmt: skip


# --------------------------------------------------------------------------- scheduler


class SchedulerSpec(_Section):
    """Scheduler defaults stored in the artifact (furiosa-llm's ``SchedulerConfig``)."""

    npu_queue_limit: int = Field(default=2, ge=1)
    max_processing_samples: int = Field(default=65536, ge=1)
    spare_blocks_ratio: float = 0.2
    is_offline: bool = False
    prefill_chunk_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SchedulerSpec:
        if not 0.0 <= self.spare_blocks_ratio < 1.0:
            raise _Invalid(("spare_blocks_ratio",), f"must be in [0, 1), got {self.spare_blocks_ratio}")
        return self


# --------------------------------------------------------------------------- build


class BuildOptions(_Section):
    """How the build runs (workers, backend, cache) and where the artifact goes."""

    save_dir: str | None = None
    num_pipeline_builder_workers: int = Field(default=1, ge=1)
    num_compile_workers: int = Field(default=1, ge=1)
    backend: str = "loky"
    cache_dir: str | None = "~/.cache/furiosa/llm"
    param_file_path: str | None = None
    param_saved_format: str = "safetensors"
    cleanup: bool = True
    use_blockwise_compile: bool = True
    num_blocks_per_supertask: int = Field(default=1, ge=1)
    embed_all_constants_into_graph: bool = False
    compiler_config_overrides: dict[str, Any] | None = None
    do_decompositions_for_model_rewrite: bool = False
    quantize_artifact_path: str | None = None
    dry_run: bool = False
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> BuildOptions:
        _check_backend(self.backend)
        if self.param_saved_format not in ("safetensors", "pt"):
            raise _Invalid(("param_saved_format",), f"expected one of safetensors, pt, got {self.param_saved_format!r}")
        _not_supported("param_saved_format", self.param_saved_format, "safetensors")
        _not_supported("quantize_artifact_path", self.quantize_artifact_path, None)
        _not_supported("do_decompositions_for_model_rewrite", self.do_decompositions_for_model_rewrite, False)
        _check_compiler_overrides(self.compiler_config_overrides or {})
        return self

    def compiler_options(self) -> dict[str, Any]:
        """Every overridable compiler option, with the user's overrides applied."""
        options = {key: default for key, (_, default) in COMPILER_CONFIG_OVERRIDES.items()}
        options.update(self.compiler_config_overrides or {})
        return options


def _check_backend(backend: str) -> None:
    """joblib's local backends always; dask and ray only when their packages are importable."""
    where = ("backend",)
    if backend in _JOBLIB_BACKENDS:
        return
    if backend in _CLUSTER_BACKENDS:
        if importlib.util.find_spec(backend) is None:
            raise _Invalid(where, f"{backend!r} is not installed (pip install {backend}); available now: "
                           f"{', '.join(_JOBLIB_BACKENDS)}")
        return
    raise _Invalid(where, f"unknown {backend!r}; allowed: {', '.join(_JOBLIB_BACKENDS + _CLUSTER_BACKENDS)}")


def _check_compiler_overrides(overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        where = ("compiler_config_overrides", key)
        if key not in COMPILER_CONFIG_OVERRIDES:
            raise _Invalid(where, f"not supported yet (only {', '.join(COMPILER_CONFIG_OVERRIDES)})")
        kind, _ = COMPILER_CONFIG_OVERRIDES[key]
        if type(value) is not kind:
            raise _Invalid(where, f"expected {_EXPECTED_BY_TYPE[kind]}, got {_show(value)}")


# --------------------------------------------------------------------------- whole spec


class BuildSpec(_Section):
    """A complete, validated build: constructing one checks everything, including the model source."""

    model: ModelConfig
    buckets: BucketsConfig = Field(default_factory=BucketsConfig)
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    build: BuildOptions = Field(default_factory=BuildOptions)

    DEFAULT_ARTIFACTS_DIR: ClassVar[str] = "artifacts"

    @model_validator(mode="after")
    def _check(self) -> BuildSpec:
        self._check_source()
        self._check_task()
        if self.build.save_dir is None:
            self.build.save_dir = f"{self.DEFAULT_ARTIFACTS_DIR}/{self.model.name}"
        return self

    def _check_task(self) -> None:
        """An encoder (task=embed) runs one pass per text: prefill-shaped buckets only."""
        model, buckets = self.model, self.buckets
        if model.task == "generate":
            if model.pooling is not None:
                raise _Invalid(("model", "pooling"), "only for model.task=embed; set null for task=generate")
            return
        if buckets.decode:
            raise _Invalid(("buckets", "decode"), "must be empty for model.task=embed (an encoder has no decode "
                           f"phase); give buckets.prefill only (e.g. buckets=embed), got {_show([list(p) for p in buckets.decode])}")
        if not buckets.prefill:
            buckets.prefill = [(1, buckets.max_seq_len_to_capture)]

    def _check_source(self) -> None:
        model = self.model
        try:
            source = resolve_source(model.model_id_or_path, model.hf_config is not None)
        except SourceError as exc:  # already names model.model_id_or_path
            raise ConfigError(str(exc)) from None
        if not source.has_weights and model.seed_for_random_weight is None:
            raise _Invalid(("model", "seed_for_random_weight"), "required for a random-weight model "
                           "(model.hf_config without model.model_id_or_path); set an integer such as 0")


# --------------------------------------------------------------------------- errors


_EXPECTED = {
    "int_type": "expected an integer",
    "int_from_float": "expected an integer",
    "bool_type": "expected a boolean (true or false)",
    "string_type": "expected a string",
    "float_type": "expected a number",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "tuple_type": "expected a pair [batch_size, attention_size]",
    "none_required": "expected null",
}
_EXPECTED_BY_TYPE: dict[type, str] = {bool: "a boolean (true or false)", int: "an integer", str: "a string"}


def _show(value: Any) -> str:
    """A value as a user typed it (YAML spelling for booleans and null), kept short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(list(value)) if isinstance(value, tuple) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: tuple[str | int, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "config"


def _unwrap_optional(annotation: Any) -> Any:
    """``X | None`` -> ``X``, so an optional section (model.pooling) lists its keys too."""
    members = [a for a in get_args(annotation) if a is not type(None)]
    return members[0] if len(members) == 1 else annotation


def allowed_keys(path: tuple[str, ...], root: type[BaseModel] | None = None) -> list[str] | None:
    """The field names of the section at ``path`` (``()`` is the top), or None if it is not a section."""
    cls: Any = root or BuildSpec
    for part in path:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        cls = _unwrap_optional(field.annotation)
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _from_validation_error(exc: ValidationError, root: type[BaseModel]) -> ConfigError:
    """The first pydantic error as a one-line ConfigError naming the dotted field."""
    error = exc.errors(include_url=False)[0]
    loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):
        return cause
    if isinstance(cause, _Invalid):
        return ConfigError(f"{_dotted(loc + cause.where)}: {cause.problem}")
    if error["type"] == "extra_forbidden":
        allowed = allowed_keys(tuple(str(p) for p in loc[:-1]), root) or []
        return ConfigError(f"{_dotted(loc)}: unknown key; allowed: {', '.join(allowed)}")
    if error["type"] == "missing":
        return ConfigError(f"{_dotted(loc)}: required")
    if error["type"] in _EXPECTED:
        return ConfigError(f"{_dotted(loc)}: {_EXPECTED[error['type']]}, got {_show(error['input'])}")
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    return ConfigError(f"{_dotted(loc)}: {message}, got {_show(error['input'])}")


# --------------------------------------------------------------------------- entry points


def load_spec(data: Mapping[str, Any]) -> BuildSpec:
    """Validate a plain mapping (e.g. ``OmegaConf.to_container(cfg, resolve=True)``) into a BuildSpec.

    Raises ConfigError with a single line naming the first problem found.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    try:
        return BuildSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise _from_validation_error(exc, BuildSpec) from None


#: Flat ArtifactBuilder parameter name -> dotted location in BuildSpec (see the module docstring).
BUILDER_PARAM_LOCATION: dict[str, str] = {
    # ArtifactBuilder.__init__
    "model_id_or_path": "model.model_id_or_path",
    "name": "model.name",
    "devices": "parallel.devices",
    "tensor_parallel_size": "parallel.tensor_parallel_size",
    "pipeline_parallel_size": "parallel.pipeline_parallel_size",
    "data_parallel_size": "parallel.data_parallel_size",
    "num_blocks_per_pp_stage": "parallel.num_blocks_per_pp_stage",
    "prefill_buckets": "buckets.prefill",
    "decode_buckets": "buckets.decode",
    "max_seq_len_to_capture": "buckets.max_seq_len_to_capture",
    "paged_attention_num_blocks": "buckets.paged_attention_num_blocks",
    "paged_attention_block_size": "buckets.paged_attention_block_size",
    "calculate_logit_only_for_last_token": "buckets.calculate_logit_only_for_last_token",
    "add_prefill_last_block_slice": "buckets.add_prefill_last_block_slice",
    "kv_cache_sharing_across_beams_config": "buckets.kv_cache_sharing_across_beams_config",
    "num_hidden_layers": "model.num_hidden_layers",
    "seed_for_random_weight": "model.seed_for_random_weight",
    "auto_bfloat16_cast": "model.auto_bfloat16_cast",
    "trust_remote_code": "model.trust_remote_code",
    "hf_config": "model.hf_config",
    "task": "model.task",
    "pooling": "model.pooling",
    "default_scheduler_config": "scheduler",
    "prefill_chunk_size": "scheduler.prefill_chunk_size",
    "quantize_artifact_path": "build.quantize_artifact_path",
    "compiler_config_overrides": "build.compiler_config_overrides",
    "do_decompositions_for_model_rewrite": "build.do_decompositions_for_model_rewrite",
    "use_blockwise_compile": "build.use_blockwise_compile",
    "num_blocks_per_supertask": "build.num_blocks_per_supertask",
    "embed_all_constants_into_graph": "build.embed_all_constants_into_graph",
    # ArtifactBuilder.build
    "save_dir": "build.save_dir",
    "num_pipeline_builder_workers": "build.num_pipeline_builder_workers",
    "num_compile_workers": "build.num_compile_workers",
    "cache_dir": "build.cache_dir",
    "param_file_path": "build.param_file_path",
    "param_saved_format": "build.param_saved_format",
    "_cleanup": "build.cleanup",
    "backend": "build.backend",
    "dry_run": "build.dry_run",
    "progress": "build.progress",
}

#: The parameters that belong to ``ArtifactBuilder.build()``; the rest belong to ``__init__``.
BUILD_METHOD_PARAMS: frozenset[str] = frozenset(
    {"save_dir", "num_pipeline_builder_workers", "num_compile_workers", "cache_dir", "param_file_path",
     "param_saved_format", "_cleanup", "backend", "dry_run", "progress"}
)
_POSITIONAL = frozenset({"model_id_or_path", "devices", "name"})


def default_artifact_name(model_id_or_path: str | None, hf_config: Mapping[str, Any] | None) -> str:
    """A name when none is given: the model file or folder name, or ``<model_type>-random``."""
    if model_id_or_path:
        stem = re.split(r"[/:]", model_id_or_path.rstrip("/"))[-1].removesuffix(".gguf")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
        if slug:
            return slug.lower()
    model_type = str((hf_config or {}).get("model_type", "model"))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model_type}-random").lower()


def _plain(value: Any) -> Any:
    """Python API values as config data: paths to str, tuples to lists, models to dicts."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _check_builder_kwargs(kwargs: Mapping[str, Any], method: str, allowed: set[str]) -> None:
    for key in kwargs:
        if key not in allowed:
            raise ConfigError(f"ArtifactBuilder.{method}: unknown argument {key!r}; allowed: {', '.join(sorted(allowed))}")


def spec_from_builder_args(
    model_id_or_path: str | os.PathLike[str] | None,
    devices: str | None,
    name: str,
    init_kwargs: Mapping[str, Any],
    build_kwargs: Mapping[str, Any],
    *,
    base: BuildSpec | None = None,
) -> BuildSpec:
    """Build a validated BuildSpec from furiosa-llm ``ArtifactBuilder(...)`` and ``.build(...)`` arguments.

    Without ``base``, ``devices`` None/"" means ``npu:0`` and ``name`` "" a name derived
    from the model.  With ``base`` (the spec of an existing builder, for ``build()``),
    None/"" positional arguments keep the base values and the keyword arguments are
    applied on top.  Unknown keyword arguments raise ConfigError.
    """
    init_params = set(BUILDER_PARAM_LOCATION) - BUILD_METHOD_PARAMS - _POSITIONAL
    _check_builder_kwargs(init_kwargs, "__init__", init_params)
    _check_builder_kwargs(build_kwargs, "build", set(BUILD_METHOD_PARAMS))
    flat: dict[str, Any] = {key: _plain(value) for key, value in {**init_kwargs, **build_kwargs}.items()}
    if base is None or model_id_or_path is not None:
        flat["model_id_or_path"] = _plain(model_id_or_path)
    if devices:
        flat["devices"] = devices
    if name or base is None:
        flat["name"] = name or default_artifact_name(flat["model_id_or_path"], flat.get("hf_config"))
    data: dict[str, Any] = base.model_dump() if base else {section: {} for section in BuildSpec.model_fields}
    if base is not None and "save_dir" not in flat and "name" in flat:
        data["build"]["save_dir"] = None  # the default follows a new name
    # The whole scheduler section first, so that a separate prefill_chunk_size lands on top of it.
    for key in sorted(flat, key=lambda k: k != "default_scheduler_config"):
        _set_dotted(data, BUILDER_PARAM_LOCATION[key], flat[key])
    return load_spec(data)


def _set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    section, _, field = path.partition(".")
    if not field:
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{section}: expected a mapping or SchedulerConfig, got {_show(value)}")
        data[section].update(value or {})
    else:
        data[section][field] = value

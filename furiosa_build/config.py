"""The typed build configuration: one schema for Hydra, the CLI and the Python API.

A build is described by a :class:`BuildSpec` whose sections mirror the Hydra config
groups in ``conf/``::

    model:     what to build from (ModelConfig)        conf/model/*.yaml
    buckets:   static shapes and paged attention        conf/buckets/*.yaml
    parallel:  devices and parallelism degrees          conf/parallel/*.yaml
    scheduler: defaults stored for the runtime scheduler conf/scheduler/*.yaml
    quantization: weight and KV cache storage          conf/quantization/*.yaml
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
    weights (kwargs)                          build.weights
    dry_run (kwargs)                          build.dry_run
    progress (kwargs)                         build.progress

Deliberate difference from the reference: ``tensor_parallel_size`` defaults to 1 (the
reference defaults to 4), so that the plainest build is a single-PE program per task.
As in the reference, ``data_parallel_size`` left null fills the remaining PEs of
``devices`` with replicas (``conf/parallel/single.yaml`` therefore names one PE).

The sections are defined in :mod:`furiosa_build.config_sections`.  What depends on the
model (heads, positions, layers, ``model.task=auto``) is checked by
:mod:`furiosa_build.model_checks`, when the spec is validated and again by
:func:`fit_to_model` once the model's config is read; output paths are checked by
:mod:`furiosa_build.output_paths`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, get_args

from pydantic import BaseModel, Field, ValidationError, ValidationInfo, model_validator

from furiosa_build.compiler import LoweringError
from furiosa_build.config_sections import (
    COMPILER_CONFIG_OVERRIDES,
    BucketsConfig,
    BuildOptions,
    Invalid,
    ModelConfig,
    ParallelSpec,
    QuantizationSpec,
    SchedulerSpec,
    Section,
    SweepOptions,
    check_quantization,
)
from furiosa_build.errors import BuildIOError, ConfigError, UnitError, show_value
from furiosa_build.load import LoadError, load_config
from furiosa_build.model_checks import (
    check_consistency,
    check_model_fit,
    check_positions,
    config_origin,
    encoder_reason,
    readable_config,
    resolve_task,
)
from furiosa_build.output_paths import check_output_paths
from furiosa_build.sources import ModelSource, SourceError, resolve_source
from furiosa_build.supertask import num_layers
from furiosa_runtime.npu.hardware import RNGD, HardwareSpec

if TYPE_CHECKING:
    from furiosa_build.load import LoadRequest

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
    "fit_to_model",
    "load_spec",
    "spec_from_builder_args",
]


#: Exceptions that are the user's fault: entry points print them as one line, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, SourceError, LoadError, LoweringError, BuildIOError, UnitError)


# --------------------------------------------------------------------------- whole spec


class BuildSpec(Section):
    """A complete, validated build: constructing one checks everything, including the model source."""

    model: ModelConfig
    buckets: BucketsConfig = Field(default_factory=BucketsConfig)
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    build: BuildOptions = Field(default_factory=BuildOptions)
    quantization: QuantizationSpec = Field(default_factory=QuantizationSpec)
    hardware: HardwareSpec = RNGD
    sweep: SweepOptions = Field(default_factory=SweepOptions)  # what a sweep's report ranks jobs by

    DEFAULT_ARTIFACTS_DIR: ClassVar[str] = "artifacts"

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> BuildSpec:
        source = self._check_source()
        self.parallel.mesh(self.hardware)  # the devices hold the layout
        check_quantization(self.quantization, self.build)
        config, folder = readable_config(self.model, source)
        origin = config_origin(self.model, source, config, config or {})
        if config is not None:  # what can be checked without transformers; fit_to_model checks the rest
            check_consistency(config, origin)
        default_decode = bool((info.context or {}).get(DECODE_BUCKETS_ARE_DEFAULTS))
        self._settle_task(config, folder, default_decode)
        if config is not None:  # the buckets as the task left them
            check_positions(config, self.buckets, origin)
        if self.build.save_dir is None:
            self.build.save_dir = f"{self.DEFAULT_ARTIFACTS_DIR}/{self.model.name}"
        return self

    def _settle_task(self, config: Mapping[str, Any] | None, folder: Path | None, default_decode: bool) -> None:
        """Resolve ``model.task=auto`` when the config is at hand, and fit the buckets to the task.

        An encoder (task=embed) runs one pass per text: prefill-shaped buckets only.  Decode
        buckets that came from the default buckets config (``default_decode``, set by
        ``python -m furiosa_build`` when neither ``buckets`` nor ``buckets.decode`` was
        chosen) are dropped for an encoder; decode buckets the user gave are refused.
        """
        model, buckets = self.model, self.buckets
        chosen_by = ""
        if config is not None:
            reason = encoder_reason(config)
            if model.task == "generate" and reason:
                raise Invalid(("model", "task"), f"generate needs a decoder with a language-model head, but {reason}; "
                              "build it for embeddings: model.task=embed buckets=embed")  # fmt: skip
            if model.task == "auto":
                model.task, why = resolve_task(config, folder)
                chosen_by = f", which model.task=auto chose because {why}" if why else ""
        if model.task == "auto":
            return  # the builder decides once transformers has read the config (fit_to_model)
        if model.task == "generate":
            if model.pooling is not None:
                raise Invalid(("model", "pooling"), "only for model.task=embed; set null for task=generate")
            return
        if buckets.decode and default_decode:
            buckets.decode = []
        if buckets.decode:
            raise Invalid(("buckets", "decode"), f"must be empty for model.task=embed{chosen_by} (an encoder has no "
                          "decode phase); give buckets.prefill only, e.g. model.task=embed buckets=embed, got "
                          f"{show_value([list(p) for p in buckets.decode])}")  # fmt: skip
        if not buckets.prefill:
            buckets.prefill = [(1, buckets.max_seq_len_to_capture)]

    def _check_source(self) -> ModelSource:
        model = self.model
        try:
            source = resolve_source(model.model_id_or_path, model.hf_config is not None)
        except SourceError as exc:  # already names model.model_id_or_path
            raise ConfigError(str(exc)) from None
        if not source.has_weights and model.seed_for_random_weight is None:
            raise Invalid(("model", "seed_for_random_weight"), "required for a random-weight model "
                          "(model.hf_config without model.model_id_or_path); set an integer such as 0")
        return source


#: ``load_spec`` context flag: the decode buckets are the default buckets config's, not the user's.
DECODE_BUCKETS_ARE_DEFAULTS = "decode_buckets_are_defaults"


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
    if isinstance(cause, Invalid):
        return ConfigError(f"{_dotted(loc + cause.where)}: {cause.problem}")
    if error["type"] == "extra_forbidden":
        allowed = allowed_keys(tuple(str(p) for p in loc[:-1]), root) or []
        return ConfigError(f"{_dotted(loc)}: unknown key; allowed: {', '.join(allowed)}")
    if error["type"] == "missing":
        return ConfigError(f"{_dotted(loc)}: required")
    if error["type"] in _EXPECTED:
        return ConfigError(f"{_dotted(loc)}: {_EXPECTED[error['type']]}, got {show_value(error['input'])}")
    message = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    return ConfigError(f"{_dotted(loc)}: {message}, got {show_value(error['input'])}")


# --------------------------------------------------------------------------- entry points


def load_spec(data: Mapping[str, Any], *, decode_buckets_are_defaults: bool = False) -> BuildSpec:
    """Validate a plain mapping (e.g. ``OmegaConf.to_container(cfg, resolve=True)``) into a BuildSpec.

    ``decode_buckets_are_defaults``: ``buckets.decode`` came from the default buckets
    config rather than from the user, so an encoder (model.task=embed) drops it instead of
    being refused.  Raises ConfigError with a single line naming the first problem found.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping, got {type(data).__name__}")
    try:
        return BuildSpec.model_validate(dict(data), context={DECODE_BUCKETS_ARE_DEFAULTS: decode_buckets_are_defaults})
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
    "weights": "build.weights",
    "dry_run": "build.dry_run",
    "progress": "build.progress",
}

#: The parameters that belong to ``ArtifactBuilder.build()``; the rest belong to ``__init__``.
BUILD_METHOD_PARAMS: frozenset[str] = frozenset(
    {"save_dir", "num_pipeline_builder_workers", "num_compile_workers", "cache_dir", "param_file_path",
     "param_saved_format", "_cleanup", "backend", "weights", "dry_run", "progress"}
)
_POSITIONAL = frozenset({"model_id_or_path", "devices", "name"})


def default_artifact_name(model_id_or_path: str | None, hf_config: Mapping[str, Any] | None) -> str:
    """A name when none is given: the model file or folder name, or ``<model_type>-random``."""
    if model_id_or_path:
        stem = re.split(r"[/:]", model_id_or_path.rstrip("/"))[-1].removesuffix(".gguf")
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
        if slug:
            return slug.lower()
    model_type = str(hf_config.get("model_type", "model")) if isinstance(hf_config, Mapping) else "model"
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
    applied on top.  Unknown keyword arguments raise ConfigError.  When ``build_kwargs``
    name a ``save_dir`` (``build()`` and ``furiosa-llm build``), it must be a path, and
    the output paths are checked as the build will use them (:func:`check_output_paths`).
    """
    init_params = set(BUILDER_PARAM_LOCATION) - BUILD_METHOD_PARAMS - _POSITIONAL
    _check_builder_kwargs(init_kwargs, "__init__", init_params)
    _check_builder_kwargs(build_kwargs, "build", set(BUILD_METHOD_PARAMS))
    if "save_dir" in build_kwargs:
        save_dir = build_kwargs["save_dir"]
        if save_dir is None or (isinstance(save_dir, str) and not save_dir.strip()):
            raise ConfigError(f"build.save_dir: ArtifactBuilder.build needs the folder to write the artifact to, got "
                              f"{show_value(save_dir)}")  # fmt: skip
        if not isinstance(save_dir, (str, os.PathLike)):
            raise ConfigError(f"build.save_dir: expected a path (str or os.PathLike), got {show_value(save_dir)}")
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
    spec = load_spec(data)
    if "save_dir" in build_kwargs:
        check_output_paths(spec)
    return spec


def _set_dotted(data: dict[str, Any], path: str, value: Any) -> None:
    section, _, field = path.partition(".")
    if not field:
        if value is not None and not isinstance(value, Mapping):
            raise ConfigError(f"{section}: expected a mapping or SchedulerConfig, got {show_value(value)}")
        data[section].update(value or {})
    else:
        data[section][field] = value


# --------------------------------------------------------------------------- fitting the spec to the model


def fit_to_model(spec: BuildSpec, request: LoadRequest) -> tuple[BuildSpec, dict[str, Any]]:
    """Read the model's config (cheap: no weights) and check the spec against it, before capture.

    Returns the spec with ``model.task`` concrete (``auto`` resolved, see
    :func:`resolve_task`) and the config.  Raises ConfigError naming the field for a model
    that is inconsistent or does not fit the buckets or the parallel settings.
    """
    hf_config = load_config(request)
    source = request.source
    readable, folder = readable_config(spec.model, source)
    reason = encoder_reason(hf_config)
    if spec.model.task == "generate" and reason:
        raise ConfigError(f"model.task: generate needs a decoder with a language-model head, but {reason}; "
                          "build it for embeddings: model.task=embed buckets=embed")  # fmt: skip
    if spec.model.task == "auto":  # the config could not be read without transformers (a GGUF file)
        data = spec.model_dump()
        data["model"]["task"] = resolve_task(hf_config, folder)[0]
        spec = load_spec(data)  # checks the buckets against the task, as for any spec
    _check_layers(spec, request, hf_config)
    check_model_fit(spec.parallel, spec.build.num_blocks_per_supertask, hf_config, buckets=spec.buckets,
                    origin=config_origin(spec.model, source, readable, hf_config), hardware=spec.hardware)  # fmt: skip
    return spec, hf_config


def _check_layers(spec: BuildSpec, request: LoadRequest, hf_config: Mapping[str, Any]) -> None:
    """``model.num_hidden_layers`` may cut a model with weights, not extend it with random layers."""
    wanted = spec.model.num_hidden_layers
    if wanted is None or not request.source.has_weights:
        return
    full = num_layers(dict(load_config(dataclasses.replace(request, num_hidden_layers=None))))
    if full and wanted > full:
        raise ConfigError(f"model.num_hidden_layers: {wanted} is more than the {full} layers of the model; "
                          f"at most {full} (or null for all)")

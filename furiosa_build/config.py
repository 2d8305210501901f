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
capture or compilation.  The model's config itself is checked the same way: sizes
positive, attention heads divisible by key/value heads, the hidden size by the heads
(without an explicit ``head_dim``), no bucket longer than the positions the model has
(``max_position_embeddings``, GPT-2's ``n_positions``...), ``model.num_hidden_layers``
no deeper than a model with weights.  Whatever ``model.hf_config`` or a folder's
``config.json`` says is checked when the spec is validated; the rest (transformers'
defaults, GGUF files) by :func:`fit_to_model`, which the builder calls right after
reading the config.  ``model.task=auto`` is resolved at the same two points.

Output paths (``build.save_dir``, ``build.cache_dir``, ``build.param_file_path``) are
checked by :func:`check_output_paths` before any work: an existing file where a folder
must go, an ancestor that is a file, a read-only or unwritable place, a name too long;
those raise :class:`furiosa_build.errors.BuildIOError` (an ``OSError``), also a user error.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import importlib.util
import json
import math
import os
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from furiosa_build.compiler import DEFAULT_OPTIONS, LoweringError
from furiosa_build.errors import BuildIOError, io_error, path_error
from furiosa_build.load import LoadError, load_config
from furiosa_build.sources import ModelSource, SourceError, resolve_source
from furiosa_build.supertask import attention_heads, num_layers
from furiosa_runtime.artifact import Bucket, PoolingConfig, split_layers
from furiosa_runtime.hardware import Mesh, plan_mesh

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
    "check_creatable",
    "check_model_fit",
    "check_output_paths",
    "default_artifact_name",
    "fit_to_model",
    "load_spec",
    "resolve_task",
    "spec_from_builder_args",
]


class ConfigError(ValueError):
    """A build configuration that cannot be used, as one line: ``<dotted.field>: <problem>``."""


#: Exceptions that are the user's fault: entry points print them as one line, exit 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, SourceError, LoadError, LoweringError, BuildIOError)

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

    ``task`` is ``generate`` (a decoder with an LM head), ``embed`` (an encoder whose
    head pools the token states into one vector) or ``auto`` (the default): ``embed`` for
    an encoder-only architecture (BERT, RoBERTa, XLM-R, DistilBERT, MPNet...) or a
    sentence-transformers folder (``modules.json``), ``generate`` otherwise; see
    :func:`resolve_task`.  A validated spec holds the concrete task whenever the model's
    config can be read without transformers (``hf_config``, a folder's ``config.json``);
    otherwise (a GGUF file) the builder resolves it right after reading the config, in
    :func:`fit_to_model`, before capture; the artifact records the concrete task.
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
            raise _Invalid((), f"must be an integer in [0, 2**64) (torch.manual_seed's range), got {_show(seed)}")
        return seed

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
        if hf_config is None:
            return None
        if not isinstance(hf_config.get("model_type"), str):
            raise _Invalid((), "must contain 'model_type' (a string such as 'llama')")
        return hf_config

    @model_validator(mode="after")
    def _known_model_type(self) -> ModelConfig:
        # A folder with remote code may name its own model type; everything else must be one
        # that transformers can build (checked here instead of deep inside AutoConfig).
        if self.hf_config is not None and not (self.trust_remote_code and self.model_id_or_path):
            problem = _model_type_problem(self.hf_config["model_type"])
            if problem:
                raise _Invalid(("hf_config", "model_type"), problem)
        return self


SEED_LIMIT = 2**64

#: Config keys holding a size (whatever the architecture calls it): null or a positive integer.
_SIZE_KEYS = frozenset({
    "hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
    "num_hidden_layers", "n_layer", "vocab_size", "intermediate_size", "ffn_dim", "n_inner",
    "max_position_embeddings", "n_positions", "num_local_experts", "num_experts_per_tok",
})  # fmt: skip
#: Where an architecture keeps its trained positions (learned tables or the rotary range).
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
#: RoBERTa-style embeddings number positions from pad_token_id + 1.
_PADDED_POSITIONS = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                               "data2vec-text", "xmod"})  # fmt: skip
#: Encoder-only model types: built for embeddings (task=embed), never for generation.
_ENCODER_MODEL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "mpnet", "electra", "albert", "camembert",
    "deberta", "deberta-v2", "ernie", "nomic_bert", "modernbert", "roberta-prelayernorm", "data2vec-text",
    "mobilebert", "megatron-bert", "xmod", "squeezebert", "convbert", "rembert", "ibert", "esm", "luke",
})  # fmt: skip
_DECODER_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
#: Rotary scalings that stretch the trained positions by their ``factor``.
_SCALED_ROPE = frozenset({"linear", "dynamic", "yarn", "longrope", "llama3"})
_COMMON_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gpt2", "opt", "bert")


@cache
def _transformers_model_types() -> frozenset[str]:
    """The model types transformers knows, read from its generated name table without
    importing transformers (whose import alone costs most of a cached rebuild)."""
    spec = importlib.util.find_spec("transformers")
    table = Path(next(iter(spec.submodule_search_locations or [])), "models", "auto", "auto_mappings.py") if spec else None
    if table is None or not table.is_file():
        return frozenset()
    module_spec = importlib.util.spec_from_file_location("_transformers_auto_mappings", table)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return frozenset(module.CONFIG_MAPPING_NAMES)
    except Exception:  # a transformers whose table looks different: ask transformers itself
        return frozenset()


def _size_problem(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be the size ``key`` (None if it can, or ``key`` is not a size)."""
    if key not in _SIZE_KEYS or value is None or isinstance(value, (list, tuple)):
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        return f"expected a positive integer, got {_show(value)}"
    if value <= 0:
        return f"must be a positive integer, got {value}"
    return None


def _model_type_problem(model_type: str) -> str | None:
    """Why transformers cannot build ``model_type`` (None if it can, or transformers is missing)."""
    if model_type in _transformers_model_types():
        return None
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:  # the load stage says that transformers is missing
        return None
    known = list(CONFIG_MAPPING.keys())
    if model_type in known:
        return None
    close = difflib.get_close_matches(model_type, known, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return (f"unknown {model_type!r}; {hint}transformers knows {len(known)} model types, such as "
            f"{', '.join(_COMMON_MODEL_TYPES)}")  # fmt: skip


def _encoder_reason(config: Mapping[str, Any]) -> str | None:
    """Why a model is encoder-only (no language-model head), or None for a decoder."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if config.get("is_decoder") is True or any(a.endswith(_DECODER_HEADS) for a in archs):
        return None
    model_type = config.get("model_type")
    if model_type in _ENCODER_MODEL_TYPES:
        return f"{archs[0] if archs else repr(model_type)} is an encoder-only model"
    return None


def resolve_task(config: Mapping[str, Any], folder: Path | None) -> tuple[Literal["generate", "embed"], str]:
    """What ``model.task=auto`` means for a model, and why.

    ``embed`` for a sentence-transformers folder (``modules.json``) or an encoder-only
    architecture (BERT, RoBERTa, XLM-R, DistilBERT, MPNet... unless configured as a
    decoder); ``generate`` for everything else.
    """
    if folder is not None and (folder / "modules.json").is_file():
        return "embed", "it is a sentence-transformers model (modules.json)"
    reason = _encoder_reason(config)
    return ("embed", reason) if reason else ("generate", "")


def _readable_config(model: ModelConfig, source: ModelSource) -> tuple[dict[str, Any] | None, Path | None]:
    """The model's config as far as it can be read without transformers, and its folder.

    (None, None) for a GGUF file or an unreadable config.json: the builder decides once
    transformers has read the config.
    """
    if source.kind == "config":
        return dict(model.hf_config or {}), None
    if source.kind != "folder" or source.path is None:
        return None, None
    try:
        config = json.loads((source.path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(config, dict):
        return None, None
    return {**config, **(model.hf_config or {})}, source.path


# --------------------------------------------------------------------------- buckets


#: Upper bounds that keep every count a 32-bit integer in the compiled programs and the runtime.
MAX_TOKENS = 2**31 - 1
MAX_BATCH = 2**16


class BucketsConfig(_Section):
    """Static shapes to compile, as ``(batch_size, attention_size)`` pairs, and the paged KV cache."""

    prefill: list[tuple[int, int]] = Field(default_factory=list)
    decode: list[tuple[int, int]] = Field(default_factory=list)
    max_seq_len_to_capture: int = Field(default=2048, gt=0, le=MAX_TOKENS)
    paged_attention_num_blocks: int | None = Field(default=None, gt=0, le=MAX_TOKENS)
    paged_attention_block_size: int = Field(default=1, gt=0, le=MAX_TOKENS)
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
            if batch > MAX_BATCH:
                raise _Invalid(where, f"batch_size {batch} is larger than {MAX_BATCH}")
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
        if self.paged_attention_block_size > self.max_seq_len_to_capture:
            raise _Invalid(("paged_attention_block_size",), f"{self.paged_attention_block_size} is larger than "
                           f"buckets.max_seq_len_to_capture={self.max_seq_len_to_capture}; a KV block never holds "
                           "more than one sequence")  # fmt: skip
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


def check_model_fit(
    parallel: ParallelSpec,
    blocks_per_supertask: int,
    hf_config: Mapping[str, Any],
    *,
    buckets: BucketsConfig | None = None,
    origin: ConfigOrigin | None = None,
) -> None:
    """Check the model's config for consistency, then the buckets and parallel settings
    against it; raise ConfigError naming the field.

    ``hf_config`` is the complete config as transformers read it (defaults filled in);
    ``origin`` says which keys were written rather than derived, and how to name them.
    """
    origin = origin or ConfigOrigin(frozenset(hf_config))
    _check_consistency(hf_config, origin)
    if buckets is not None:
        _check_positions(hf_config, buckets, origin)
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


def _first_key(config: Mapping[str, Any], *keys: str) -> str | None:
    return next((k for k in keys if config.get(k) is not None), None)


@dataclasses.dataclass(frozen=True)
class ConfigOrigin:
    """Where the keys of a model config come from, for messages and for explicit ``head_dim``.

    ``written``: keys set by the model's files or ``model.hf_config`` (the rest are
    transformers' defaults or derived); ``overrides``: keys of ``model.hf_config``;
    ``files``: how to name a key read from the model's files (None: a random-weight model,
    whose keys are all ``model.hf_config.<key>``).
    """

    written: frozenset[str]
    overrides: frozenset[str] = frozenset()
    files: str | None = None

    def name(self, key: str) -> str:
        if self.files is None or key in self.overrides:
            return f"model.hf_config.{key}"
        return f"{self.files}: {key}"


def _check_consistency(config: Mapping[str, Any], origin: ConfigOrigin) -> None:
    """Sizes positive, heads divisible by KV heads, hidden size by heads (without head_dim), experts."""
    def fail(key: str, problem: str) -> None:
        raise ConfigError(f"{origin.name(key)}: {problem}")

    for key, value in config.items():
        problem = _size_problem(key, value)
        if problem:
            fail(key, problem)
    heads_key = _first_key(config, "num_attention_heads", "n_head")
    kv_key = _first_key(config, "num_key_value_heads")
    hidden_key = _first_key(config, "hidden_size", "n_embd", "d_model")
    heads = config.get(heads_key) if heads_key else None
    kv_heads = config.get(kv_key) if kv_key else None
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        fail(kv_key or "", f"{kv_heads} key/value heads do not divide the {heads} attention heads ({heads_key}); "
                           "each key/value head must serve the same number of query heads")  # fmt: skip
    hidden = config.get(hidden_key) if hidden_key else None
    explicit_head_dim = "head_dim" in origin.written and config.get("head_dim") is not None
    if isinstance(heads, int) and isinstance(hidden, int) and not explicit_head_dim and hidden % heads:
        fail(hidden_key or "", f"{hidden} is not divisible by the {heads} attention heads ({heads_key}); "
                               "change one of them or give head_dim explicitly")  # fmt: skip
    experts, per_token = config.get("num_local_experts"), config.get("num_experts_per_tok")
    if isinstance(experts, int) and isinstance(per_token, int) and per_token > experts:
        fail("num_experts_per_tok", f"{per_token} experts per token, but the model has only {experts} "
                                    "(num_local_experts)")  # fmt: skip


def position_limit(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """(key, longest sequence) the model was trained for, or None if its config does not say.

    Learned position tables (GPT-2, OPT, BERT) cannot index beyond it at all, and rotary
    models were never trained beyond it, so no bucket may exceed it.
    """
    key = next((k for k in _POSITION_KEYS if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)
                and config[k] > 0), None)  # fmt: skip
    if key is None:
        return None
    limit = int(config[key])
    pad = config.get("pad_token_id")
    if config.get("model_type") in _PADDED_POSITIONS and isinstance(pad, int) and key == "max_position_embeddings":
        limit -= pad + 1
    scaling = config.get("rope_scaling") or config.get("rope_parameters")
    if isinstance(scaling, Mapping) and key == "max_position_embeddings":  # rotary scaling made for longer contexts
        factor = scaling.get("factor")
        kind = scaling.get("rope_type") or scaling.get("type")
        original = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings") or limit
        if kind in _SCALED_ROPE and isinstance(factor, (int, float)) and factor > 1 and isinstance(original, int):
            limit = max(limit, int(original * factor))
    return key, limit


def _check_positions(config: Mapping[str, Any], buckets: BucketsConfig, origin: ConfigOrigin) -> None:
    """Refuse a bucket longer than the positions the model has."""
    found = position_limit(config)
    if found is None:
        return
    key, limit = found
    name = origin.name(key)
    if not buckets.prefill and not buckets.decode:
        if buckets.max_seq_len_to_capture > limit:
            raise ConfigError(f"buckets.max_seq_len_to_capture: {buckets.max_seq_len_to_capture} (the default bucket "
                              f"size) exceeds the {limit} positions of the model ({name}); set it to at most {limit}")
        return
    for phase in ("prefill", "decode"):
        for index, (_, attention) in enumerate(getattr(buckets, phase)):
            if attention > limit:
                raise ConfigError(f"buckets.{phase}[{index}]: attention_size {attention} exceeds the {limit} "
                                  f"positions of the model ({name}); use buckets of at most {limit} tokens")


def _origin(model: ModelConfig, source: ModelSource, readable: Mapping[str, Any] | None,
            hf_config: Mapping[str, Any]) -> ConfigOrigin:
    """Which keys of ``hf_config`` the user or the model's files wrote (see ConfigOrigin);
    ``readable`` is what ``_readable_config`` found (None for a GGUF file, whose every key
    is the file's)."""
    overrides = frozenset(model.hf_config or {})
    if source.kind == "config":
        return ConfigOrigin(overrides, overrides)
    written = frozenset(readable if readable is not None else hf_config)
    return ConfigOrigin(written | overrides, overrides, f"model.model_id_or_path: {model.model_id_or_path}")


def fit_to_model(spec: BuildSpec, request: LoadRequest) -> tuple[BuildSpec, dict[str, Any]]:
    """Read the model's config (cheap: no weights) and check the spec against it, before capture.

    Returns the spec with ``model.task`` concrete (``auto`` resolved, see
    :func:`resolve_task`) and the config.  Raises ConfigError naming the field for a model
    that is inconsistent or does not fit the buckets or the parallel settings.
    """
    hf_config = load_config(request)
    source = request.source
    readable, folder = _readable_config(spec.model, source)
    reason = _encoder_reason(hf_config)
    if spec.model.task == "generate" and reason:
        raise ConfigError(f"model.task: generate needs a decoder with a language-model head, but {reason}; "
                          "build it for embeddings: model.task=embed buckets=embed")  # fmt: skip
    if spec.model.task == "auto":  # the config could not be read without transformers (a GGUF file)
        data = spec.model_dump()
        data["model"]["task"] = resolve_task(hf_config, folder)[0]
        spec = load_spec(data)  # checks the buckets against the task, as for any spec
    _check_layers(spec, request, hf_config)
    check_model_fit(spec.parallel, spec.build.num_blocks_per_supertask, hf_config, buckets=spec.buckets,
                    origin=_origin(spec.model, source, readable, hf_config))  # fmt: skip
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


# --------------------------------------------------------------------------- output paths


def check_output_paths(spec: BuildSpec) -> None:
    """Refuse, before any work, output paths the build could not write: raise BuildIOError
    (or the package stage's ConfigError) with one line ``<field>: <path>: <problem>``.

    ``build.save_dir`` (not for a dry run, which writes no artifact): not a file, no
    ancestor that is a file, a writable place to create it; ``build.param_file_path``
    likewise.  ``build.cache_dir`` is not checked: the cache is an optimisation, and one
    that cannot be used warns once and the build goes on without it.
    """
    opts = spec.build
    if not opts.dry_run and opts.save_dir:
        save_dir = Path(opts.save_dir).expanduser()
        _check_existing("build.save_dir", save_dir, want_dir=True)
        check_creatable("build.save_dir", save_dir, save_dir.parent, scratch_sibling=True)
        try:  # the package stage's own refusal (not an artifact of ours, the current folder...)
            from furiosa_build.package import check_save_dir
        except ImportError:  # pragma: no cover - package stage without the check
            check_save_dir = None
        if check_save_dir is not None:
            check_save_dir(save_dir)
    if not opts.dry_run and opts.param_file_path:
        param_file = Path(opts.param_file_path).expanduser()
        _check_existing("build.param_file_path", param_file, want_dir=False)
        check_creatable("build.param_file_path", param_file, param_file.parent, scratch_sibling=True)


def _check_existing(field: str, path: Path, want_dir: bool) -> None:
    try:
        if not os.path.lexists(path):
            return
        is_dir = path.is_dir()
    except OSError as exc:
        raise io_error(exc, field, path) from None
    if want_dir and not is_dir:
        raise path_error(errno.ENOTDIR, field, path, "exists and is not a folder; choose another path")
    if not want_dir and is_dir:
        raise path_error(errno.EISDIR, field, path, "is a folder; give a file path")


#: What a scratch sibling's name adds to the name it stands beside (furiosa_build.scratch).
_SCRATCH_NAME_EXTRA = 64


def check_creatable(field: str, target: Path, place: Path, *, scratch_sibling: bool = False) -> None:
    """``place`` (or its nearest existing ancestor) must be a folder this process may write,
    and the names still to be made must fit the file system (``scratch_sibling``: the build
    also makes a scratch sibling of ``target`` with a longer name)."""
    try:
        target = Path(os.path.abspath(target))
        existing = Path(os.path.abspath(place))
        while not os.path.lexists(existing):
            existing = existing.parent
        if not existing.is_dir():
            problem = "is a broken symbolic link" if existing.is_symlink() and not existing.exists() else "is not a folder"
            raise path_error(errno.ENOTDIR, field, target, f"{existing} {problem}")
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        if target != existing and target.is_relative_to(existing):
            for part in target.relative_to(existing).parts:
                limit = name_max - (_SCRATCH_NAME_EXTRA if scratch_sibling and part == target.name else 0)
                if len(os.fsencode(part)) > limit:
                    raise path_error(errno.ENAMETOOLONG, field, target, f"the name {part[:20]!r}... is longer than "
                                     f"the {limit} bytes this build can use there")  # fmt: skip
        if not os.access(existing, os.W_OK | os.X_OK):
            if os.statvfs(existing).f_flag & os.ST_RDONLY:
                raise path_error(errno.EROFS, field, target, f"{existing} is on a read-only file system")
            raise path_error(errno.EACCES, field, target, f"{existing} is not writable (permission denied)")
    except BuildIOError:
        raise
    except OSError as exc:  # a loop of symbolic links...
        raise io_error(exc, field, target) from None


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
        for field in ("save_dir", "param_file_path", "quantize_artifact_path"):
            value = getattr(self, field)
            if value is not None and not value.strip():
                raise _Invalid((field,), f"expected a path, got {value!r}" + (" (null: artifacts/<model.name>)" if field == "save_dir" else ""))
            if value is not None and "\0" in value:
                raise _Invalid((field,), f"a path cannot contain a NUL character, got {_show(value)}")
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
    def _check(self, info: ValidationInfo) -> BuildSpec:
        source = self._check_source()
        config, folder = _readable_config(self.model, source)
        origin = _origin(self.model, source, config, config or {})
        if config is not None:  # what can be checked without transformers; fit_to_model checks the rest
            _check_consistency(config, origin)
        default_decode = bool((info.context or {}).get(DECODE_BUCKETS_ARE_DEFAULTS))
        self._settle_task(config, folder, default_decode)
        if config is not None:  # the buckets as the task left them
            _check_positions(config, self.buckets, origin)
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
            reason = _encoder_reason(config)
            if model.task == "generate" and reason:
                raise _Invalid(("model", "task"), f"generate needs a decoder with a language-model head, but {reason}; "
                               "build it for embeddings: model.task=embed buckets=embed")  # fmt: skip
            if model.task == "auto":
                model.task, why = resolve_task(config, folder)
                chosen_by = f", which model.task=auto chose because {why}" if why else ""
        if model.task == "auto":
            return  # the builder decides once transformers has read the config (fit_to_model)
        if model.task == "generate":
            if model.pooling is not None:
                raise _Invalid(("model", "pooling"), "only for model.task=embed; set null for task=generate")
            return
        if buckets.decode and default_decode:
            buckets.decode = []
        if buckets.decode:
            raise _Invalid(("buckets", "decode"), f"must be empty for model.task=embed{chosen_by} (an encoder has no "
                           "decode phase); give buckets.prefill only, e.g. model.task=embed buckets=embed, got "
                           f"{_show([list(p) for p in buckets.decode])}")  # fmt: skip
        if not buckets.prefill:
            buckets.prefill = [(1, buckets.max_seq_len_to_capture)]

    def _check_source(self) -> ModelSource:
        model = self.model
        try:
            source = resolve_source(model.model_id_or_path, model.hf_config is not None)
        except SourceError as exc:  # already names model.model_id_or_path
            raise ConfigError(str(exc)) from None
        if not source.has_weights and model.seed_for_random_weight is None:
            raise _Invalid(("model", "seed_for_random_weight"), "required for a random-weight model "
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
                              f"{_show(save_dir)}")  # fmt: skip
        if not isinstance(save_dir, (str, os.PathLike)):
            raise ConfigError(f"build.save_dir: expected a path (str or os.PathLike), got {_show(save_dir)}")
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
            raise ConfigError(f"{section}: expected a mapping or SchedulerConfig, got {_show(value)}")
        data[section].update(value or {})
    else:
        data[section][field] = value

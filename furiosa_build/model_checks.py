"""Checks of the model's config, and of the spec against it (what only the model decides).

Parallel settings are checked in two steps: ``ParallelSpec`` checks what the config alone
decides (device strings, power-of-two tp, tp * pp * dp against the PEs of the devices);
:func:`check_model_fit` checks what depends on the model (heads and vocabulary divisible by
tp, stages against the decoder depth) as soon as the model's config is read, before
capture or compilation.  The model's config itself is checked the same way: sizes
positive, attention heads divisible by key/value heads, the hidden size by the heads
(without an explicit ``head_dim``), no bucket longer than the positions the model has
(``max_position_embeddings``, GPT-2's ``n_positions``...), ``model.num_hidden_layers``
no deeper than a model with weights.  Whatever ``model.hf_config`` or a folder's
``config.json`` says is checked when the spec is validated; the rest (transformers'
defaults, GGUF files) by :func:`furiosa_build.config.fit_to_model`, which the builder calls right after
reading the config.  ``model.task=auto`` is resolved at the same two points.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from furiosa_build.errors import ConfigError, show_value
from furiosa_build.sources import ModelSource
from furiosa_build.supertask import attention_heads, num_layers
from furiosa_runtime.npu.hardware import RNGD, HardwareSpec

if TYPE_CHECKING:
    from furiosa_build.config_sections import BucketsConfig, ModelConfig, ParallelSpec

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
        return f"expected a positive integer, got {show_value(value)}"
    if value <= 0:
        return f"must be a positive integer, got {value}"
    return None


def model_type_problem(model_type: str) -> str | None:
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


def encoder_reason(config: Mapping[str, Any]) -> str | None:
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
    reason = encoder_reason(config)
    return ("embed", reason) if reason else ("generate", "")


def readable_config(model: ModelConfig, source: ModelSource) -> tuple[dict[str, Any] | None, Path | None]:
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
    hardware: HardwareSpec = RNGD,
) -> None:
    """Check the model's config for consistency, then the buckets and parallel settings
    against it; raise ConfigError naming the field.

    ``hf_config`` is the complete config as transformers read it (defaults filled in);
    ``origin`` says which keys were written rather than derived, and how to name them.
    """
    origin = origin or ConfigOrigin(frozenset(hf_config))
    check_consistency(hf_config, origin)
    if buckets is not None:
        check_positions(hf_config, buckets, origin)
    heads, kv_heads = attention_heads(dict(hf_config))
    vocab = int(hf_config.get("vocab_size", 1))
    tp = parallel.tensor_parallel_size
    problem = _tp_misfit(tp, heads, kv_heads, vocab)
    if problem:
        pes = len(parallel.mesh(hardware).pes)
        fits = [t for t in (2**i for i in range(8)) if t <= pes and not _tp_misfit(t, heads, kv_heads, vocab)]
        raise ConfigError(f"parallel.tensor_parallel_size: {tp} {problem}; allowed here: {', '.join(map(str, fits))}")
    layers = num_layers(dict(hf_config))
    stages = parallel.num_blocks_per_pp_stage
    if stages is None and parallel.pipeline_parallel_size > layers:
        raise ConfigError(f"parallel.pipeline_parallel_size: {parallel.pipeline_parallel_size} stages for a model of "
                          f"{layers} decoder layers; at most {layers}")  # fmt: skip
    if stages is not None and sum(stages) != layers:
        raise ConfigError(f"parallel.num_blocks_per_pp_stage: {show_value(stages)} sums to {sum(stages)}, but the model "
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


def check_consistency(config: Mapping[str, Any], origin: ConfigOrigin) -> None:
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


def check_positions(config: Mapping[str, Any], buckets: BucketsConfig, origin: ConfigOrigin) -> None:
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


def config_origin(model: ModelConfig, source: ModelSource, readable: Mapping[str, Any] | None,
                  hf_config: Mapping[str, Any]) -> ConfigOrigin:
    """Which keys of ``hf_config`` the user or the model's files wrote (see ConfigOrigin);
    ``readable`` is what ``readable_config`` found (None for a GGUF file, whose every key
    is the file's)."""
    overrides = frozenset(model.hf_config or {})
    if source.kind == "config":
        return ConfigOrigin(overrides, overrides)
    written = frozenset(readable if readable is not None else hf_config)
    return ConfigOrigin(written | overrides, overrides, f"model.model_id_or_path: {model.model_id_or_path}")

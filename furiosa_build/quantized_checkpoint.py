"""Quantized checkpoints in the Hugging Face compressed-tensors format
(``build.quantize_artifact_path``), read and checked against the model.

What is accepted is what FP8 checkpoints use in practice (llm-compressor's ``FP8_DYNAMIC``
and ``FP8`` schemes) and 8-bit integer weight-only ones, all symmetric, one scale per output
channel or per tensor, optionally with the embedding tables quantized weight-only as
well.  ``config.json`` holds::

    "quantization_config": {
      "quant_method": "compressed-tensors",
      "format": "float-quantized",            # int8 weights: "int-quantized"; both: "mixed-precision"
      "config_groups": {
        "group_0": {
          "targets": ["Linear"],
          "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, ...},
          "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true, ...}},
        "group_1": {                            # optional: the embedding tables
          "targets": ["Embedding", "lm_head"], "format": "int-quantized",
          "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": true, ...},
          "input_activations": null}},
      "ignore": []}                             # ["lm_head"] without group_1

and the safetensors files hold, for every quantized module ``<module>``: ``<module>.weight``
(``F8_E4M3`` or ``I8``, ``[out, in]``), ``<module>.weight_scale`` (``[out, 1]`` per channel,
``[]`` or ``[1]`` per tensor, any float dtype) and, for static activations,
``<module>.input_scale``; every other tensor in its own dtype.  ``input_activations`` null
is weight-only.  A group's ``format`` (else the top-level one) must be ``float-quantized``
for float and ``int-quantized`` for int weights: integers stored one int8 per value, what
compressed-tensors' ``IntQuantizationCompressor`` writes; ``pack-quantized``, which
llm-compressor picks by default for 4- and 8-bit integer weight-only schemes and which
packs the values into int32 words, is refused in one line.

Only the linear layers of decoder layers may be quantized by the ``Linear`` group, the same
ones in every layer (one compiled block serves them all).  The second group quantizes the
input embedding and ``lm_head`` weight-only with one scale per row (per token, per output
channel): with tied embeddings they are one tensor, stored once under the embedding's name
(as ``save_pretrained`` stores tied weights), and one table serves the lookup and the
logits; untied, both must be quantized.

The build reads every tensor of the model from the checkpoint (:class:`QuantizedWeights`,
a tied tensor under either name), scales as float32 of shape ``[out, 1]`` or ``[1]``,
each checked to have the model's shape; the model source still gives the config and the
tokenizer.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from furiosa_build.errors import ConfigError
from furiosa_build.safetensors_file import (
    StoredTensor,
    TensorSpec,
    read_header,
    read_tensor,
)
from furiosa_build.weight_sources import WeightSource
from furiosa_runtime.npu.artifact import QuantizationConfig
from furiosa_runtime.npu.weights import SAFETENSORS_DTYPES, SafetensorsFormatError

FIELD = "build.quantize_artifact_path"
SUPPORTED = ("fp8 weights with dynamic per-token or static per-tensor fp8 activations, fp8 weight-only, int8 weight-only; "
             "8-bit symmetric, per-channel or per-tensor scales; embedding tables 8-bit weight-only per channel")  # fmt: skip
FORMATS = {"float": "float-quantized", "int": "int-quantized"}
MIXED = "mixed-precision"
WEIGHT_DTYPES = {"float": ("f8_e4m3fn", SAFETENSORS_DTYPES["F8_E4M3"]), "int": ("i8", SAFETENSORS_DTYPES["I8"])}
STORED = {name: stored for name, stored in WEIGHT_DTYPES.values()}
SCALE_SUFFIXES = ("weight_scale", "input_scale")
#: Model config fields a checkpoint must agree with the model on.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "head_dim")  # fmt: skip


class QuantizationError(ConfigError):
    """A quantized checkpoint that cannot be used, in one line naming the field or tensor."""


@dataclass(frozen=True)
class ModelLayout:
    """What of a model a checkpoint may quantize, from the model on the meta device."""

    linears: frozenset[str]  # weight names of every nn.Linear inside the decoder layers
    embedding: str  # the input embedding module (``model.embed_tokens``)
    lm_head: str  # the output embedding module (``lm_head``)
    ties: dict[str, tuple[str, ...]]  # parameter name -> every name of the same tensor, for tied parameters

    @classmethod
    def of(cls, hf_config: dict[str, Any]) -> ModelLayout:
        import torch

        from furiosa_build.hf_model import (
            auto_model_class,
            canonical_names,
            config_for_model,
            meta_model,
        )

        model = meta_model(auto_model_class("generate"), config_for_model(hf_config, "model.hf_config"), hf_config)
        names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
        layers = [name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
        linears = frozenset(f"{name}.weight" for name, module in model.named_modules()
                            if isinstance(module, torch.nn.Linear) and name.startswith(tuple(f"{p}." for p in layers)))  # fmt: skip
        groups: dict[str, list[str]] = {}
        for name, first in canonical_names(model).items():
            groups.setdefault(first, []).append(name)
        ties = {name: tuple(group) for group in groups.values() if len(group) > 1 for name in group}
        return cls(linears, names[id(model.get_input_embeddings())], names[id(model.get_output_embeddings())], ties)

    @property
    def tied(self) -> bool:
        return f"{self.lm_head}.weight" in self.ties.get(f"{self.embedding}.weight", ())


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """A compressed-tensors checkpoint folder: its scheme, config and tensors (headers only)."""

    folder: Path
    hf_config: dict[str, Any]
    scheme: QuantizationConfig  # ``modules`` and ``embeddings`` empty until matched to a model (:meth:`for_model`)
    tensors: dict[str, tuple[Path, StoredTensor]]

    @classmethod
    def open(cls, path: str | Path) -> QuantizedCheckpoint:
        folder = Path(path).expanduser()
        config = _read_json(folder / "config.json")
        quant = config.get("quantization_config")
        if not isinstance(quant, dict):
            raise QuantizationError(f"{FIELD}: {folder / 'config.json'} has no quantization_config (not a quantized checkpoint)")
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise QuantizationError(f"{FIELD}: {folder} holds no .safetensors file")
        tensors: dict[str, tuple[Path, StoredTensor]] = {}
        for file in files:
            try:
                tensors.update((name, (file, stored)) for name, stored in read_header(file).items())
            except (OSError, SafetensorsFormatError) as err:
                raise QuantizationError(f"{FIELD}: {file}: {err}") from None
        return cls(folder, config, parse_scheme(quant), tensors)

    @cached_property
    def layout(self) -> ModelLayout:
        """The model's layout, from the checkpoint's config (the model of its shape fields)."""
        return ModelLayout.of({key: value for key, value in self.hf_config.items() if key != "quantization_config"})

    def check_model(self, hf_config: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model (its shape fields differ from the model's)."""
        for key in SHAPE_FIELDS:
            if key in hf_config and key in self.hf_config and hf_config[key] != self.hf_config[key]:
                raise QuantizationError(f"{FIELD}: the checkpoint's {key} is {self.hf_config[key]!r} but the model's is "
                                        f"{hf_config[key]!r}: it is a checkpoint of another model")  # fmt: skip

    def for_model(self, layers_path: str, num_layers: int) -> QuantizationConfig:
        """The scheme with the quantized modules of a decoder layer and the quantized
        embedding tables, every tensor checked."""
        per_layer: dict[int, set[str]] = {}
        outside: set[str] = set()
        pattern = re.compile(rf"{re.escape(layers_path)}\.(\d+)\.(.+)")
        for module in (name.removesuffix(".weight_scale") for name in self.tensors if name.endswith(".weight_scale")):
            found = pattern.fullmatch(module)
            if found is None:
                outside.add(module)
            else:
                per_layer.setdefault(int(found[1]), set()).add(found[2])
        if not per_layer:
            raise QuantizationError(f"{FIELD}: the checkpoint has no *.weight_scale tensor in a decoder layer: no linear layer is quantized")
        modules = sorted(set().union(*per_layer.values()))
        for layer in range(num_layers):
            if per_layer.get(layer, set()) != set(modules):
                missing = sorted(set(modules) - per_layer.get(layer, set()))
                raise QuantizationError(f"{FIELD}: layer {layer} does not quantize {', '.join(missing) or 'the same modules'}; "
                                        "every decoder layer must quantize the same linear layers")  # fmt: skip
            for module in modules:
                self._check_module(f"{layers_path}.{layer}.{module}", self.scheme.weights, self.scheme.strategy,
                                   self.scheme.activations == "static")  # fmt: skip
        return self.scheme.model_copy(update={"modules": modules, **self._tables(outside, layers_path)})

    def _tables(self, quantized: set[str], layers_path: str) -> dict[str, Any]:
        """``embeddings`` and ``embedding_weights`` of the scheme: the embedding and ``lm_head``
        when their tables are quantized (``quantized``: the modules outside the layers)."""
        layout = self.layout
        tables = {layout.embedding, layout.lm_head}
        if not quantized:
            return {"embeddings": [], "embedding_weights": None}
        if not quantized <= tables:
            raise QuantizationError(f"{FIELD}: {', '.join(sorted(quantized - tables))} is quantized, but only the linear layers "
                                    f"of the decoder layers ({layers_path}.N...) and the embedding tables can be; add it to "
                                    "the checkpoint's ignore list")  # fmt: skip
        if self.scheme.embedding_weights is None:
            raise QuantizationError(f"{FIELD}: {', '.join(sorted(quantized))} is quantized by the Linear group; embedding tables "
                                    "are supported weight-only, in a config group of their own (or add it to ignore)")  # fmt: skip
        if not layout.tied and quantized != tables:
            raise QuantizationError(f"{FIELD}: only {', '.join(sorted(quantized))} of the untied {layout.embedding} and "
                                    f"{layout.lm_head} is quantized; quantize both or neither")  # fmt: skip
        for module in quantized:
            self._check_module(module, self.scheme.embedding_weights, "channel", static=False)
        return {"embeddings": sorted(tables), "embedding_weights": self.scheme.embedding_weights}

    def _check_module(self, module: str, weights: str, strategy: str, static: bool) -> None:
        """A quantized module's weight, scale and (``static``) input scale have the dtypes and shapes of the scheme."""
        weight = self._stored(f"{module}.weight")
        if weight.dtype != STORED[weights] or len(weight.shape) != 2:
            raise QuantizationError(f"{FIELD}: {module}.weight must be a 2-D {STORED[weights].name} tensor for this scheme, "
                                    f"got {weight.dtype.name} {list(weight.shape)}")  # fmt: skip
        expected = [(weight.shape[0], 1), (weight.shape[0],)] if strategy == "channel" else [(), (1,)]
        _check_scale(f"{module}.weight_scale", self._stored(f"{module}.weight_scale"), expected)
        if static:
            _check_scale(f"{module}.input_scale", self._stored(f"{module}.input_scale"), [(), (1,)])

    def _stored(self, name: str) -> StoredTensor:
        if name not in self.tensors:
            raise QuantizationError(f"{FIELD}: tensor {name} is missing from the checkpoint")
        return self.tensors[name][1]

    def spec(self, name: str) -> TensorSpec:
        """A tensor's dtype and shape as the build reads it: scales float32 ``[out, 1]`` or ``[1]``."""
        stored = self.tensors[name][1]
        if name.endswith(SCALE_SUFFIXES):
            return np.dtype(np.float32), (stored.shape[0], 1) if math.prod(stored.shape) > 1 else (1,)
        return stored.dtype, stored.shape

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as :meth:`spec` describes it."""
        path, stored = self.tensors[name]
        dtype, shape = self.spec(name)
        return read_tensor(path, stored).astype(dtype).reshape(shape)


def parse_scheme(quant: dict[str, Any]) -> QuantizationConfig:
    """The scheme of a ``quantization_config``; anything but the supported ones is refused,
    naming what is supported."""
    if quant.get("quant_method") != "compressed-tensors":
        raise QuantizationError(f"{FIELD}: quant_method {quant.get('quant_method')!r} is not supported (only compressed-tensors)")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantizationError(f"{FIELD}: expected config_groups, got {groups!r}")
    linear = [g for g in groups.values() if "Linear" in (g.get("targets") or [])]
    tables = [g for g in groups.values() if "Linear" not in (g.get("targets") or [])]
    if len(linear) != 1 or len(tables) > 1:
        raise QuantizationError(f"{FIELD}: expected one config group targeting Linear and at most one other (the embedding "
                                f"tables), got {len(groups)} groups of which {len(linear)} target Linear")  # fmt: skip
    kind, strategy = _weights(linear[0], quant)
    activations = _activations(linear[0].get("input_activations"), kind)
    scheme = {("float", "dynamic"): "fp8-dynamic", ("float", "static"): "fp8-static",
              ("float", "none"): "fp8-weight-only", ("int", "none"): "int8-weight-only"}[(kind, activations)]  # fmt: skip
    return QuantizationConfig(scheme=scheme, weights=WEIGHT_DTYPES[kind][0], strategy=strategy, activations=activations,
                              modules=[], embedding_weights=_table_weights(tables[0], quant) if tables else None)  # fmt: skip


def _weights(group: dict[str, Any], quant: dict[str, Any]) -> tuple[str, str]:
    """(type, strategy) of a group's weights, in the group's format."""
    weights = group.get("weights") or {}
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if bits != 8 or kind not in FORMATS or weights.get("symmetric", True) is not True or strategy not in ("channel", "tensor"):
        described = f"{kind} {bits}-bit, strategy {strategy}, symmetric {weights.get('symmetric', True)}"
        raise QuantizationError(f"{FIELD}: weights {described} are not supported (supported: {SUPPORTED})")
    top = quant.get("format")
    fmt = group.get("format") or top
    if fmt != FORMATS[kind] or top not in (FORMATS[kind], MIXED):
        raise QuantizationError(f"{FIELD}: format {fmt!r} is not supported for {kind} weights (only {FORMATS[kind]}, "
                                f"or {MIXED} at the top with {FORMATS[kind]} in the group)")  # fmt: skip
    return kind, strategy


def _table_weights(group: dict[str, Any], quant: dict[str, Any]) -> str:
    """The storage dtype of the embedding tables' group: weight-only, one scale per row."""
    kind, strategy = _weights(group, quant)
    if strategy != "channel" or group.get("input_activations") is not None:
        raise QuantizationError(f"{FIELD}: embedding tables ({', '.join(group.get('targets') or [])}) are supported "
                                "weight-only with per-channel scales")  # fmt: skip
    return WEIGHT_DTYPES[kind][0]


def _activations(acts: dict[str, Any] | None, kind: str) -> str:
    if acts is None:
        return "none"
    described = f"{acts.get('type')} {acts.get('num_bits')}-bit, strategy {acts.get('strategy')}, dynamic {acts.get('dynamic')}"
    fp8 = acts.get("type") == "float" and acts.get("num_bits") == 8 and acts.get("symmetric", True) is True and kind == "float"
    if fp8 and acts.get("dynamic") is True and acts.get("strategy") == "token":
        return "dynamic"
    if fp8 and acts.get("dynamic") is False and acts.get("strategy") == "tensor":
        return "static"
    raise QuantizationError(f"{FIELD}: input activations {described} are not supported (supported: {SUPPORTED})")


def _check_scale(name: str, stored: StoredTensor, shapes: list[tuple[int, ...]]) -> None:
    if stored.dtype.kind not in "fV" or stored.dtype.itemsize == 1 or stored.shape not in shapes:
        raise QuantizationError(f"{FIELD}: {name} must be a float tensor of shape {' or '.join(str(list(s)) for s in shapes)}, "
                                f"got {stored.dtype.name} {list(stored.shape)}")  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantizationError(f"{FIELD}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise QuantizationError(f"{FIELD}: {path}: {err}") from None
    if not isinstance(data, dict):
        raise QuantizationError(f"{FIELD}: {path}: not a JSON object")
    return data


class QuantizedWeights(WeightSource):
    """The model's tensors from a quantized checkpoint: every tensor of ``model`` (by name,
    a tied one under any of its names) with its scales, 8-bit weights as stored, scales as
    float32 (``[out, 1]`` per channel, ``[1]`` per tensor), every other tensor as stored.

    A checkpoint whose tensors do not match the model's (a tensor missing, of another
    shape, or one the model does not have) is refused in one line."""

    def __init__(self, checkpoint: QuantizedCheckpoint, model: WeightSource) -> None:
        self.checkpoint = checkpoint
        self.names = self._match(model.specs())

    def _match(self, model: dict[str, TensorSpec]) -> dict[str, str]:
        """Model tensor name (and its scales') -> the checkpoint tensor holding it."""
        stored = self.checkpoint.tensors
        ties = self.checkpoint.layout.ties if any(name not in stored for name in model) else {}
        names: dict[str, str] = {}
        for name, (_, shape) in model.items():
            source = next((n for n in (name, *ties.get(name, ())) if n in stored), None)
            if source is None:
                raise QuantizationError(f"{FIELD}: tensor {name} of the model is missing from the checkpoint")
            if stored[source][1].shape != shape:
                raise QuantizationError(f"{FIELD}: tensor {source} is {list(stored[source][1].shape)} in the checkpoint but "
                                        f"{list(shape)} in the model: the checkpoint's layers do not match the model")  # fmt: skip
            names[name] = source
            base, source_base = name.removesuffix("weight"), source.removesuffix("weight")
            names.update((base + s, source_base + s) for s in SCALE_SUFFIXES if source_base + s in stored)
        unused = sorted(set(stored) - set(names.values()))
        if unused:
            raise QuantizationError(f"{FIELD}: tensor {unused[0]} of the checkpoint is not in the model"
                                    f"{f' (and {len(unused) - 1} more)' if len(unused) > 1 else ''}: its layers do not match the model")  # fmt: skip
        return names

    def specs(self) -> dict[str, TensorSpec]:
        return {name: self.checkpoint.spec(source) for name, source in self.names.items()}

    def tensor(self, name: str) -> np.ndarray:
        return self.checkpoint.tensor(self.names[name])

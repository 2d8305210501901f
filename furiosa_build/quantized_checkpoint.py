"""Quantized checkpoints in the Hugging Face compressed-tensors format
(``build.quantize_artifact_path``), read and checked against the model.

What is accepted is what FP8 checkpoints use in practice (llm-compressor's ``FP8_DYNAMIC``
and ``FP8`` schemes) and 8-bit integer weight-only ones, all symmetric, one scale per output
channel or per tensor.  ``config.json`` holds::

    "quantization_config": {
      "quant_method": "compressed-tensors",
      "format": "float-quantized",            # int8 weights: "int-quantized" (see below)
      "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": true, ...},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": true, ...}}},
      "ignore": ["lm_head"]}

and the safetensors files hold, for every quantized linear ``<module>``: ``<module>.weight``
(``F8_E4M3`` or ``I8``, ``[out, in]``), ``<module>.weight_scale`` (``[out, 1]`` per channel,
``[]`` or ``[1]`` per tensor, any float dtype) and, for static activations,
``<module>.input_scale``; every other tensor in its own dtype.  ``input_activations`` null
is weight-only.  Integer weights must be stored one int8 per value (``int-quantized``, what
compressed-tensors' ``IntQuantizationCompressor`` writes); ``pack-quantized``, which
llm-compressor picks by default for 4- and 8-bit weight-only schemes and which packs the
values into int32 words, is refused in one line.

The build reads every tensor from the checkpoint (:class:`QuantizedWeights`), scales as
float32 of shape ``[out, 1]`` or ``[1]``; the model source still gives the config and the
tokenizer.  Only the linear layers of decoder layers may be quantized, the same ones in
every layer (one compiled block serves them all).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
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
             "8-bit symmetric, per-channel or per-tensor scales")  # fmt: skip
FORMATS = {"float": "float-quantized", "int": "int-quantized"}
WEIGHT_DTYPES = {"float": ("f8_e4m3fn", SAFETENSORS_DTYPES["F8_E4M3"]), "int": ("i8", SAFETENSORS_DTYPES["I8"])}
#: Model config fields a checkpoint must agree with the model on.
SHAPE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "head_dim")  # fmt: skip


class QuantizationError(ConfigError):
    """A quantized checkpoint that cannot be used, in one line naming the field or tensor."""


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """A compressed-tensors checkpoint folder: its scheme, config and tensors (headers only)."""

    folder: Path
    hf_config: dict[str, Any]
    scheme: QuantizationConfig  # ``modules`` empty until matched to a model (:meth:`for_model`)
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

    def check_model(self, hf_config: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model (its shape fields differ from the model's)."""
        for key in SHAPE_FIELDS:
            if key in hf_config and key in self.hf_config and hf_config[key] != self.hf_config[key]:
                raise QuantizationError(f"{FIELD}: the checkpoint's {key} is {self.hf_config[key]!r} but the model's is "
                                        f"{hf_config[key]!r}: it is a checkpoint of another model")  # fmt: skip

    def for_model(self, layers_path: str, num_layers: int) -> QuantizationConfig:
        """The scheme with the quantized modules of a decoder layer, every tensor checked."""
        scales = [name.removesuffix(".weight_scale") for name in self.tensors if name.endswith(".weight_scale")]
        per_layer: dict[int, set[str]] = {}
        pattern = re.compile(rf"{re.escape(layers_path)}\.(\d+)\.(.+)")
        for module in scales:
            found = pattern.fullmatch(module)
            if found is None:
                raise QuantizationError(f"{FIELD}: {module} is quantized, but only the linear layers of the decoder layers "
                                        f"({layers_path}.N...) can be; add it to the checkpoint's ignore list")  # fmt: skip
            per_layer.setdefault(int(found[1]), set()).add(found[2])
        if not per_layer:
            raise QuantizationError(f"{FIELD}: the checkpoint has no *.weight_scale tensor: nothing is quantized")
        modules = sorted(set().union(*per_layer.values()))
        for layer in range(num_layers):
            if per_layer.get(layer, set()) != set(modules):
                missing = sorted(set(modules) - per_layer.get(layer, set()))
                raise QuantizationError(f"{FIELD}: layer {layer} does not quantize {', '.join(missing) or 'the same modules'}; "
                                        "every decoder layer must quantize the same linear layers")  # fmt: skip
            for module in modules:
                self._check_module(f"{layers_path}.{layer}.{module}")
        return self.scheme.model_copy(update={"modules": modules})

    def _check_module(self, module: str) -> None:
        """A quantized linear's weight, scale and input scale have the dtypes and shapes of the scheme."""
        weight = self._stored(f"{module}.weight")
        _, dtype = WEIGHT_DTYPES["float" if self.scheme.weights == "f8_e4m3fn" else "int"]
        if weight.dtype != dtype or len(weight.shape) != 2:
            raise QuantizationError(f"{FIELD}: {module}.weight must be a 2-D {dtype.name} tensor for this scheme, "
                                    f"got {weight.dtype.name} {list(weight.shape)}")  # fmt: skip
        expected = [(weight.shape[0], 1), (weight.shape[0],)] if self.scheme.strategy == "channel" else [(), (1,)]
        _check_scale(f"{module}.weight_scale", self._stored(f"{module}.weight_scale"), expected)
        if self.scheme.activations == "static":
            _check_scale(f"{module}.input_scale", self._stored(f"{module}.input_scale"), [(), (1,)])

    def _stored(self, name: str) -> StoredTensor:
        if name not in self.tensors:
            raise QuantizationError(f"{FIELD}: tensor {name} is missing from the checkpoint")
        return self.tensors[name][1]


def parse_scheme(quant: dict[str, Any]) -> QuantizationConfig:
    """The scheme of a ``quantization_config``; anything but the supported ones is refused,
    naming what is supported."""
    if quant.get("quant_method") != "compressed-tensors":
        raise QuantizationError(f"{FIELD}: quant_method {quant.get('quant_method')!r} is not supported (only compressed-tensors)")
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise QuantizationError(f"{FIELD}: expected one entry in config_groups, got {len(groups) if isinstance(groups, dict) else groups!r}")
    (group,) = groups.values()
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if bits != 8 or kind not in FORMATS or weights.get("symmetric", True) is not True or strategy not in ("channel", "tensor"):
        described = f"{kind} {bits}-bit, strategy {strategy}, symmetric {weights.get('symmetric', True)}"
        raise QuantizationError(f"{FIELD}: weights {described} are not supported (supported: {SUPPORTED})")
    if quant.get("format") != FORMATS[kind]:
        raise QuantizationError(f"{FIELD}: format {quant.get('format')!r} is not supported for {kind} weights (only {FORMATS[kind]})")
    activations = _activations(acts, kind)
    scheme = {("float", "dynamic"): "fp8-dynamic", ("float", "static"): "fp8-static",
              ("float", "none"): "fp8-weight-only", ("int", "none"): "int8-weight-only"}[(kind, activations)]  # fmt: skip
    return QuantizationConfig(scheme=scheme, weights=WEIGHT_DTYPES[kind][0], strategy=strategy, activations=activations, modules=[])


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
    """The model's tensors from a quantized checkpoint: 8-bit weights as stored, scales as
    float32 (``[out, 1]`` per channel, ``[1]`` per tensor), every other tensor as stored."""

    def __init__(self, checkpoint: QuantizedCheckpoint) -> None:
        self.checkpoint = checkpoint

    def specs(self) -> dict[str, TensorSpec]:
        return {name: self._spec(name, stored) for name, (_, stored) in self.checkpoint.tensors.items()}

    def tensor(self, name: str) -> np.ndarray:
        path, stored = self.checkpoint.tensors[name]
        dtype, shape = self._spec(name, stored)
        return read_tensor(path, stored).astype(dtype).reshape(shape)

    @staticmethod
    def _spec(name: str, stored: StoredTensor) -> TensorSpec:
        if name.endswith(("weight_scale", "input_scale")):
            return np.dtype(np.float32), (stored.shape[0], 1) if math.prod(stored.shape) > 1 else (1,)
        return stored.dtype, stored.shape

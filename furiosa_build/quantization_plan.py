"""Quantization without a checkpoint: the schemes of the ``quantization`` config group.

A shape-only build (``build.weights=none``) plans a quantized model from its config alone.
Every linear layer of a decoder layer (what llm-compressor's FP8_DYNAMIC and W8A16 recipes
quantize; the embedding and ``lm_head`` stay bf16) compiles to a ``quantized_linear`` whose
weight is declared in the scheme's 8-bit dtype with one float32 scale per output channel,
so the weight report, the memory plan and the timing model count the bytes such a model
stores and the FP8 peak its W8A8 layers run at.  A build with weights takes 8-bit weights
from a checkpoint only (``build.quantize_artifact_path``, as ``python -m
furiosa_build.quantize`` writes one): that is how real quantized weights and their scales
come in, so a build never invents them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from furiosa_build.compiler.fuse import LINEAR_PASSES, fuse
from furiosa_build.compiler.lower import lower
from furiosa_build.compiler.quantize import linear_modules
from furiosa_build.safetensors_file import TensorSpec
from furiosa_build.weight_sources import WeightSource
from furiosa_runtime.npu.artifact import QuantizationConfig
from furiosa_runtime.npu.isa import DTYPES

#: Scheme -> (weight storage dtype, activations), one scale per output channel.  fp8-static is
#: left out: its input scales come from calibration, which only a checkpoint carries.
PLANNED_SCHEMES: dict[str, tuple[str, str]] = {
    "fp8-dynamic": ("f8_e4m3fn", "dynamic"),  # W8A8: activations quantized per token at run time
    "fp8-weight-only": ("f8_e4m3fn", "none"),
    "int8-weight-only": ("i8", "none"),  # W8A16
}


def planned_scheme(scheme: str, block_graphs: list[Mapping[str, Any]]) -> QuantizationConfig:
    """``scheme`` over every linear layer the captured decoder-layer graphs read a weight of."""
    weights, activations = PLANNED_SCHEMES[scheme]
    modules: set[str] = set()
    for graph in block_graphs:
        lowered = lower(dict(graph))
        fuse(lowered, LINEAR_PASSES)  # the linear instructions quantization rewrites
        modules.update(linear_modules(lowered))
    return QuantizationConfig(scheme=scheme, weights=weights, strategy="channel", activations=activations, modules=sorted(modules))


class PlannedWeights(WeightSource):
    """A model's tensor specs with the quantized linears of every decoder layer stored as
    ``quantization`` says: the weight in its 8-bit dtype, plus a float32 ``weight_scale``
    of shape ``[out, 1]`` named as compressed-tensors names it.  Specs only: a shape-only
    build reads no tensor."""

    def __init__(self, base: WeightSource, quantization: QuantizationConfig, layers_path: str, num_layers: int) -> None:
        self.base = base
        self.quantization = quantization
        self.modules = [f"{layers_path}.{layer}.{module}" for layer in range(num_layers) for module in quantization.modules]

    def specs(self) -> dict[str, TensorSpec]:
        specs = dict(self.base.specs())
        stored = DTYPES[self.quantization.weights]
        for module in self.modules:
            _, shape = specs[f"{module}.weight"]
            specs[f"{module}.weight"] = (stored, shape)
            specs[f"{module}.weight_scale"] = (np.dtype(np.float32), (shape[0], 1))
        return specs

    def tensor(self, name: str) -> np.ndarray:
        raise AssertionError(f"a planned quantization has no values ({name}); only shape-only builds use it")

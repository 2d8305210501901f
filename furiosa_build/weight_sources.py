"""A model's bf16 weights, one tensor at a time: stored in a safetensors file, or random.

A :class:`WeightSource` gives the dtype and shape of every tensor without reading any,
and each tensor on demand: :class:`StoredWeights` reads a model cache entry's
``model.safetensors``, :class:`RandomWeights` generates random weights.

Random weights (:data:`RANDOM_RULE`) are a pure function of the user's seed and each
tensor's name, so they do not depend on the order tensors are made in nor on the
framework's init: tensor ``name`` holds the first ``size`` draws of
``Generator(PCG64(int(sha256(f"{seed}:{canonical}"), little-endian)))).random(dtype=float32)``
in C order, mapped to ``center + (u - 0.5) * 0.02 * sqrt(12)`` in float32 (uniform, standard
deviation 0.02) and truncated to bfloat16 (the upper 16 bits).  ``canonical`` is the first
name of a tied parameter (``lm_head.weight`` tied to the embedding draws the embedding's
values); ``center`` is the constant the framework initialises a normalisation layer's
parameter to (1 for norm weights, 0 for biases and for Gemma's ``(1 + weight)`` norms) and
0 for everything else.  ``seed_for_random_weight`` on a real model follows the same rule.
Random weights are generated on demand, a block of rows at a time, and never stored: the
cache entry of a random model holds ``random_weights.json`` (seed, rule, and every
tensor's shape, centre and canonical name) instead of ``model.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from furiosa_build.hf_model import auto_model_class, canonical_names, config_for_model, float_entries, meta_model
from furiosa_build.safetensors_file import StoredTensor, TensorSpec, read_header, read_tensor
from furiosa_build.source_files import LoadError

BF16 = np.dtype(ml_dtypes.bfloat16)
WEIGHTS_FILE = "model.safetensors"
RANDOM_FILE = "random_weights.json"
RANDOM_RULE = "furiosa-random/1"  # see the module docstring; a new rule needs a new name (and model_cache.LOADER_VERSION)


class WeightSource:
    """A model's weights, converted to bfloat16: :meth:`specs` gives the dtype and shape of
    every tensor without reading any, :meth:`tensor` one tensor on demand."""

    def specs(self) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def tensor(self, name: str) -> np.ndarray:
        raise NotImplementedError


class StoredWeights(WeightSource):
    """A safetensors file (a model cache entry's bf16 ``model.safetensors``), read one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._header: dict[str, StoredTensor] | None = None

    @property
    def header(self) -> dict[str, StoredTensor]:
        if self._header is None:
            self._header = read_header(self.path)
        return self._header

    def specs(self) -> dict[str, TensorSpec]:
        return {name: (entry.dtype, entry.shape) for name, entry in self.header.items()}

    def tensor(self, name: str) -> np.ndarray:
        return read_tensor(self.path, self.header[name])


class ShapeOnlyWeights(WeightSource):
    """Every weight's dtype and shape, from the model's config alone: what a shape-only
    build (``build.weights=none``) plans, compiles and packages with.  No tensor exists."""

    def __init__(self, hf_config: dict[str, Any], task: str) -> None:
        self._specs = {name: (BF16, t.shape) for name, t in random_weight_plan(hf_config, task).items()}

    def specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def tensor(self, name: str) -> np.ndarray:
        raise RuntimeError(f"{name}: a shape-only build has no weights to read")


@dataclass(frozen=True)
class RandomTensor:
    """One tensor of a random-weight model: its shape, centre and the name its values are keyed by."""

    shape: tuple[int, ...]
    center: float
    canonical: str


class RandomWeights(WeightSource):
    """Random weights by :data:`RANDOM_RULE`, generated when asked for (never stored)."""

    def __init__(self, seed: int, tensors: dict[str, RandomTensor]) -> None:
        self.seed = seed
        self.tensors = tensors

    def specs(self) -> dict[str, TensorSpec]:
        return {name: (BF16, t.shape) for name, t in self.tensors.items()}

    def tensor(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return random_tensor(self.seed, t.canonical, t.shape, t.center)

    def to_json(self) -> bytes:
        tensors = {name: {"shape": list(t.shape), "center": t.center, "canonical": t.canonical} for name, t in self.tensors.items()}
        return json.dumps({"rule": RANDOM_RULE, "seed": self.seed, "tensors": tensors}, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_file(cls, path: Path) -> RandomWeights:
        """Read ``random_weights.json``; ValueError when it is not one of this rule."""
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("rule") != RANDOM_RULE or type(data.get("seed")) is not int:
            raise ValueError(f"not a {RANDOM_RULE} recipe")
        tensors = data.get("tensors")
        if not isinstance(tensors, dict):
            raise ValueError("no tensors")
        plan = {}
        for name, t in tensors.items():
            try:
                shape = tuple(t["shape"])
                center, canonical = t["center"], t["canonical"]
            except (KeyError, TypeError):
                raise ValueError(f"{name}: not a tensor entry") from None
            if (not all(type(d) is int and d >= 0 for d in shape) or type(center) not in (int, float)
                    or not isinstance(canonical, str) or canonical not in tensors):  # fmt: skip
                raise ValueError(f"{name}: not a tensor entry")
            plan[name] = RandomTensor(shape, float(center), canonical)
        return cls(data["seed"], plan)


_RANDOM_BLOCK = 1 << 20  # float32 draws per block: the only temporary a random tensor needs
_RANDOM_WIDTH = np.float32(0.02 * 12**0.5)  # uniform on (-w/2, w/2) has standard deviation 0.02


def random_tensor(seed: int, name: str, shape: tuple[int, ...], center: float = 0.0) -> np.ndarray:
    """The bf16 values :data:`RANDOM_RULE` gives tensor ``name`` (its canonical name) of a
    model with ``seed_for_random_weight=seed``: made a block of draws at a time, straight
    into the bf16 result."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    out = np.empty(shape, BF16)
    bits = out.reshape(-1).view(np.uint16)
    buffer = np.empty(min(_RANDOM_BLOCK, bits.size), np.float32)
    center32 = np.float32(center)
    for lo in range(0, bits.size, _RANDOM_BLOCK):
        block = buffer[: min(_RANDOM_BLOCK, bits.size - lo)]
        rng.random(out=block, dtype=np.float32)
        block -= np.float32(0.5)
        block *= _RANDOM_WIDTH
        if center32:
            block += center32
        np.right_shift(block.view(np.uint32), 16, out=block.view(np.uint32))  # truncate to the upper 16 bits
        bits[lo : lo + block.size] = block.view(np.uint32)
    return out


def random_weight_plan(hf_config: dict[str, Any], task: str = "generate") -> dict[str, RandomTensor]:
    """Every floating tensor a random-weight model of ``hf_config`` has, with what
    :data:`RANDOM_RULE` draws for it (needs torch and transformers; allocates no weights)."""
    config = config_for_model(hf_config, "model.hf_config")
    return random_plan(meta_model(auto_model_class(task), config, hf_config))


def random_state_dict(hf_config: dict[str, Any], seed: int, task: str = "generate") -> dict[str, np.ndarray]:
    """The whole random-weight state dict (bf16) of ``hf_config``: for oracles of small models."""
    source = RandomWeights(seed, random_weight_plan(hf_config, task))
    return {name: source.tensor(name) for name in source.specs()}


def random_plan(model) -> dict[str, RandomTensor]:
    """What :data:`RANDOM_RULE` draws for every floating tensor of ``model`` (a meta-device
    model): its shape, its centre and the canonical name its stream is keyed by."""
    aliases = canonical_names(model)
    centers = _norm_centers(model)
    plan = {}
    for name, shape in float_entries(model).items():
        if name not in aliases:
            raise LoadError(f"model.seed_for_random_weight: {name} is a buffer of the model, which random weights cannot fill")
        canonical = aliases[name]
        plan[name] = RandomTensor(shape, centers.get(canonical, 0.0), canonical)
    return plan


def _is_norm(module) -> bool:
    """A normalisation layer, found by type the way transformers' ``_init_weights`` does."""
    from torch import nn

    kind = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) or "LayerNorm" in kind or "RMSNorm" in kind


def _norm_centers(model) -> dict[str, float]:
    """Parameter name -> the constant the framework initialises a normalisation layer's
    parameter to (1 for a weight, 0 for a bias; 0 for Gemma's ``(1 + weight)`` norms),
    found by running the model's own ``_init_weights`` on an empty CPU copy of the layer."""
    import copy

    import torch

    centers: dict[str, float] = {}
    for prefix, module in model.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if not own or not _is_norm(module):
            continue
        values: dict[str, Any] = {}
        try:
            probe = copy.deepcopy(module).to_empty(device="cpu")
            with torch.no_grad():
                for p in probe.parameters(recurse=False):
                    p.fill_(float("nan"))
            model._init_weights(probe)
            values = {name: p.detach().reshape(-1) for name, p in probe.named_parameters(recurse=False)}
        except Exception:  # a layer the model cannot initialise alone: the usual constants
            pass
        for name in own:
            full = f"{prefix}.{name}" if prefix else name
            value = values.get(name)
            if value is not None and value.numel() and bool(torch.isfinite(value[0])) and bool((value == value[0]).all()):
                centers[full] = float(value[0])
            else:
                centers[full] = 1.0 if name == "weight" else 0.0
    return centers

"""Supertasks: what the capture stage produces and the later stages consume.

Plain data (no torch): a ``CaptureUnit`` is the picklable work item sent to a
pipeline-builder worker, a ``CaptureResult`` its answer (canonical graphs of the
embedding, each block-group signature and the head, with the pipeline values bound to
their inputs).  Captures are cached by content key, serialised without pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any

import numpy as np

from furiosa_build.cache import cache_key, canonical_json
from furiosa_runtime.npu.artifact import Bucket, PoolingConfig
from furiosa_runtime.npu.isa import Constant


@dataclass
class GraphIR:
    """Inputs, parameters, nodes and outputs of one supertask, canonically named."""

    inputs: list[dict[str, Any]] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "params": self.params, "nodes": self.nodes, "outputs": self.outputs}


Signature = tuple[str, ...]
USER_INPUTS = ("input_ids", "position_ids", "positions", "slot_mapping", "block_tables")
CARRY = "hidden"


@dataclass(frozen=True)
class CaptureUnit:
    """A picklable work unit: everything a pipeline-builder worker needs for one bucket."""

    hf_config: dict[str, Any]
    bucket: Bucket
    signatures: tuple[Signature, ...]  # distinct layer-type signatures of the block groups
    block_size: int
    slice_last_token: bool
    pooling: PoolingConfig | None = None  # an embedding model: the head pools instead of an LM head


@dataclass
class Supertask:
    """One captured supertask: its graph and the pipeline values bound to its inputs/outputs."""

    kind: str  # "embed" | "block" | "head"
    graph: GraphIR
    input_values: list[str]
    output_values: list[str]
    constant_params: list[str] = field(default_factory=list)  # params that are buffers/constants


@dataclass
class CaptureResult:
    bucket: Bucket
    embed: Supertask
    blocks: dict[Signature, Supertask]
    head: Supertask
    constants: dict[str, np.ndarray]  # buffer / lifted-constant values by captured name
    layers_path: str


def num_layers(hf_config: dict[str, Any]) -> int:
    """The decoder depth, whatever the architecture calls it (``n_layer`` for GPT-2...)."""
    return int(hf_config.get("num_hidden_layers", hf_config.get("n_layer", 0)))


def attention_heads(hf_config: dict[str, Any]) -> tuple[int, int]:
    """(query heads, key/value heads), whatever the architecture calls them."""
    heads = int(hf_config.get("num_attention_heads") or hf_config.get("n_head") or 1)
    return heads, int(hf_config.get("num_key_value_heads") or heads)


def with_layers(hf_config: dict[str, Any], types: list[str]) -> dict[str, Any]:
    """A copy of ``hf_config`` with ``len(types)`` decoder layers of those types."""
    key = "num_hidden_layers" if "num_hidden_layers" in hf_config else "n_layer"
    config = {**hf_config, key: len(types)}
    if hf_config.get("layer_types"):
        config["layer_types"] = list(types)
    return config


def layer_types(hf_config: dict[str, Any]) -> list[str]:
    """The type of every decoder layer (``"full_attention"`` unless the config says)."""
    types = hf_config.get("layer_types")
    return list(types) if types else ["full_attention"] * num_layers(hf_config)


def block_signatures(types: list[str], blocks_per_supertask: int) -> list[Signature]:
    """Split the layer types into supertask groups of ``blocks_per_supertask`` layers."""
    return [tuple(types[i : i + blocks_per_supertask]) for i in range(0, len(types), blocks_per_supertask)]


# -- caching captured supertasks -------------------------------------------------------------
CAPTURE_VERSION = "2"  # 2: MoE experts captured as furiosa::moe_experts


def capture_key(unit: CaptureUnit) -> str:
    """Content key of a capture: the unit plus the versions of the tracing stack.

    Versions are read from package metadata so that a fully cached build never imports
    torch in the main process.
    """

    program_input = {
        "hf_config": unit.hf_config,
        "bucket": unit.bucket.model_dump(),
        "signatures": [list(s) for s in unit.signatures],
        "block_size": unit.block_size,
        "slice_last_token": unit.slice_last_token,
    }
    if unit.pooling is not None:  # absent for generate models, so their keys are unchanged
        program_input["pooling"] = unit.pooling.model_dump()
    versions = {"torch": version("torch"), "transformers": version("transformers")}
    return cache_key(program_input, versions, f"capture-{CAPTURE_VERSION}")


def encode_result(result: CaptureResult) -> bytes:
    """Serialise a capture (graphs, bindings, constant values) without pickle."""
    def task(t: Supertask) -> dict[str, Any]:
        return {"kind": t.kind, "graph": t.graph.to_json(), "inputs": t.input_values, "outputs": t.output_values, "constants": t.constant_params}

    doc = {
        "bucket": result.bucket.model_dump(),
        "embed": task(result.embed),
        "blocks": [[list(sig), task(t)] for sig, t in result.blocks.items()],
        "head": task(result.head),
        "constants": [Constant.infer(k, v).model_dump() for k, v in sorted(result.constants.items())],
        "layers_path": result.layers_path,
    }
    return canonical_json(doc)


def decode_result(payload: bytes) -> CaptureResult:
    doc = json.loads(payload)

    def task(d: dict[str, Any]) -> Supertask:
        return Supertask(d["kind"], GraphIR(**d["graph"]), d["inputs"], d["outputs"], d["constants"])

    return CaptureResult(
        bucket=Bucket(**doc["bucket"]),
        embed=task(doc["embed"]),
        blocks={tuple(sig): task(t) for sig, t in doc["blocks"]},
        head=task(doc["head"]),
        constants={c["name"]: Constant(**c).array() for c in doc["constants"]},
        layers_path=doc["layers_path"],
    )

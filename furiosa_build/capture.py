"""Capture stage: ``torch.export`` a weightless model skeleton for one bucket and split it
into supertasks (embedding, transformer-block groups, head) in canonical graph form.

For an embedding model (``unit.pooling`` set) the skeleton is the bare encoder whose
output is pooled (mean or CLS over the real tokens, then L2-normalised) inside the
exported graph, so the head supertask compiles the pooling to NPU instructions and the
pipeline returns one vector per row.

The skeleton holds uninitialised parameters (never touched, so they cost no memory) and
only the config-derived buffers (rotary tables) are real; capture therefore never needs
the model weights.  It has one group of decoder layers per distinct *block signature*
(the layer types inside a supertask), not ``num_hidden_layers`` layers, so the cost of
capture does not grow with depth and every group of the same signature shares one
program.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, OutputKind

from furiosa_build import attention
from furiosa_build.compiler.lower import LoweringError
from furiosa_build.graph_ir import build_graph_ir
from furiosa_build.hf_model import auto_model_class
from furiosa_build.supertask import (
    CARRY,
    USER_INPUTS,
    CaptureResult,
    CaptureUnit,
    Signature,
    Supertask,
    with_layers,
)
from furiosa_runtime.npu.artifact import Bucket, PoolingConfig

EMBEDDINGS = "embeddings"  # the pipeline value a pooling head produces


def capture(unit: CaptureUnit) -> CaptureResult:
    """Export the skeleton for ``unit.bucket`` and split it into supertasks."""
    attention.register()
    model, groups = _skeleton(unit.hf_config, unit.signatures, unit.pooling)
    layers_path, layers = _decoder_layers(model, sum(len(s) for s in unit.signatures))
    for layer in layers:
        layer.register_forward_pre_hook(_mark_carry, with_kwargs=True)
    attention.bind_paged_inputs(model)
    kwargs = example_inputs(unit.bucket, unit.block_size)
    if unit.slice_last_token and unit.bucket.is_prefill and unit.pooling is None:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own deepcopy of the module call graph trips a deprecation inside torch.
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        # longrope caches its long factors as a plain attribute; they are constants of the config.
        warnings.filterwarnings("ignore", message=r".*long_inv_freq was assigned during export.*", category=UserWarning)
        program = torch.export.export(model, (), kwargs, strict=False).run_decompositions()
    _check_paged_attention(program, len(layers), unit.hf_config)
    _drop_buffer_updates(program, unit.hf_config)
    return _split(program, model, layers_path, groups, unit)


def _drop_buffer_updates(program, hf_config: dict[str, Any]) -> None:
    """Drop the buffer writes of the forward from the graph outputs.

    A write is dropped when nothing in the graph reads the buffer's old value: it is then
    recomputed from the inputs on every call (longrope's ``inv_freq``, picked from the
    long or short factors by the largest position), so no state passes between steps.
    A model that reads back what its previous call wrote is refused.
    """
    signature = program.graph_signature
    buffers = {s.target: s.arg.name for s in signature.input_specs if s.kind == InputKind.BUFFER}
    readers = {n.name: len(n.users) for n in program.graph.nodes if n.op == "placeholder"}
    output = program.graph.output_node()
    kept = []
    for spec, value in zip(signature.output_specs, output.args[0], strict=True):
        if spec.kind == OutputKind.USER_OUTPUT:
            kept.append(value)
        elif spec.kind != OutputKind.BUFFER_MUTATION or readers[buffers[spec.target]]:
            what = spec.target or spec.arg.name
            raise _unsupported(hf_config, f"it keeps state between calls in {what} ({spec.kind.name.lower()})")
    output.args = (tuple(kept),)


def _unsupported(hf_config: dict[str, Any], why: str) -> LoweringError:
    """The one-line refusal of an architecture the compiler cannot take."""
    arch = (hf_config.get("architectures") or [hf_config.get("model_type", "this model")])[0]
    return LoweringError(f"model.hf_config: {arch} is not supported: {why}")


def _check_paged_attention(program, layers: int, hf_config: dict[str, Any]) -> None:
    """Every layer must attend through ``furiosa::paged_attention``: a model that computes
    attention itself would export a graph with no KV cache, wrong from the first decode."""
    paged = sum(n.target == torch.ops.furiosa.paged_attention.default for n in program.graph.nodes)
    if paged < layers:
        raise _unsupported(hf_config, f"{layers - paged} of its {layers} attention layers bypass transformers' "
                           "AttentionInterface, so they cannot be routed to paged attention")  # fmt: skip


def example_inputs(bucket: Bucket, block_size: int) -> dict[str, Any]:
    """Static-shape example inputs of a bucket (values are irrelevant to the trace)."""
    batch, seq = bucket.batch_size, bucket.input_len
    ids = torch.zeros((batch, seq), dtype=torch.long)
    return {
        "input_ids": ids,
        "position_ids": ids.clone(),
        "positions": ids.clone(),
        "slot_mapping": ids.clone(),
        "block_tables": torch.zeros((batch, math.ceil(bucket.attention_size / block_size)), dtype=torch.long),
        "use_cache": False,
    }


def _mark_carry(module, args, kwargs):
    if args:
        return (torch.ops.furiosa.carry(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": torch.ops.furiosa.carry(kwargs["hidden_states"])}


def _skeleton(hf_config: dict[str, Any], signatures: tuple[Signature, ...], pooling: PoolingConfig | None):
    """A float32 model with one decoder-layer group per signature and no real weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    types = [t for sig in signatures for t in sig]
    config = AutoConfig.for_model(**with_layers(hf_config, types))
    model_class = auto_model_class("generate" if pooling is None else "embed")
    with init_empty_weights(include_buffers=False):
        try:
            model = model_class.from_config(
                config, attn_implementation=attention.ATTN_IMPLEMENTATION,
                experts_implementation=attention.EXPERTS_IMPLEMENTATION, dtype=torch.float32,
            )  # fmt: skip
        except KeyError as exc:  # a model with its own table of attention classes (Falcon)
            if exc.args != (attention.ATTN_IMPLEMENTATION,):
                raise
            raise _unsupported(hf_config, "its attention does not go through transformers' AttentionInterface") from None
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                # Uninitialised host memory is never touched by export, so it stays virtual.
                module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape), requires_grad=False)
    model.tie_weights()
    if pooling is not None:
        _pool_outputs(model, pooling)
    bounds, start = [], 0
    for sig in signatures:
        bounds.append((start, start + len(sig), sig))
        start += len(sig)
    return model.eval(), bounds


def _pool_outputs(model: torch.nn.Module, pooling: PoolingConfig) -> None:
    """Make the encoder return one pooled vector per row, as sentence-transformers does.

    Real tokens are those with a KV slot (padding has slot -1), so padding never enters
    the pool; ``cls`` keeps only the real token at position 0.  The forward is replaced on
    the instance rather than wrapped in a module, so parameter names stay those of the
    weight file.  Single texts have token type 0 everywhere (what the tokenizer gives).
    """
    encode = model.forward
    takes_token_types = "token_type_ids" in inspect.signature(encode).parameters

    def forward(input_ids, position_ids, positions, slot_mapping, block_tables, use_cache=False):
        kwargs = {"positions": positions, "slot_mapping": slot_mapping, "block_tables": block_tables, "use_cache": use_cache}
        if takes_token_types:
            kwargs["token_type_ids"] = torch.zeros_like(input_ids)
        hidden = encode(input_ids=input_ids, position_ids=position_ids, **kwargs).last_hidden_state  # (B, S, H)
        real = slot_mapping >= 0
        if pooling.mode == "cls":
            real = real & (positions == 0)
        weights = real.to(hidden.dtype).unsqueeze(-1)  # (B, S, 1)
        pooled = (hidden * weights).sum(1)  # (B, H)
        if pooling.mode == "mean":
            pooled = pooled / weights.sum(1).clamp(min=1e-9)
        if pooling.normalize:
            pooled = pooled / torch.sqrt((pooled * pooled).sum(-1, keepdim=True)).clamp(min=1e-12)
        return pooled

    model.forward = forward


def _decoder_layers(model: torch.nn.Module, count: int) -> tuple[str, torch.nn.ModuleList]:
    candidates = [
        (sum(p.numel() for p in m.parameters()), name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == count
    ]
    if not candidates:
        raise ValueError(f"cannot find the list of {count} decoder layers in {type(model).__name__}")
    _, name, layers = max(candidates, key=lambda c: c[0])
    return name, layers


def _layer_index(node: fx.Node, pattern: re.Pattern[str]) -> int | None:
    for path, _ in reversed(list(node.meta.get("nn_module_stack", {}).values())):
        match = pattern.match(path)
        if match:
            return int(match.group(1))
    return None


def _split(program, model, layers_path: str, groups, unit: CaptureUnit) -> CaptureResult:
    graph = program.graph
    specs = {s.arg.name: s for s in program.graph_signature.input_specs}
    pattern = re.compile(rf"^(?:L__self__\.?)?{re.escape(layers_path)}\.(\d+)(?:\.|$)")
    group_of = {layer: g for g, (lo, hi, _) in enumerate(groups) for layer in range(lo, hi)}
    carries = [n for n in graph.nodes if n.op == "call_function" and n.target == torch.ops.furiosa.carry.default]
    carry_src = {node: node.args[0] for node in carries}  # marker -> the value it marks
    segment = _assign_segments(graph, carries, pattern, group_of)

    def resolve(node: fx.Node) -> fx.Node:
        while node in carry_src:
            node = carry_src[node]
        return node

    def seg_nodes(tag: str) -> list[fx.Node]:
        """The segment's nodes plus the weight-only nodes (transposes...) they read."""
        own = {n for n in graph.nodes if segment.get(n) == tag and n not in carry_src}
        needed, stack = set(own), list(own)
        while stack:
            for arg in stack.pop().all_input_nodes:
                if arg.op == "call_function" and arg not in segment and arg not in needed:
                    needed.add(arg)
                    stack.append(arg)
        # Shape assertions carry no value and no users: the static shapes make them moot.
        return [n for n in graph.nodes if n in needed and (n.users or n.meta.get("val") is not None)]

    def leaves(tag: str, nodes: list[fx.Node]) -> list[fx.Node]:
        return [n for n in nodes if segment.get(n) == tag and any(segment.get(u) != tag for u in n.users)]

    constants: dict[str, np.ndarray] = {}
    value_name: dict[fx.Node, str] = {}

    def build(tag: str, kind: str, first_layer: int, outputs: list[fx.Node]) -> Supertask:
        nodes = seg_nodes(tag)
        inside = set(nodes)
        ext_inputs: list[fx.Node] = [resolve(carries[first_layer])] if kind == "block" else []
        params: list[tuple[fx.Node, str]] = []
        constant_params: list[str] = []
        seen = set(ext_inputs)
        for node in nodes:
            for arg in map(resolve, node.all_input_nodes):
                if arg in inside or arg in seen:
                    continue
                seen.add(arg)
                spec = specs.get(arg.name) if arg.op == "placeholder" else None
                if spec is not None and spec.kind != InputKind.USER_INPUT:
                    rel, is_const = _param_name(spec, layers_path, first_layer, program, model, constants)
                    params.append((arg, rel))
                    if is_const:
                        constant_params.append(rel)
                else:
                    ext_inputs.append(arg)
        ir = build_graph_ir(nodes, ext_inputs, params, outputs, carry_src)
        names = [value_name[n] if n in value_name else _external_name(n) for n in ext_inputs]
        return Supertask(kind, ir, names, [], constant_params)

    embed_outputs = leaves("embed", seg_nodes("embed"))
    for node in embed_outputs:
        value_name[node] = CARRY if node is resolve(carries[0]) else f"aux:{node.name}"
    embed = build("embed", "embed", 0, embed_outputs)
    embed.output_values = [value_name[n] for n in embed_outputs]

    blocks: dict[Signature, Supertask] = {}
    for g, (lo, _, sig) in enumerate(groups):
        tag = f"g{g}"
        outputs = leaves(tag, seg_nodes(tag))
        if len(outputs) != 1:
            raise ValueError(f"a decoder-layer group must produce one hidden state, got {len(outputs)}")
        value_name[outputs[0]] = CARRY
        blocks[sig] = build(tag, "block", lo, outputs)
        blocks[sig].output_values = [CARRY]
    output_node = next(n for n in graph.nodes if n.op == "output")
    head = build("head", "head", 0, [resolve(output_node.args[0][0])])
    head.output_values = ["logits" if unit.pooling is None else EMBEDDINGS]
    return CaptureResult(unit.bucket, embed, blocks, head, constants, layers_path)


def _assign_segments(graph: fx.Graph, carries: list[fx.Node], pattern, group_of) -> dict[fx.Node, str]:
    """Tag every activation node with "embed", "g<group>" or "head".

    Nodes that read no activation (weight transposes, constant tables) are left untagged:
    they are replicated into whichever supertask reads them.
    """
    dynamic: set[fx.Node] = {n for n in graph.nodes if n.op == "placeholder" and n.name in USER_INPUTS}
    segment: dict[fx.Node, str] = {}
    for layer, node in enumerate(carries):
        segment[node] = f"g{group_of[layer]}"
    for node in graph.nodes:
        if node.op != "call_function" or not any(a in dynamic for a in node.all_input_nodes):
            continue
        dynamic.add(node)
        if node in segment:
            continue
        layer = _layer_index(node, pattern)
        if layer is not None:
            segment[node] = f"g{group_of[layer]}"
        elif any(segment.get(a, "embed") != "embed" for a in node.all_input_nodes if a in segment):
            segment[node] = "head"
        else:
            segment[node] = "embed"
    return segment


def _external_name(node: fx.Node) -> str:
    if node.op == "placeholder" and node.name in USER_INPUTS:
        return node.name
    raise ValueError(f"supertask input {node.name!r} is produced by another block; not a supported structure")


def _param_name(spec, layers_path: str, first_layer: int, program, model, constants) -> tuple[str, bool]:
    """Name a parameter relative to its supertask; record buffer/constant values."""
    target = spec.target
    if spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
        value = program.constants[target] if spec.kind == InputKind.CONSTANT_TENSOR else model.get_buffer(target)
        if target not in program.constants and spec.kind == InputKind.CONSTANT_TENSOR:
            raise ValueError(f"missing constant {target}")
        array = value.detach().cpu()
        constants[target] = array.float().numpy() if array.is_floating_point() else array.numpy()
        return f"const:{target}", True
    prefix = f"{layers_path}."
    if target.startswith(prefix):
        index, rest = target[len(prefix) :].split(".", 1)
        return f"{int(index) - first_layer}.{rest}", False
    return target, False



"""The NPU compiler: canonical ATen graph -> ``furiosa_runtime.npu.isa.Program``.

``compile_graph`` runs lowering, fusion, weight quantization, tensor-parallel sharding (when compiling for one
rank of a group) and memory planning.  It imports neither torch nor the model, so compile
workers are cheap processes fed plain JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from furiosa_build.compiler.fuse import LINEAR_PASSES, fuse
from furiosa_build.compiler.lower import Lowered, LoweringError, constant_specs, lower
from furiosa_build.compiler.memory import plan_memory
from furiosa_build.compiler.quantize import quantize_linears
from furiosa_build.compiler.shard import ShardSpec, shard
from furiosa_runtime.npu.isa import Program

COMPILER_VERSION = "0.2.0"
DEFAULT_OPTIONS: dict[str, Any] = {"fuse": True}

__all__ = ["COMPILER_VERSION", "DEFAULT_OPTIONS", "LoweringError", "ShardSpec", "compile_graph", "compile_lowered"]


def compile_graph(
    graph: Mapping[str, Any], name: str, options: Mapping[str, Any] = DEFAULT_OPTIONS, tp: ShardSpec | None = None
) -> Program:
    """Compile one supertask graph (``GraphIR.to_json()``) into a program.

    ``name`` is the supertask kind ("embed", "block", "head"); with ``tp`` the program is
    the one PE ``tp.rank`` of a tensor-parallel group runs (``compiler/shard.py``); option
    ``quantization`` makes the quantized layers' linears ``quantized_linear`` (``compiler/quantize.py``).
    """
    lowered = lower(dict(graph))
    quantization = options.get("quantization")
    if options.get("fuse", True):
        fuse(lowered)
    elif tp is not None or quantization:
        fuse(lowered, LINEAR_PASSES)  # sharding splits linear instructions, quantization rewrites them
    if quantization:
        quantize_linears(lowered, quantization)
    return compile_lowered(lowered, name, tp)


def compile_lowered(lowered: Lowered, name: str, tp: ShardSpec | None = None) -> Program:
    """The passes after fusion: tensor-parallel sharding (for rank ``tp.rank``) and the memory plan."""
    layout = shard(lowered, tp, name) if tp is not None else None
    instructions, plan = plan_memory(lowered)
    names = {n for inst in instructions for n in (*inst.ins, *inst.outs)} | set(lowered.outputs)
    kv_index = 0
    numbered = []
    for inst in instructions:
        if inst.op == "paged_attention":
            inst = inst.model_copy(update={"attrs": {**inst.attrs, "kv_index": kv_index}})
            kv_index += 1
        numbered.append(inst)
    return Program(
        name=name,
        inputs=tuple(lowered.inputs),
        params=tuple(p for p in lowered.params if p.name in names),
        constants=tuple(constant_specs(lowered)),
        outputs=tuple(lowered.outputs),
        values={k: v for k, v in sorted(lowered.values.items()) if k in names},
        instructions=tuple(numbered),
        memory_plan=plan,
        uses_kv_cache=kv_index > 0,
        tensor_parallel=layout,
    )

"""Serialise an exported ATen subgraph into ``GraphIR``, the compiler's canonical input.

Capture turns each supertask of an exported program into a ``GraphIR``.  Names are
canonical (inputs ``in0..``, nodes ``n0..``, parameters relative to the supertask), so
the same transformer block captured for layer 0 and for layer 29 serialises to the same
bytes and therefore the same compile-cache key.  Compile workers need neither torch nor
the model: this plain data is all they get.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from furiosa_build.supertask import GraphIR

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.bfloat16: "bf16",
    torch.float16: "f16",
    torch.float64: "f32",  # the NPU has no f64: constants computed in f64 are narrowed
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "bool",
}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"tensors of dtype {dtype} are not supported by the NPU compiler") from None


def tensor_meta(val: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in val.shape], "dtype": dtype_name(val.dtype)}


def _encode(arg: Any, names: dict[fx.Node, str]) -> Any:
    if isinstance(arg, fx.Node):
        return {"v": names[arg]}
    if isinstance(arg, (list, tuple)):
        return [_encode(a, names) for a in arg]
    if isinstance(arg, torch.dtype):
        return {"dtype": dtype_name(arg)}
    if isinstance(arg, (torch.device, torch.layout, torch.memory_format)):
        return None
    if isinstance(arg, (bool, int, float, str)) or arg is None:
        return arg
    raise ValueError(f"cannot encode graph argument {arg!r} of type {type(arg).__name__}")


class _AliasNames(dict):
    """Node -> canonical name, looking through dropped marker nodes."""

    def __init__(self, aliases: dict[fx.Node, fx.Node]) -> None:
        super().__init__()
        self.aliases = aliases

    def __missing__(self, node: fx.Node) -> str:
        if node in self.aliases:
            return self[self.aliases[node]]
        raise KeyError(node)


def op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(node.target)


def build_graph_ir(
    nodes: list[fx.Node],
    inputs: list[fx.Node],
    params: list[tuple[fx.Node, str]],
    outputs: list[fx.Node],
    aliases: dict[fx.Node, fx.Node] | None = None,
) -> GraphIR:
    """Serialise ``nodes`` (in topological order) reading ``inputs`` and ``params``.

    ``aliases`` maps marker nodes that were dropped to the value they stand for.
    """
    ir = GraphIR()
    names: dict[fx.Node, str] = _AliasNames(aliases or {})
    for i, node in enumerate(inputs):
        names[node] = f"in{i}"
        ir.inputs.append({"name": f"in{i}", **tensor_meta(node.meta["val"])})
    for node, rel_name in params:
        names[node] = f"p:{rel_name}"
        ir.params.append({"name": rel_name, **tensor_meta(node.meta["val"])})
    for i, node in enumerate(nodes):
        names[node] = f"n{i}"
        val = node.meta.get("val")
        metas = [tensor_meta(v) for v in val] if isinstance(val, (list, tuple)) else [tensor_meta(val)]
        ir.nodes.append(
            {
                "name": f"n{i}",
                "op": op_name(node),
                "args": _encode(list(node.args), names),
                "kwargs": {k: _encode(v, names) for k, v in sorted(node.kwargs.items())},
                "meta": metas,
            }
        )
    ir.outputs = [names[n] for n in outputs]
    return ir

"""Lowering: canonical ATen graph (``GraphIR`` JSON) -> NPU instructions, one for one.

Views and copies that do not change data become aliases, shapes are taken from the
captured metadata (all static), and ops whose inputs are all compile-time constants are
folded with the instruction set's own reference kernels.  Fusion runs afterwards on the
instruction list (``fuse.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from furiosa_runtime.npu.isa import COMPUTE_DTYPE, DTYPES, Constant, ExecContext, Instruction, TensorSpec, execute


class LoweringError(ValueError):
    """The graph uses an ATen op or form the NPU compiler does not support."""


@dataclass
class Lowered:
    """Instructions over named values, before fusion and memory planning."""

    inputs: list[TensorSpec]
    params: list[TensorSpec]
    outputs: list[str]
    values: dict[str, TensorSpec] = field(default_factory=dict)
    instructions: list[Instruction] = field(default_factory=list)
    constants: dict[str, np.ndarray] = field(default_factory=dict)


UNARY_OPS = {
    "neg": "neg", "exp": "exp", "log": "log", "sqrt": "sqrt", "rsqrt": "rsqrt", "reciprocal": "reciprocal",
    "abs": "abs", "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu", "relu": "relu", "cos": "cos",
    "sin": "sin", "erf": "erf", "logical_not": "logical_not", "bitwise_not": "logical_not",
}  # fmt: skip
BINARY_OPS = {
    "add": "add", "sub": "sub", "mul": "mul", "div": "div", "pow": "pow", "maximum": "maximum",
    "minimum": "minimum", "eq": "eq", "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge",
    "logical_and": "logical_and", "logical_or": "logical_or", "bitwise_and": "logical_and",
    "bitwise_or": "logical_or", "floor_divide": "floordiv",
}  # fmt: skip
REDUCE_OPS = {"mean": "mean", "sum": "sum", "amax": "max", "amin": "min", "any": "any"}
ALIAS_OPS = {"clone", "alias", "detach", "lift_fresh_copy", "contiguous", "dropout"}
VIEW_OPS = {"view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "flatten", "view_copy", "unflatten"}


def _base(op: str) -> str:
    """'aten.add.Tensor' -> 'add', 'furiosa.paged_attention.default' -> 'paged_attention'."""
    parts = op.split(".")
    return parts[1] if parts[0] in ("aten", "furiosa") and len(parts) > 1 else op


class Lowerer:
    def __init__(self, graph: dict[str, Any]) -> None:
        self.graph = graph
        embedded = {name: Constant(name=name, **spec).array() for name, spec in graph.get("constants", {}).items()}
        params = [TensorSpec(name=f"p:{p['name']}", shape=tuple(p["shape"]), dtype=_compute(p["dtype"])) for p in graph["params"]]
        self.out = Lowered(
            inputs=[TensorSpec(name=i["name"], shape=tuple(i["shape"]), dtype=_compute(i["dtype"])) for i in graph["inputs"]],
            params=[p for p in params if p.name[2:] not in embedded],
            outputs=[],
        )
        for spec in [*self.out.inputs, *params]:
            self.out.values[spec.name] = spec
        # embed_all_constants_into_graph: buffers become program constants (and may fold).
        for name, array in embedded.items():
            self.out.constants[f"p:{name}"] = array.astype(_np_dtype(self.out.values[f"p:{name}"].dtype))
        self.alias: dict[str, str] = {}
        self.multi: dict[str, list[str]] = {}  # node name -> names of its tuple elements

    def run(self) -> Lowered:
        for node in self.graph["nodes"]:
            self.lower(node)
        self.out.outputs = [self.ref(o) for o in self.graph["outputs"]]
        return self.out

    # -- helpers ---------------------------------------------------------------------------
    def ref(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def arg(self, value: Any) -> Any:
        if isinstance(value, dict) and "v" in value:
            return self.ref(value["v"])
        if isinstance(value, list):
            return [self.arg(v) for v in value]
        return value

    def spec(self, name: str) -> TensorSpec:
        return self.out.values[name]

    def emit(self, node: dict[str, Any], op: str, ins: list[str], attrs: dict[str, Any] | None = None) -> None:
        meta = node["meta"][0]
        out = TensorSpec(name=node["name"], shape=tuple(meta["shape"]), dtype=_compute(meta["dtype"]))
        self.out.values[out.name] = out
        inst = Instruction(op=op, ins=tuple(ins), outs=(out.name,), attrs=attrs or {})
        if ins and all(i in self.out.constants for i in ins) or (not ins and op in ("iota", "full")):
            self.fold(inst)
        else:
            self.out.instructions.append(inst)

    def emit_multi(self, node: dict[str, Any], op: str, ins: list[str], attrs: dict[str, Any]) -> None:
        """An instruction with one output per element of the node's tuple result."""
        outs = []
        for i, meta in enumerate(node["meta"]):
            out = TensorSpec(name=f"{node['name']}.{i}", shape=tuple(meta["shape"]), dtype=_compute(meta["dtype"]))
            self.out.values[out.name] = out
            outs.append(out.name)
        self.out.instructions.append(Instruction(op=op, ins=tuple(ins), outs=tuple(outs), attrs=attrs))
        self.multi[node["name"]] = outs

    def fold(self, inst: Instruction) -> None:
        """Evaluate an instruction whose operands are all known now."""
        (result,) = execute(inst, [self.out.constants[i] for i in inst.ins], ExecContext())
        spec = self.out.values[inst.outs[0]]
        self.out.constants[inst.outs[0]] = np.asarray(result).astype(_np_dtype(spec.dtype)).reshape(spec.shape)

    def scalar_operand(self, node: dict[str, Any], value: float | int | bool) -> str:
        """Materialise a Python scalar operand as a folded constant."""
        name = f"{node['name']}.s{len(self.out.constants)}"
        dtype = "f32" if isinstance(value, float) else ("bool" if isinstance(value, bool) else "i64")
        self.out.values[name] = TensorSpec(name=name, shape=(), dtype=dtype)
        self.out.constants[name] = np.asarray(value, dtype=_np_dtype(dtype))
        return name

    def shape_of(self, node: dict[str, Any]) -> list[int]:
        return list(node["meta"][0]["shape"])

    # -- dispatch --------------------------------------------------------------------------
    def lower(self, node: dict[str, Any]) -> None:
        op = node["op"]
        base = _base(op)
        args = [self.arg(a) for a in node["args"]]
        kwargs = {k: self.arg(v) for k, v in node["kwargs"].items()}
        handler: Callable[..., None] | None = getattr(self, f"op_{base}", None)
        if op == "getitem":
            self.alias[node["name"]] = self.multi[args[0]][args[1]]
        elif base in ALIAS_OPS:
            self.alias[node["name"]] = args[0]
        elif base in VIEW_OPS:
            self.emit(node, "reshape", [args[0]], {"shape": self.shape_of(node)})
        elif base in UNARY_OPS:
            self.emit(node, "unary", [args[0]], {"fn": UNARY_OPS[base]})
        elif base in BINARY_OPS:
            self.binary(node, BINARY_OPS[base], args, kwargs)
        elif base in REDUCE_OPS:
            self.reduce(node, REDUCE_OPS[base], args, kwargs)
        elif handler is not None:
            handler(node, args, kwargs)
        else:
            raise LoweringError(f"ATen op {op} is not supported by the NPU compiler")

    def binary(self, node, fn: str, args, kwargs) -> None:
        a, b = args[0], args[1]
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        if alpha != 1:
            if not isinstance(b, str):
                b = b * alpha
            else:
                scaled = dict(node, name=f"{node['name']}.alpha")
                self.emit(scaled, "binary", [b], {"fn": "mul", "scalar": alpha})
                b = scaled["name"]
        if kwargs.get("rounding_mode") == "floor":
            fn = "floordiv"
        elif kwargs.get("rounding_mode") is not None:
            raise LoweringError(f"division rounding mode {kwargs['rounding_mode']!r} is not supported")
        if isinstance(a, str) and isinstance(b, str):
            self.emit(node, "binary", [a, b], {"fn": fn})
        elif isinstance(a, str):
            self.emit(node, "binary", [a], {"fn": fn, "scalar": b})
        else:
            self.emit(node, "binary", [b], {"fn": fn, "scalar": a, "scalar_first": True})

    def reduce(self, node, fn: str, args, kwargs) -> None:
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        ndim = len(self.spec(args[0]).shape)
        if isinstance(dims, int):
            dims = [dims]
        dims = None if dims is None else [d % ndim for d in dims]
        self.emit(node, "reduce", [args[0]], {"fn": fn, "dims": dims, "keepdim": bool(keepdim)})

    # -- ops with their own shape logic ----------------------------------------------------
    def op_max(self, node, args, kwargs) -> None:
        """max(x) over every element (longrope picks its factors by the largest position),
        or the elementwise max(x, y); max over a dim also returns indices, not lowered."""
        self.extremum(node, "max", "maximum", args, kwargs)

    def op_min(self, node, args, kwargs) -> None:
        self.extremum(node, "min", "minimum", args, kwargs)

    def extremum(self, node, reduce_fn: str, binary_fn: str, args, kwargs) -> None:
        if node["op"].endswith(".default"):
            self.reduce(node, reduce_fn, args[:1], {})
        elif node["op"].endswith(".other"):
            self.binary(node, binary_fn, args, kwargs)
        else:
            raise LoweringError(f"ATen op {node['op']} (values and indices along a dim) is not supported by the NPU compiler")

    def op_embedding(self, node, args, kwargs) -> None:
        self.emit(node, "gather", [args[0], args[1]])

    def op_mm(self, node, args, kwargs) -> None:
        self.emit(node, "matmul", [args[0], args[1]])

    op_bmm = op_mm
    op_matmul = op_mm

    def op_addmm(self, node, args, kwargs) -> None:
        product = dict(node, name=f"{node['name']}.mm")
        self.emit(product, "matmul", [args[1], args[2]])
        self.emit(node, "binary", [product["name"], args[0]], {"fn": "add"})

    def op_rsub(self, node, args, kwargs) -> None:
        self.binary(node, "sub", [args[1], args[0], *args[2:]], kwargs)

    def op_permute(self, node, args, kwargs) -> None:
        ndim = len(self.spec(args[0]).shape)
        self.emit(node, "permute", [args[0]], {"dims": [d % ndim for d in args[1]]})

    def op_t(self, node, args, kwargs) -> None:
        self.emit(node, "permute", [args[0]], {"dims": [1, 0]})

    def op_transpose(self, node, args, kwargs) -> None:
        ndim = len(self.spec(args[0]).shape)
        dims = list(range(ndim))
        a, b = args[1] % ndim, args[2] % ndim
        dims[a], dims[b] = dims[b], dims[a]
        self.emit(node, "permute", [args[0]], {"dims": dims})

    def op_expand(self, node, args, kwargs) -> None:
        self.emit(node, "expand", [args[0]], {"shape": self.shape_of(node)})

    def op_slice(self, node, args, kwargs) -> None:
        size_in = self.spec(args[0]).shape
        dim = (args[1] if len(args) > 1 else 0) % len(size_in)
        start, end, _ = slice(
            args[2] if len(args) > 2 else None, args[3] if len(args) > 3 else None
        ).indices(size_in[dim])
        step = args[4] if len(args) > 4 else 1
        self.emit(node, "slice", [args[0]], {"dim": dim, "start": start, "end": end, "step": step})

    def op_select(self, node, args, kwargs) -> None:
        size_in = self.spec(args[0]).shape
        dim = args[1] % len(size_in)
        self.emit(node, "select", [args[0]], {"dim": dim, "index": args[2] % size_in[dim]})

    def op_cat(self, node, args, kwargs) -> None:
        tensors = args[0]
        dim = (args[1] if len(args) > 1 else kwargs.get("dim", 0)) % len(self.shape_of(node))
        self.emit(node, "cat", list(tensors), {"dim": dim})

    def op_split_with_sizes(self, node, args, kwargs) -> None:
        src, sizes = args[0], args[1]
        dim = (args[2] if len(args) > 2 else 0) % len(self.spec(src).shape)
        names, start = [], 0
        for i, (size, meta) in enumerate(zip(sizes, node["meta"])):
            part = {"name": f"{node['name']}.{i}", "meta": [meta]}
            self.emit(part, "slice", [src], {"dim": dim, "start": start, "end": start + size, "step": 1})
            names.append(part["name"])
            start += size
        self.multi[node["name"]] = names

    def op_split(self, node, args, kwargs) -> None:
        dim = args[2] if len(args) > 2 else 0
        sizes = [m["shape"][dim] for m in node["meta"]]
        self.op_split_with_sizes(node, [args[0], sizes, dim], kwargs)

    def op__to_copy(self, node, args, kwargs) -> None:
        target = _compute(node["meta"][0]["dtype"])
        if target == self.spec(args[0]).dtype:
            self.alias[node["name"]] = args[0]
        else:
            self.emit(node, "cast", [args[0]], {"dtype": target})

    def op__softmax(self, node, args, kwargs) -> None:
        self.emit(node, "softmax", [args[0]], {"dim": args[1] % len(self.shape_of(node))})

    op_softmax = op__softmax

    def op_gelu(self, node, args, kwargs) -> None:
        fn = "gelu_tanh" if kwargs.get("approximate", "none") == "tanh" else "gelu"
        self.emit(node, "unary", [args[0]], {"fn": fn})

    def op_where(self, node, args, kwargs) -> None:
        ins = [a if isinstance(a, str) else self.scalar_operand(node, a) for a in args[:3]]
        self.emit(node, "where", ins)

    def op_masked_fill(self, node, args, kwargs) -> None:
        self.op_where(node, [args[1], args[2], args[0]], kwargs)

    def op_clamp(self, node, args, kwargs) -> None:
        low = args[1] if len(args) > 1 else kwargs.get("min")
        high = args[2] if len(args) > 2 else kwargs.get("max")
        current = args[0]
        for fn, bound, suffix in (("maximum", low, "lo"), ("minimum", high, "hi")):
            if bound is None:
                continue
            step = dict(node, name=f"{node['name']}.{suffix}")
            self.emit(step, "binary", [current], {"fn": fn, "scalar": bound})
            current = step["name"]
        self.alias[node["name"]] = current

    def op_arange(self, node, args, kwargs) -> None:
        numbers = [a for a in args if isinstance(a, (int, float))]
        start, end, step = (0, numbers[0], 1) if len(numbers) == 1 else (*numbers[:2], numbers[2] if len(numbers) > 2 else 1)
        self.emit(node, "iota", [], {"start": start, "end": end, "step": step, "dtype": _compute(node["meta"][0]["dtype"])})

    def op_full(self, node, args, kwargs) -> None:
        value = args[1] if len(args) > 1 else kwargs["fill_value"]
        self.emit(node, "full", [], {"shape": self.shape_of(node), "value": value, "dtype": _compute(node["meta"][0]["dtype"])})

    def op_full_like(self, node, args, kwargs) -> None:
        self.op_full(node, [None, args[1]], kwargs)

    def op_scalar_tensor(self, node, args, kwargs) -> None:
        self.op_full(node, [None, args[0]], kwargs)

    def op_native_layer_norm(self, node, args, kwargs) -> None:
        """LayerNorm; a norm without affine parameters (OLMo's) scales by 1 and shifts by 0."""
        x, _, weight, bias, eps = args
        weight = self.scalar_operand(node, 1.0) if weight is None else weight
        bias = self.scalar_operand(node, 0.0) if bias is None else bias
        main = {"name": f"{node['name']}.0", "meta": node["meta"][:1]}
        self.emit(main, "layer_norm", [x, weight, bias], {"eps": eps})
        self.multi[node["name"]] = [main["name"]]

    def op_index_select(self, node, args, kwargs) -> None:
        self.emit(node, "index_select", [args[0], args[2]], {"dim": args[1] % len(self.spec(args[0]).shape)})

    def op_index(self, node, args, kwargs) -> None:
        indices = args[1]
        used = [(d, i) for d, i in enumerate(indices) if i is not None]
        if len(used) != 1:
            raise LoweringError("advanced indexing with more than one index tensor is not supported")
        dim, idx = used[0]
        self.emit(node, "index_select", [args[0], idx], {"dim": dim})

    def op_topk(self, node, args, kwargs) -> None:
        """The k largest along the last dim (an MoE router): values and indices."""
        x, k = args[0], args[1]
        dim = (args[2] if len(args) > 2 else kwargs.get("dim", -1)) % len(self.spec(x).shape)
        largest = args[3] if len(args) > 3 else kwargs.get("largest", True)
        if dim != len(self.spec(x).shape) - 1 or not largest:
            raise LoweringError("aten.topk is supported for the largest values along the last dim only")
        self.emit_multi(node, "topk", [x], {"k": k})

    def op_moe_experts(self, node, args, kwargs) -> None:
        x, ids, weights, gate_up, down, act = args
        self.emit(node, "moe_experts", [x, ids, weights, gate_up, down], {"act": act})

    def op_paged_attention(self, node, args, kwargs) -> None:
        q, k, v, positions, slot_mapping, block_tables, scale, causal, sliding_window, softcap = args
        attrs = {"scale": scale, "causal": causal, "sliding_window": sliding_window, "softcap": softcap}
        self.emit(node, "paged_attention", [q, k, v, positions, slot_mapping, block_tables], attrs)


def _compute(dtype: str) -> str:
    return COMPUTE_DTYPE[dtype]


def _np_dtype(dtype: str) -> np.dtype:
    return DTYPES[dtype]


def lower(graph: dict[str, Any]) -> Lowered:
    """Lower a canonical ATen graph to unfused NPU instructions."""
    return Lowerer(graph).run()


def constant_specs(lowered: Lowered) -> list[Constant]:
    """The folded constants that instructions still read, embedded in the program."""
    used = {i for inst in lowered.instructions for i in inst.ins} | set(lowered.outputs)
    return [
        Constant.of(name, lowered.constants[name], lowered.values[name].dtype)
        for name in sorted(used & lowered.constants.keys())
    ]

"""Fusion passes over lowered instructions.

Each pass recognises the unfused form that Hugging Face models export to and replaces
it with one macro-instruction of the NPU:

  linear     (permute W) -> (reshape x) -> matmul -> (reshape) (-> add bias)
  rms_norm   pow 2 -> mean -> add eps -> rsqrt -> mul x -> mul weight (or 1 + weight)
  rotary     x*cos + cat(-x[..., h:], x[..., :h])*sin
  gated_act  act(gate) * up, with silu recognised from x * sigmoid(x)

A pattern only fires when every intermediate value has no other reader, so fusion can
never change what the program computes; the tests check fused == unfused numerically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from furiosa_build.compiler.lower import Lowered
from furiosa_runtime.npu.isa import Instruction


class Graph:
    """Producer/consumer index over a Lowered program, rebuilt after each rewrite."""

    def __init__(self, lowered: Lowered) -> None:
        self.lowered = lowered
        self.producer: dict[str, Instruction] = {}
        self.readers: dict[str, int] = {}
        for inst in lowered.instructions:
            for out in inst.outs:
                self.producer[out] = inst
            for name in inst.ins:
                self.readers[name] = self.readers.get(name, 0) + 1
        for name in lowered.outputs:
            self.readers[name] = self.readers.get(name, 0) + 1

    def single_use(self, name: str) -> bool:
        return self.readers.get(name, 0) == 1

    def make(self, name: str, op: str, fn: str | None = None) -> Instruction | None:
        """The instruction producing ``name`` if it is ``op`` (with ``attrs.fn == fn``)."""
        inst = self.producer.get(name)
        if inst is None or inst.op != op or (fn is not None and inst.attrs.get("fn") != fn):
            return None
        return inst

    def is_param(self, name: str) -> bool:
        return name.startswith("p:")

    def scalar(self, inst: Instruction) -> Any:
        return inst.attrs.get("scalar") if len(inst.ins) == 1 and not inst.attrs.get("scalar_first") else None


Rewrite = Callable[[Graph, Instruction], tuple[Instruction, list[Instruction]] | None]


def _apply(lowered: Lowered, rewrite: Rewrite) -> None:
    """Replace each instruction the rewrite matches; drop the instructions it absorbed."""
    graph = Graph(lowered)
    absorbed: set[int] = set()
    replaced: dict[int, Instruction] = {}
    for inst in lowered.instructions:
        if id(inst) in absorbed:
            continue
        result = rewrite(graph, inst)
        if result is None:
            continue
        new, eaten = result
        if any(id(e) in absorbed or id(e) in replaced for e in eaten):
            continue
        replaced[id(inst)] = new
        absorbed.update(id(e) for e in eaten)
    lowered.instructions = [replaced.get(id(i), i) for i in lowered.instructions if id(i) not in absorbed]
    _dead_code(lowered)


def _dead_code(lowered: Lowered) -> None:
    live = set(lowered.outputs)
    kept = []
    for inst in reversed(lowered.instructions):
        if any(o in live for o in inst.outs) or inst.op == "paged_attention":
            kept.append(inst)
            live.update(inst.ins)
    lowered.instructions = kept[::-1]


def _weight_of(graph: Graph, name: str) -> tuple[str, str, list[Instruction]] | None:
    """Follow permute/expand/reshape from a matmul operand back to a 2-D parameter."""
    chain: list[Instruction] = []
    layout = "kn"
    while not graph.is_param(name):
        inst = graph.producer.get(name)
        if inst is None or not graph.single_use(name) or inst.op not in ("permute", "expand", "reshape"):
            return None
        if inst.op == "permute":
            if inst.attrs["dims"] != [1, 0]:
                return None
            layout = "nk" if layout == "kn" else "kn"
        elif inst.op == "reshape":
            source = graph.lowered.values[inst.ins[0]].shape
            if tuple(inst.attrs["shape"][-2:]) != source[-2:]:
                return None
        chain.append(inst)
        name = inst.ins[0]
    return (name, layout, chain) if len(graph.lowered.values[name].shape) == 2 else None


def fuse_linear(graph: Graph, inst: Instruction):
    if inst.op != "matmul":
        return None
    weight = _weight_of(graph, inst.ins[1])
    if weight is None:
        return None
    w, layout, eaten = weight
    x, out = inst.ins[0], inst.outs[0]
    values = graph.lowered.values
    flat = graph.make(x, "reshape")
    if flat is not None and graph.single_use(x) and values[flat.ins[0]].shape[-1] == values[x].shape[-1]:
        x = flat.ins[0]
        eaten = [*eaten, flat]
    return Instruction(op="linear", ins=(x, w), outs=(out,), attrs={"w_layout": layout}), eaten


def fuse_linear_reshape(graph: Graph, inst: Instruction):
    """reshape(linear(x)) where the linear was fed the flattened input: produce the shape directly."""
    if inst.op != "reshape":
        return None
    lin = graph.make(inst.ins[0], "linear")
    if lin is None or not graph.single_use(inst.ins[0]):
        return None
    values = graph.lowered.values
    x_shape, out_shape = values[lin.ins[0]].shape, tuple(inst.attrs["shape"])
    if x_shape[:-1] != out_shape[:-1]:
        return None
    return Instruction(op="linear", ins=lin.ins, outs=inst.outs, attrs=lin.attrs), [lin]


def fuse_bias(graph: Graph, inst: Instruction):
    if inst.op != "binary" or inst.attrs.get("fn") != "add" or len(inst.ins) != 2:
        return None
    for lin_name, bias in (inst.ins, inst.ins[::-1]):
        lin = graph.make(lin_name, "linear")
        if lin is not None and len(lin.ins) == 2 and graph.is_param(bias) and graph.single_use(lin_name):
            if len(graph.lowered.values[bias].shape) == 1:
                return Instruction(op="linear", ins=(*lin.ins, bias), outs=inst.outs, attrs=lin.attrs), [lin]
    return None


def fuse_rms_norm(graph: Graph, inst: Instruction):
    if inst.op != "binary" or inst.attrs.get("fn") != "mul" or len(inst.ins) != 2:
        return None
    for normed, weight in (inst.ins, inst.ins[::-1]):
        matched = _rms_core(graph, normed)
        if matched is None:
            continue
        x, eps, eaten = matched
        offset = 0.0
        shifted = graph.make(weight, "binary", "add")
        if shifted is not None and graph.is_param(shifted.ins[0]) and graph.single_use(weight) and graph.scalar(shifted) is not None:
            offset, weight, eaten = float(graph.scalar(shifted)), shifted.ins[0], [*eaten, shifted]
        if not graph.is_param(weight):
            continue
        attrs = {"eps": eps, "weight_offset": offset}
        return Instruction(op="rms_norm", ins=(x, weight), outs=inst.outs, attrs=attrs), eaten
    return None


def _rms_core(graph: Graph, name: str):
    """Match x * rsqrt(mean(x**2, -1, keepdim) + eps) ending at ``name``."""
    mul = graph.make(name, "binary", "mul")
    if mul is None or len(mul.ins) != 2 or not graph.single_use(name):
        return None
    for x, r in (mul.ins, mul.ins[::-1]):
        rsqrt = graph.make(r, "unary", "rsqrt")
        add = rsqrt and graph.make(rsqrt.ins[0], "binary", "add")
        mean = add and graph.make(add.ins[0], "reduce", "mean")
        square = mean and graph.make(mean.ins[0], "binary", "pow")
        if not (square and square.ins[0] == x and graph.scalar(square) == 2 and graph.scalar(add) is not None):
            continue
        ndim = len(graph.lowered.values[x].shape)
        if mean.attrs["dims"] != [ndim - 1] or not mean.attrs["keepdim"]:
            continue
        chain = [mul, rsqrt, add, mean, square]
        if all(graph.single_use(i.outs[0]) for i in chain[1:]):
            return x, float(graph.scalar(add)), chain
    return None


def fuse_rotary(graph: Graph, inst: Instruction):
    if inst.op != "binary" or inst.attrs.get("fn") != "add" or len(inst.ins) != 2:
        return None
    for direct, rotated in (inst.ins, inst.ins[::-1]):
        m1, m2 = graph.make(direct, "binary", "mul"), graph.make(rotated, "binary", "mul")
        if m1 is None or m2 is None or len(m1.ins) != 2 or len(m2.ins) != 2:
            continue
        for cat_name, sin in (m2.ins, m2.ins[::-1]):
            cat = graph.make(cat_name, "cat")
            x = _rotate_half_source(graph, cat)
            if x is None or x not in m1.ins:
                continue
            cos = m1.ins[1] if m1.ins[0] == x else m1.ins[0]
            eaten = [m1, m2, cat, *(graph.producer[i] for i in cat.ins), graph.producer[graph.producer[cat.ins[0]].ins[0]]]
            if not all(graph.single_use(e.outs[0]) for e in eaten):
                continue
            return Instruction(op="rotary", ins=(x, cos, sin), outs=inst.outs), eaten
    return None


def _rotate_half_source(graph: Graph, cat: Instruction | None) -> str | None:
    """If ``cat`` is cat([-x[..., h:], x[..., :h]], -1), return x."""
    if cat is None or len(cat.ins) != 2:
        return None
    neg = graph.make(cat.ins[0], "unary", "neg")
    low = graph.make(cat.ins[1], "slice")
    high = neg and graph.make(neg.ins[0], "slice")
    if not (low and high) or low.ins[0] != high.ins[0]:
        return None
    x = low.ins[0]
    ndim = len(graph.lowered.values[x].shape)
    dim = graph.lowered.values[x].shape[-1]
    half = dim // 2
    ok = (
        cat.attrs["dim"] == ndim - 1
        and low.attrs == {"dim": ndim - 1, "start": 0, "end": half, "step": 1}
        and high.attrs == {"dim": ndim - 1, "start": half, "end": dim, "step": 1}
    )
    return x if ok else None


def fuse_silu(graph: Graph, inst: Instruction):
    if inst.op != "binary" or inst.attrs.get("fn") != "mul" or len(inst.ins) != 2:
        return None
    for x, s in (inst.ins, inst.ins[::-1]):
        sig = graph.make(s, "unary", "sigmoid")
        if sig is not None and sig.ins[0] == x and graph.single_use(s):
            return Instruction(op="unary", ins=(x,), outs=inst.outs, attrs={"fn": "silu"}), [sig]
    return None


def fuse_gated(graph: Graph, inst: Instruction):
    if inst.op != "binary" or inst.attrs.get("fn") != "mul" or len(inst.ins) != 2:
        return None
    for act_name, up in (inst.ins, inst.ins[::-1]):
        act = graph.producer.get(act_name)
        if act is None or act.op != "unary" or act.attrs["fn"] not in ("silu", "gelu", "gelu_tanh", "relu"):
            continue
        values = graph.lowered.values
        if graph.single_use(act_name) and values[act.ins[0]].shape == values[up].shape:
            return Instruction(op="gated_act", ins=(act.ins[0], up), outs=inst.outs, attrs={"act": act.attrs["fn"]}), [act]
    return None


LINEAR_PASSES: list[Rewrite] = [fuse_linear, fuse_linear_reshape, fuse_bias]
PASSES: list[Rewrite] = [*LINEAR_PASSES, fuse_rms_norm, fuse_rotary, fuse_silu, fuse_gated]


def fuse(lowered: Lowered, passes: list[Rewrite] = PASSES) -> Lowered:
    """Apply the fusion passes in order (each to a fixed point of one sweep).

    ``LINEAR_PASSES`` alone form the linear instructions that tensor-parallel sharding
    splits, for builds that turn the other fusions off.
    """
    _dead_code(lowered)
    for rewrite in passes:
        _apply(lowered, rewrite)
    _linear_shapes(lowered)
    return lowered


def _linear_shapes(lowered: Lowered) -> None:
    """A linear fed the unflattened input (``fuse_linear`` absorbed the flattening reshape)
    yields ``x.shape[:-1] + (N,)``: record that shape, not the flattened one of the matmul it
    replaced (the sharding pass addresses dims by their place in the recorded shape)."""
    values = lowered.values
    for inst in lowered.instructions:
        if inst.op == "linear":
            out = values[inst.outs[0]]
            shape = (*values[inst.ins[0]].shape[:-1], out.shape[-1])
            if shape != out.shape:
                values[out.name] = out.model_copy(update={"shape": shape})

"""Tensor-parallel sharding: a pass that turns a lowered program into the program of one
PE of a tensor-parallel group (Megatron-style, in the spirit of gpt-fast's ``apply_tp``).

The pass walks the fused instruction list once and tracks which values are *split*
(each PE holds one chunk of a dim) and which are replicated:

* column-parallel linear: the layers named in ``COLUMN_PARALLEL`` (q/k/v, gate/up,
  GPT-2's fused ``c_attn`` and ``c_fc``) and, in the head, the projection onto the
  vocabulary keep only their chunk of output features; the output is split on its last dim.
* row-parallel linear: any linear whose input is split on its features keeps the matching
  weight columns; the partial sums are combined by an explicit ``all_reduce`` and a bias
  is added after it (once, not once per PE).
* vocab-parallel embedding: a gather from a parameter table keeps its chunk of rows; ids
  outside the chunk read row 0 and are zeroed, and the partial embeddings are all-reduced.
* split values flow through reshapes, permutes, elementwise ops, norms over another dim,
  rotary embedding and paged attention (heads are split; with fewer KV heads than PEs the
  KV heads are replicated, ``ShardSpec.kv_parts`` distinct chunks over the group).
* distributed norm: an RMSNorm or LayerNorm over the split dim (OLMo2's q/k norm over the
  whole projection output) becomes ``norm_partials`` (this PE's row sums), an ``all_reduce``
  of those few numbers per row, and ``norm_apply`` of this PE's slice with its slice of the
  weight; a sum or mean over the split dim (the unfused form) is reduced locally and
  all-reduced the same way.
* quantized linear: split as a linear, per-channel scales with their output channels; a
  row-parallel one with dynamic activations all-reduces the rows' absmax (``op`` max).
* mixture-of-experts: every expert is split on its intermediate features, like a gated
  MLP, and the routed partial sums are all-reduced (the router stays replicated).
* a split program output (the head's logits) is ``all_gather``-ed, so every value that
  crosses a program boundary is replicated.
* fallback: an instruction no rule above splits is computed whole on every PE: its split
  operands are all-gathered first, and its result is cut back to this PE's chunk when it
  keeps the split dim, so what follows sees the layout it expects.  Each fallback is a
  note in ``TensorParallel.notes`` (the build report prints them).  A rule raises
  ``ShardingError`` to say it does not apply; since any split value can be gathered back
  whole, the pass itself refuses nothing.

Parameters get a ``ParamShard`` layout recorded in the program; the builder cuts the
weight file's tensors accordingly, so each PE stores only its chunk.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from furiosa_build.compiler.lower import Lowered, LoweringError
from furiosa_runtime.npu.isa import Instruction, ParamShard, Program, TensorParallel, TensorSpec

#: Linear layers split by output features, by the end of their module path ->
#: (a key/value projection, whose split follows the KV heads?; fused segments).
COLUMN_PARALLEL: dict[str, tuple[bool, int]] = {
    "q_proj": (False, 1),
    "k_proj": (True, 1),
    "v_proj": (True, 1),
    "gate_proj": (False, 1),
    "up_proj": (False, 1),
    "c_attn": (False, 3),  # GPT-2: one projection producing [q | k | v]
    "c_fc": (False, 1),
    "gate_up_proj": (False, 2),  # Phi-3: [gate | up]
    "query_key_value": (False, 1),  # GPT-NeoX, Bloom: [q k v] per head, so a chunk of rows is a chunk of heads
    "dense_h_to_4h": (False, 1),
    "fc1": (False, 1),  # OPT, Phi
    "attention.self.query": (False, 1),  # BERT
    "attention.self.key": (True, 1),
    "attention.self.value": (True, 1),
    "intermediate.dense": (False, 1),
}
#: Fused [q | k | v] projections whose k and v segments follow the KV heads, so they may be
#: narrower than q and split over fewer PEs: the widths are read off the slices that take
#: the projection's output apart.
FUSED_QKV = ("qkv_proj",)  # Phi-3
ELEMENTWISE = frozenset({"unary", "binary", "where", "cast", "copy", "rotary", "gated_act"})


class ShardingError(LoweringError):
    """A sharding rule does not apply to an instruction (the pass then falls back)."""


@dataclass(frozen=True)
class ShardSpec:
    """Which PE of which group to compile for (part of the compile-unit key)."""

    size: int  # tensor_parallel_size
    rank: int
    kv_parts: int  # distinct KV-head chunks: min(size, num_key_value_heads)
    vocab_size: int


def shard(lowered: Lowered, spec: ShardSpec, kind: str) -> TensorParallel:
    """Rewrite ``lowered`` in place into rank ``spec.rank``'s program; return its layout."""
    return _Sharder(lowered, spec, kind).run()


def fallback_notes(programs: Iterable[Program | bytes | str]) -> list[str]:
    """The fallbacks of a build's programs, once each (ranks and buckets repeat them)."""
    notes: dict[str, None] = {}
    for program in programs:
        if not isinstance(program, Program):
            program = Program.model_validate_json(program)
        if program.tensor_parallel is not None:
            notes.update(dict.fromkeys(f"{program.name}: {note}" for note in program.tensor_parallel.notes))
    return list(notes)


def cut(array: np.ndarray, layout: ParamShard, chunk: int) -> np.ndarray:
    """Chunk ``chunk`` of a full tensor under ``layout`` (each fused segment cut alike)."""
    widths = layout.widths(array.shape[layout.dim])
    segments = np.split(array, np.cumsum([w for w, _ in widths])[:-1], axis=layout.dim)
    return np.concatenate([np.split(s, p, axis=layout.dim)[chunk * p // layout.parts] for s, (_, p) in zip(segments, widths)], axis=layout.dim)


class _Sharder:
    def __init__(self, lowered: Lowered, spec: ShardSpec, kind: str) -> None:
        self.low = lowered
        self.spec = spec
        self.kind = kind
        self.split: dict[str, ParamShard] = {}
        self.layouts: dict[str, ParamShard] = {}  # "p:<param>" -> layout
        self.full: dict[str, tuple[int, ...]] = {}  # full shapes of localised values
        self.whole: dict[str, str] = {}  # split value -> a replicated copy of all of it
        self.read_whole: set[str] = set()  # parameters some instruction reads unsplit
        self.out: list[Instruction] = []
        self.notes: list[str] = []

    def run(self) -> TensorParallel:
        for inst in self.low.instructions:
            self.visit(inst)
        self.low.outputs = [self.replicate_output(name) for name in self.low.outputs]
        self.low.instructions = self.out
        self.low.params = [self.low.values[p.name] for p in self.low.params]
        params = {name[2:]: layout for name, layout in sorted(self.layouts.items())}
        notes = tuple(dict.fromkeys(self.notes))
        return TensorParallel(size=self.spec.size, rank=self.spec.rank, params=params, notes=notes)

    # -- values ---------------------------------------------------------------------------
    def shape(self, name: str) -> tuple[int, ...]:
        return self.low.values[name].shape

    def localise(self, name: str, split: ParamShard) -> None:
        """Record that ``name`` is split and give it its per-PE shape."""
        spec = self.low.values[name]
        full = self.full.setdefault(name, spec.shape)
        widths = split.widths(full[split.dim])
        if sum(w for w, _ in widths) != full[split.dim] or any(w % p for w, p in widths):
            raise ShardingError(f"{name}: dim {split.dim} of size {full[split.dim]} does not split {split.parts} ways")
        local = list(full)
        local[split.dim] = sum(w // p for w, p in widths)
        self.low.values[name] = spec.model_copy(update={"shape": tuple(local)})
        self.split[name] = split

    def new_value(self, base: str, suffix: str, shape: tuple[int, ...], dtype: str) -> str:
        name = f"{base}.{suffix}"
        self.low.values[name] = TensorSpec(name=name, shape=shape, dtype=dtype)
        return name

    def emit(self, op: str, ins: tuple[str, ...], out: str, attrs: dict | None = None) -> None:
        self.out.append(Instruction(op=op, ins=ins, outs=(out,), attrs=attrs or {}))

    def shard_param(self, name: str, layout: ParamShard) -> None:
        if self.layouts.get(name, layout) != layout:
            raise ShardingError(f"parameter {name[2:]} is needed with two different tensor-parallel layouts")
        if name in self.read_whole:
            raise ShardingError(f"parameter {name[2:]} is also read whole")
        if name not in self.layouts:
            self.layouts[name] = layout
            self.localise(name, layout)

    def chunk_of(self, name: str, dim: int, split: ParamShard) -> str:
        """A replicated operand cut to this PE's chunk of ``dim``, as ``split`` cuts its partner."""
        layout = split.model_copy(update={"dim": dim})
        if name.startswith("p:"):
            self.shard_param(name, layout)
            return name
        chunk = layout.chunk(self.spec.rank, self.spec.size)
        if name in self.low.constants:
            array = cut(self.low.constants[name], layout, chunk)
            local = self.new_value(name, f"tp{chunk}", array.shape, self.low.values[name].dtype)
            self.low.constants[local] = array
            return local
        if split.segments != 1:
            raise ShardingError(f"{name}: cannot cut a computed value into fused segments")
        size = self.shape(name)[dim] // split.parts
        shape = tuple(size if d == dim else n for d, n in enumerate(self.shape(name)))
        local = self.new_value(name, f"tp{chunk}", shape, self.low.values[name].dtype)
        self.emit("slice", (name,), local, {"dim": dim, "start": chunk * size, "end": (chunk + 1) * size, "step": 1})
        return local

    # -- dispatch --------------------------------------------------------------------------
    def visit(self, inst: Instruction) -> None:
        """Rewrite one instruction; if no rule can split it, compute it whole (``fallback``)."""
        saved = self.checkpoint()
        try:
            self.dispatch(inst)
        except ShardingError as error:
            self.restore(saved)
            self.fallback(inst, str(error))
        for emitted in self.out[saved[0] :]:
            self.read_whole.update(n for n in emitted.ins if n.startswith("p:") and n not in self.split)

    def checkpoint(self) -> tuple:
        """The pass's state, so that a rule that gives up half-way leaves no trace."""
        low = self.low
        return (len(self.out), dict(self.split), dict(self.layouts), dict(self.full), dict(low.values), dict(low.constants), dict(self.whole))

    def restore(self, saved: tuple) -> None:
        emitted, split, layouts, full, values, constants, whole = saved
        del self.out[emitted:]
        self.split, self.layouts, self.full, self.whole = split, layouts, full, whole
        self.low.values, self.low.constants = values, constants

    def dispatch(self, inst: Instruction) -> None:
        if inst.op == "linear":
            return self.linear(inst)
        if inst.op == "quantized_linear":
            return self.quantized_linear(inst)
        if inst.op == "gather" and self.vocab_parallel(inst.ins[0]):
            return self.gather(inst)
        if inst.op == "moe_experts":
            return self.moe_experts(inst)
        splits = [self.split[i] for i in inst.ins if i in self.split]
        if not splits:
            return self.out.append(inst)
        handler = self.elementwise if inst.op in ELEMENTWISE else getattr(self, f"op_{inst.op}", None)
        if handler is None:
            raise ShardingError(f"no rule splits a {inst.op}")
        handler(inst)

    def keep(self, inst: Instruction, split: ParamShard, attrs: dict | None = None) -> None:
        """Emit ``inst`` (with new attrs) and mark its output split as ``split``."""
        self.out.append(inst if attrs is None else inst.model_copy(update={"attrs": {**inst.attrs, **attrs}}))
        self.localise(inst.outs[0], split)

    def only_split(self, inst: Instruction) -> ParamShard:
        splits = {self.split[i] for i in inst.ins if i in self.split}
        if len(splits) != 1:
            raise ShardingError(f"{inst.op} {inst.outs[0]}: operands split differently")
        return splits.pop()

    # -- linear layers and embeddings -------------------------------------------------------
    def linear(self, inst: Instruction) -> None:
        x, w, *bias = inst.ins
        n_dim, k_dim = (0, 1) if inst.attrs.get("w_layout", "nk") == "nk" else (1, 0)
        x_split = self.split.get(x)
        if x_split is not None and x_split.dim == len(self.shape(x)) - 1:
            return self.row_parallel(inst, x_split, k_dim)
        if x_split is not None:
            raise ShardingError(f"linear {inst.outs[0]}: input split on a batch dim")
        column = self.column_layout(w, n_dim, inst.outs[0])
        if column is None:
            return self.out.append(inst)
        self.shard_param(w, column)
        for b in bias:
            self.shard_param(b, column.model_copy(update={"dim": 0}))
        self.keep(inst, column.model_copy(update={"dim": len(self.shape(inst.outs[0])) - 1}))

    def column_layout(self, weight: str, n_dim: int, out: str) -> ParamShard | None:
        """The split of a column-parallel weight, or None for a replicated linear."""
        if self.kind == "head":
            vocab = self.shape(weight)[n_dim] == self.spec.vocab_size
            return ParamShard(dim=n_dim, parts=self.spec.size) if vocab else None
        module = f".{weight.rsplit('.', 1)[0]}"
        names = [name for name in (*COLUMN_PARALLEL, *FUSED_QKV) if module.endswith(f".{name}")]
        if self.kind != "block" or not names:
            return None
        if names[0] in FUSED_QKV:
            return self.fused_qkv_layout(out, n_dim)
        kv, segments = COLUMN_PARALLEL[names[0]]
        return ParamShard(dim=n_dim, parts=self.spec.kv_parts if kv else self.spec.size, segments=segments)

    def fused_qkv_layout(self, out: str, n_dim: int) -> ParamShard | None:
        """[q | k | v] with q split over every PE and k, v like the KV heads; the segment
        widths are those of the three slices of ``out`` along its features that follow."""
        width, last = self.shape(out)[-1], len(self.shape(out)) - 1
        cuts = sorted({(i.attrs["start"], min(i.attrs["end"], width)) for i in self.low.instructions
                       if i.op == "slice" and i.ins[0] == out and i.attrs["dim"] == last and i.attrs["step"] == 1})  # fmt: skip
        if len(cuts) != 3 or [a for a, _ in cuts] != [0, *(b for _, b in cuts[:-1])] or cuts[-1][1] != width:
            self.notes.append(f"linear {out} kept whole: its [q | k | v] segments are not sliced apart")
            return None
        (q, k, v), size, kv = [b - a for a, b in cuts], self.spec.size, self.spec.kv_parts
        if q == k == v and kv == size:
            return ParamShard(dim=n_dim, parts=size, segments=3)
        return ParamShard(dim=n_dim, parts=size, segments=3, fused=((q, size), (k, kv), (v, kv)))

    def row_parallel(self, inst: Instruction, x_split: ParamShard, k_dim: int) -> None:
        """x[..., K/tp] @ w[K/tp] gives partial sums: all-reduce them, then add the bias."""
        if x_split.parts != self.spec.size or x_split.segments != 1:
            raise ShardingError(f"linear {inst.outs[0]}: a row-parallel input must be split over every PE")
        x, w, *bias = inst.ins
        self.shard_param(w, ParamShard(dim=k_dim, parts=self.spec.size))
        out = inst.outs[0]
        spec = self.low.values[out]
        partial = self.new_value(out, "partial", spec.shape, spec.dtype)
        self.emit("linear", (x, w), partial, dict(inst.attrs))
        summed = self.new_value(out, "sum", spec.shape, spec.dtype) if bias else out
        self.emit("all_reduce", (partial,), summed, {"group": "tp"})
        if bias:
            self.emit("binary", (summed, bias[0]), out, {"fn": "add"})

    def quantized_linear(self, inst: Instruction) -> None:
        """A quantized linear splits like a linear, its per-channel scales with the output
        channels (column-parallel; a per-tensor scale stays whole).  Row-parallel, each PE
        scales its partial sums by the whole ``w_scale`` before the all-reduce, and dynamic
        activations are quantised with the absmax of the whole row: the PEs' row maxima are
        all-reduced with ``op`` "max" first, so every element gets the scale it gets on one PE."""
        x, w, w_scale, *rest = inst.ins
        extra = 1 if inst.attrs["activations"] == "static" else 0
        if any(name in self.split for name in rest):
            raise ShardingError(f"quantized_linear {inst.outs[0]}: a split scale or bias")
        x_split = self.split.get(x)
        if x_split is not None and x_split.dim == len(self.shape(x)) - 1:
            return self.row_parallel_quantized(inst, x_split)
        if x_split is not None:
            raise ShardingError(f"quantized_linear {inst.outs[0]}: input split on a batch dim")
        column = self.column_layout(w, 0, inst.outs[0])
        if column is None:
            return self.out.append(inst)
        self.shard_param(w, column)
        for param in ([w_scale] if self.shape(w_scale)[0] != 1 else []) + rest[extra:]:
            self.shard_param(param, column.model_copy(update={"dim": 0}))
        self.keep(inst, column.model_copy(update={"dim": len(self.shape(inst.outs[0])) - 1}))

    def row_parallel_quantized(self, inst: Instruction, x_split: ParamShard) -> None:
        if x_split.parts != self.spec.size or x_split.segments != 1:
            raise ShardingError(f"quantized_linear {inst.outs[0]}: a row-parallel input must be split over every PE")
        x, w, w_scale, *rest = inst.ins
        extra = 1 if inst.attrs["activations"] == "static" else 0
        self.shard_param(w, ParamShard(dim=1, parts=self.spec.size))
        out = inst.outs[0]
        spec = self.low.values[out]
        ins, attrs = [x, w, w_scale, *rest[:extra]], dict(inst.attrs)
        if inst.attrs["activations"] == "dynamic":
            ins.append(self.row_absmax(x))
            attrs["row_absmax"] = True
        partial = self.new_value(out, "partial", spec.shape, spec.dtype)
        self.emit("quantized_linear", tuple(ins), partial, attrs)
        bias = rest[extra:]
        summed = self.new_value(out, "sum", spec.shape, spec.dtype) if bias else out
        self.emit("all_reduce", (partial,), summed, {"group": "tp"})
        if bias:
            self.emit("binary", (summed, bias[0]), out, {"fn": "add"})

    def row_absmax(self, x: str) -> str:
        """max |x| over the whole last dim of split ``x``, on every PE: ``(..., 1)``."""
        rows = (*self.shape(x)[:-1], 1)
        magnitude = self.new_value(x, "abs", self.shape(x), "f32")
        self.emit("unary", (x,), magnitude, {"fn": "abs"})
        local = self.new_value(x, "absmax_local", rows, "f32")
        self.emit("reduce", (magnitude,), local, {"fn": "max", "dims": [len(rows) - 1], "keepdim": True})
        whole = self.new_value(x, "absmax", rows, "f32")
        self.emit("all_reduce", (local,), whole, {"group": "tp", "op": "max"})
        return whole

    def moe_experts(self, inst: Instruction) -> None:
        """Every expert split like a gated MLP: this PE's chunk of the intermediate features
        (of the gate and of the up segment of ``gate_up``, and of ``down``'s inputs), so the
        routed sums are partial; all-reduce them."""
        x, ids, weights, gate_up, down = inst.ins
        if any(i in self.split for i in (x, ids, weights)):
            raise ShardingError(f"moe_experts {inst.outs[0]}: tokens or routing split over the group")
        self.shard_param(gate_up, ParamShard(dim=1, parts=self.spec.size, segments=2))
        self.shard_param(down, ParamShard(dim=2, parts=self.spec.size))
        out = inst.outs[0]
        spec = self.low.values[out]
        partial = self.new_value(out, "partial", spec.shape, spec.dtype)
        self.out.append(inst.model_copy(update={"outs": (partial,)}))
        self.emit("all_reduce", (partial,), out, {"group": "tp"})

    def vocab_parallel(self, table: str) -> bool:
        return table.startswith("p:") and self.shape(table)[0] % self.spec.size == 0

    def gather(self, inst: Instruction) -> None:
        """Vocab-parallel lookup: this PE's rows, zeros for ids it does not hold, all-reduce."""
        table, ids = inst.ins
        out = inst.outs[0]
        rows = self.shape(table)[0] // self.spec.size
        self.shard_param(table, ParamShard(dim=0, parts=self.spec.size))
        id_shape = self.shape(ids)
        local = self.new_value(out, "ids", id_shape, "i64")
        self.emit("binary", (ids,), local, {"fn": "sub", "scalar": self.spec.rank * rows})
        low, high, valid = (self.new_value(out, s, id_shape, "bool") for s in ("ge", "lt", "valid"))
        self.emit("binary", (local,), low, {"fn": "ge", "scalar": 0})
        self.emit("binary", (local,), high, {"fn": "lt", "scalar": rows})
        self.emit("binary", (low, high), valid, {"fn": "logical_and"})
        safe = self.new_value(out, "safe", id_shape, "i64")
        self.emit("binary", (local, valid), safe, {"fn": "mul"})  # ids of other PEs read row 0
        spec = self.low.values[out]
        looked_up = self.new_value(out, "rows", spec.shape, spec.dtype)
        self.emit("gather", (table, safe), looked_up)
        mask = self.new_value(out, "mask", (*id_shape, 1), "bool")  # (..., 1) broadcasts over features
        self.emit("reshape", (valid,), mask, {"shape": [*id_shape, 1]})
        partial = self.new_value(out, "partial", spec.shape, spec.dtype)
        self.emit("binary", (looked_up, mask), partial, {"fn": "mul"})
        self.emit("all_reduce", (partial,), out, {"group": "tp"})

    def replicate_output(self, name: str) -> str:
        """Program outputs cross to other tasks replicated: all-gather a split one."""
        return self.gathered(name) if name in self.split else name

    def gathered(self, name: str) -> str:
        """The whole of split value ``name`` on every PE: an ``all_gather`` of the chunks
        (once; a value computed whole by a fallback is reused as it is)."""
        if name not in self.whole:
            split = self.split[name]
            # a parameter's gathered copy is a computed value: no "p:" (that marks a weight in HBM)
            whole = self.new_value(name.removeprefix("p:"), "gathered", self.full[name], self.low.values[name].dtype)
            attrs = {"group": "tp", "dim": split.dim}
            widths = split.widths(self.full[name][split.dim])
            if len(widths) > 1 or split.parts != self.spec.size:
                attrs["segments"] = [[w // p, p] for w, p in widths]
            self.emit("all_gather", (name,), whole, attrs)
            self.whole[name] = whole
        return self.whole[name]

    # -- fallback: replicate what cannot be split ----------------------------------------------
    def fallback(self, inst: Instruction, reason: str) -> None:
        """Compute ``inst`` whole on every PE: all-gather its split operands, run it unsplit,
        then give each output this PE's chunk again when it keeps the split dim (the rules
        downstream were written for split values; the whole copy stays for later fallbacks)."""
        split_ins = [name for name in inst.ins if name in self.split]
        ins = tuple(self.gathered(name) if name in self.split else name for name in inst.ins)
        cuts = {out: self.resplit_layout(split_ins[0], out) if split_ins else None for out in inst.outs}
        outs = tuple(out if cuts[out] is None else self.new_value(out, "whole", self.shape(out), self.low.values[out].dtype) for out in inst.outs)
        self.out.append(inst.model_copy(update={"ins": ins, "outs": outs}))
        for out, whole in zip(inst.outs, outs):
            if cuts[out] is not None:
                self.resplit(whole, out, cuts[out])
        self.notes.append(f"{inst.op} {inst.outs[0]} computed whole on every PE ({reason})")

    def resplit_layout(self, source: str, out: str) -> ParamShard | None:
        """How to cut ``out`` like its split operand ``source``: on the same dim (counted from
        the last), if ``out`` has it at the same size; None to leave ``out`` replicated."""
        split, full, shape = self.split[source], self.full[source], self.shape(out)
        dim = split.dim + len(shape) - len(full)
        if split.segments != 1 or not 0 <= dim < len(shape) or shape[dim] != full[split.dim]:
            return None
        return ParamShard(dim=dim, parts=split.parts)

    def resplit(self, whole: str, out: str, split: ParamShard) -> None:
        """``out`` = this PE's chunk of the replicated value ``whole``."""
        size = self.shape(whole)[split.dim] // split.parts
        chunk = split.chunk(self.spec.rank, self.spec.size)
        self.emit("slice", (whole,), out, {"dim": split.dim, "start": chunk * size, "end": (chunk + 1) * size, "step": 1})
        self.localise(out, split)
        self.whole[out] = whole

    # -- ops a split flows through ---------------------------------------------------------
    def elementwise(self, inst: Instruction) -> None:
        """Broadcasting ops: operands full-sized on the split dim are cut to this PE's chunk."""
        ndim = len(self.shape(inst.outs[0]))
        at = {s.model_copy(update={"dim": s.dim + ndim - len(self.shape(i))}) for i in inst.ins if (s := self.split.get(i))}
        if len(at) != 1:
            raise ShardingError(f"{inst.op} {inst.outs[0]}: operands split differently")
        (split,) = at
        dim = split.dim
        ins = []
        for name in inst.ins:
            own = dim - (ndim - len(self.shape(name)))
            full_sized = own >= 0 and self.shape(name)[own] != 1
            ins.append(self.chunk_of(name, own, split) if name not in self.split and full_sized else name)
        self.keep(inst.model_copy(update={"ins": tuple(ins)}), split)

    def op_rms_norm(self, inst: Instruction) -> None:
        x, *affine = inst.ins
        split = self.split.get(x)
        if split is None or any(a in self.split for a in affine):
            raise ShardingError(f"{inst.op} {inst.outs[0]}: a split weight")
        if split.dim == len(self.shape(x)) - 1:
            return self.distributed_norm(inst, split)
        self.keep(inst, split)

    op_layer_norm = op_rms_norm

    def distributed_norm(self, inst: Instruction, split: ParamShard) -> None:
        """A norm over the split dim: each PE sums its slice of every row (``norm_partials``),
        the sums are all-reduced (a few numbers per row, not the rows), and each PE normalises
        its slice with its slice of the weight and bias (``norm_apply``).

        The all-reduce adds every rank's sums, so a chunk held by ``size / parts`` PEs (a
        replicated KV head) is counted that often: the count is the local row length times
        the group size, which is the full row length times that same factor."""
        if split.segments != 1:
            raise ShardingError(f"{inst.op} {inst.outs[0]}: normalising over fused segments")
        x, *affine = inst.ins
        kind = "rms" if inst.op == "rms_norm" else "layer"
        row = self.shape(x)
        out = inst.outs[0]
        partial = self.new_value(out, "partial_sums", (*row[:-1], 1 if kind == "rms" else 2), "f32")
        self.emit("norm_partials", (x,), partial, {"kind": kind})
        sums = self.new_value(out, "sums", self.shape(partial), "f32")
        self.emit("all_reduce", (partial,), sums, {"group": "tp"})
        ins = [x, sums] + [self.chunk_of(a, 0, split) if len(self.shape(a)) == 1 and self.shape(a)[0] != 1 else a for a in affine]
        attrs = {"kind": kind, "eps": inst.attrs["eps"], "count": row[-1] * self.spec.size}
        if kind == "rms":
            attrs["weight_offset"] = inst.attrs.get("weight_offset", 0.0)
        self.emit("norm_apply", tuple(ins), out, attrs)
        self.localise(out, ParamShard(dim=len(row) - 1, parts=split.parts))

    def op_softmax(self, inst: Instruction) -> None:
        split = self.split[inst.ins[0]]
        if inst.attrs["dim"] == split.dim:
            raise ShardingError(f"softmax {inst.outs[0]}: over a split dim")
        self.keep(inst, split)

    def op_reduce(self, inst: Instruction) -> None:
        split = self.split[inst.ins[0]]
        dims = inst.attrs["dims"]
        if dims is None or split.dim in dims:
            return self.distributed_reduce(inst, split)
        dim = split.dim if inst.attrs["keepdim"] else split.dim - sum(d < split.dim for d in dims)
        self.keep(inst, split.model_copy(update={"dim": dim}))

    def distributed_reduce(self, inst: Instruction, split: ParamShard) -> None:
        """A sum or mean over the split dim: reduce this PE's chunk, all-reduce the partial
        results (the unfused form of a distributed norm's mean of squares).

        The all-reduce adds ``size / parts`` copies of each chunk's result; a mean of a
        chunk is the sum over ``1 / parts`` of the elements, so the group's total of the
        local means is ``size`` times the mean, and its total of local sums ``size / parts``
        times the sum."""
        out = inst.outs[0]
        spec = self.low.values[out]
        if inst.attrs["fn"] not in ("sum", "mean") or split.segments != 1 or spec.dtype != "f32":
            raise ShardingError(f"reduce {inst.outs[0]}: a {inst.attrs['fn']} over a split dim")
        scale = self.spec.size if inst.attrs["fn"] == "mean" else self.spec.size // split.parts
        partial = self.new_value(out, "partial", spec.shape, spec.dtype)
        self.out.append(inst.model_copy(update={"outs": (partial,)}))
        summed = self.new_value(out, "sum", spec.shape, spec.dtype) if scale != 1 else out
        self.emit("all_reduce", (partial,), summed, {"group": "tp"})
        if scale != 1:
            self.emit("binary", (summed,), out, {"fn": "div", "scalar": float(scale)})

    def op_reshape(self, inst: Instruction) -> None:
        """The split dim keeps its place when the dims before it have the same product."""
        split = self.split[inst.ins[0]]
        full = self.full[inst.ins[0]]
        before = int(np.prod(full[: split.dim]))
        shape = list(inst.attrs["shape"])
        for dim, size in enumerate(shape):
            if int(np.prod(shape[:dim])) == before and size != 1:
                break
        else:
            raise ShardingError(f"reshape {inst.outs[0]}: moves the split dim")
        if split.segments != 1 and (shape[dim], int(np.prod(shape[dim + 1 :]))) != (full[split.dim], int(np.prod(full[split.dim + 1 :]))):
            raise ShardingError(f"reshape {inst.outs[0]}: regroups fused segments")
        local = list(shape)
        local[dim] = local[dim] // split.parts if split.segments == 1 else self.shape(inst.ins[0])[split.dim]
        self.keep(inst, split.model_copy(update={"dim": dim}), {"shape": local})

    def op_permute(self, inst: Instruction) -> None:
        split = self.split[inst.ins[0]]
        self.keep(inst, split.model_copy(update={"dim": list(inst.attrs["dims"]).index(split.dim)}))

    def op_expand(self, inst: Instruction) -> None:
        split = self.split[inst.ins[0]]
        dim = split.dim + len(inst.attrs["shape"]) - len(self.shape(inst.ins[0]))
        local = list(inst.attrs["shape"])
        local[dim] = self.shape(inst.ins[0])[split.dim]  # the split dim is not expanded
        self.keep(inst, split.model_copy(update={"dim": dim}), {"shape": local})

    def op_slice(self, inst: Instruction) -> None:
        """A slice of another dim keeps the split; one fused segment of the split dim is its chunk."""
        split = self.split[inst.ins[0]]
        attrs = inst.attrs
        if attrs["dim"] != split.dim:
            return self.keep(inst, split)
        full = self.full[inst.ins[0]][split.dim]
        start = local_start = 0
        for width, parts in split.widths(full):
            if split.segments > 1 and (attrs["start"], min(attrs["end"], full), attrs["step"]) == (start, start + width, 1):
                bounds = {"start": local_start, "end": local_start + width // parts}
                return self.keep(inst, ParamShard(dim=split.dim, parts=parts), bounds)
            start, local_start = start + width, local_start + width // parts
        raise ShardingError(f"slice {inst.outs[0]}: of a split dim")

    def op_select(self, inst: Instruction) -> None:
        split = self.split[inst.ins[0]]
        if inst.attrs["dim"] == split.dim:
            raise ShardingError(f"select {inst.outs[0]}: of a split dim")
        self.keep(inst, split.model_copy(update={"dim": split.dim - (inst.attrs["dim"] < split.dim)}))

    def op_cat(self, inst: Instruction) -> None:
        split = self.only_split(inst)
        if inst.attrs["dim"] == split.dim or any(i not in self.split for i in inst.ins):
            raise ShardingError(f"cat {inst.outs[0]}: of split and replicated values")
        self.keep(inst, split)

    def op_index_select(self, inst: Instruction) -> None:
        split = self.split.get(inst.ins[0])
        if split is None or inst.ins[1] in self.split or inst.attrs["dim"] == split.dim:
            raise ShardingError(f"index_select {inst.outs[0]}: along a split dim")
        self.keep(inst, split)

    def op_matmul(self, inst: Instruction) -> None:
        """Batched matmul with both operands split on the same batch dim (e.g. per head)."""
        a, b = inst.ins
        split = self.only_split(inst)
        if a not in self.split or b not in self.split or split.dim >= len(self.shape(inst.outs[0])) - 2:
            raise ShardingError(f"matmul {inst.outs[0]}: operands not split on one batch dim")
        self.keep(inst, split)

    def op_paged_attention(self, inst: Instruction) -> None:
        """Heads split: q on its heads, k/v on the KV heads (replicated chunks under GQA)."""
        q, k, v = inst.ins[:3]
        splits = [self.split.get(n) for n in (q, k, v)]
        if any(s is None or s.dim != 1 for s in splits) or any(n in self.split for n in inst.ins[3:]):
            raise ShardingError(f"paged_attention {inst.outs[0]}: q, k and v must all be split on heads")
        self.keep(inst, ParamShard(dim=2, parts=splits[0].parts))  # out (B, S, H, D)

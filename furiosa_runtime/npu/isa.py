"""The NPU instruction set: program format and the reference semantics of every opcode.

A compiled program is a straight-line list of macro-instructions over named values.
Each opcode below is defined by a small NumPy function; that function *is* the
specification (the simulator executes it, the compiler folds constants with it).
Values are computed in float32 (integers in int64); parameters are stored in bf16 and
widened when read, which is the accumulate-in-fp32 contract of the hardware.

Collectives (``COLLECTIVES``) are executed by every PE of a tensor-parallel group at the
same point of its program; their reference function takes the operand of every PE in
rank order and returns what each PE receives.

Opcodes (ins -> outs, attrs):
  linear          x[..., K], w[N, K] (, b[N]) -> y[..., N]      w_layout "nk" | "kn"
  quantized_linear x[..., K], w[N, K] stored f8_e4m3fn or i8, w_scale[N, 1] or [1] (, x_scale[1])
                  (, b[N]) -> y[..., N]; see ``_quantized_linear``   activations "none" | "dynamic" | "static"
  matmul          a[..., M, K], b[..., K, N] -> c                  batched, broadcasting
  rms_norm        x, w -> y                                        eps, weight_offset
  layer_norm      x, w, b -> y                                     eps
  norm_partials   x[..., D] -> the row sums a norm needs: [sum x^2] (kind "rms") or
                  [sum x, sum x^2] (kind "layer"), shape [..., 1 or 2]       kind
  norm_apply      x, sums, w (, b) -> y: RMSNorm / LayerNorm of x from row sums over
                  ``count`` elements (a distributed norm: x is one PE's slice of the row and
                  the sums were all-reduced over the group)     kind, eps, count, weight_offset
  rotary          x[B,H,S,D], cos, sin -> y                        rotate-half RoPE
  gated_act       gate, up -> act(gate) * up                       act
  topk            x -> values, indices of the k largest along the last dim   k
  moe_experts     x[T, H], expert ids[T, k], weights[T, k], gate_up[E, 2I, H], down[E, H, I] -> y[T, H]
                  sum over a token's k experts of weight * down_e(act(gate_e x) * up_e x)     act
  paged_attention q, k, v, positions, slot_mapping, block_tables -> o[B,S,H,D]
                  scale, causal, sliding_window, softcap; writes k/v into the bound KV cache
  all_reduce      x -> sum (or max) of x over the tensor-parallel group   group (, op) (collective)
  all_gather      x -> concatenation of x over the group along dim  group, dim (, segments)
                  (collective; see ``_all_gather`` for chunks held by several PEs and fused segments)
  unary / binary  elementwise math                                 fn (, scalar)
  reduce          x -> reduction over dims                         fn, dims, keepdim
  softmax         x -> softmax along dim                           dim
  gather          table, ids -> table[ids]                         (embedding lookup)
  index_select    x, idx -> x.take(idx, dim)                       dim
  where           cond, a, b -> select
  cast            x -> x as dtype                                  dtype
  reshape, permute, expand, slice, select, cat, copy               data movement
  iota / full     -> constant tensors                              shape, value, dtype
"""

from __future__ import annotations

import base64
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import ml_dtypes
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PROGRAM_FORMAT = "furiosa-npu-program/1"

DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
    "f16": np.dtype(np.float16),
    "i64": np.dtype(np.int64),
    "i32": np.dtype(np.int32),
    "bool": np.dtype(np.bool_),
    "f8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),  # quantized weights (``quantized_linear``)
    "i8": np.dtype(np.int8),
}
COMPUTE_DTYPE = {"f32": "f32", "bf16": "f32", "f16": "f32", "i64": "i64", "i32": "i64", "bool": "bool", "f8_e4m3fn": "f32", "i8": "f32"}
#: Storage dtypes of quantized weights: a program declares such a parameter in it (not in
#: its compute dtype), so its stored bytes are known from the program alone.
QUANTIZED_DTYPES = ("f8_e4m3fn", "i8")
#: The largest finite float8_e4m3fn value: an absmax scale maps a row onto [-448, 448].
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)

DType = Literal["f32", "bf16", "f16", "i64", "i32", "bool", "f8_e4m3fn", "i8"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """A named tensor with a static shape."""

    name: str
    shape: tuple[int, ...]
    dtype: DType

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype].itemsize


class Constant(TensorSpec):
    """A tensor embedded in the program (``embed_all_constants_into_graph``)."""

    data: str  # base64 of the little-endian raw bytes

    def array(self) -> np.ndarray:
        raw = base64.b64decode(self.data)
        return np.frombuffer(raw, dtype=DTYPES[self.dtype]).reshape(self.shape).copy()

    @classmethod
    def infer(cls, name: str, array: np.ndarray) -> Constant:
        """Embed ``array`` in its compute dtype (floats as f32, integers as i64)."""
        kind = "f32" if array.dtype.kind in "fV" else ("bool" if array.dtype.kind == "b" else "i64")
        return cls.of(name, array, kind)

    @classmethod
    def of(cls, name: str, array: np.ndarray, dtype: DType) -> Constant:
        data = np.ascontiguousarray(array.astype(DTYPES[dtype]))
        return cls(name=name, shape=array.shape, dtype=dtype, data=base64.b64encode(data.tobytes()).decode())


class Instruction(_Strict):
    op: str
    ins: tuple[str, ...]
    outs: tuple[str, ...]
    attrs: dict[str, Any] = Field(default_factory=dict)
    free: tuple[str, ...] = ()  # values whose last use is this instruction


class MemoryPlan(_Strict):
    """Static placement of intermediate values in one activation arena (bytes)."""

    arena_bytes: int
    offsets: dict[str, int]


class ParamShard(_Strict):
    """How a tensor-parallel program's parameter is cut from the full tensor.

    ``dim`` is split into ``parts`` equal chunks (``parts`` < group size means chunks are
    replicated, e.g. KV heads of GQA); with ``segments`` > 1 the dim is first cut into that
    many equal segments (fused QKV) and each segment is split the same way.  ``fused``
    gives segments of different widths instead, each with its own number of parts (Phi-3's
    ``[q | k | v]`` under GQA: k and v have fewer heads, split over fewer PEs); ``parts``
    is then the largest of them, and a segment of ``p`` parts gives chunk ``c`` its part
    ``c * p // parts``.
    """

    dim: int
    parts: int
    segments: int = 1
    fused: tuple[tuple[int, int], ...] = ()  # (full width, parts) of each segment, when they differ

    def chunk(self, rank: int, size: int) -> int:
        """The chunk held by ``rank`` of a group of ``size``."""
        return rank * self.parts // size

    def widths(self, full: int) -> list[tuple[int, int]]:
        """(full width, parts) of every segment of a dim of size ``full``."""
        return list(self.fused) or [(full // self.segments, self.parts)] * self.segments


class TensorParallel(_Strict):
    """The tensor-parallel position of a program and the layout of its sharded parameters."""

    size: int
    rank: int
    params: dict[str, ParamShard] = Field(default_factory=dict)  # program param (without "p:") -> layout
    notes: tuple[str, ...] = ()  # instructions the compiler could not split: all-gathered, computed whole


class Program(_Strict):
    """One compiled unit: what a PE executes for one supertask of one bucket."""

    format: Literal["furiosa-npu-program/1"] = PROGRAM_FORMAT
    name: str
    inputs: tuple[TensorSpec, ...]
    params: tuple[TensorSpec, ...]
    constants: tuple[Constant, ...] = ()
    outputs: tuple[str, ...]
    values: dict[str, TensorSpec]
    instructions: tuple[Instruction, ...]
    memory_plan: MemoryPlan
    uses_kv_cache: bool = False
    tensor_parallel: TensorParallel | None = None  # None: a single-PE program

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for inst in self.instructions:
            hist[inst.op] = hist.get(inst.op, 0) + 1
        return dict(sorted(hist.items()))


# ----------------------------------------------------------------------------------------
# Reference semantics.  Every kernel takes (inputs, attrs, ctx) and returns a tuple.


class KVCacheLayer:
    """The K and V storage of one layer: flat token slots (num_blocks * block_size).

    A slot holds its keys and then its values in one row of ``kv`` (``[k heads | v heads]``),
    so a block of K and V is one contiguous run that one gather reads; ``k`` and ``v`` are
    views of it, ``(num_slots, kv_heads, head_dim)`` and ``(num_slots, kv_heads, v_head_dim)``.
    """

    def __init__(self, num_slots: int, kv_heads: int, head_dim: int, v_head_dim: int, dtype: np.dtype, storage: np.ndarray | None = None) -> None:
        """``storage`` (optional): the ``(num_slots, kv_heads * (head_dim + v_head_dim))`` rows
        to use, such as a slice of a larger array; zeros of ``dtype`` otherwise."""
        width = kv_heads * (head_dim + v_head_dim)
        self.kv = np.zeros((num_slots, width), dtype=dtype) if storage is None else storage
        assert self.kv.shape == (num_slots, width), f"KV storage of shape {self.kv.shape}, not {(num_slots, width)}"
        self.k, self.v = _split_kv(self.kv, kv_heads, head_dim)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes


def _split_kv(rows: np.ndarray, kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Views of the keys and values of ``[..., k heads | v heads]`` rows: ``(..., Hkv, D)``, ``(..., Hkv, Dv)``."""
    split = kv_heads * head_dim
    keys, values = rows[..., :split], rows[..., split:]
    return keys.reshape(*rows.shape[:-1], kv_heads, head_dim), values.reshape(*rows.shape[:-1], kv_heads, -1)


class ExecContext:
    """What a kernel may touch besides its operands: the bound KV cache."""

    def __init__(self, kv: KVCacheLayer | None = None, block_size: int = 1) -> None:
        self.kv = kv
        self.block_size = block_size


Kernel = Callable[[list[np.ndarray], dict[str, Any], ExecContext], tuple[np.ndarray, ...]]
KERNELS: dict[str, Kernel] = {}


def kernel(name: str) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        KERNELS[name] = fn
        return fn

    return register


def _f32(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float32 else x.astype(np.float32)


@kernel("linear")
def _linear(ins, attrs, ctx):
    x, w = ins[0], _f32(ins[1])
    # One 2-D GEMM over all rows: a stacked (B, S, K) @ (K, N) would run B small GEMMs.
    y = (x.reshape(-1, x.shape[-1]) @ (w.T if attrs.get("w_layout", "nk") == "nk" else w)).reshape(*x.shape[:-1], -1)
    if len(ins) > 2:
        y = y + _f32(ins[2])
    return (y,)


@kernel("quantized_linear")
def _quantized_linear(ins, attrs, ctx):
    """A linear layer over 8-bit weights, in the order of operations of compressed-tensors'
    fake quantisation (the PyTorch reference of the tests does the same):

    * ``activations`` "none" (weight-only): ``y = (x @ w.T) * w_scale``;
    * "dynamic" (W8A8): each row (token) of x is quantised to float8_e4m3fn with its own
      scale ``s = max|x_row| / 448`` (a row of zeros keeps scale 1), ``q = fp8(x / s)``, then
      ``y = (q @ w.T) * s * w_scale``;
    * "static": the same with the one calibrated ``x_scale`` operand for every row, and
      ``x / x_scale`` clipped to [-448, 448] before the cast.

    The 8-bit operands are widened to float32 exactly (through ``ml_dtypes``), the product
    accumulates in float32, and the bias, if any, is added last.  ``w_scale`` is one scale
    per output channel (``[N, 1]``) or one for the whole tensor (``[1]``).  With attr
    ``row_absmax`` a dynamic instruction takes ``max|x_row|`` as an operand after
    ``w_scale`` (``[..., 1]``) instead of computing it: a tensor-parallel PE holding a slice
    of each row gets the whole row's maximum from an ``all_reduce`` with ``op`` "max".
    """
    x, w, w_scale, *rest = ins
    rows = x.reshape(-1, x.shape[-1])  # (T, K)
    mode = attrs["activations"]
    x_scale = None
    if mode == "static":
        x_scale = _f32(rest.pop(0)).reshape(1, 1)
    elif mode == "dynamic":
        peak = _f32(rest.pop(0)).reshape(-1, 1) if attrs.get("row_absmax") else np.abs(rows).max(axis=-1, keepdims=True)
        x_scale = np.where(peak > 0, peak, np.float32(FP8_MAX)).astype(np.float32) / np.float32(FP8_MAX)  # (T, 1)
    if x_scale is not None:
        rows = np.clip(rows / x_scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    y = rows @ _f32(w).T  # (T, N)
    if x_scale is not None:
        y *= x_scale
    y *= _f32(w_scale).reshape(1, -1)
    if rest:
        y += _f32(rest[0])
    return (y.reshape(*x.shape[:-1], -1),)


@kernel("matmul")
def _matmul(ins, attrs, ctx):
    return (np.matmul(_f32(ins[0]), _f32(ins[1])),)


@kernel("rms_norm")
def _rms_norm(ins, attrs, ctx):
    x, w = ins
    y = x * (1.0 / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + np.float32(attrs["eps"])))
    y *= _f32(w) + np.float32(attrs.get("weight_offset", 0.0))
    return (_f32(y),)


@kernel("layer_norm")
def _layer_norm(ins, attrs, ctx):
    x, w, b = ins
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + np.float32(attrs["eps"]))
    return ((y * _f32(w) + _f32(b)).astype(np.float32),)


@kernel("norm_partials")
def _norm_partials(ins, attrs, ctx):
    """The row sums of the last dim a norm is computed from: sum(x^2) for RMSNorm, and
    (sum(x), sum(x^2)) for LayerNorm.  Sums, not means, so that the partial sums of the
    slices of a row held by different PEs add up (by ``all_reduce``) to the row's sums."""
    x = _f32(ins[0])
    squares = np.sum(np.square(x), axis=-1, keepdims=True)
    if attrs["kind"] == "rms":
        return (squares,)
    return (np.concatenate([np.sum(x, axis=-1, keepdims=True), squares], axis=-1),)


@kernel("norm_apply")
def _norm_apply(ins, attrs, ctx):
    """RMSNorm or LayerNorm of ``x`` given the row sums of ``norm_partials`` over ``count``
    elements: with ``count`` the full row length and ``x`` a slice of the row, this is the
    slice of the norm of the whole row (``w`` and ``b`` are the matching slices)."""
    x, sums, w, *bias = ins
    count, eps = np.float32(attrs["count"]), np.float32(attrs["eps"])
    if attrs["kind"] == "rms":
        y = x * (1.0 / np.sqrt(sums[..., :1] / count + eps))
        y *= _f32(w) + np.float32(attrs.get("weight_offset", 0.0))
        return (_f32(y),)
    mean = sums[..., :1] / count
    var = np.maximum(sums[..., 1:2] / count - mean * mean, np.float32(0))  # E[x^2] - E[x]^2
    y = (x - mean) / np.sqrt(var + eps) * _f32(w) + _f32(bias[0])
    return (_f32(y),)


@kernel("rotary")
def _rotary(ins, attrs, ctx):
    x, cos, sin = ins
    half = x.shape[-1] // 2
    # x * cos + cat(-x2, x1) * sin, written half by half instead of materialising the cat
    out = x * cos
    out[..., :half] -= x[..., half:] * sin[..., :half]
    out[..., half:] += x[..., :half] * sin[..., half:]
    return (out,)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.float32(0.7978845608028654) * (x + np.float32(0.044715) * x**3)))


def _erf(x: np.ndarray) -> np.ndarray:
    """erf via Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7, below float32 resolution near 1)."""
    t = 1.0 / (1.0 + np.float32(0.3275911) * np.abs(x))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return (np.sign(x) * (1.0 - poly * np.exp(-x * x))).astype(np.float32)


def _gelu_erf(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + _erf(x * np.float32(0.7071067811865476)))).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "neg": np.negative,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1.0 / np.sqrt(x),
    "reciprocal": lambda x: 1.0 / x,
    "abs": np.abs,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "relu": lambda x: np.maximum(x, 0),
    "gelu": _gelu_erf,
    "gelu_tanh": _gelu_tanh,
    "cos": np.cos,
    "sin": np.sin,
    "logical_not": np.logical_not,
    "erf": _erf,
}

BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "floordiv": np.floor_divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "eq": np.equal,
    "ne": np.not_equal,
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "logical_and": np.logical_and,
    "logical_or": np.logical_or,
}


def _keep_float32(result: np.ndarray, *operands: np.ndarray) -> np.ndarray:
    """NumPy promotes float32 op python-scalar correctly, but int op float goes to float64."""
    if result.dtype == np.float64:
        return result.astype(np.float32)
    return result


@kernel("unary")
def _unary(ins, attrs, ctx):
    return (_keep_float32(np.asarray(UNARY[attrs["fn"]](ins[0]))),)


@kernel("binary")
def _binary(ins, attrs, ctx):
    a = ins[0]
    b = ins[1] if len(ins) > 1 else _scalar_like(attrs["scalar"], a)
    if attrs.get("scalar_first"):
        a, b = b, a
    return (_keep_float32(np.asarray(BINARY[attrs["fn"]](a, b))),)


def _scalar_like(value: float | int | bool, like: np.ndarray) -> np.ndarray:
    if isinstance(value, bool):
        return np.bool_(value)
    if like.dtype.kind == "f" or isinstance(value, float):
        return np.float32(value)
    return np.int64(value)


@kernel("reduce")
def _reduce(ins, attrs, ctx):
    fn = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min, "any": np.any}[attrs["fn"]]
    dims = tuple(attrs["dims"]) if attrs.get("dims") is not None else None
    return (_keep_float32(np.asarray(fn(ins[0], axis=dims, keepdims=attrs.get("keepdim", False)))),)


@kernel("softmax")
def _softmax(ins, attrs, ctx):
    x = ins[0]
    e = np.exp(x - x.max(axis=attrs["dim"], keepdims=True))
    return (e / e.sum(axis=attrs["dim"], keepdims=True),)


@kernel("gated_act")
def _gated_act(ins, attrs, ctx):
    gate, up = ins
    if attrs["act"] == "silu" and gate.dtype == np.float32:
        return (_silu_mul(gate, up),)
    return (UNARY[attrs["act"]](gate) * up,)


def _silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate / (1 + exp(-gate)) * up in one buffer: the MLP's widest activation is never copied."""
    out = np.negative(gate)
    np.exp(out, out=out)
    out += 1
    np.divide(gate, out, out=out)
    out *= up
    return out


@kernel("topk")
def _topk(ins, attrs, ctx):
    """The k largest values of the last dim, largest first (ties: the lower index first)."""
    x = ins[0]
    order = np.argsort(-x, axis=-1, kind="stable")[..., : attrs["k"]]
    return np.take_along_axis(x, order, axis=-1), order.astype(np.int64)


@kernel("moe_experts")
def _moe_experts(ins, attrs, ctx):
    """A mixture-of-experts MLP: each token runs only through the experts it was routed to,
    one gathered GEMM pair per expert, weighted and summed (a token picks an expert once)."""
    x, ids, weights, gate_up, down = ins
    out = np.zeros_like(x)
    for expert in np.unique(ids):
        rows, slots = np.nonzero(ids == expert)
        gate, up = np.split(x[rows] @ _f32(gate_up[expert]).T, 2, axis=-1)
        hidden = _gated_act([gate, up], {"act": attrs["act"]}, ctx)[0]
        out[rows] += (hidden @ _f32(down[expert]).T) * weights[rows, slots, None]
    return (out,)


@kernel("gather")
def _gather(ins, attrs, ctx):
    table, ids = ins
    return (_f32(table[ids]),)


@kernel("index_select")
def _index_select(ins, attrs, ctx):
    return (np.take(ins[0], ins[1], axis=attrs["dim"]),)


@kernel("where")
def _where(ins, attrs, ctx):
    return (np.where(ins[0], ins[1], ins[2]),)


@kernel("cast")
def _cast(ins, attrs, ctx):
    return (ins[0].astype(DTYPES[COMPUTE_DTYPE[attrs["dtype"]]]),)


@kernel("reshape")
def _reshape(ins, attrs, ctx):
    return (ins[0].reshape(attrs["shape"]),)


@kernel("permute")
def _permute(ins, attrs, ctx):
    return (ins[0].transpose(attrs["dims"]),)


@kernel("expand")
def _expand(ins, attrs, ctx):
    return (np.broadcast_to(ins[0], attrs["shape"]),)


@kernel("slice")
def _slice(ins, attrs, ctx):
    index = [slice(None)] * ins[0].ndim
    index[attrs["dim"]] = slice(attrs["start"], attrs["end"], attrs["step"])
    return (ins[0][tuple(index)],)


@kernel("select")
def _select(ins, attrs, ctx):
    return (np.take(ins[0], attrs["index"], axis=attrs["dim"]),)


@kernel("cat")
def _cat(ins, attrs, ctx):
    return (np.concatenate(ins, axis=attrs["dim"]),)


@kernel("copy")
def _copy(ins, attrs, ctx):
    return (np.array(ins[0]),)


@kernel("iota")
def _iota(ins, attrs, ctx):
    return (np.arange(attrs["start"], attrs["end"], attrs["step"]).astype(DTYPES[COMPUTE_DTYPE[attrs["dtype"]]]),)


@kernel("full")
def _full(ins, attrs, ctx):
    return (np.full(attrs["shape"], attrs["value"], dtype=DTYPES[COMPUTE_DTYPE[attrs["dtype"]]]),)


Collective = Callable[[list[np.ndarray], dict[str, Any]], np.ndarray]
COLLECTIVES: dict[str, Collective] = {}


def collective(name: str) -> Callable[[Collective], Collective]:
    def register(fn: Collective) -> Collective:
        COLLECTIVES[name] = fn
        return fn

    return register


@collective("all_reduce")
def _all_reduce(parts: list[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
    """Sum in rank order, in float32, so every PE receives bit-identical values (with attr
    ``op`` "max", the elementwise maximum instead)."""
    if attrs.get("op") == "max":
        return np.maximum.reduce([_f32(part) for part in parts])
    total = _f32(parts[0]).copy()
    for part in parts[1:]:
        total += part
    return total


@collective("all_gather")
def _all_gather(parts: list[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
    """The whole value from the chunks of every PE, concatenated along ``dim`` in rank order.

    ``segments`` (optional) describes each PE's chunk as ``[[width, distinct], ...]``: the
    chunk is that many fused segments of the given widths (``[q_r | k_r | v_r]``), and the
    result is reassembled segment by segment (``[q0 q1 .. | k0 k1 .. | v0 v1 ..]``).  A
    segment with fewer distinct chunks than PEs is held by ``group / distinct`` neighbouring
    PEs each (KV heads replicated under GQA) and taken once.  Without ``segments`` every PE
    holds a distinct chunk of one segment.
    """
    dim = attrs["dim"]
    layout = attrs.get("segments") or [[parts[0].shape[dim], len(parts)]]
    pieces = [np.split(chunk, np.cumsum([width for width, _ in layout])[:-1], axis=dim) for chunk in parts]
    gathered = []
    for segment, (_, distinct) in enumerate(layout):
        holders = range(0, len(parts), max(1, len(parts) // distinct))  # the first PE holding each distinct chunk
        gathered += [pieces[rank][segment] for rank in holders]
    return np.concatenate(gathered, axis=dim)


#: Rows attended together: rows of similar context length share one gather of KV blocks.
ATTENTION_ROW_GROUP = 8
#: Queries attended together: a causal chunk of queries reads only the keys up to its last one.
ATTENTION_QUERY_CHUNK = 64
#: Host threads a kernel may spread independent pieces of work over (``FURIOSA_HOST_THREADS``,
#: default the CPUs this process may run on).  Results do not depend on it.
HOST_THREADS = int(os.environ.get("FURIOSA_HOST_THREADS", "0")) or (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
_scratch = threading.local()  # per host thread: a reused gather buffer (_gather_blocks), in_parallel's state


@kernel("paged_attention")
def _paged_attention(ins, attrs, ctx):
    """Write this step's K/V into the paged cache, then attend over the cached context.

    Keys are addressed by logical position: the cache slot of position j of sequence b is
    block_tables[b, j // block_size] * block_size + j % block_size.  A query at position
    p sees positions j <= p (causal) that lie in the sequence's context; slot -1 marks a
    padding token, which is neither written nor attended.  A query that sees no key gets
    zeros.

    The rows are split into groups of similar context length (each group gathers only the
    KV blocks its longest row needs, into a reused buffer); a long prompt is attended in
    causal chunks of queries.  With one query per row (a decode step) the groups run on
    the host's threads side by side: their work is gathering blocks and many small
    products, which BLAS runs on one thread; a prompt's products are large enough for
    BLAS's own threads, so its groups run one after another.
    """
    q, k, v, positions, slot_mapping, block_tables = ins
    kv = ctx.kv
    assert kv is not None, "paged_attention needs a bound KV cache"
    num_blocks = kv.k.shape[0] // ctx.block_size
    if block_tables.size and not 0 <= block_tables.min() <= block_tables.max() < num_blocks:
        raise ValueError(f"block_tables: block ids must lie in [0, {num_blocks}), got {block_tables.min()}..{block_tables.max()}")
    valid = slot_mapping >= 0  # (B, S)
    slots = slot_mapping[valid]
    kv.k[slots] = k.transpose(0, 2, 1, 3)[valid]  # (B, S, Hkv, D) -> (T, Hkv, D)
    kv.v[slots] = v.transpose(0, 2, 1, 3)[valid]

    context_len = np.where(valid, positions + 1, 0).max(axis=1)  # (B,)
    batch, heads, seq, _ = q.shape
    q = q * np.float32(attrs["scale"])
    out = np.empty((batch, seq, heads, kv.v.shape[-1]), dtype=np.float32)
    chunk = ATTENTION_QUERY_CHUNK if attrs["causal"] else seq

    def attend(rows: np.ndarray) -> None:
        for start in range(0, seq, chunk):
            queries = slice(start, start + chunk)
            out[rows, queries] = _attend(q[rows, :, queries], kv, block_tables[rows], positions[rows, queries], context_len[rows], ctx.block_size, attrs)

    order = np.argsort(context_len, kind="stable")
    groups = [order[first : first + ATTENTION_ROW_GROUP] for first in range(0, batch, ATTENTION_ROW_GROUP)]
    costs = [len(rows) * (int(context_len[rows].max()) + 1) for rows in groups]
    in_parallel(attend, groups, costs, HOST_THREADS if seq == 1 else 1)
    return (out,)


def in_parallel(fn: Callable[[Any], None], items: list[Any], costs: list[int], threads: int) -> None:
    """Call ``fn`` on every item, spread over up to ``threads`` host threads.

    The calls must be independent (each writes its own part of an output), so the result
    is the same in any order.  Items are dealt out largest cost first to the least loaded
    thread, and the calling thread works through one share itself: one hand-over per
    thread, not one per item.  Called again from inside a share, it runs serially.
    """
    threads = min(threads, len(items))
    if threads <= 1 or getattr(_scratch, "in_share", False):
        for item in items:
            fn(item)
        return
    shares: list[list[Any]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for i in sorted(range(len(items)), key=lambda i: -costs[i]):
        least = loads.index(min(loads))
        shares[least].append(items[i])
        loads[least] += costs[i]
    futures = [_host_pool().submit(_work_through, fn, share) for share in shares[1:]]
    _work_through(fn, shares[0])
    for future in futures:
        future.result()


def _work_through(fn: Callable[[Any], None], share: list[Any]) -> None:
    """One thread's share of ``in_parallel``; nested calls inside it stay on this thread."""
    _scratch.in_share = True
    try:
        for item in share:
            fn(item)
    finally:
        _scratch.in_share = False


_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid that made it, pool)


def _host_pool() -> ThreadPoolExecutor:
    """The host threads of this process (made again in a forked child, which has none)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=max(HOST_THREADS - 1, 1), thread_name_prefix="furiosa-host"))
    return _pool[1]


def _attend(q, kv, block_tables, positions, context_len, block_size, attrs) -> np.ndarray:
    """Attention of a few rows' (pre-scaled) queries over their cached context:
    q (B, H, S, D) -> (B, S, H, Dv)."""
    batch, heads, seq, _ = q.shape
    kv_heads = kv.k.shape[1]
    visible = np.minimum(context_len, positions.max(axis=1) + 1) if attrs["causal"] else context_len
    used = min(max(-(-int(visible.max(initial=0)) // block_size), 1), block_tables.shape[1])
    tables = block_tables[:, :used]  # (B, used): whole blocks gathered at once
    keys, values = _split_kv(_gather_blocks(kv.kv, tables, block_size), kv_heads, kv.k.shape[-1])  # (B, L, Hkv, D), (B, L, Hkv, Dv)

    qg = q.reshape(batch, kv_heads, (heads // kv_heads) * seq, q.shape[-1])  # (B, Hkv, G*S, D)
    # Strided views whose (L, D) rows stay unit-stride are BLAS operands as they are: no copy.
    scores = qg @ keys.transpose(0, 2, 3, 1)  # (B, Hkv, G*S, L)
    if attrs.get("softcap"):
        cap = np.float32(attrs["softcap"])
        scores = np.tanh(scores / cap) * cap
    scores = scores.reshape(batch, kv_heads, -1, seq, scores.shape[-1])  # (B, Hkv, G, S, L)
    np.copyto(scores, np.float32(-np.inf), where=_hidden_keys(positions, context_len, scores.shape[-1], attrs)[:, None, None])
    weights, denom = _softmax_numerator(scores.reshape(batch, kv_heads, -1, scores.shape[-1]))
    out = (weights @ values.transpose(0, 2, 1, 3)) / denom  # (B, Hkv, G*S, Dv)
    out = out.reshape(batch, kv_heads, -1, seq, values.shape[-1])  # (B, Hkv, G, S, Dv)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, heads, values.shape[-1])


def _gather_blocks(cache: np.ndarray, tables: np.ndarray, block_size: int) -> np.ndarray:
    """The cache rows of each row's blocks, in table order: ``(B, used * block_size, width)`` in f32.

    The blocks land in a reused buffer: writing them into fresh memory costs more than
    reading them.  The ids were bounds-checked by the caller.
    """
    blocks = cache.reshape(-1, block_size, cache.shape[-1])
    shape = (*tables.shape, *blocks.shape[1:])
    size = math.prod(shape)
    buffer = getattr(_scratch, "blocks", None)
    if buffer is None or buffer.size < size or buffer.dtype != cache.dtype:
        buffer = np.empty(size, dtype=cache.dtype)
        _scratch.blocks = buffer
    gathered = np.take(blocks, tables, axis=0, mode="clip", out=buffer[:size].reshape(shape))
    return _f32(gathered.reshape(tables.shape[0], -1, cache.shape[-1]))


def _hidden_keys(positions: np.ndarray, context_len: np.ndarray, keys: int, attrs: dict[str, Any]) -> np.ndarray:
    """True where query (b, s) may not see key position j: ``(B, S, L)``.

    Visible are the positions before the context's end and, causally, up to the query's
    own: one comparison against the nearer bound (and one more for a sliding window).
    """
    end = np.minimum(context_len[:, None], positions + 1) if attrs["causal"] else context_len[:, None]  # (B, S)
    key_pos = np.arange(keys)
    hidden = key_pos >= end[:, :, None]
    if attrs.get("sliding_window"):
        hidden |= key_pos <= positions[:, :, None] - attrs["sliding_window"]
    return hidden


def _softmax_numerator(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(scores - row max) in place, and the row sums to divide by (1 for a row with no
    finite score, whose weights are all zero)."""
    peak = scores.max(axis=-1, keepdims=True)
    peak[~np.isfinite(peak)] = 0
    scores -= peak
    np.exp(scores, out=scores)
    denom = scores.sum(axis=-1, keepdims=True)
    denom[denom == 0] = 1
    return scores, denom


def execute(inst: Instruction, operands: list[np.ndarray], ctx: ExecContext) -> tuple[np.ndarray, ...]:
    """Run one instruction with its reference semantics (a collective as a group of one PE)."""
    if inst.op in COLLECTIVES:
        return (COLLECTIVES[inst.op]([operands[0]], inst.attrs),)
    try:
        fn = KERNELS[inst.op]
    except KeyError:
        raise ValueError(f"unknown opcode {inst.op!r}; known: {', '.join(sorted(KERNELS))}") from None
    return fn(operands, inst.attrs, ctx)

"""The timing face of the simulated NPU: a roofline cost per instruction, program and step.

An instruction takes ``max(compute, memory)`` on its PE plus a fixed dispatch time:
compute is its FLOPs at the PE's share of the chip's sustained BF16 peak (FP8 peak for a
W8A8 ``quantized_linear``); memory is the bytes it moves between HBM and the PE at the PE's
share of the sustained HBM bandwidth (``compute_efficiency`` and ``hbm_efficiency`` of the
hardware description), namely the parameters it reads (in their stored dtype: one byte per
weight of a quantized linear, plus its float32 scales) and, for paged attention, the KV
cache it reads and writes in the storage dtype the artifact declares (``kv_cache_dtype``, at
the bytes per token the build reserves for it: :func:`kv_token_bytes`).  Activations are
taken to stay in SRAM.  A collective is a ring over the tensor-parallel group's PE links; a
pipeline transfer sends its bytes over the link between the two stages' PEs (on one device
or between devices).  A step is priced stage by stage (``StageTimes``): what each pipeline
stage computes, and the transfers into it.  A lone step walks the stages one after another,
so its latency is the sum of its programs, collectives and transfers; a pipelined server
overlaps the stages of successive steps (``engine/replica_timer.py``), which is why the
parts are kept apart.

Shapes are static per bucket, so these are the latencies of the compiled shapes (attention
over the whole bucket context), the way the hardware runs them.  They are estimates for
comparing bucket grids and layouts before owning the hardware, not measurements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby

from furiosa_runtime.npu.artifact import Pipeline, Transfer
from furiosa_runtime.npu.hardware import HardwareSpec, device_of
from furiosa_runtime.npu.isa import (
    COLLECTIVES,
    DTYPES,
    QUANTIZED_DTYPES,
    Instruction,
    Program,
    TensorSpec,
)


@dataclass(frozen=True)
class Cost:
    """Modelled time of some work on one PE, with the FLOPs and HBM bytes behind it."""

    seconds: float = 0.0
    flops: float = 0.0
    hbm_bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, self.flops + other.flops, self.hbm_bytes + other.hbm_bytes)


@dataclass(frozen=True)
class StageTimes:
    """One step of a bucket's pipeline, stage by stage: ``busy[s]`` is how long stage s
    computes (its supertasks, collectives included), ``sends[s]`` how long the activations
    sent into stage s take on the link (0 for the first stage: a transfer is charged to the
    hop into the stage that reads it)."""

    busy: tuple[float, ...]
    sends: tuple[float, ...]

    @property
    def seconds(self) -> float:
        """A lone step: every stage and transfer one after another."""
        return sum(self.busy) + sum(self.sends)


def kv_token_bytes(k: TensorSpec, v: TensorSpec, itemsize: int) -> int:
    """Bytes one token's keys and values take in one layer's KV cache on one PE, from the
    paged-attention instruction's new K ``(B, Hkv, S, D)`` and V ``(B, Hkv, S, Dv)``: the
    one figure the memory plan (``step_times.kv_cache_bytes``) and the timing model share."""
    _, kv_heads, _, dim = k.shape
    return kv_heads * (dim + v.shape[-1]) * itemsize


def collective_seconds(op: str, nbytes: int, group: int, hw: HardwareSpec) -> float:
    """A ring collective over ``group`` PEs: all-reduce moves 2(g-1)/g of the buffer per PE,
    all-gather (g-1)/g of the gathered result.  A distributed norm all-reduces only its row
    sums (``norm_partials``: one or two numbers per row), which is what makes it cheaper than
    all-gathering the rows."""
    if group == 1:
        return 0.0
    share = (2 if op == "all_reduce" else 1) * (group - 1) / group
    return (group - 1) * hw.link_latency_seconds + share * nbytes / hw.pe_link_bandwidth


def transfer_seconds(nbytes: int, same_device: bool, hw: HardwareSpec) -> float:
    """An activation sent between pipeline stages: PE links on one device, the device link otherwise."""
    bandwidth = hw.pe_link_bandwidth if same_device else hw.device_link_bandwidth
    return hw.link_latency_seconds + nbytes / bandwidth


class StepModel:
    """Modelled latencies of an artifact's programs and of one step of each bucket.

    ``weight_dtype`` and ``kv_dtype`` are how parameters and the KV cache are stored in
    device memory (programs compute in f32, so their specs do not say).
    """

    def __init__(self, programs: Mapping[str, Program], hw: HardwareSpec, block_size: int, weight_dtype: str, kv_dtype: str) -> None:
        self.programs = programs
        self.hw = hw
        self.block_size = block_size
        self.weight_itemsize = DTYPES[weight_dtype].itemsize
        self.kv_itemsize = DTYPES[kv_dtype].itemsize
        self.costs = {key: self.program_cost(p) for key, p in programs.items()}

    def program_cost(self, program: Program) -> Cost:
        """One run of ``program`` on its PE, collectives included."""
        specs = {s.name: s for s in (*program.inputs, *program.params, *program.constants)} | program.values
        total = Cost()
        for inst in program.instructions:
            total += self.instruction_cost(inst, specs, program)
        return total

    def instruction_cost(self, inst: Instruction, specs: dict[str, TensorSpec], program: Program) -> Cost:
        hw = self.hw
        dispatch = hw.dispatch_cycles / hw.clock_hz
        if inst.op in COLLECTIVES:
            group = program.tensor_parallel.size if program.tensor_parallel else 1
            return Cost(dispatch + collective_seconds(inst.op, specs[inst.outs[0]].nbytes, group, hw))
        flops = self._flops(inst, specs)
        params = [specs[name] for name in inst.ins if name.startswith("p:")]
        hbm = sum(math.prod(p.shape) * self._stored_itemsize(inst, p) for p in params)
        if inst.op == "gather" and params:  # an embedding reads only the rows it looks up
            hbm = math.prod(specs[inst.outs[0]].shape) * self.weight_itemsize
        if inst.op == "moe_experts":  # at most one expert per routed (token, slot) is read
            experts = specs[inst.ins[3]].shape[0]
            hbm = hbm * min(experts, math.prod(specs[inst.ins[1]].shape)) // experts
        if inst.op == "paged_attention":
            hbm += self._kv_bytes(inst, specs)
        peak = hw.pe_fp8_flops if inst.op == "quantized_linear" and inst.attrs["activations"] != "none" else hw.pe_flops
        return Cost(dispatch + max(flops / peak, hbm / hw.pe_hbm_bandwidth), flops, hbm)

    def _stored_itemsize(self, inst: Instruction, param: TensorSpec) -> int:
        """Bytes per element of a parameter in HBM: a quantized weight's own 8-bit dtype and
        its float32 scales, ``weight_dtype`` for every other weight."""
        if param.dtype in QUANTIZED_DTYPES or (inst.op == "quantized_linear" and param.name in inst.ins[2:4]):
            return DTYPES[param.dtype].itemsize
        return self.weight_itemsize

    def _flops(self, inst: Instruction, specs: dict[str, TensorSpec]) -> float:
        out = specs[inst.outs[0]].shape
        if inst.op in ("linear", "quantized_linear", "matmul"):
            return 2.0 * math.prod(out) * specs[inst.ins[0]].shape[-1]
        if inst.op == "paged_attention":
            batch, heads, seq, dim = specs[inst.ins[0]].shape
            return 2.0 * batch * heads * seq * self._context(inst, specs) * (dim + specs[inst.ins[2]].shape[-1])
        if inst.op == "moe_experts":  # every routed (token, slot) runs one expert's gate/up and down GEMMs
            _, gate_up_rows, hidden = specs[inst.ins[3]].shape
            return 2.0 * math.prod(specs[inst.ins[1]].shape) * hidden * (gate_up_rows + specs[inst.ins[4]].shape[-1])
        if inst.op == "norm_partials":  # a square and an add per element (LayerNorm: one more add)
            return (2.0 if inst.attrs["kind"] == "rms" else 3.0) * math.prod(specs[inst.ins[0]].shape)
        if inst.op == "norm_apply":  # scale and weight per element (LayerNorm: also centre and shift)
            return (2.0 if inst.attrs["kind"] == "rms" else 4.0) * math.prod(out)
        return float(math.prod(out))  # elementwise and data movement: one operation per element

    def _kv_bytes(self, inst: Instruction, specs: dict[str, TensorSpec]) -> float:
        """KV cache traffic of one paged-attention instruction: read the context, write the new tokens."""
        batch, _, seq, _ = specs[inst.ins[1]].shape
        per_token = kv_token_bytes(specs[inst.ins[1]], specs[inst.ins[2]], self.kv_itemsize)
        return float(batch * (self._context(inst, specs) + seq) * per_token)

    def _context(self, inst: Instruction, specs: dict[str, TensorSpec]) -> int:
        """Key positions the compiled shape attends over: the whole block table."""
        return specs[inst.ins[5]].shape[1] * self.block_size

    def stage_times(self, pipeline: Pipeline, stage_of: Mapping[str, int], transfers: Iterable[Transfer],
                    stage_pe: Callable[[int], str]) -> StageTimes:  # fmt: skip
        """One step of ``pipeline`` with its tasks on the stages ``stage_of`` says (by task
        name): each stage runs its supertasks one after another (the ranks of a
        tensor-parallel group in lockstep); each transfer crosses the link between its two
        stages' PEs (``stage_pe``: a PE of a stage)."""
        supertasks = [(stage_of[name], max(self.costs[t.program].seconds for t in group))
                      for name, group in groupby(pipeline.tasks, key=lambda t: t.name)]  # fmt: skip
        hops = [(t.dst_stage, self._transfer_seconds(pipeline, t, stage_pe)) for t in transfers]
        stages = range(max(stage_of.values()) + 1)
        return StageTimes(tuple(_stage_sum(supertasks, s) for s in stages), tuple(_stage_sum(hops, s) for s in stages))

    def _transfer_seconds(self, pipeline: Pipeline, transfer: Transfer, stage_pe: Callable[[int], str]) -> float:
        same = device_of(stage_pe(transfer.src_stage)) == device_of(stage_pe(transfer.dst_stage))
        return transfer_seconds(self._value_bytes(pipeline, transfer.value), same, self.hw)

    def _value_bytes(self, pipeline: Pipeline, value: str) -> int:
        task = next(t for t in pipeline.tasks if value in t.outputs)
        program = self.programs[task.program]
        return program.values[program.outputs[task.outputs.index(value)]].nbytes


def _stage_sum(parts: list[tuple[int, float]], stage: int) -> float:
    """The seconds of the ``(stage, seconds)`` parts on ``stage``, added in order."""
    return sum((seconds for s, seconds in parts if s == stage), 0.0)


def build_placement_seconds(pipeline: Pipeline, model: StepModel) -> float:
    """A lone step of ``pipeline`` where the build placed it (data-parallel replica 0)."""
    stage_pe = {t.stage: t.device for t in pipeline.tasks}
    return model.stage_times(pipeline, {t.name: t.stage for t in pipeline.tasks}, pipeline.transfers, stage_pe.__getitem__).seconds

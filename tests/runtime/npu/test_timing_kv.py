"""The KV cache in the timing model: its storage dtype sets the bytes a decode step reads, and
the memory the build plans for it is what the simulator allocates, at the same bytes per token."""

from __future__ import annotations

from pathlib import Path

import pytest

from furiosa_runtime import LLM
from furiosa_runtime.npu.artifact import open_artifact
from furiosa_runtime.npu.hardware import RNGD
from furiosa_runtime.npu.isa import Instruction, MemoryPlan, Program, TensorSpec
from furiosa_runtime.npu.step_times import kv_cache_bytes, load_programs
from furiosa_runtime.npu.timing import StepModel

DISPATCH = RNGD.dispatch_cycles / RNGD.clock_hz


def spec(name: str, *shape: int, dtype: str = "f32") -> TensorSpec:
    return TensorSpec(name=name, shape=shape, dtype=dtype)


def decode_attention(batch: int, context: int, block_size: int = 16) -> Program:
    """One decode step's paged attention of a Llama-3.1-8B layer on one PE of tp 8: 4 query
    heads and one KV head of 128, ``context`` key positions per row."""
    values = [spec("q", batch, 4, 1, 128), spec("k", batch, 1, 1, 128), spec("v", batch, 1, 1, 128), spec("pos", batch, 1, dtype="i64"),
              spec("slots", batch, 1, dtype="i64"), spec("tables", batch, context // block_size, dtype="i64"), spec("o", batch, 4, 1, 128)]  # fmt: skip
    attention = Instruction(op="paged_attention", ins=tuple(v.name for v in values[:6]), outs=("o",),
                            attrs={"scale": 128**-0.5, "causal": True, "kv_index": 0})  # fmt: skip
    return Program(name="attention", inputs=tuple(values[:6]), params=(), outputs=("o",), values={v.name: v for v in values},
                   instructions=(attention,), memory_plan=MemoryPlan(arena_bytes=0, offsets={}), uses_kv_cache=True)  # fmt: skip


@pytest.mark.parametrize("kv_dtype", ["f32", "bf16", "f8_e4m3fn"])
def test_the_kv_dtype_scales_a_decode_steps_kv_traffic_and_time(kv_dtype: str):
    program = decode_attention(batch=64, context=4096)
    f32 = StepModel({}, RNGD, block_size=16, weight_dtype="bf16", kv_dtype="f32").program_cost(program)
    cost = StepModel({}, RNGD, block_size=16, weight_dtype="bf16", kv_dtype=kv_dtype).program_cost(program)

    shrink = {"f32": 1, "bf16": 2, "f8_e4m3fn": 4}[kv_dtype]
    assert cost.hbm_bytes == 64 * (4096 + 1) * 2 * 128 * 4 / shrink  # keys and values of the context and the new token
    assert cost.flops == f32.flops  # attention computes in f32 whatever the storage
    assert cost.seconds - DISPATCH == pytest.approx((f32.seconds - DISPATCH) / shrink)  # memory-bound: time follows bytes
    assert cost.seconds - DISPATCH == pytest.approx(cost.hbm_bytes / RNGD.pe_hbm_bandwidth)


def test_the_memory_plan_the_simulator_and_the_timing_agree_on_kv_bytes(tiny_llama_artifact: Path):
    artifact, files = open_artifact(tiny_llama_artifact)
    gen = artifact.generator_config
    programs = load_programs(files, artifact)
    slots = gen.paged_attention_config.num_blocks * gen.paged_attention_config.block_size
    planned = kv_cache_bytes(artifact.pipelines, programs, slots, gen.kv_cache_dtype)

    simulator = LLM(tiny_llama_artifact).engine.simulator
    allocated = {name: sum(layer.nbytes for layer in pe.kv.values()) for name, pe in simulator.pes.items() if pe.kv}
    assert planned == allocated

    # A decode step reads, per token of context, what the plan holds per slot on its PE.
    model = StepModel(programs, RNGD, gen.paged_attention_config.block_size, artifact.model_metadata.weight_dtype, gen.kv_cache_dtype)
    decode = next(p for p in artifact.pipelines if not p.bucket.is_prefill)
    [pe] = planned
    charged = 0.0
    for task in decode.tasks:
        program = programs[task.program]
        specs = {s.name: s for s in (*program.inputs, *program.params, *program.constants)} | program.values
        for inst in (i for i in program.instructions if i.op == "paged_attention"):
            charged += model.instruction_cost(inst, specs, program).hbm_bytes
    assert charged == decode.bucket.batch_size * (decode.bucket.attention_size + 1) * planned[pe] / slots

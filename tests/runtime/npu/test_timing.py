"""The timing face of the simulator: a roofline per instruction, summed over a bucket's step."""

from __future__ import annotations

from pathlib import Path

import pytest

from furiosa_runtime import LLM, SamplingParams
from furiosa_runtime.npu.artifact import smallest_bucket
from furiosa_runtime.npu.hardware import RNGD
from furiosa_runtime.npu.isa import Instruction, MemoryPlan, Program, TensorParallel, TensorSpec
from furiosa_runtime.npu.timing import StepModel, collective_seconds, transfer_seconds

DISPATCH = RNGD.dispatch_cycles / RNGD.clock_hz


def one_linear(rows: int, k: int, n: int) -> Program:
    x, w, y = TensorSpec(name="x", shape=(rows, k), dtype="f32"), TensorSpec(name="p:w", shape=(n, k), dtype="f32"), TensorSpec(name="y", shape=(rows, n), dtype="f32")
    return Program(name="linear", inputs=(x,), params=(w,), outputs=("y",), values={"x": x, "y": y},
                   instructions=(Instruction(op="linear", ins=("x", "p:w"), outs=("y",)),), memory_plan=MemoryPlan(arena_bytes=0, offsets={}))  # fmt: skip


def test_a_linear_is_bound_by_reading_its_weights_until_the_batch_is_large() -> None:
    model = StepModel({}, RNGD, block_size=16, weight_dtype="bf16", kv_dtype="f32")
    k = n = 4096
    weight_seconds = k * n * 2 / RNGD.pe_hbm_bandwidth  # bf16 weights from HBM
    small, large = model.program_cost(one_linear(1, k, n)), model.program_cost(one_linear(8192, k, n))
    assert small.hbm_bytes == k * n * 2 and small.flops == 2 * k * n
    assert small.seconds == pytest.approx(DISPATCH + weight_seconds)  # memory-bound
    assert large.seconds == pytest.approx(DISPATCH + 2 * 8192 * k * n / RNGD.pe_flops)  # compute-bound
    assert large.seconds > weight_seconds


def test_collectives_and_transfers_cost_bandwidth_and_hops() -> None:
    megabyte = 2**20
    assert collective_seconds("all_reduce", megabyte, 1, RNGD) == 0.0  # a group of one talks to nobody
    reduce4, gather4 = collective_seconds("all_reduce", megabyte, 4, RNGD), collective_seconds("all_gather", megabyte, 4, RNGD)
    assert reduce4 - 3 * RNGD.link_latency_seconds == pytest.approx(2 * (gather4 - 3 * RNGD.link_latency_seconds))
    assert transfer_seconds(megabyte, same_device=False, hw=RNGD) > transfer_seconds(megabyte, same_device=True, hw=RNGD)


def test_every_bucket_has_a_step_latency_and_bigger_batches_take_longer(engine_artifact: Path) -> None:
    simulator = LLM(engine_artifact).engine.simulator
    steps = {(p.bucket.phase, p.bucket.batch_size, p.bucket.attention_size): simulator.step_seconds[p.name] for p in simulator.artifact.pipelines}
    assert all(seconds > 0 for seconds in steps.values())
    decode = sorted((batch, seconds) for (phase, batch, _), seconds in steps.items() if phase == "decode")
    assert [s for _, s in decode] == sorted(s for _, s in decode) and decode[0][1] < decode[-1][1]


def test_the_engine_clock_is_one_prefill_then_one_decode_per_further_token(engine_artifact: Path) -> None:
    llm = LLM(engine_artifact)
    simulator, runner = llm.engine.simulator, llm.engine.runner
    [output] = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    prefill = simulator.step_seconds[simulator.pipeline(smallest_bucket(runner.prefill_buckets, 1, 3)).name]
    decode = simulator.step_seconds[simulator.pipeline(smallest_bucket(runner.decode_buckets, 1, 7)).name]
    assert llm.engine.npu_seconds == pytest.approx(prefill + 3 * decode)
    # The request's own modelled timeline: first token after the prefill, done after the decodes.
    assert output.metrics.npu_time_to_first_token == pytest.approx(prefill)
    assert output.metrics.npu_finished_time == pytest.approx(llm.engine.npu_seconds)


def test_a_mixture_of_experts_reads_only_the_experts_its_tokens_are_routed_to() -> None:
    experts, hidden, inner = 8, 64, 128

    def moe(tokens: int) -> Program:
        spec = lambda name, *shape, dtype="f32": TensorSpec(name=name, shape=shape, dtype=dtype)  # noqa: E731
        x, ids, w, y = spec("x", tokens, hidden), spec("ids", tokens, 2, dtype="i64"), spec("w", tokens, 2), spec("y", tokens, hidden)
        gate_up, down = spec("p:gate_up", experts, 2 * inner, hidden), spec("p:down", experts, hidden, inner)
        return Program(name="moe", inputs=(x, ids, w), params=(gate_up, down), outputs=("y",), values={v.name: v for v in (x, ids, w, y)},
                       instructions=(Instruction(op="moe_experts", ins=("x", "ids", "w", "p:gate_up", "p:down"), outs=("y",), attrs={"act": "silu"}),),
                       memory_plan=MemoryPlan(arena_bytes=0, offsets={}))  # fmt: skip

    model = StepModel({}, RNGD, block_size=16, weight_dtype="bf16", kv_dtype="f32")
    all_experts = experts * 3 * inner * hidden * 2
    one_token, many = model.program_cost(moe(1)), model.program_cost(moe(64))
    assert one_token.hbm_bytes == all_experts * 2 // experts and many.hbm_bytes == all_experts
    assert one_token.flops == 2 * 2 * hidden * 3 * inner  # two routed experts, gate/up and down each


def test_a_distributed_norm_moves_row_sums_where_an_all_gather_would_move_rows() -> None:
    rows, width, group = 4096, 4096, 4

    def norm(kind: str) -> Program:
        spec = lambda name, *shape: TensorSpec(name=name, shape=shape, dtype="f32")  # noqa: E731
        sums = 1 if kind == "rms" else 2
        values = [spec("x", rows, width // group), spec("s", rows, sums), spec("t", rows, sums), spec("y", rows, width // group)]
        code = (Instruction(op="norm_partials", ins=("x",), outs=("s",), attrs={"kind": kind}),
                Instruction(op="all_reduce", ins=("s",), outs=("t",), attrs={"group": "tp"}),
                Instruction(op="norm_apply", ins=("x", "t", "p:w"), outs=("y",), attrs={"kind": kind, "eps": 1e-6, "count": width}))
        return Program(name="norm", inputs=values[:1], params=(spec("p:w", width // group),), outputs=("y",),
                       values={v.name: v for v in values}, instructions=code, memory_plan=MemoryPlan(arena_bytes=0, offsets={}),
                       tensor_parallel=TensorParallel(size=group, rank=0))  # fmt: skip

    model = StepModel({}, RNGD, block_size=16, weight_dtype="bf16", kv_dtype="f32")
    rms, layer = model.program_cost(norm("rms")), model.program_cost(norm("layer"))
    local = rows * width // group
    assert rms.flops == 2 * local + 2 * local  # square and add, then scale and weight (a collective computes nothing)
    assert layer.flops == 3 * local + 4 * local and rms.hbm_bytes == width // group * 2  # its slice of the bf16 weight
    all_reduce = collective_seconds("all_reduce", rows * 4, group, RNGD)  # one f32 per row
    assert rms.seconds == pytest.approx(3 * DISPATCH + all_reduce + 4 * local / RNGD.pe_flops)
    assert all_reduce < collective_seconds("all_gather", rows * width * 4, group, RNGD) / 50  # the rows themselves

"""The compiler on real captured graphs: fusion finds the macro-instructions and never
changes what a program computes; and the tensor-parallel pass on hand-written programs:
every rank ends with what the whole program computes (distributed norms, fallbacks, fused
segments)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from furiosa_build import attention
from furiosa_build.capture import capture
from furiosa_build.compiler import LoweringError, ShardSpec, compile_graph, compile_lowered
from furiosa_build.compiler.lower import Lowered
from furiosa_build.compiler.shard import cut, fallback_notes
from furiosa_build.supertask import CaptureUnit, block_signatures, layer_types
from furiosa_runtime.npu.artifact import Bucket
from furiosa_runtime.npu.isa import Instruction, KVCacheLayer, ParamShard, TensorSpec
from furiosa_runtime.npu.simulator import program_run, run_group, run_program
from tests.helpers import compose_spec

BLOCK_SIZE = 4


@pytest.fixture(scope="module")
def llama_prefill():
    hf_config = compose_spec(["model=tiny-llama"]).model.hf_config
    signatures = tuple(dict.fromkeys(block_signatures(layer_types(hf_config), 1)))
    return capture(CaptureUnit(hf_config, Bucket.prefill(2, 8), signatures, BLOCK_SIZE, True))


def test_a_llama_block_fuses_into_npu_macro_instructions(llama_prefill):
    (block,) = llama_prefill.blocks.values()
    program = compile_graph(block.graph.to_json(), "block")
    ops = program.op_histogram()
    assert ops["linear"] == 7 and ops["rms_norm"] == 2 and ops["rotary"] == 2
    assert ops["gated_act"] == 1 and ops["paged_attention"] == 1
    assert "matmul" not in ops and "unary" not in ops
    assert program.uses_kv_cache and program.memory_plan.arena_bytes > 0


@pytest.mark.parametrize("kind", ["embed", "block", "head"])
def test_fusion_does_not_change_results(llama_prefill, kind):
    task = {"embed": llama_prefill.embed, "head": llama_prefill.head}.get(kind) or next(iter(llama_prefill.blocks.values()))
    graph = task.graph.to_json()
    fused, plain = compile_graph(graph, kind), compile_graph(graph, kind, {"fuse": False})
    assert len(fused.instructions) <= len(plain.instructions)
    rng = np.random.default_rng(0)
    inputs = [_random_input(spec, rng) for spec in fused.inputs]
    params = {p.name: rng.standard_normal(p.shape).astype(np.float32) * 0.1 for p in plain.params}
    results = []
    for program in (fused, plain):
        kv = [KVCacheLayer(64, 2, 16, 16, np.float32)]
        results.append(run_program(program, inputs, {k: params[k] for k in (p.name for p in program.params)}, kv, BLOCK_SIZE))
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _random_input(spec, rng) -> np.ndarray:
    if spec.dtype == "i64":
        batch, width = spec.shape
        if width == 2:  # block tables
            return np.arange(1, 1 + batch * width).reshape(batch, width)
        return np.tile(np.arange(width), (batch, 1)) + BLOCK_SIZE  # ids, positions and slots
    return rng.standard_normal(spec.shape).astype(np.float32)


def test_memory_plan_reuses_space_of_dead_values(llama_prefill):
    (block,) = llama_prefill.blocks.values()
    program = compile_graph(block.graph.to_json(), "block")
    total = sum(program.values[v].nbytes for inst in program.instructions for v in inst.outs)
    assert program.memory_plan.arena_bytes < total
    freed = {name for inst in program.instructions for name in inst.free}
    assert not freed & set(program.outputs)


def test_an_architecture_with_its_own_attention_classes_is_refused_in_one_line():
    hf_config = {"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 64,
                 "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 512}  # fmt: skip
    with pytest.raises(LoweringError, match=r"^model.hf_config: FalconForCausalLM is not supported: its attention does not go"):
        capture(CaptureUnit(hf_config, Bucket.prefill(1, 8), (("full_attention",),), BLOCK_SIZE, True))


def test_attention_computed_outside_the_paged_op_is_refused(monkeypatch):
    """A layer that attends by itself would keep no KV cache: wrong from the first decode."""

    def plain_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2), None

    monkeypatch.setattr(attention, "_attention", plain_attention)
    hf_config = compose_spec(["model=tiny-llama"]).model.hf_config
    with pytest.raises(LoweringError, match=r"2 of its 2 attention layers bypass transformers' AttentionInterface"):
        capture(CaptureUnit(hf_config, Bucket.prefill(1, 8), (("full_attention", "full_attention"),), BLOCK_SIZE, True))


# -- tensor-parallel sharding of hand-written programs -------------------------------------------
# Each program is compiled whole and for every rank of a group; the ranks run in lockstep
# (meeting at their collectives) and every rank must end with the whole program's outputs.


def _lowered(inputs: dict[str, tuple], params: dict[str, tuple], code: list[tuple], outputs: list[str]) -> Lowered:
    """A lowered program from (op, ins, out, out_shape, attrs) lines (all f32)."""
    spec = lambda name, shape: TensorSpec(name=name, shape=shape, dtype="f32")  # noqa: E731
    low = Lowered(inputs=[spec(n, s) for n, s in inputs.items()], params=[spec(f"p:{n}", s) for n, s in params.items()], outputs=outputs)
    for value in (*low.inputs, *low.params):
        low.values[value.name] = value
    for op, ins, out, shape, attrs in code:
        low.values[out] = spec(out, shape)
        low.instructions.append(Instruction(op=op, ins=ins, outs=(out,), attrs=attrs))
    return low


def _run_split(make, size: int, kv_heads: int, seed: int = 0, offset: float = 0.0):
    """Run ``make()``'s program whole and split over ``size`` PEs; return the whole run's
    outputs, every rank's outputs and the rank programs."""
    rng = np.random.default_rng(seed)
    whole = compile_lowered(make(), "block")
    inputs = [rng.standard_normal(s.shape).astype(np.float32) + offset for s in whole.inputs]
    params = {p.name: rng.standard_normal(p.shape).astype(np.float32) for p in whole.params}
    want = run_program(whole, inputs, params, [], BLOCK_SIZE)
    programs = [compile_lowered(make(), "block", ShardSpec(size, rank, min(size, kv_heads), 512)) for rank in range(size)]
    runs = []
    for rank, program in enumerate(programs):
        layouts = program.tensor_parallel.params
        mine = {p.name: cut(params[p.name], layouts[p.name[2:]], layouts[p.name[2:]].chunk(rank, size)) if p.name[2:] in layouts else params[p.name]
                for p in program.params}  # fmt: skip
        runs.append(program_run(program, inputs, mine, [], BLOCK_SIZE))
    return want, run_group(runs), programs


def _olmo2_norms() -> Lowered:
    """OLMo2's q/k norms over the whole projection output (the dim tp splits), as RMSNorm
    (with a Gemma-style 1 + w) and as LayerNorm; 4 query heads and 2 KV heads of 4."""
    return _lowered(
        {"x": (3, 16)},
        {"0.self_attn.q_proj.weight": (16, 16), "0.self_attn.q_norm.weight": (16,), "0.self_attn.k_proj.weight": (8, 16),
         "0.self_attn.k_norm.weight": (8,), "0.self_attn.k_norm.bias": (8,)},
        [("linear", ("x", "p:0.self_attn.q_proj.weight"), "q", (3, 16), {"w_layout": "nk"}),
         ("rms_norm", ("q", "p:0.self_attn.q_norm.weight"), "qn", (3, 16), {"eps": 1e-6, "weight_offset": 1.0}),
         ("linear", ("x", "p:0.self_attn.k_proj.weight"), "k", (3, 8), {"w_layout": "nk"}),
         ("layer_norm", ("k", "p:0.self_attn.k_norm.weight", "p:0.self_attn.k_norm.bias"), "kn", (3, 8), {"eps": 1e-5})],
        ["qn", "kn"],
    )  # fmt: skip


@pytest.mark.parametrize("size", [2, 4])
def test_a_norm_over_the_split_dim_all_reduces_row_sums_not_rows(size):
    want, ranks, programs = _run_split(_olmo2_norms, size, kv_heads=2, offset=3.0)  # rows with a mean: LayerNorm's sums
    for got in ranks:
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    for program in programs:
        ops = program.op_histogram()
        assert ops["norm_partials"] == ops["norm_apply"] == 2 and "rms_norm" not in ops and "layer_norm" not in ops
        sums = [program.values[i.outs[0]].shape for i in program.instructions if i.op == "all_reduce"]
        assert sums == [(3, 1), (3, 2)]  # one (RMS) or two (LayerNorm) numbers per row cross the links
        assert ops["all_gather"] == 2  # only the two outputs, which leave the program whole
        layouts = program.tensor_parallel.params
        assert layouts["0.self_attn.q_norm.weight"] == ParamShard(dim=0, parts=size)  # each PE its slice of the weight
        assert layouts["0.self_attn.k_norm.bias"] == ParamShard(dim=0, parts=2)  # 2 KV heads: chunks shared by PEs
        assert program.tensor_parallel.notes == ()


def test_the_unfused_norm_reduces_locally_and_all_reduces():
    """mean(x^2) over the split dim (a norm without fusion) and a sum over replicated KV chunks."""
    make = lambda: _lowered(  # noqa: E731
        {"x": (3, 16)}, {"0.self_attn.q_proj.weight": (16, 16), "0.self_attn.k_proj.weight": (8, 16)},
        [("linear", ("x", "p:0.self_attn.q_proj.weight"), "q", (3, 16), {"w_layout": "nk"}),
         ("binary", ("q",), "q2", (3, 16), {"fn": "pow", "scalar": 2}),
         ("reduce", ("q2",), "ms", (3, 1), {"fn": "mean", "dims": [1], "keepdim": True}),
         ("linear", ("x", "p:0.self_attn.k_proj.weight"), "k", (3, 8), {"w_layout": "nk"}),
         ("reduce", ("k",), "ks", (3,), {"fn": "sum", "dims": [1], "keepdim": False})],
        ["ms", "ks"],
    )  # fmt: skip
    want, ranks, programs = _run_split(make, 4, kv_heads=2)
    for got in ranks:
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert programs[0].op_histogram()["all_reduce"] == 2 and "all_gather" not in programs[0].op_histogram()


def test_an_op_without_a_split_rule_is_all_gathered_computed_whole_and_split_again():
    """softmax over the split features: gathered, computed on every PE, then cut back so that
    o_proj is still row-parallel (its weight split, one all-reduce)."""
    make = lambda: _lowered(  # noqa: E731
        {"x": (3, 16)}, {"0.self_attn.q_proj.weight": (16, 16), "0.self_attn.o_proj.weight": (16, 16)},
        [("linear", ("x", "p:0.self_attn.q_proj.weight"), "q", (3, 16), {"w_layout": "nk"}),
         ("softmax", ("q",), "s", (3, 16), {"dim": 1}),
         ("linear", ("s", "p:0.self_attn.o_proj.weight"), "o", (3, 16), {"w_layout": "nk"})],
        ["o"],
    )  # fmt: skip
    want, ranks, programs = _run_split(make, 4, kv_heads=4)
    for got in ranks:
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    for program in programs:
        assert [i.op for i in program.instructions] == ["linear", "all_gather", "softmax", "slice", "linear", "all_reduce"]
        assert program.tensor_parallel.params["0.self_attn.o_proj.weight"] == ParamShard(dim=1, parts=4)
        (note,) = program.tensor_parallel.notes
        assert note.startswith("softmax s computed whole on every PE (softmax s: over a split dim")
    assert fallback_notes(programs) == [f"block: {note}"]  # the build report's line: once, not once per rank


def test_fallbacks_gather_fused_segments_and_replicated_chunks():
    """GPT-2's fused [q | k | v] (each segment split) and a KV projection with fewer heads
    than PEs (chunks shared by PEs) are both reassembled whole by the all-gather."""
    make = lambda: _lowered(  # noqa: E731
        {"x": (3, 16)}, {"0.attn.c_attn.weight": (16, 24), "0.self_attn.k_proj.weight": (8, 16)},
        [("linear", ("x", "p:0.attn.c_attn.weight"), "qkv", (3, 24), {"w_layout": "kn"}),
         ("reduce", ("qkv",), "top", (3, 1), {"fn": "max", "dims": [1], "keepdim": True}),
         ("linear", ("x", "p:0.self_attn.k_proj.weight"), "k", (3, 8), {"w_layout": "nk"}),
         ("softmax", ("k",), "p", (3, 8), {"dim": 1}),
         ("binary", ("p", "top"), "y", (3, 8), {"fn": "mul"})],
        ["y", "qkv"],
    )  # fmt: skip
    want, ranks, programs = _run_split(make, 4, kv_heads=2)
    for got in ranks:
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    gathers = [i.attrs.get("segments") for i in programs[0].instructions if i.op == "all_gather"]
    assert [[2, 4]] * 3 in gathers  # q, k and v each split over the 4 PEs
    assert [[4, 2]] in gathers  # 2 distinct chunks of k over 4 PEs
    assert len(programs[0].tensor_parallel.notes) == 2  # the max and the softmax
    assert sum(i.op == "all_gather" and i.ins == ("qkv",) for i in programs[0].instructions) == 1  # gathered once, reused as the output


def test_a_fused_qkv_under_gqa_splits_q_over_every_pe_and_k_v_like_the_kv_heads():
    """Phi-3's qkv_proj: [q (4 heads) | k (2 heads) | v (2 heads)] of head size 2 over 4 PEs."""
    make = lambda: _lowered(  # noqa: E731
        {"x": (3, 16)}, {"0.self_attn.qkv_proj.weight": (16, 16)},
        [("linear", ("x", "p:0.self_attn.qkv_proj.weight"), "qkv", (3, 16), {"w_layout": "nk"}),
         ("slice", ("qkv",), "q", (3, 8), {"dim": 1, "start": 0, "end": 8, "step": 1}),
         ("slice", ("qkv",), "k", (3, 4), {"dim": 1, "start": 8, "end": 12, "step": 1}),
         ("slice", ("qkv",), "v", (3, 4), {"dim": 1, "start": 12, "end": 16, "step": 1})],
        ["q", "k", "v", "qkv"],
    )  # fmt: skip
    want, ranks, programs = _run_split(make, 4, kv_heads=2)
    for got in ranks:
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    layout = programs[1].tensor_parallel.params["0.self_attn.qkv_proj.weight"]
    assert layout == ParamShard(dim=0, parts=4, segments=3, fused=((8, 4), (4, 2), (4, 2)))
    rows = np.arange(16)[:, None]
    assert cut(rows, layout, 1).ravel().tolist() == [2, 3, 8, 9, 12, 13]  # q head 1, the KV head it reads
    assert programs[1].values["qkv"].shape == (3, 6) and programs[1].tensor_parallel.notes == ()

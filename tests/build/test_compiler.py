"""The compiler on real captured graphs: fusion finds the macro-instructions and never
changes what a program computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from furiosa_build import attention
from furiosa_build.capture import capture
from furiosa_build.compiler import LoweringError, compile_graph
from furiosa_build.supertask import CaptureUnit, block_signatures, layer_types
from furiosa_runtime.artifact import Bucket
from furiosa_runtime.isa import KVCacheLayer
from furiosa_runtime.simulator import run_program
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

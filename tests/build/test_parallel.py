"""Building for tensor, pipeline and data parallelism, read as usage examples.

``parallel.tensor_parallel_size`` splits every program Megatron-style over a group of
PEs (each rank gets its own program and its own weight shards), ``pipeline_parallel_size``
and ``num_blocks_per_pp_stage`` put decoder layers on stages with recorded transfers, and
``data_parallel_size`` (null: inferred) fills the remaining PEs of ``devices`` with replicas.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from furiosa_build import __main__ as entry
from furiosa_build import compile as compile_stage
from furiosa_build.builder import ArtifactBuilder
from furiosa_build.compiler.shard import cut
from furiosa_build.config import ConfigError
from furiosa_runtime import LLM, SamplingParams
from furiosa_runtime.npu.artifact import Artifact, load_artifact
from furiosa_runtime.npu.isa import ParamShard, Program
from tests.helpers import build, compose_spec

LLAMA = ["model=tiny-llama", "buckets=tiny"]  # 4 query heads, 2 KV heads, 2 layers
MISTRAL = ["model=tiny-mistral", "buckets=tiny"]  # 8 query heads, 2 KV heads, 4 layers
TP4 = ["parallel.devices=npu:0:0-3", "parallel.tensor_parallel_size=4"]


@pytest.fixture(scope="module")
def tp4(tmp_path_factory, cache_dir) -> tuple[Path, object]:
    """tiny-llama split over 4 PEs: more PEs than KV heads, so KV heads are replicated."""
    out = tmp_path_factory.mktemp("parallel") / "llama-tp4"
    return out, build([*LLAMA, *TP4], out, cache_dir)


@pytest.fixture(scope="module")
def staged(tmp_path_factory, cache_dir) -> Path:
    """tiny-mistral on three uneven pipeline stages, one PE each."""
    out = tmp_path_factory.mktemp("parallel") / "mistral-pp3"
    build([*MISTRAL, "parallel.devices=npu:0:0-2", "parallel.pipeline_parallel_size=3",
           "parallel.num_blocks_per_pp_stage=[1,2,1]"], out, cache_dir)  # fmt: skip
    return out


def _program(root: Path, key: str) -> Program:
    return Program.model_validate(json.loads((root / "programs" / f"{key}.json").read_text()))


def _tasks(artifact: Artifact, name: str):
    return [t for t in artifact.pipelines[0].tasks if t.name == name]


def test_each_rank_runs_its_own_program_with_explicit_all_reduces(tp4) -> None:
    root, _ = tp4
    artifact = load_artifact(root)
    block = _tasks(artifact, "block.0")
    assert [(t.shard, t.device) for t in block] == [(r, f"npu:0:{r}") for r in range(4)]
    programs = [_program(root, t.program) for t in block]
    assert len({t.program for t in block}) == 4  # one program per rank
    for rank, program in enumerate(programs):
        assert program.tensor_parallel.rank == rank and program.tensor_parallel.size == 4
        assert program.op_histogram()["all_reduce"] == 2  # after o_proj and after down_proj
        attention = next(i for i in program.instructions if i.op == "paged_attention")
        q, k = (program.values[name].shape for name in attention.ins[:2])
        assert (q[1], k[1]) == (1, 1)  # 4 heads / 4 ranks; 2 KV heads, each shared by a pair of ranks
    head = _program(root, _tasks(artifact, "head")[0].program)
    assert "all_gather" in head.op_histogram()  # vocab-parallel logits gathered
    embed = _program(root, _tasks(artifact, "embed")[0].program)
    assert "all_reduce" in embed.op_histogram()  # vocab-parallel embedding


def test_blockwise_reuse_holds_per_rank(tp4) -> None:
    root, _ = tp4
    artifact = load_artifact(root)
    for pipeline in artifact.pipelines:
        for rank in range(4):
            blocks = {t.program for t in pipeline.tasks if t.kind == "block" and t.shard == rank}
            assert len(blocks) == 1  # one program reused by every layer
    block_programs = {t.program for p in artifact.pipelines for t in p.tasks if t.kind == "block"}
    assert len(block_programs) == len(artifact.pipelines) * 4  # one per (bucket, rank)


def test_every_pe_stores_only_its_shards(tp4) -> None:
    root, report = tp4
    artifact = load_artifact(root)
    tensors = load_file(root / "params.safetensors")
    q = "model.layers.0.self_attn.q_proj.weight"
    ranks = _tasks(artifact, "block.0")
    assert [t.params["0.self_attn.q_proj.weight"] for t in ranks] == [f"{q}@tp{r}/4" for r in range(4)]
    assert [t.params["0.self_attn.k_proj.weight"] for t in ranks][:2] == ["model.layers.0.self_attn.k_proj.weight@tp0/2"] * 2
    assert tensors[f"{q}@tp1/4"].shape == (16, 64)  # rows 16-31 of the (64, 64) projection
    assert q not in tensors  # the whole tensor is not shipped
    weights = report.weights
    assert set(weights.per_pe) == {f"npu:0:{r}" for r in range(4)}
    for used in weights.per_pe.values():
        assert used == weights.total / 4 + weights.replicated
    # Replicated: the norms, and half of k/v_proj (2 KV heads over 4 ranks).
    assert weights.replicated < 0.1 * weights.total
    assert "weights per PE" in report.render() and "tp=4" in report.render()


def test_olmo2_norms_over_the_split_heads_become_distributed_norms(tmp_path, cache_dir) -> None:
    """OLMo2 normalises q and k over the whole projection output, which tp splits by heads:
    each rank sums its slice, the row sums are all-reduced, each rank scales its slice."""
    root = tmp_path / "olmo2"
    report = build(["model=tiny-olmo2", "buckets=tiny", *TP4], root, cache_dir)
    for task in _tasks(load_artifact(root), "block.0"):
        program = _program(root, task.program)
        ops = program.op_histogram()
        assert ops["norm_partials"] == ops["norm_apply"] == 2 and "all_gather" not in ops
        assert ops["all_reduce"] == 4  # the q and k norms' row sums, after o_proj and after down_proj
        layouts = program.tensor_parallel.params
        assert layouts["0.self_attn.q_norm.weight"] == ParamShard(dim=0, parts=4)  # cut like q
        assert layouts["0.self_attn.k_norm.weight"] == ParamShard(dim=0, parts=2)  # like k: 2 KV heads over 4 ranks
    assert report.sharding == [] and "computed whole" not in report.render()


def test_an_instruction_without_a_split_rule_is_computed_whole_and_reported(monkeypatch, tp4, tmp_path, cache_dir) -> None:
    """Without its rule, rotary embedding falls back: q and k are all-gathered, rotated whole
    on every rank and cut back for attention.  Same tokens; one report line says so."""
    shard = importlib.import_module("furiosa_build.compiler.shard")  # the package's ``shard`` is the function
    monkeypatch.setattr(shard, "ELEMENTWISE", shard.ELEMENTWISE - {"rotary"})
    monkeypatch.setattr(compile_stage, "COMPILER_VERSION", "test-without-a-rotary-rule")  # its programs cached apart
    root = tmp_path / "fallback"
    report = build([*LLAMA, *TP4, "build.backend=sequential"], root, cache_dir)  # compiled in this process
    assert len(report.sharding) == 2  # q and k, once for all ranks, layers and buckets
    assert all(re.fullmatch(r"block: rotary \S+ computed whole on every PE \(no rule splits a rotary\)", n) for n in report.sharding)
    assert "tensor parallelism: all-gathered and computed whole on every PE: block: rotary" in report.render()
    block = _program(root, _tasks(load_artifact(root), "block.0")[1].program)
    assert block.op_histogram()["all_gather"] == 2 and block.op_histogram()["paged_attention"] == 1
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 17, 33, 101, 7, 9]}]
    want = LLM(tp4[0]).generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids
    assert LLM(root).generate(prompts, params, use_tqdm=False)[0].outputs[0].token_ids == want


def test_column_chunks_keep_fused_segments_together() -> None:
    """GPT-2's c_attn yields [q | k | v]: each rank takes its chunk of every segment."""
    full = np.arange(12).reshape(1, 12)  # q = 0..3, k = 4..7, v = 8..11
    chunk = cut(full, ParamShard(dim=1, parts=2, segments=3), 1)
    assert chunk.tolist() == [[2, 3, 6, 7, 10, 11]]


def test_pipeline_stages_and_transfers_are_recorded(staged) -> None:
    artifact = load_artifact(staged)
    assert artifact.parallel_config.num_blocks_per_pp_stage == [1, 2, 1]
    pipeline = artifact.pipelines[0]
    placed = [(t.name, t.stage, t.device) for t in pipeline.tasks]
    assert placed == [("embed", 0, "npu:0:0"), ("block.0", 0, "npu:0:0"), ("block.1", 1, "npu:0:1"),
                      ("block.2", 1, "npu:0:1"), ("block.3", 2, "npu:0:2"), ("head", 2, "npu:0:2")]  # fmt: skip
    sends = {(t.value, t.src_stage, t.dst_stage, t.after_task) for t in pipeline.transfers}
    assert ("hidden", 0, 1, "block.0") in sends and ("hidden", 1, 2, "block.2") in sends
    assert {t.value for t in pipeline.transfers if t.dst_stage == 2} >= {"hidden", "aux:mul_1"}  # rotary tables too


def test_data_parallel_size_is_inferred_from_the_devices(tmp_path, cache_dir) -> None:
    build([*LLAMA, "parallel.devices='npu:0,npu:1'", "parallel.tensor_parallel_size=4",
           "parallel.pipeline_parallel_size=2"], tmp_path / "a", cache_dir)  # fmt: skip
    config = load_artifact(tmp_path / "a").parallel_config
    assert (config.tensor_parallel_size, config.pipeline_parallel_size, config.data_parallel_size) == (4, 2, 2)
    assert config.num_blocks_per_pp_stage == [1, 1]


# -- invalid combinations: one line naming the field, before any work -------------------------

CONFIG_ERRORS = [
    (["parallel.devices=npu:0:0-1", "parallel.tensor_parallel_size=4"],
     "parallel.tensor_parallel_size: 4 is larger than the 2 PEs of devices 'npu:0:0-1'"),
    (["parallel.devices=npu:0", "parallel.tensor_parallel_size=2", "parallel.data_parallel_size=2"],
     "parallel.data_parallel_size: tensor_parallel_size * pipeline_parallel_size * data_parallel_size = 2*1*2 = 4 "
     "does not match the 8 PEs"),
    (["parallel.devices=npu:0:0-2", "parallel.tensor_parallel_size=2"],
     "parallel.data_parallel_size: cannot fill the 3 PEs"),
    (["parallel.devices=npu:0:0-1", "parallel.pipeline_parallel_size=4"],
     "parallel.pipeline_parallel_size: 4 stages of 1 PEs need 4 PEs"),
    (["parallel.devices=npu:0:0-1", "parallel.pipeline_parallel_size=2", "parallel.num_blocks_per_pp_stage=[4]"],
     "parallel.num_blocks_per_pp_stage: expected 2 positive layer counts"),
    (["parallel.devices=npu0"], "parallel.devices: 'npu0' is not a device; use npu:N, npu:N:P or npu:N:P-Q"),
    (["parallel.devices=npu:0:5-2"], "parallel.devices: 'npu:0:5-2' is a reversed PE range; write the lower PE first (npu:0:2-5)"),
    (["parallel.devices='npu:0,npu:0:1'"], "parallel.devices: npu:0:1 listed more than once"),
    (["parallel.tensor_parallel_size=6"], "parallel.tensor_parallel_size: must be a power of two"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "expected"), CONFIG_ERRORS, ids=[e.split(":")[0] + str(i) for i, (_, e) in enumerate(CONFIG_ERRORS)])
def test_invalid_combination_is_one_line_naming_the_field(overrides, expected) -> None:
    with pytest.raises(ConfigError) as error:
        compose_spec([*LLAMA, *overrides])
    assert str(error.value).startswith(expected), error.value
    assert "\n" not in str(error.value)


MODEL_ERRORS = [
    (["model=tiny-gpt2", "parallel.devices=npu:0", "parallel.tensor_parallel_size=8"],
     "parallel.tensor_parallel_size: 8 does not divide the model's 4 attention heads; allowed here: 1, 2, 4"),
    ([*MISTRAL[:1], "parallel.devices=npu:0:0-1", "parallel.pipeline_parallel_size=2", "parallel.num_blocks_per_pp_stage=[1,2]"],
     "parallel.num_blocks_per_pp_stage: [1, 2] sums to 3, but the model has 4 decoder layers"),
    ([*MISTRAL[:1], "parallel.devices=npu:0:0-5", "parallel.pipeline_parallel_size=6"],
     "parallel.pipeline_parallel_size: 6 stages for a model of 4 decoder layers"),
    ([*MISTRAL[:1], "parallel.devices=npu:0:0-1", "parallel.pipeline_parallel_size=2", "build.num_blocks_per_supertask=3"],
     "parallel.num_blocks_per_pp_stage: stages [2, 2] would split a supertask"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "expected"), MODEL_ERRORS, ids=["heads", "sum", "depth", "supertask"])
def test_model_misfit_is_refused_before_any_work(overrides, expected, tmp_path) -> None:
    spec = compose_spec([*overrides, "buckets=tiny", f"build.save_dir={tmp_path / 'out'}", f"build.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ConfigError) as error:
        ArtifactBuilder.from_spec(spec).build_from_spec()
    assert str(error.value).startswith(expected), error.value
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_smollm2_heads_allow_only_tp_1(capsys) -> None:
    """SmolLM2-135M has 9 query heads and 3 KV heads: no power of two above 1 divides them."""
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["parallel.devices=npu:0:0-1", "parallel.tensor_parallel_size=2", "build.dry_run=true"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: parallel.tensor_parallel_size: 2 does not divide the model's 9 attention heads; "
                   "allowed here: 1")  # fmt: skip

"""What a build promises: caching, blockwise reuse, determinism, atomic output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from furiosa_build.builder import ArtifactBuilder
from furiosa_build.config import ConfigError
from furiosa_build.load import LoadError
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import REPO, build, compose_spec

TINY = ["model=tiny-llama", "buckets=tiny"]


def _program_keys(artifact: Path) -> set[str]:
    return {p.stem for p in (artifact / "programs").iterdir()}


def test_rebuild_of_unchanged_config_compiles_nothing(tmp_path):
    cold = build(TINY, tmp_path / "a", tmp_path / "cache")
    warm = build(TINY, tmp_path / "a", tmp_path / "cache")
    assert cold.compile.compiled == cold.compile.unique > 0
    assert warm.compile.compiled == 0
    assert warm.compile.cached == cold.compile.unique
    assert "0 compiled" in warm.render()


def test_adding_a_decode_bucket_compiles_only_its_programs(tmp_path):
    cache = tmp_path / "cache"
    before = build([*TINY, "buckets.decode=[[1,64]]"], tmp_path / "a", cache)
    after = build([*TINY, "buckets.decode=[[1,64],[2,64]]"], tmp_path / "b", cache)
    new_pipeline = load_artifact(tmp_path / "b").pipelines[-1]
    assert new_pipeline.bucket.batch_size == 2 and not new_pipeline.bucket.is_prefill
    new_programs = {t.program for t in new_pipeline.tasks} - _program_keys(tmp_path / "a")
    assert after.compile.compiled == len(new_programs) == 3  # embed, block, head of (2, 64)
    assert after.compile.cached == before.compile.unique


def test_block_programs_do_not_grow_with_depth(tmp_path):
    shallow = build([*TINY, "model.num_hidden_layers=2"], tmp_path / "l2", tmp_path / "cache")
    deep = build([*TINY, "model.num_hidden_layers=6"], tmp_path / "l6", tmp_path / "cache")
    assert deep.compile.unique == shallow.compile.unique
    for pipeline in load_artifact(tmp_path / "l6").pipelines:
        blocks = [t for t in pipeline.tasks if t.kind == "block"]
        assert len(blocks) == 6 and len({t.program for t in blocks}) == 1
        assert [t.kv_layers for t in blocks] == [[i] for i in range(6)]


def test_without_blockwise_compile_every_layer_gets_its_own_program(tmp_path):
    report = build([*TINY, "model.num_hidden_layers=3", "build.use_blockwise_compile=false"], tmp_path / "a", None)
    pipeline = load_artifact(tmp_path / "a").pipelines[0]
    assert len({t.program for t in pipeline.tasks if t.kind == "block"}) == 3
    assert report.compile.unique == 4 * (2 + 3)


def test_supertasks_of_several_blocks(tmp_path):
    build([*TINY, "model.num_hidden_layers=5", "build.num_blocks_per_supertask=2"], tmp_path / "a", tmp_path / "c")
    pipeline = load_artifact(tmp_path / "a").pipelines[0]
    assert [t.kv_layers for t in pipeline.tasks if t.kind == "block"] == [[0, 1], [2, 3], [4]]


def test_two_builds_are_byte_identical_but_for_id_and_time(tmp_path):
    build(TINY, tmp_path / "one", None)
    build(TINY, tmp_path / "two", None)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for rel in files:
        a, b = (tmp_path / "one" / rel).read_bytes(), (tmp_path / "two" / rel).read_bytes()
        if rel.name == "artifact.json":
            a, b = (_without_identity(json.loads(x)) for x in (a, b))
        assert a == b, rel


def _without_identity(doc: dict) -> dict:
    doc["metadata"].pop("artifact_id")
    doc["metadata"].pop("timestamp")
    return doc


def test_dry_run_plans_without_compiling(tmp_path):
    spec = compose_spec([*TINY, f"build.cache_dir={tmp_path / 'cache'}", f"build.save_dir={tmp_path / 'a'}", "build.progress=false"])
    plan = ArtifactBuilder.from_spec(spec).plan()
    assert plan.unique > 0 and plan.cached == 0
    assert len(plan.pipelines) == 4 and plan.supertasks_per_pipeline == 4
    assert not (tmp_path / "a").exists()
    ArtifactBuilder.from_spec(spec).build_from_spec()
    assert ArtifactBuilder.from_spec(spec).plan().cached == plan.unique
    assert "to compile" in plan.render()


def test_a_corrupted_cache_entry_is_recompiled_with_a_warning(tmp_path):
    cache = tmp_path / "cache"
    cold = build(TINY, tmp_path / "a", cache)
    entry = next((cache / "programs").rglob("*.json"))
    entry.write_bytes(entry.read_bytes()[:-10])
    with pytest.warns(UserWarning, match="corrupted"):
        warm = build(TINY, tmp_path / "a", cache)
    assert warm.compile.compiled == 1 and warm.compile.cached == cold.compile.unique - 1


def test_float32_weights_need_auto_bfloat16_cast_and_nothing_is_written(tmp_path):
    with pytest.raises(LoadError, match="auto_bfloat16_cast"):
        build([*TINY, "model.hf_config.dtype=float32"], tmp_path / "a", tmp_path / "cache")
    assert not (tmp_path / "a").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    build([*TINY, "model.hf_config.dtype=float32", "model.auto_bfloat16_cast=true"], tmp_path / "a", tmp_path / "cache")
    assert (tmp_path / "a" / "artifact.json").is_file()


def test_builder_python_api_matches_the_reference_names(tmp_path):
    spec = compose_spec(["model=tiny-llama"])
    builder = ArtifactBuilder(
        None, "npu:0", "api-llama", hf_config=spec.model.hf_config, seed_for_random_weight=0,
        tensor_parallel_size=1, prefill_buckets=[(1, 32)], decode_buckets=[(1, 64)], max_seq_len_to_capture=64,
        paged_attention_block_size=8, calculate_logit_only_for_last_token=True,
    )  # fmt: skip
    report = builder.build(tmp_path / "api", num_pipeline_builder_workers=2, num_compile_workers=2, cache_dir=None, progress=False)
    artifact = load_artifact(tmp_path / "api")
    assert report.pipelines == 2 and artifact.metadata.name == "api-llama"
    assert [p.name for p in artifact.pipelines] == ["api-llama-kv0-b1-attn32", "api-llama-kv63-b1-attn64"]
    assert [(b.batch_size, b.attention_size) for b, _ in report.step_seconds] == [(1, 32), (1, 64)]
    assert all(seconds > 0 for _, seconds in report.step_seconds) and "modelled step latency" in report.render()
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        ArtifactBuilder(None, "npu:0", "x", hf_config=spec.model.hf_config, seed_for_random_weight=0, tensor_parallel_size=3)


@pytest.mark.slow
def test_command_line_build_with_hydra_overrides(tmp_path):
    """The issue's example command, with worker pools, end to end in a subprocess."""
    out = tmp_path / "cli"
    cmd = [
        sys.executable, "-m", "furiosa_build", "model=tiny-llama", "buckets.decode=[[1,256],[4,256]]",
        "build.num_compile_workers=2", "build.num_pipeline_builder_workers=2", f"build.save_dir={out}",
        f"build.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stderr
    assert "pipelines: 3" in result.stdout
    assert {p.bucket.batch_size for p in load_artifact(out).pipelines} == {1, 4}


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO)}

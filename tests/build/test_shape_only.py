"""Shape-only builds (``build.weights=none``, ``furiosa-llm build --no-weights``): the same
programs and plan as a build with weights, from the model's config alone, and an artifact
that refuses to generate in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from furiosa_build.cli import main as furiosa_llm
from furiosa_build.config import ConfigError
from furiosa_runtime import LLM
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import build, compose_spec


def _programs(artifact: Path) -> dict[str, str]:
    manifest = json.loads((artifact / "artifact.json").read_text())["manifest"]
    return {rel: digest for rel, digest in manifest.items() if rel.startswith("programs/")}


def test_a_shape_only_build_compiles_what_a_full_build_compiles(tmp_path: Path, tiny_llama_artifact: Path, cache_dir: Path):
    report = build(["model=tiny-llama", "buckets=tiny", "build.weights=none"], tmp_path / "shapes", cache_dir)

    artifact = load_artifact(tmp_path / "shapes")
    assert artifact.shape_only and artifact.param_files == []
    assert not (tmp_path / "shapes" / "params.safetensors").exists()
    assert _programs(tmp_path / "shapes") == _programs(tiny_llama_artifact)
    assert report.weights is not None and sum(report.weights.per_pe.values()) > 0  # memory planned from the shapes
    assert report.step_seconds  # and the timing model priced every bucket


def test_a_shape_only_artifact_refuses_to_generate(tmp_path: Path, cache_dir: Path):
    build(["model=tiny-llama", "buckets=tiny", "build.weights=none"], tmp_path / "shapes", cache_dir)

    with pytest.raises(ValueError, match=r"built without weights \(build.weights=none\).*simulated, not run"):
        LLM(tmp_path / "shapes")


def test_no_weights_reads_only_the_config_of_a_model_folder(tmp_path: Path, cache_dir: Path, capsys):
    hf_config = dict(compose_spec(["model=tiny-llama", "buckets=tiny"]).model.hf_config)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file: a shape-only build never opens it")

    status = furiosa_llm(["build", str(folder), str(tmp_path / "out"), "-pb", "1,32", "-db", "2,64",
                          "--no-weights", "--cache-dir", str(cache_dir)])  # fmt: skip

    assert status == 0, capsys.readouterr().err
    assert load_artifact(tmp_path / "out").shape_only


def test_weights_none_with_a_param_file_is_refused():
    with pytest.raises(ConfigError, match=r"^build.param_file_path: .*shape-only"):
        compose_spec(["model=tiny-llama", "buckets=tiny", "build.weights=none", "build.param_file_path=/tmp/w.safetensors"])


def test_weights_takes_included_or_none():
    with pytest.raises(ConfigError, match=r"^build.weights: .*included.*none"):
        compose_spec(["model=tiny-llama", "buckets=tiny", "build.weights=some"])

"""The ``hardware`` config group: the NPU a build is planned and timed for, recorded in the
artifact, checked like every other section."""

from __future__ import annotations

from pathlib import Path

import pytest

from furiosa_build.config import ConfigError
from furiosa_runtime.npu.artifact import load_artifact
from furiosa_runtime.npu.hardware import RNGD
from tests.helpers import build, compose_spec

TINY = ["model=tiny-llama", "buckets=tiny"]


def test_the_default_is_rngd_and_the_artifact_records_it(tiny_llama_artifact: Path):
    assert compose_spec(TINY).hardware == RNGD
    assert load_artifact(tiny_llama_artifact).hardware == RNGD


def test_another_description_changes_the_timing_not_the_programs(tmp_path: Path, tiny_llama_artifact: Path, cache_dir: Path):
    base = build([*TINY, "build.weights=none"], tmp_path / "rngd", cache_dir)
    faster = build([*TINY, "build.weights=none", "hardware.name=RNGD-2xHBM", "hardware.hbm_bandwidth=3.0e12"],
                   tmp_path / "fast", cache_dir)  # fmt: skip

    assert load_artifact(tmp_path / "fast").hardware.hbm_bandwidth == 3.0e12
    assert load_artifact(tmp_path / "fast").manifest.keys() == load_artifact(tmp_path / "rngd").manifest.keys()
    for (bucket, slow), (same, fast) in zip(base.step_seconds, faster.step_seconds, strict=True):
        assert bucket == same and fast < slow  # tiny decode steps are bound by weight and KV reads


def test_more_pes_per_device_allow_wider_tensor_parallelism():
    wide = ["parallel.devices=npu:0", "model.hf_config.num_attention_heads=16", "model.hf_config.num_key_value_heads=16"]
    with pytest.raises(ConfigError, match=r"^parallel.tensor_parallel_size: 16 is larger than the 8 PEs"):
        compose_spec([*TINY, *wide, "parallel.tensor_parallel_size=16"])
    spec = compose_spec([*TINY, *wide, "parallel.tensor_parallel_size=16", "hardware.pes_per_device=16"])
    assert spec.parallel.mesh(spec.hardware).tp == 16


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hardware.hbm_efficiency=2", r"^hardware.hbm_efficiency: must be less than or equal to 1"),
        ("hardware.bf16_tflops=0", r"^hardware.bf16_tflops: must be greater than 0"),
        ("hardware.pes_per_device=0", r"^hardware.pes_per_device: must be greater than or equal to 1"),
    ],
)
def test_bad_figures_get_one_line(override: str, message: str):
    with pytest.raises(ConfigError, match=message):
        compose_spec([*TINY, override])

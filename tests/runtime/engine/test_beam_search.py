"""Beam search: the search alone against transformers, the beams' shared KV blocks, and the
requests it refuses."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from furiosa_runtime import LLM, BeamSearchParams, SamplingParams
from furiosa_runtime.engine.beam_search import BeamSearch
from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.engine.sampler import log_softmax
from tests.helpers import build

EOS = 3


@dataclass
class Beam:
    output_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list = field(default_factory=list)


@pytest.fixture(scope="module")
def small_vocab_model():
    """A transformers Llama with 64 tokens, so EOS often competes: every stopping rule acts."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=64, eos_token_id=EOS, pad_token_id=0)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend
    yield AutoModelForCausalLM.from_config(config).eval()
    torch.set_num_threads(threads)


def search_with(model, prompt: list[int], k: int, max_tokens: int, length_penalty: float, early_stopping: bool | str):
    """``BeamSearch`` driven by a transformers model's logits (the whole context of every beam,
    all of one length, in one batch each step)."""
    import torch

    search, beams = BeamSearch(k, max_tokens, {EOS}, length_penalty, early_stopping), [Beam()]
    while not search.done:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + b.output_token_ids for b in beams])).logits[:, -1].numpy()  # (beams, vocab)
        rows = np.stack([log_softmax(row) for row in logits])
        choices = search.step(beams, rows, lambda beam, token: {})
        beams = [Beam([*beams[b].output_token_ids, t], beams[b].cumulative_logprob + float(rows[b, t])) for b, t in choices]
    return search.best(k)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(1.0, False), (0.5, True), (2.0, "never"), (-1.0, False), (1.0, "never")])
def test_search_picks_what_transformers_picks(small_vocab_model, k, length_penalty, early_stopping):
    import torch

    for seed in range(4):
        prompt = np.random.default_rng(seed).integers(4, 64, size=seed % 5 + 1).tolist()
        out = small_vocab_model.generate(
            torch.tensor([prompt]), num_beams=k, num_return_sequences=k, do_sample=False, max_new_tokens=10, pad_token_id=0,
            length_penalty=length_penalty, early_stopping=early_stopping, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        want = [row[: row.index(EOS) + 1] if EOS in row else row for row in out.sequences[:, len(prompt) :].tolist()]
        got = search_with(small_vocab_model, prompt, k, 10, length_penalty, early_stopping)
        assert [h.token_ids for h in got] == want
        assert np.allclose([h.score for h in got], out.sequences_scores.numpy(), atol=1e-5)


def test_beams_share_the_prompts_kv_blocks(tiny_llama_artifact):
    """Right after the prompt, 4 beams hold its 2 full blocks once plus a copy each of the
    partly filled third: 6 blocks where 4 independent requests hold 12."""
    prompt = list(range(5, 25))  # 20 tokens: 2 full blocks of 8 and 4 tokens in a third
    beams = EngineCore(tiny_llama_artifact, enable_prefix_caching=False)
    beams.add_request("beams", None, prompt, SamplingParams(n=4, use_beam_search=True, temperature=0, max_tokens=6))
    beams.step()
    assert len(beams.groups["beams"].seqs) == 4
    alone = EngineCore(tiny_llama_artifact, enable_prefix_caching=False)
    for i in range(4):
        alone.add_request(str(i), None, prompt, SamplingParams(temperature=0, max_tokens=6))
    while any(not seq.output_token_ids for group in alone.groups.values() for seq in group.seqs):
        alone.step()
    used = [engine.blocks.num_usable - engine.blocks.num_free for engine in (beams, alone)]
    assert used == [6, 12]
    while beams.has_unfinished_requests():
        beams.step()
        beams.blocks.check_invariants()
    assert beams.blocks.num_free == beams.blocks.num_usable


def test_beam_search_on_a_busy_engine_matches_it_alone(tiny_llama_artifact):
    """Beams batched with other requests, and with another beam search, find the same beams."""
    llm = LLM(tiny_llama_artifact)
    params = SamplingParams(n=3, use_beam_search=True, temperature=0, max_tokens=6, length_penalty=0.8)
    alone = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in ([5, 9, 11], [40, 41])]
    mixed = llm.generate([{"prompt_token_ids": [5, 9, 11]}, {"prompt_token_ids": [7] * 12}, {"prompt_token_ids": [40, 41]}],
                         [params, SamplingParams(temperature=0, max_tokens=9), params], use_tqdm=False)  # fmt: skip
    for one, together in zip(alone, [mixed[0], mixed[2]]):
        assert [c.token_ids for c in together.outputs] == [c.token_ids for c in one.outputs]


@pytest.fixture(scope="module")
def beam_artifact(tmp_path_factory, cache_dir):
    """tiny-llama built for beam width 2 (kv_cache_sharing_across_beams_config): its decode
    buckets (1, 64) and (2, 64) become (2, 64) and (4, 64)."""
    out = tmp_path_factory.mktemp("beams") / "tiny-llama-beams"
    build(["model=tiny-llama", "buckets=tiny", "buckets.kv_cache_sharing_across_beams_config={beam_width: 2, max_new_tokens: 8}"],
          out, cache_dir)  # fmt: skip
    return out


def test_beam_artifact_records_its_width_and_serves_it(beam_artifact, tiny_llama_artifact):
    llm = LLM(beam_artifact)
    generator = llm.engine.artifact.generator_config
    assert [b.batch_size for b in generator.decode_buckets] == [2, 4]
    assert generator.kv_cache_sharing_across_beams_config.beam_width == 2
    params = BeamSearchParams(beam_width=2, max_tokens=8)
    want = LLM(tiny_llama_artifact).beam_search([[5, 9, 11]], params)[0]
    assert [s.tokens for s in llm.beam_search([[5, 9, 11]], params)[0].sequences] == [s.tokens for s in want.sequences]


@pytest.mark.parametrize(("params", "message"), [
    (BeamSearchParams(beam_width=4, max_tokens=8), "best_of: beam width 4 does not match this artifact's decode buckets"),
    (BeamSearchParams(beam_width=2, max_tokens=9), "max_tokens: at most 8 with beam search on this artifact"),
    (BeamSearchParams(beam_width=2, max_tokens=8, temperature=0.7), "temperature must be 0.0 with use_beam_search"),
])  # fmt: skip
def test_beam_artifact_refuses_other_beam_searches_in_one_line(beam_artifact, params, message):
    with pytest.raises(ValueError, match=message) as info:
        LLM(beam_artifact).beam_search([[5, 9, 11]], params)
    assert "\n" not in str(info.value)


def test_beam_search_is_refused_on_an_embedding_artifact(tiny_bert_artifact):
    with pytest.raises(ValueError, match="LLM.generate") as info:
        LLM(tiny_bert_artifact).beam_search([[5, 9, 11]], BeamSearchParams(beam_width=2, max_tokens=4))
    assert "\n" not in str(info.value)


def test_more_beams_than_the_kv_cache_holds_are_refused(tiny_llama_artifact):
    with pytest.raises(ValueError, match=r"^best_of: 16 beams of 64 tokens may need 128 KV blocks, the cache has 16"):
        LLM(tiny_llama_artifact).beam_search([[5, 9, 11]], BeamSearchParams(beam_width=16, max_tokens=61))


def test_beam_searches_that_overflow_the_kv_cache_together_each_finish_as_alone(tiny_llama_artifact):
    """Three beam searches that fit the 16-block cache one by one, not together: the older
    requests go first, the youngest's beams are preempted and recomputed, and every search
    finds the beams it finds alone, with every block free at the end."""
    llm = LLM(tiny_llama_artifact)
    prompts = [list(range(3, 18)), list(range(40, 54)), list(range(90, 102))]
    params = [SamplingParams(n=4, use_beam_search=True, temperature=0, max_tokens=16),
              SamplingParams(n=4, use_beam_search=True, temperature=0, max_tokens=7, length_penalty=0.5),
              SamplingParams(n=2, use_beam_search=True, temperature=0, max_tokens=20)]  # fmt: skip
    alone = [llm.generate({"prompt_token_ids": p}, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    together = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    for one, mixed in zip(alone, together):
        assert [c.token_ids for c in mixed.outputs] == [c.token_ids for c in one.outputs]
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable

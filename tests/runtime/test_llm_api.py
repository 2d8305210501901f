"""LLM as a vLLM user drives it: prompts in every form, SamplingParams features, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from furiosa_runtime import LLM, ContextLengthExceededError, Logprob, RequestOutput, SamplingParams, SchedulerConfig
from furiosa_runtime.artifact import load_artifact


@pytest.fixture(scope="module")
def llm(engine_artifact: Path) -> LLM:
    return LLM(engine_artifact, seed=0)


GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def test_prompt_forms_agree(llm: LLM) -> None:
    ids = llm.tokenizer.encode("Hello world")
    by_text, by_dict, by_ids, by_ids_dict = llm.generate(
        ["Hello world", {"prompt": "Hello world"}, ids, {"prompt_token_ids": ids}], GREEDY, use_tqdm=False
    )
    assert by_text.outputs[0].token_ids == by_dict.outputs[0].token_ids == by_ids.outputs[0].token_ids == by_ids_dict.outputs[0].token_ids
    assert by_text.prompt == "Hello world" and by_ids.prompt is None
    assert by_text.prompt_token_ids == ids
    [legacy] = llm.generate(prompt_token_ids=[ids], sampling_params=GREEDY, use_tqdm=False)
    assert legacy.outputs[0].token_ids == by_ids.outputs[0].token_ids


def test_request_output_fields_and_metrics(llm: LLM) -> None:
    [out] = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert isinstance(out, RequestOutput) and out.finished
    completion = out.outputs[0]
    assert (completion.index, len(completion.token_ids), completion.finish_reason, completion.stop_reason) == (0, 5, "length", None)
    assert completion.text == llm.tokenizer.decode(completion.token_ids)
    assert completion.cumulative_logprob is None and completion.logprobs is None  # not asked for
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.time_to_first_token >= 0 and m.time_in_queue >= 0


def test_per_prompt_sampling_params_and_order(llm: LLM) -> None:
    outs = llm.generate(["a", "b", "c"], [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 1, 2)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 1, 2]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(["a", "b"], [GREEDY], use_tqdm=False)


def test_progress_bar(llm: LLM, capsys) -> None:
    llm.generate(["a", "b"], GREEDY, use_tqdm=True)
    assert "2/2" in capsys.readouterr().err


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=8, ignore_eos=True)
    [alone] = llm.generate("Hello", params, use_tqdm=False)
    in_batch = llm.generate(["Other", "Hello", "More"], [SamplingParams(temperature=1.0, max_tokens=8), params, GREEDY], use_tqdm=False)
    assert in_batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    engine_seeded = [LLM(llm.model_id_or_path, seed=7).generate("Hi", SamplingParams(max_tokens=8), use_tqdm=False)[0] for _ in range(2)]
    assert engine_seeded[0].outputs[0].token_ids == engine_seeded[1].outputs[0].token_ids


def test_n_and_best_of(llm: LLM) -> None:
    [out] = llm.generate("Hello", SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # independent samples
    [best] = llm.generate("Hello", SamplingParams(n=2, best_of=5, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True, logprobs=0), use_tqdm=False)
    assert len(best.outputs) == 2
    assert best.outputs[0].cumulative_logprob >= best.outputs[1].cumulative_logprob
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable


def test_logprobs(llm: LLM) -> None:
    [out] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True), use_tqdm=False)
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token, position in zip(completion.token_ids, completion.logprobs):
        assert len(position) == 3 and token in position  # greedy: the sampled token is the top one
        assert isinstance(position[token], Logprob) and position[token].rank == 1
        assert position[token].decoded_token == llm.tokenizer.decode([token], skip_special_tokens=False)
    assert completion.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(completion.token_ids, completion.logprobs)))


def test_stop_token_ids_min_tokens_and_stop_strings(llm: LLM) -> None:
    [free] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    tokens = free.outputs[0].token_ids
    [stopped] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[tokens[2]]), use_tqdm=False)
    first = tokens.index(tokens[2])
    assert stopped.outputs[0].token_ids == tokens[: first + 1]
    assert (stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == ("stop", tokens[2])
    [late] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, min_tokens=first + 2, ignore_eos=True, stop_token_ids=[tokens[2]]), use_tqdm=False)
    assert len(late.outputs[0].token_ids) >= first + 2 and tokens[2] not in late.outputs[0].token_ids[: first + 2]
    text = free.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    [cut] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop]), use_tqdm=False)
    assert cut.outputs[0].text == text[: text.index(stop)] and cut.outputs[0].stop_reason == stop


def test_penalties_change_greedy_output(llm: LLM) -> None:
    [plain] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    [penalised] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0, repetition_penalty=1.5), use_tqdm=False)
    tokens = penalised.outputs[0].token_ids
    assert tokens != plain.outputs[0].token_ids
    assert max(tokens.count(t) for t in tokens) <= max(plain.outputs[0].token_ids.count(t) for t in plain.outputs[0].token_ids)


def test_context_length_errors_never_stall_the_queue(llm: LLM) -> None:
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 64 tokens") as info:
        llm.generate(["fine", "x " * 80], GREEDY, use_tqdm=False)
    assert info.value.max_model_len == 64
    with pytest.raises(ValueError, match="64 in the completion"):
        llm.generate("Hello", SamplingParams(max_tokens=64), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing of the refused batch was queued
    assert llm.generate("fine", GREEDY, use_tqdm=False)[0].finished


def test_max_tokens_none_runs_to_the_context_limit(llm: LLM) -> None:
    [out] = llm.generate({"prompt_token_ids": [5] * 60}, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_constructor_arguments(engine_artifact: Path) -> None:
    devices = load_artifact(engine_artifact).devices
    with LLM(engine_artifact, devices=devices, scheduler_config=SchedulerConfig(max_processing_samples=1), tokenizer=str(engine_artifact)) as llm:
        assert llm.model_metadata.task == "generate" and llm.max_model_len == 64
        assert len(llm.generate(["a", "b"], GREEDY, use_tqdm=False)) == 2
    for kwargs, needle in [({"devices": "gpu:0"}, "devices"), ({"revision": "main"}, "revision"),
                           ({"enable_jit_compilation": True}, "enable_jit_compilation"), ({"tokenizer_mode": "fast"}, "tokenizer_mode"),
                           ({"data_parallel_size": 3}, "data_parallel_size"), ({"bogus": 1}, "bogus"),
                           ({"scheduler_config": SchedulerConfig(spare_blocks_ratio=2.0)}, "spare_blocks_ratio")]:  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            LLM(engine_artifact, **kwargs)


def test_chat_uses_the_template(smollm2_artifact: Path) -> None:
    llm = LLM(smollm2_artifact)
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out.outputs[0].text
    assert out.prompt.startswith("<|im_start|>")

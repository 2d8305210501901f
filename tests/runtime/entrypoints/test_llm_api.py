"""LLM as a vLLM user drives it: prompts in every form, SamplingParams features, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest

from furiosa_runtime import LLM, ContextLengthExceededError, Logprob, RequestOutput, SamplingParams, SchedulerConfig
from furiosa_runtime.npu.artifact import load_artifact


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


def test_progress_bar_counts_generated_tokens(llm: LLM, capsys) -> None:
    llm.generate(["a", "b"], GREEDY, use_tqdm=True)
    bar = capsys.readouterr().err
    assert "12/12" in bar and "tok/s" in bar and "2/2 requests" in bar  # 2 requests x 6 tokens
    llm.generate(["a", "b"], [GREEDY, SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=list(range(512)))])
    assert "7/7" in capsys.readouterr().err  # stopped after 1 token: its unused 5 leave the total
    llm.generate(["a"], GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == ""


def test_prefix_caching_reuses_a_shared_prompt_and_reports_it(engine_artifact: Path) -> None:
    llm = LLM(engine_artifact)  # prefix caching is on by default
    shared = list(range(3, 3 + 24))  # three 8-token KV blocks
    [first] = llm.generate({"prompt_token_ids": shared + [40]}, GREEDY, use_tqdm=False)
    [second] = llm.generate({"prompt_token_ids": shared + [41]}, GREEDY, use_tqdm=False)
    assert (first.num_cached_tokens, second.num_cached_tokens) == (0, 24)
    stats = llm.engine.stats()
    assert (stats.prefix_cache_hit_tokens, stats.prefix_cache_queried_tokens) == (24, 50)
    uncached = LLM(engine_artifact, enable_prefix_caching=False)
    [again] = uncached.generate({"prompt_token_ids": shared + [41]}, GREEDY, use_tqdm=False)
    assert again.outputs[0].token_ids == second.outputs[0].token_ids and again.num_cached_tokens == 0
    assert uncached.engine.stats().prefix_cache_queried_tokens == 0


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
                           ({"enable_jit_compilation": "yes"}, "enable_jit_compilation"), ({"tokenizer_mode": "fast"}, "tokenizer_mode"),
                           ({"data_parallel_size": 3}, "data_parallel_size"), ({"bogus": 1}, "bogus"),
                           ({"scheduler_config": SchedulerConfig(spare_blocks_ratio=2.0)}, "spare_blocks_ratio")]:  # fmt: skip
        with pytest.raises(ValueError, match=needle):
            LLM(engine_artifact, **kwargs)


def test_chat_uses_the_template(smollm2_artifact: Path) -> None:
    llm = LLM(smollm2_artifact)
    [out] = llm.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(temperature=0, max_tokens=8))
    assert "Paris" in out.outputs[0].text
    assert out.prompt.startswith("<|im_start|>")


@pytest.mark.parametrize(
    ("prompts", "needle"),
    [
        (5, r"^prompts: must be a prompt or a list of prompts"),
        (b"Hello", r"^prompts: must be a prompt or a list of prompts"),  # not iterated into byte values
        ({"prompt": 5}, r"^prompt: the 'prompt' of a dict prompt must be a str, got 5"),
        ({"prompt_token_ids": 5}, r"^prompt_token_ids: must be a list of integers, got 5"),
        ({"prompt": "Hi", "multi_modal_data": {}}, r"^prompt: not supported yet: key\(s\) multi_modal_data"),
        ([[1.5, 2]], r"^prompt_token_ids: must be a list of integers"),
        ([[5, 512]], r"^prompt_token_ids: every id must be in \[0, 512\)"),
        ("", r"^prompt: must contain at least one token"),
    ],
)
def test_bad_prompts_are_refused_in_one_line(llm: LLM, prompts, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        llm.generate(prompts, GREEDY, use_tqdm=False)
    assert "\n" not in str(info.value)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize(
    ("sampling_params", "needle"),
    [
        ({"max_tokens": 3}, r"^sampling_params: must be a SamplingParams or a list of them, got dict"),
        ("greedy", r"^sampling_params: must be a SamplingParams or a list of them, got str"),
        ([None], r"^sampling_params\[0\]: must be a SamplingParams, got NoneType"),
    ],
)
def test_bad_sampling_params_argument(llm: LLM, sampling_params, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        llm.generate("Hello", sampling_params, use_tqdm=False)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        (SamplingParams(max_tokens=2, stop_token_ids=[10**6]), r"^stop_token_ids must be token ids below the vocabulary size \(512\)"),
        (SamplingParams(max_tokens=2, logprobs=10**6), r"^logprobs must be None or an integer <= the vocabulary size \(512\)"),
        (SamplingParams(max_tokens=None, min_tokens=200), r"^min_tokens must be <= the \d+ tokens .* maximum context length of 64"),
    ],
)
def test_requests_the_model_cannot_honour_are_refused_up_front(llm: LLM, params: SamplingParams, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        llm.generate(["fine", "Hello"], [GREEDY, params], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()  # nothing of the batch was queued
    assert llm.generate("fine", GREEDY, use_tqdm=False)[0].finished


def test_legacy_prompt_token_ids(llm: LLM) -> None:
    [single] = llm.generate(prompt_token_ids=[5, 6, 7], sampling_params=GREEDY, use_tqdm=False)  # one flat list: one prompt
    [listed] = llm.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY, use_tqdm=False)
    assert single.outputs[0].token_ids == listed.outputs[0].token_ids
    with pytest.raises(ValueError, match="give prompts or prompt_token_ids, not both"):
        llm.generate("Hello", GREEDY, prompt_token_ids=[[5, 6]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: must be a list of token ids"):
        llm.generate(prompt_token_ids=["Hello"], sampling_params=GREEDY, use_tqdm=False)


def test_a_failed_step_leaves_the_llm_usable(llm: LLM, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("simulated NPU fault")

    with monkeypatch.context() as patch:
        patch.setattr(llm.engine.sampler, "sample", broken)
        with pytest.raises(RuntimeError, match="simulated NPU fault"):
            llm.generate(["Hello", "Hi"], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable
    assert llm.generate("Hello", GREEDY, use_tqdm=False)[0].finished


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([], r"^messages: must be a non-empty list"),
        ({"role": "user", "content": "Hi"}, r"^messages: must be a non-empty list"),
        ([{"content": "Hi"}], r"^messages\[0\]\.role: must be a string"),
        ([{"role": "user"}], r"^messages\[0\]\.content: must be a string or a list of content parts"),
        ([{"role": "user", "content": 5}], r"^messages\[0\]\.content: "),
        (["Hi"], r"^messages\[0\]: must be a dict"),
        ([[{"role": "user", "content": "Hi"}], [{"role": "user"}]], r"^messages\[1\]\[0\]\.content: "),
        ([[{"role": "user", "content": "Hi"}], []], r"^messages\[1\]: every conversation must be a non-empty list"),
    ],
)
def test_chat_refuses_malformed_messages(llm: LLM, messages, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        llm.chat(messages, GREEDY, use_tqdm=False)


def test_chat_takes_an_explicit_template(llm: LLM) -> None:
    # tiny-llama has no chat template; the error says to pass one, and LLM.chat accepts it (as vLLM's does)
    with pytest.raises(ValueError, match="chat_template"):
        llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    [out] = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, use_tqdm=False, chat_template=template)
    assert out.prompt == "user: Hi\n" and out.finished


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"devices": ""}, r"^devices must be None or a device string"),  # was silently the artifact's devices
        ({"devices": 5}, r"^devices must be None or a device string"),
        ({"pipeline_parallel_size": 0}, r"^pipeline_parallel_size must be >= 1, got 0"),
        ({"pipeline_parallel_size": True}, r"^pipeline_parallel_size must be None or an integer >= 1, got True"),
        ({"data_parallel_size": "2"}, r"^data_parallel_size must be None or an integer >= 1"),
        ({"seed": -1}, r"^seed must be >= 0, got -1"),
        ({"seed": "x"}, r"^seed must be None or an integer >= 0"),
        ({"scheduler_config": {"npu_queue_limit": 2}}, r"^scheduler_config must be None or a SchedulerConfig, got dict"),
        ({"tokenizer": "/no/such/folder"}, r"^tokenizer: tokenizer.json not found in /no/such/folder"),
        ({"tokenizer": 5}, r"^tokenizer must be None or a non-empty path"),
        ({"jit_threshold": 0}, r"^jit_threshold must be >= 1, got 0"),
        ({"enable_prefix_caching": "no"}, r"^enable_prefix_caching must be True or False, got 'no'"),
    ],
)
def test_bad_constructor_arguments_are_one_line(engine_artifact: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        LLM(engine_artifact, **kwargs)
    assert "\n" not in str(info.value)


def test_scheduler_config_type_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match=r"^scheduler_config\.npu_queue_limit: must be a valid integer.*got 'x'$") as info:
        SchedulerConfig(npu_queue_limit="x")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^scheduler_config\.bogus: unknown field; allowed: npu_queue_limit, "):
        SchedulerConfig(bogus=1)


@pytest.mark.parametrize(
    ("path", "content", "needle"),
    [
        (None, None, r"^model_id_or_path must be a non-empty path"),
        ("artifact", b'{"metadata": {"artifact_id"', r"is not a valid artifact description \(Expecting ':' delimiter"),
        ("artifact", b"\xff\xfe{", r"is not a valid artifact description \(not UTF-8: invalid start byte at byte 0\)"),
        ("artifact", b"[1, 2]", r"is not a valid artifact description \(Artifact: must be a valid dictionary"),
        ("artifact", b'{"format_version": "1"}', r"is not a valid artifact description \(metadata: required\)"),
    ],
)
def test_bad_artifact_paths_are_one_line(tmp_path: Path, path, content, needle: str) -> None:
    if path is not None:
        path = tmp_path / path
        path.mkdir()
        (path / "artifact.json").write_bytes(content)
    with pytest.raises(ValueError, match=needle) as info:
        LLM(path)
    assert "\n" not in str(info.value)


def test_generate_returns_whole_completions_whatever_the_output_kind(llm: LLM) -> None:
    from furiosa_runtime import RequestOutputKind

    delta = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    [streamed_kind] = llm.generate("Hello", delta, use_tqdm=False)
    [plain] = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert streamed_kind.outputs[0].token_ids == plain.outputs[0].token_ids and len(plain.outputs[0].token_ids) == 5
    assert delta.output_kind is RequestOutputKind.DELTA  # the caller's params are not changed

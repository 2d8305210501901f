"""The OpenAI-compatible server, driven with the official ``openai`` client as a user would.

Each server runs in a thread on 127.0.0.1 (a socket bound to a free port), over an
``AsyncLLMEngine`` of its own; a separate ``LLM`` on the same artifact is the oracle:
greedy tokens must be identical.  tiny-llama has no chat template, so the server is given
one (``--chat-template``), and the oracle renders with the same.  Prompt logprobs and a
beam width fixed by the build are served by a second server, on tiny-llama built with every
prompt position's logits and for beam width 2.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from furiosa_runtime import LLM, AsyncLLMEngine, SamplingParams
from furiosa_runtime.entrypoints.openai.api_server import build_app
from furiosa_runtime.entrypoints.openai.serving_engine import ServerConfig
from tests.helpers import REPO, build

MODEL = "tiny"
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
HELLO = [{"role": "user", "content": "Hello there"}]


@contextlib.contextmanager
def serving(engine: AsyncLLMEngine, config: ServerConfig) -> Iterator[str]:
    """Run the app for ``engine`` in a thread on a free 127.0.0.1 port; yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "the server did not stop"


def client_for(url: str, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and labels (model_name left out)."""
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def wait_until_idle(engine: AsyncLLMEngine, timeout: float = 10) -> None:
    """Until the engine holds no request and every KV block is free (or fail)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if not engine.request_ids and stats.running == stats.waiting == stats.kv_blocks_used == 0:
            return
        assert time.monotonic() < deadline, (engine.request_ids, stats)
        time.sleep(0.02)


@pytest.fixture(scope="module")
def oracle(tiny_llama_artifact: Path) -> LLM:
    return LLM(tiny_llama_artifact)


@pytest.fixture(scope="module")
def engine(tiny_llama_artifact: Path) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_llm(LLM(tiny_llama_artifact))


@pytest.fixture(scope="module")
def url(engine: AsyncLLMEngine) -> Iterator[str]:
    with serving(engine, ServerConfig([MODEL, "tiny-alias"], chat_template=TEMPLATE)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return client_for(url)


@pytest.fixture(scope="module")
def all_logits_artifact(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """tiny-llama whose prefill computes every position's logits (prompt_logprobs) and whose
    decode buckets are built for beam width 2."""
    out = tmp_path_factory.mktemp("server") / "tiny-llama-all-logits-beams-2"
    build(["model=tiny-llama", "buckets=tiny", "buckets.calculate_logit_only_for_last_token=false",
           "buckets.kv_cache_sharing_across_beams_config={beam_width: 2, max_new_tokens: 8}"], out, cache_dir)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def all_logits_url(all_logits_artifact: Path) -> Iterator[str]:
    with serving(AsyncLLMEngine.from_llm(LLM(all_logits_artifact)), ServerConfig([MODEL], chat_template=TEMPLATE)) as base:
        yield base


# -- the routes that are not the model's -------------------------------------------------------


def test_models_health_and_version(client: openai.OpenAI, url: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, "tiny-alias"]
    assert models[0].model_extra["max_model_len"] == 64
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/version").json()["version"]


# -- completions and chat: the same tokens as LLM ----------------------------------------------


def test_completion_equals_llm_generate(client: openai.OpenAI, oracle: LLM) -> None:
    prompts = ["Hello", "The cat sat on"]
    response = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0, logprobs=0,
                                         extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    expected = oracle.generate(prompts, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
    assert [c.index for c in response.choices] == [0, 1]
    for choice, want in zip(response.choices, expected):
        assert choice.text == want.outputs[0].text
        assert choice.logprobs.tokens == [f"token_id:{t}" for t in want.outputs[0].token_ids]
        assert choice.finish_reason == want.outputs[0].finish_reason
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert response.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in expected)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_token_id_prompts(client: openai.OpenAI, oracle: LLM) -> None:
    response = client.completions.create(model="tiny-alias", prompt=[5, 6, 7], max_tokens=5, temperature=0)
    assert response.model == MODEL  # the first served name
    assert response.choices[0].text == oracle.generate([5, 6, 7], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)[0].outputs[0].text


def test_chat_equals_llm_chat(client: openai.OpenAI, oracle: LLM) -> None:
    response = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=10, temperature=0,
                                              logprobs=True, extra_body={"return_tokens_as_token_ids": True})  # fmt: skip
    [want] = oracle.chat(HELLO, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False, chat_template=TEMPLATE)
    [choice] = response.choices
    assert choice.message.role == "assistant" and choice.message.content == want.outputs[0].text
    assert [t.token for t in choice.logprobs.content] == [f"token_id:{t}" for t in want.outputs[0].token_ids]
    assert response.usage.prompt_tokens == len(want.prompt_token_ids)
    assert response.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_concatenates_to_the_whole(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, temperature=0, logprobs=2)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, temperature=0, logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == whole.choices[0].logprobs.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == whole.choices[0].logprobs.text_offset
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_samples_are_seeded(client: openai.OpenAI) -> None:
    def sample() -> openai.types.Completion:
        return client.completions.create(model=MODEL, prompt="Hello", n=3, max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True})

    first, second = sample(), sample()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert len({c.text for c in first.choices}) > 1  # independent samples
    assert first.usage.completion_tokens == 24
    streamed = list(client.chat.completions.create(model=MODEL, messages=HELLO, n=2, max_tokens=6, temperature=1.0, seed=3, stream=True))
    assert {choice.index for chunk in streamed for choice in chunk.choices} == {0, 1}
    assert sum(choice.finish_reason is not None for chunk in streamed for choice in chunk.choices) == 2


def test_logprobs(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    for token in chat.choices[0].logprobs.content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token and token.top_logprobs[0].logprob == token.logprob  # greedy
        assert token.logprob <= 0 and bytes(token.bytes).decode() == token.token
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)
    completion = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert all(token in top and max(top.values()) == top[token] for token, top in zip(logprobs.tokens, logprobs.top_logprobs))


def test_stop_and_lengths(client: openai.OpenAI) -> None:
    text = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0).choices[0].text
    stop = text[len(text) // 2 :][:3]
    stopped = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)] and stopped.choices[0].finish_reason == "stop"
    capped = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=3, temperature=0,
                                            extra_body={"ignore_eos": True})  # fmt: skip
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    default = client.completions.create(model=MODEL, prompt="Hello", temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


# -- vLLM's beam search and prompt logprobs ------------------------------------------------------


def test_beam_search_equals_llm_generate(client: openai.OpenAI, oracle: LLM) -> None:
    prompts = ["Hello", "The cat sat on"]
    beams = {"use_beam_search": True, "length_penalty": 0.8, "early_stopping": True, "return_tokens_as_token_ids": True}
    response = client.completions.create(model=MODEL, prompt=prompts, n=2, best_of=3, max_tokens=8, temperature=0, logprobs=0,
                                         extra_body=beams)  # fmt: skip
    expected = oracle.generate(prompts, SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0, max_tokens=8,
                                                       length_penalty=0.8, early_stopping=True), use_tqdm=False)  # fmt: skip
    want = [c for output in expected for c in output.outputs]  # prompt by prompt, best beam first
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert [c.logprobs.tokens for c in response.choices] == [[f"token_id:{t}" for t in c.token_ids] for c in want]
    assert [(c.text, c.finish_reason) for c in response.choices] == [(c.text, c.finish_reason) for c in want]
    assert response.usage.completion_tokens == sum(len(c.token_ids) for c in want)
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, n=3, max_tokens=6, logprobs=True,  # temperature: 0 by default
                                          extra_body={"use_beam_search": True, "return_tokens_as_token_ids": True})  # fmt: skip
    [beamed] = oracle.chat(HELLO, SamplingParams(n=3, use_beam_search=True, temperature=0, max_tokens=6), use_tqdm=False,
                           chat_template=TEMPLATE)  # fmt: skip
    assert [[t.token for t in c.logprobs.content] for c in chat.choices] == [[f"token_id:{t}" for t in c.token_ids] for c in beamed.outputs]
    assert len({c.message.content for c in chat.choices}) == 3


def vllm_json(prompt_logprobs: list) -> list:
    """``RequestOutput.prompt_logprobs`` as vLLM's server writes it: token ids as string keys."""
    return [None if top is None else {str(t): dataclasses.asdict(lp) for t, lp in top.items()} for top in prompt_logprobs]


def test_prompt_logprobs_equal_llm_generate(all_logits_url: str, all_logits_artifact: Path) -> None:
    client, oracle = client_for(all_logits_url), LLM(all_logits_artifact)
    prompts = ["Hello there", "The cat sat on the"]
    response = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=2, temperature=1.0, seed=1,
                                         extra_body={"prompt_logprobs": 2})  # fmt: skip
    expected = oracle.generate(prompts, SamplingParams(max_tokens=2, prompt_logprobs=2), use_tqdm=False)
    assert [vllm_json(o.prompt_logprobs) for o in expected for _ in range(2)] == [c.model_extra["prompt_logprobs"] for c in response.choices]
    assert expected[1].prompt_logprobs[0] is None and len(expected[1].prompt_logprobs) == len(expected[1].prompt_token_ids)
    chat = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 0})
    [want] = oracle.chat(HELLO, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0), use_tqdm=False, chat_template=TEMPLATE)
    assert chat.model_extra["prompt_logprobs"] == vllm_json(want.prompt_logprobs)
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices[0].model_extra["prompt_logprobs"] is None


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt": "Hello", "n": 4}, "best_of"),
    ("/v1/chat/completions", {"messages": HELLO, "n": 4}, "n"),  # chat's beam width is n
])  # fmt: skip
def test_a_beam_width_the_artifact_was_not_built_for_is_refused(all_logits_url: str, path: str, body: dict, param: str) -> None:
    width_2 = httpx.post(f"{all_logits_url}{path}", json={**body, "model": MODEL, "n": 2, "use_beam_search": True, "max_tokens": 8})
    assert width_2.status_code == 200 and len(width_2.json()["choices"]) == 2
    width_4 = httpx.post(f"{all_logits_url}{path}", json={**body, "model": MODEL, "use_beam_search": True, "max_tokens": 8})
    assert_openai_error(width_4, 400, param, "beam width 4 does not match this artifact's decode buckets")


# -- errors: OpenAI's shape, the right status ---------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "needle"),
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model", "does not exist"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 100}, 400, "max_tokens", "maximum context length is 64"),
        ("/v1/completions", {"model": MODEL, "prompt": "word " * 80}, 400, "prompt", "maximum context length"),
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_completion_tokens": 100}, 400, "max_completion_tokens", "context length"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -0.5}, 400, "temperature", "temperature must be"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 2, "temperature": 0}, 400, "n", "greedy"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", "valid integer"),
        ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt", "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "logit_bias": {"1": 5}}, 400, "logit_bias", "Unrecognized request argument"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "Field required"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "hi"}]}, 400, "messages", "role"),
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "top_logprobs": 2}, 400, "top_logprobs", "logprobs"),
        ("/v1/embeddings", {"model": MODEL, "input": "a"}, 400, "model", "task=embed"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 2, "use_beam_search": True, "temperature": 0.7}, 400, "temperature",
         "temperature must be 0.0 with use_beam_search"),
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "use_beam_search": True}, 400, "n", ">= 2 with use_beam_search"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "n": 2, "use_beam_search": True, "stream": True}, 400, "use_beam_search",
         "cannot be streamed"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "length_penalty": 0.5}, 400, "length_penalty", "without use_beam_search"),
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "n": 2, "use_beam_search": True, "early_stopping": "soon"}, 400,
         "early_stopping", "early_stopping"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "prompt_logprobs": -1}, 400, "prompt_logprobs", "integer >= 0"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "prompt_logprobs": 1}, 400, "prompt_logprobs",
         "buckets.calculate_logit_only_for_last_token=false"),
        ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs",
         "not available when stream is true"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(url: str, path: str, body: dict, status: int, param: str, needle: str) -> None:
    assert_openai_error(httpx.post(f"{url}{path}", json=body), status, param, needle)


def assert_openai_error(response: httpx.Response, status: int, param: str, needle: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and needle in error["message"], error


def test_malformed_bodies_and_routes(url: str, client: openai.OpenAI) -> None:
    for response, status in [
        (httpx.post(f"{url}/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"content-type": "application/json"}), 400),
        (httpx.post(f"{url}/v1/completions", content=b"[1, 2]"), 400),
        (httpx.get(f"{url}/v1/completions"), 405),
        (httpx.get(f"{url}/v1/nothing"), 404),
    ]:
        assert response.status_code == status and response.json()["error"]["message"], response.text
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=-1)
    assert err.value.status_code == 400 and err.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="unknown", prompt="a")


# -- the engine underneath: metrics, disconnects -------------------------------------------------


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, url: str) -> None:
    before = metrics(url)
    response = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    after = metrics(url)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert moved("furiosa_llm:request_success_total", (("finished_reason", "length"),)) == 1
    assert moved("furiosa_llm:prompt_tokens_total") == response.usage.prompt_tokens
    assert moved("furiosa_llm:generation_tokens_total") == 4
    assert moved("furiosa_llm:time_to_first_token_seconds_count") == 1
    assert moved("furiosa_llm:time_per_output_token_seconds_count") == 1
    assert moved("furiosa_llm:e2e_request_latency_seconds_count") == 1
    assert moved("furiosa_llm:engine_steps_total") >= 4 and moved("furiosa_llm:npu_seconds_total") > 0
    assert after[("furiosa_llm:num_kv_blocks", ())] > 0 and after[("furiosa_llm:num_kv_blocks_used", ())] == 0
    assert after[("furiosa_llm:num_requests_running", ())] == after[("furiosa_llm:num_requests_waiting", ())] == 0
    assert 0 <= after[("furiosa_llm:prefix_cache_hit_rate", ())] <= 1


def slow_steps(engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.02) -> None:
    """Make each engine step take a while, so a request is surely still running when its client leaves."""
    step = engine.native_engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(engine.native_engine, "step", slow_step)


def test_a_client_that_disconnects_aborts_its_request(url: str, engine: AsyncLLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_steps(engine, monkeypatch)
    before = metrics(url)
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 30, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the role chunk: the request is running
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 30, "ignore_eos": True}, timeout=0.3)
    wait_until_idle(engine)
    aborted = metrics(url)[("furiosa_llm:request_success_total", (("finished_reason", "abort"),))]
    assert aborted - before.get(("furiosa_llm:request_success_total", (("finished_reason", "abort"),)), 0.0) == 2


# -- API key and CORS ----------------------------------------------------------------------------


def test_api_key_and_cors(engine: AsyncLLMEngine) -> None:
    config = ServerConfig([MODEL], api_key="sesame", allowed_origins=["http://localhost:3000"], chat_template=TEMPLATE)
    with serving(engine, config) as base:
        with pytest.raises(openai.AuthenticationError) as err:
            client_for(base, api_key="wrong").models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        assert httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 401  # no key at all
        assert client_for(base, api_key="sesame").completions.create(model=MODEL, prompt="Hello", max_tokens=2).choices
        assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(f"{base}/metrics").status_code == 200  # not /v1
        preflight = httpx.options(f"{base}/v1/chat/completions", headers={
            "origin": "http://localhost:3000", "access-control-request-method": "POST", "access-control-request-headers": "authorization"})  # fmt: skip
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert "access-control-allow-origin" not in httpx.get(f"{base}/health", headers={"origin": "http://evil.example"}).headers


# -- embeddings ----------------------------------------------------------------------------------


def test_embeddings(tiny_bert_artifact: Path) -> None:
    llm = LLM(tiny_bert_artifact)
    texts = ["A man is eating food.", "hi"]
    with serving(AsyncLLMEngine.from_llm(llm), ServerConfig(["bert"])) as base:
        client = client_for(base)
        response = client.embeddings.create(model="bert", input=texts)  # the client asks for base64
        as_floats = httpx.post(f"{base}/v1/embeddings", json={"model": "bert", "input": [[5, 17, 33]], "encoding_format": "float"}).json()
        as_base64 = httpx.post(f"{base}/v1/embeddings", json={"model": "bert", "input": "hi", "encoding_format": "base64"}).json()
        with pytest.raises(openai.BadRequestError, match="task=generate"):
            client.completions.create(model="bert", prompt="a")
        with pytest.raises(openai.BadRequestError, match="maximum context length is 32"):
            client.embeddings.create(model="bert", input=[list(range(5, 45))])
    want = llm.embed(texts, use_tqdm=False)
    assert [d.index for d in response.data] == [0, 1]
    for data, output in zip(response.data, want):
        np.testing.assert_allclose(data.embedding, output.outputs.embedding, rtol=1e-6)
    assert response.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in want)
    np.testing.assert_allclose(as_floats["data"][0]["embedding"], llm.embed([[5, 17, 33]], use_tqdm=False)[0].outputs.embedding, rtol=1e-6)
    vector = np.frombuffer(base64.b64decode(as_base64["data"][0]["embedding"]), dtype="<f4")  # little-endian float32
    np.testing.assert_array_equal(vector, np.asarray(want[1].outputs.embedding, dtype=np.float32))


# -- the process: SIGTERM drains -----------------------------------------------------------------

# The server as `python -m furiosa_runtime serve` runs it, with engine steps slowed down so the
# request is surely in flight when SIGTERM arrives.
SERVE = """
import sys, time
from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.entrypoints.cli import main
step = EngineCore.step
EngineCore.step = lambda self: (time.sleep(0.02), step(self))[1]
sys.exit(main(["serve", *sys.argv[1:]]))
"""


def test_sigterm_lets_the_request_in_flight_finish(tiny_llama_artifact: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-c", SERVE, str(tiny_llama_artifact), "--host", "127.0.0.1", "--port", "0", "--served-model-name", MODEL]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        port = None
        log: list[str] = []
        for line in process.stderr:  # the startup line names the address
            log.append(line)
            if " on http://127.0.0.1:" in line:
                port = int(line.rsplit(":", 1)[1])
                break
        assert port, "".join(log)
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 40, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as response:
            events = response.iter_lines()
            first = next(e for e in events if e)
            process.send_signal(signal.SIGTERM)
            rest = [e for e in events if e]
        assert rest[-1] == "data: [DONE]"
        texts = [json.loads(e.removeprefix("data: ")) for e in [first, *rest[:-1]]]
        assert texts[-1]["choices"][0]["finish_reason"] == "length" and len(texts) == 40
        assert process.wait(timeout=30) == 0
        log += process.stderr.readlines()
        shutdown = next(i for i, line in enumerate(log) if "Shutting down" in line)
        assert any("finished (length)" in line and "+ 40 completion tokens" in line for line in log[shutdown:]), "".join(log)
    finally:
        process.kill()
        process.wait()


def test_the_server_stack_is_imported_only_to_serve() -> None:
    code = ("import sys, furiosa_runtime\nfrom furiosa_runtime import LLM, AsyncLLMEngine\nimport furiosa_runtime.entrypoints.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', 'uvicorn', 'prometheus_client'}))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_health_answers_while_a_long_prompt_is_tokenized(url: str) -> None:
    """Prompts are tokenized off the event loop: /health keeps answering while a 3 MB prompt
    is tokenized (then refused as longer than the model's context)."""
    prompt = "the quick brown fox jumps over the lazy dog; " * 70000
    replies: list[httpx.Response] = []
    done = threading.Event()

    def post() -> None:
        try:
            replies.append(httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}, timeout=60))
        finally:
            done.set()

    thread = threading.Thread(target=post)
    thread.start()
    answered = 0
    with httpx.Client(timeout=10) as health:
        while not done.is_set():
            assert health.get(f"{url}/health").status_code == 200
            answered += 1
    thread.join()
    assert replies[0].status_code == 400 and replies[0].json()["error"]["code"] == "context_length_exceeded"
    assert answered > 100, answered

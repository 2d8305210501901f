"""What an outside checker sends the OpenAI-compatible server that a well-behaved client
does not: malformed bodies, wrong types, out-of-range values, oversized requests, keyless
calls.  Each gets an OpenAI-shaped error with the right status, naming the field, never a
500 or a traceback, and the server stays healthy (the engine holds no request or KV block
afterwards).

One server for the module, on 127.0.0.1, behind an API key (so every route's 401 is
checked on the same server) and with a small body limit (so a 413 costs little).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from furiosa_runtime import LLM, AsyncLLMEngine
from furiosa_runtime.entrypoints.openai.protocol import ChatCompletionRequest, EmbeddingRequest
from furiosa_runtime.entrypoints.openai.serving_engine import ServerConfig, bad_request
from tests.runtime.entrypoints.test_openai_server import (
    HELLO,
    MODEL,
    TEMPLATE,
    assert_openai_error,
    client_for,
    metrics,
    serving,
    wait_until_idle,
)

KEY = "sesame"
BODY_LIMIT = 64 * 1024
C, CHAT, EMBED = "/v1/completions", "/v1/chat/completions", "/v1/embeddings"


@pytest.fixture(scope="module")
def engine(tiny_llama_artifact: Path) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_llm(LLM(tiny_llama_artifact))


@pytest.fixture(scope="module")
def url(engine: AsyncLLMEngine) -> Iterator[str]:
    with serving(engine, ServerConfig([MODEL], api_key=KEY, chat_template=TEMPLATE, max_body_bytes=BODY_LIMIT)) as base:
        yield base


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    """Raw HTTP with the key; every request bounded by a timeout."""
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {KEY}"}, timeout=10) as client:
        yield client


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail if the server logged an error or a traceback (a client mistake is a warning)."""
    with caplog.at_level(logging.INFO):
        yield
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


# -- bodies and fields: 400 naming the field and what it allows ------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param", "needle"),
    [
        # counts whose cost grows with the number: bounded (n=100000 used to hold the engine for hours)
        (C, {"prompt": "a", "n": 100_000}, "n", "less than or equal to 128"),
        (CHAT, {"messages": HELLO, "n": 10**20}, "n", "less than or equal to 128"),
        (C, {"prompt": "a", "best_of": 100_000}, "best_of", "less than or equal to 128"),
        (C, {"prompt": "a", "logprobs": 21}, "logprobs", "less than or equal to 20"),
        (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
        (C, {"prompt": "a", "prompt_logprobs": 100}, "prompt_logprobs", "less than or equal to 20"),
        (C, {"prompt": "a", "seed": 2**70}, "seed", "less than or equal to 9223372036854775807"),
        # the engine's name for a field is the request's
        (CHAT, {"messages": HELLO, "logprobs": True, "top_logprobs": -1}, "top_logprobs", "top_logprobs must be"),
        (C, {"prompt": [1, 999_999]}, "prompt", "prompt: every id must be in [0, 512)"),
        (C, {"prompt": [[1, 2], [-5]]}, "prompt", "prompt: every id must be in [0, 512)"),
        # a field of several types lists them, not pydantic's first member
        (C, {"prompt": "a", "stop": 5}, "stop", "stop: must be str or list[str], got 5"),
        (C, {"prompt": 5}, "prompt", "prompt: must be str or list[str] or list[int] or list[list[int]]"),
        (C, {"prompt": "a", "stream": True, "stream_options": {"foo": 1}}, "stream_options",
         "Unrecognized request argument supplied: stream_options.foo"),
        (CHAT, {"messages": ["hi"]}, "messages", "messages[0]: Input should be an object"),
        # template variables cannot replace apply_chat_template's own arguments (they were 500s)
        (CHAT, {"messages": HELLO, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "messages cannot be set"),
        (CHAT, {"messages": HELLO, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "tokenize cannot be set"),
        (CHAT, {"messages": HELLO, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template_kwargs",
         "chat_template cannot be set"),
        (CHAT, {"messages": HELLO, "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
         "add_generation_prompt cannot be set"),
        (EMBED, {"input": "a"}, "model", "serves task=generate; this endpoint needs task=embed"),
        # what already held, kept so: the cases an outside checker tries first
        (C, {"prompt": "a", "max_tokens": "ten"}, "max_tokens", "valid integer"),
        (C, {"prompt": "a", "temperature": "hot"}, "temperature", "valid number"),
        (C, {"prompt": "a", "n": 0}, "n", "n must be an integer >= 1"),
        (C, {"prompt": "a", "top_p": 1.5}, "top_p", "(0, 1]"),
        (C, {"prompt": "a", "presence_penalty": -3}, "presence_penalty", "[-2, 2]"),
        (C, {"prompt": "a", "logprobs": -1}, "logprobs", ">= 0"),
        (CHAT, {"messages": HELLO, "top_logprobs": 2}, "top_logprobs", "only allowed when logprobs is true"),
        (C, {"prompt": "a", "foo": 1}, "foo", "Unrecognized request argument supplied: foo"),
        (C, {}, "prompt", "prompt: Field required"),
        (C, {"prompt": ""}, "prompt", "at least one token"),
        (CHAT, {"messages": []}, "messages", "at least one message"),
        (CHAT, {"messages": [{"role": "user"}]}, "messages", "messages[0].content"),
        (CHAT, {"messages": [{"content": "hi"}]}, "messages", "messages[0].role"),
        (C, {"prompt": "word " * 80}, "prompt", "maximum context length is 64"),
        (C, {"prompt": "a", "max_tokens": 64}, "max_tokens", "maximum context length is 64"),
        (C, {"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ],
)  # fmt: skip
def test_bad_fields_name_the_field(http: httpx.Client, no_tracebacks: None, path: str, body: dict, param: str, needle: str) -> None:
    assert_openai_error(http.post(path, json={"model": MODEL, **body}), 400, param, needle)


def test_unknown_model_is_404(http: httpx.Client, no_tracebacks: None) -> None:
    assert_openai_error(http.post(C, json={"model": "gpt-4", "prompt": "a"}), 404, "model", "does not exist")


@pytest.mark.parametrize(
    ("content", "content_type", "needle"),
    [
        (b'{"model": "tiny", "prompt": ', "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "body: Input should be an object"),
        (b"42", "application/json", "body: Input should be an object"),
        (b'{"model": "tiny", "prompt": "\xff\xfe"}', "application/json", "not valid JSON"),
        (b"[" * 10_000 + b"]" * 10_000, "application/json", "not valid JSON"),
        (b'{"model": "tiny", "prompt": "a"}', "text/plain", "Unsupported Content-Type 'text/plain'"),
        (b"model=tiny&prompt=a", "application/x-www-form-urlencoded", "application/json"),
    ],
)  # fmt: skip
def test_malformed_bodies(http: httpx.Client, no_tracebacks: None, content: bytes, content_type: str, needle: str) -> None:
    response = http.post(C, content=content, headers={"content-type": content_type})
    assert_openai_error(response, 400, None, needle)


def test_json_without_a_content_type_or_with_a_charset_is_accepted(http: httpx.Client) -> None:
    body = b'{"model": "tiny", "prompt": "Hello", "max_tokens": 2}'
    for headers in ({}, {"content-type": "application/json; charset=utf-8"}):
        response = http.post(C, content=body, headers=headers)
        assert response.status_code == 200 and response.json()["choices"], response.text


def test_a_body_over_the_limit_is_413(http: httpx.Client, no_tracebacks: None) -> None:
    big = b'{"model": "tiny", "prompt": "' + b"a" * BODY_LIMIT + b'"}'
    assert_openai_error(http.post(C, content=big, headers={"content-type": "application/json"}), 413, None, str(BODY_LIMIT))
    chunked = http.post(C, content=iter([big[:1000], big[1000:]]), headers={"content-type": "application/json"})  # no Content-Length
    assert_openai_error(chunked, 413, None, "larger than this server accepts")


# -- what is accepted: OpenAI's shapes and vLLM's ---------------------------------------------------


def test_accepted_shapes(url: str) -> None:
    client = client_for(url, api_key=KEY)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]}]
    assert client.chat.completions.create(model=MODEL, messages=parts, max_tokens=2).choices[0].message.content is not None
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "narrator", "content": "hi"}], max_tokens=2).choices
    batch = client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=2, seed=7, temperature=0.8)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.prompt_tokens == 5
    stop = [f"never-{i}" for i in range(10)]
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, stop=stop).choices
    models = client.models.list()
    assert models.object == "list" and [(m.id, m.object) for m in models.data] == [(MODEL, "model")]


def test_a_stream_of_several_samples(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "n": 2, "stream": True, "ignore_eos": True}
    with http.stream("POST", C, json=body) as response:
        events = [line for line in response.iter_lines() if line]
    assert response.status_code == 200 and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["index"] for chunk in chunks for c in chunk["choices"]} == {0, 1}


# -- routes and the key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", C), ("POST", CHAT), ("POST", EMBED),
     ("GET", C), ("GET", "/v1/nothing"), ("DELETE", "/v1/models")],
)  # fmt: skip
def test_every_v1_path_needs_the_key(url: str, no_tracebacks: None, method: str, path: str) -> None:
    """Before routing, as vLLM's middleware does: an unknown route or a wrong method under /v1
    does not tell a keyless client what exists."""
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}):
        response = httpx.request(method, f"{url}{path}", json={"model": MODEL, "prompt": "a"}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", response.text


def test_open_routes_and_route_errors(url: str, http: httpx.Client) -> None:
    """/health, /version and /metrics are open, as in vLLM; with the key, route errors are 404 and 405."""
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{url}{path}", timeout=10).status_code == 200
    assert httpx.get(f"{url}/version", timeout=10).json()["version"]
    assert_openai_error(http.get(C), 405, None, "Method Not Allowed")
    assert_openai_error(http.get("/v1/nothing"), 404, None, "Invalid URL")
    assert_openai_error(http.get("/nothing"), 404, None, "Invalid URL")
    with pytest.raises(openai.AuthenticationError):
        client_for(url, api_key="wrong").models.list()


# -- the engine name of a field, without a server ---------------------------------------------------


def test_engine_field_names_become_the_request_names() -> None:
    embedding = EmbeddingRequest(model="bert", input=[1])
    error = bad_request(ValueError("prompt_token_ids: every id must be in [0, 512), got 999"), embedding, "input")
    assert (error.info.param, error.info.message) == ("input", "input: every id must be in [0, 512), got 999")
    chat = ChatCompletionRequest(model=MODEL, messages=HELLO)
    assert bad_request(ValueError("best_of: 3 beams exceed ..."), chat, "messages").info.param == "n"


# -- afterwards -----------------------------------------------------------------------------------


def test_the_server_is_healthy_afterwards(url: str, http: httpx.Client, engine: AsyncLLMEngine) -> None:
    """Runs last: no request or KV block was left behind by the refused ones, and a good
    request still succeeds."""
    response = http.post(C, json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2
    wait_until_idle(engine)
    after = metrics(url)
    assert after[("furiosa_llm:num_kv_blocks_used", ())] == 0 and after[("furiosa_llm:num_requests_running", ())] == 0

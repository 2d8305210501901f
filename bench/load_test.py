"""Load test of the OpenAI-compatible server: many concurrent streaming chats, some clients leaving.

    python bench/load_test.py                                   # artifacts/smollm2-135m-instruct (make demo builds it)
    python bench/load_test.py ARTIFACT --requests 200 --disconnect 0.2 --max-tokens 32

Starts ``python -m furiosa_runtime serve ARTIFACT --host 127.0.0.1 --port 0`` (traffic stays
on this machine) and sends ``--requests`` streaming chat completions at once, each asking
for ``--max-tokens`` tokens.  A ``--disconnect`` share of the clients, chosen by ``--seed``,
close their stream after a random number of content chunks.  Meanwhile ``/health`` is
polled every 100 ms.  Then it checks, and exits non-zero unless:

* every other request ended with a finish reason, its usage and ``[DONE]``;
* the engine ends with no request running or waiting and every KV block free, having
  ended every request once, with at most one abort per client that left before its last
  token (``/metrics``; a client that leaves just as its request ends sees no abort);
* ``/health`` answered 200 every time;
* SIGTERM stops the server with status 0.

It prints the throughput and the time to first token (TTFT, to the first content chunk)
and per output token (TPOT, after the first) as the clients measured them, p50 and p99.
Figures depend on the machine and its load; nothing is compared with a threshold.

``make demo``'s artifact decodes at most 4 rows per step over 64 KV blocks, so 200 requests
take long on it; serving buckets make the figures meaningful:

    python -m furiosa_build "buckets.prefill=[[1,64],[1,128]]" "buckets.decode=[[8,128],[32,128]]" \
        buckets.max_seq_len_to_capture=128 buckets.paged_attention_num_blocks=600 build.save_dir=artifacts/smollm2-serving
    python bench/load_test.py artifacts/smollm2-serving
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
    "What is 12 times 12?", "Give me a synonym for happy.", "Why is the sky blue?", "Who wrote Hamlet?",
    "What is the boiling point of water?", "Suggest a name for a cat.", "What does a compiler do?",
    "Translate 'good morning' to French.", "What is the largest planet?", "Write a haiku about rain.",
    "What is photosynthesis?", "How do I make tea?", "What is a prime number?",
]  # fmt: skip


@dataclass
class Result:
    """One client's view of its request."""

    leaves_after: int | None  # content chunks after which the client disconnects (None: stays)
    started: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    finish_reason: str | None = None
    completion_tokens: int | None = None
    done: bool = False  # saw [DONE]
    error: str | None = None


def start_server(artifact: str, log_path: Path) -> tuple[subprocess.Popen[str], int]:
    """The server process and its port (read from its startup line); its log goes to ``log_path``."""
    argv = [sys.executable, "-m", "furiosa_runtime", "serve", artifact, "--host", "127.0.0.1", "--port", "0", "--served-model-name", "model"]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    log = log_path.open("w")
    assert process.stderr is not None
    for line in process.stderr:
        log.write(line)
        if " on http://127.0.0.1:" in line:
            port = int(line.rsplit(":", 1)[1])
            break
    else:
        raise SystemExit(f"the server did not start; see {log_path}")
    threading.Thread(target=lambda: log.writelines(process.stderr), daemon=True).start()  # type: ignore[arg-type]
    return process, port


async def chat(client: httpx.AsyncClient, result: Result, question: str, max_tokens: int) -> None:
    body = {"model": "model", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    result.started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    result.done = True
                    break
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("usage"):
                    result.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    if choice["delta"].get("content"):
                        result.chunk_times.append(time.perf_counter())
                    result.finish_reason = choice["finish_reason"] or result.finish_reason
                if result.leaves_after is not None and len(result.chunk_times) >= result.leaves_after:
                    return  # closing the stream mid-way: the server must abort the request
    except httpx.HTTPError as err:
        result.error = f"{type(err).__name__}: {err}"


async def poll_health(client: httpx.AsyncClient, stop: asyncio.Event, latencies: list[float], failures: list[str]) -> None:
    while not stop.is_set():
        began = time.perf_counter()
        try:
            response = await client.get("/health", timeout=30)
            if response.status_code != 200:
                failures.append(f"status {response.status_code}")
        except httpx.HTTPError as err:
            failures.append(f"{type(err).__name__}: {err}")
        latencies.append(time.perf_counter() - began)
        await asyncio.sleep(0.1)


def scrape(base: str) -> dict[str, float]:
    """/metrics samples by name (and finish reason), the model label dropped."""
    text = httpx.get(f"{base}/metrics").text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            reason = sample.labels.get("finished_reason")
            values[sample.name + (f"[{reason}]" if reason else "")] = sample.value
    return values


async def run(base: str, args: argparse.Namespace) -> tuple[list[Result], list[float], list[str], float]:
    rng = random.Random(args.seed)
    leaving = set(rng.sample(range(args.requests), round(args.disconnect * args.requests)))
    results = [Result(rng.randint(1, args.max_tokens // 2) if i in leaving else None) for i in range(args.requests)]
    limits = httpx.Limits(max_connections=args.requests + 8, max_keepalive_connections=args.requests + 8)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(900)) as client, \
               httpx.AsyncClient(base_url=base) as health:  # fmt: skip
        stop, latencies, failures = asyncio.Event(), [], []
        poller = asyncio.create_task(poll_health(health, stop, latencies, failures))
        began = time.perf_counter()
        await asyncio.gather(*(chat(client, r, QUESTIONS[i % len(QUESTIONS)], args.max_tokens) for i, r in enumerate(results)))
        wall = time.perf_counter() - began
        stop.set()
        await poller
    return results, latencies, failures, wall


def percentiles(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", default="artifacts/smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--disconnect", type=float, default=0.2, help="share of clients that leave mid-stream")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "furiosa_load_test_server.log", help="the server's log")
    args = parser.parse_args()

    process, port = start_server(args.artifact, args.log)
    base = f"http://127.0.0.1:{port}"
    problems: list[str] = []
    try:
        before = scrape(base)
        results, health, health_failures, wall = asyncio.run(run(base, args))
        deadline = time.monotonic() + 60  # aborts are applied between engine steps
        while True:
            after = scrape(base)
            idle = [after[f"furiosa_llm:{name}"] for name in ("num_requests_running", "num_requests_waiting", "num_kv_blocks_used")]
            if not any(idle) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=120)

    stayed = [r for r in results if r.leaves_after is None]
    left = [r for r in results if r.leaves_after is not None and r.finish_reason is None]  # before their last token
    incomplete = [r for r in stayed if not (r.done and r.finish_reason and r.completion_tokens) or r.error]

    def ended(reason: str) -> float:
        key = f"furiosa_llm:request_success_total[{reason}]"
        return after.get(key, 0) - before.get(key, 0)

    aborted = ended("abort")
    if sum(ended(reason) for reason in ("stop", "length", "abort")) != args.requests:
        problems.append(f"the server ended {sum(ended(r) for r in ('stop', 'length', 'abort')):.0f} requests, not {args.requests}")
    if incomplete:
        problems.append(f"{len(incomplete)} of {len(stayed)} staying requests did not complete, e.g. {incomplete[0]}")
    if any(idle):
        problems.append(f"engine not idle at the end: running, waiting, KV blocks used = {idle}")
    if aborted > len(left):
        problems.append(f"{len(left)} clients left early but the server counted {aborted:.0f} aborts")
    if health_failures:
        problems.append(f"/health failed {len(health_failures)} times, e.g. {health_failures[0]}")
    if status != 0:
        problems.append(f"the server exited with {status} after SIGTERM")

    tokens = after["furiosa_llm:generation_tokens_total"] - before["furiosa_llm:generation_tokens_total"]  # left clients' too
    ttft = [r.chunk_times[0] - r.started for r in stayed if r.chunk_times]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (len(r.chunk_times) - 1) for r in stayed if len(r.chunk_times) > 1]
    print(f"server: {args.artifact}, {args.requests} streaming chat requests at once, max_tokens {args.max_tokens}, "
          f"{sum(r.leaves_after is not None for r in results)} clients leaving mid-stream (seed {args.seed})")  # fmt: skip
    print(f"completed: {len(stayed) - len(incomplete)}/{len(stayed)}; aborted by the server: {aborted:.0f} of the {len(left)} "
          "clients that left before their last token; "
          f"KV blocks used at the end: {after['furiosa_llm:num_kv_blocks_used']:.0f} of {after['furiosa_llm:num_kv_blocks']:.0f}")  # fmt: skip
    print(f"wall {wall:.1f} s; throughput {tokens / wall:.1f} output tokens/s ({tokens:.0f} tokens generated), "
          f"{len(stayed) / wall:.2f} completed requests/s")  # fmt: skip
    print(f"TTFT (client): {percentiles(ttft)}; TPOT (client): {percentiles(tpot)}")
    print(f"/health: {len(health)} polls, all 200: {not health_failures}, max latency {max(health, default=0) * 1000:.0f} ms")
    print(f"modelled NPU time of the run: {after['furiosa_llm:npu_seconds_total'] - before['furiosa_llm:npu_seconds_total']:.2f} s; "
          f"prefix cache hit rate {after['furiosa_llm:prefix_cache_hit_rate']:.2f}; server exit status after SIGTERM: {status}")  # fmt: skip
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

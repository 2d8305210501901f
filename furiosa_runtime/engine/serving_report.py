"""What modelled serving reports: per-request latencies and per-step counters, summarised.

``ServingStats`` is filled step by step (which bucket ran, how much of it was padding, how
many KV blocks were in use and for how long); ``ServingReport.of`` turns it and the
requests' modelled times into the figures ``vllm bench serve`` prints: output tokens/s,
requests/s, TTFT, TPOT and end-to-end latency (mean, p50, p90, p99), plus what only a
model of the NPU can say: padding per bucket, KV-cache use, preemptions and the
prefix-cache hit rate.  All times are on the modelled NPU clock (``npu/timing.py``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from furiosa_runtime.npu.artifact import Bucket

PERCENTILES = (50, 90, 99)


def bucket_label(bucket: Bucket) -> str:
    """``prefill 4x256``: phase, batch size x attention size."""
    return f"{bucket.phase} {bucket.batch_size}x{bucket.attention_size}"


@dataclass(frozen=True)
class RequestTiming:
    """One finished request on the modelled clock (seconds)."""

    request_id: str
    arrival: float
    first_token: float
    finished: float
    prompt_tokens: int
    output_tokens: int

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None for a single-token request, as vLLM leaves it out)."""
        return (self.finished - self.first_token) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass
class ServingStats:
    """Counters of a modelled run, one ``record`` per step."""

    kv_blocks_total: int
    steps: int = 0
    runs: Counter[str] = field(default_factory=Counter)  # bucket -> times it ran (on any data-parallel replica)
    cells: Counter[str] = field(default_factory=Counter)  # bucket -> rows x columns computed
    padding: Counter[str] = field(default_factory=Counter)  # executed bucket -> of which padding
    kv_peak: int = 0
    kv_block_seconds: float = 0.0  # blocks in use x step seconds, summed
    seconds: float = 0.0  # NPU busy time

    def record(self, runs: list[tuple[Bucket, int]], seconds: float, kv_used: int) -> None:
        """One step, run as ``runs`` (a bucket with the real tokens it computed, one per
        data-parallel replica holding rows), lasting ``seconds`` with ``kv_used`` blocks held."""
        self.steps += 1
        for run, tokens in runs:
            label = bucket_label(run)
            self.runs[label] += 1
            cells = run.batch_size * run.input_len
            self.cells[label] += cells
            self.padding[label] += cells - tokens
        self.kv_peak = max(self.kv_peak, kv_used)
        self.kv_block_seconds += kv_used * seconds
        self.seconds += seconds


@dataclass(frozen=True)
class Latency:
    """Mean and percentiles of one latency, milliseconds."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> Latency:
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0)
        values = np.asarray(seconds) * 1e3
        p50, p90, p99 = (float(np.percentile(values, q)) for q in PERCENTILES)
        return cls(float(values.mean()), p50, p90, p99)


@dataclass(frozen=True)
class BucketUse:
    """How often a bucket ran and how much of what it computed was padding."""

    bucket: str
    runs: int  # steps it ran (on any data-parallel replica)
    padding: float  # share of computed rows x columns that were padding


@dataclass(frozen=True)
class ServingReport:
    """The summary of one modelled serving run (see the module docstring)."""

    workload: str
    requests: int
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: Latency
    tpot_ms: Latency
    e2e_ms: Latency
    buckets: list[BucketUse]
    kv_blocks_total: int
    kv_blocks_peak: int
    kv_blocks_mean: float
    preemptions: int
    prefix_cache_hit_rate: float
    steps: int

    @classmethod
    def of(cls, workload: str, timings: list[RequestTiming], stats: ServingStats, duration: float,
           preemptions: int, hit_rate: float) -> ServingReport:  # fmt: skip
        output = sum(t.output_tokens for t in timings)
        labels = sorted(stats.runs, key=_bucket_order)
        buckets = [BucketUse(label, stats.runs[label], stats.padding[label] / stats.cells[label]) for label in labels]
        return cls(
            workload, len(timings), duration, sum(t.prompt_tokens for t in timings), output,
            output / duration if duration else 0.0, len(timings) / duration if duration else 0.0,
            Latency.of([t.ttft for t in timings]), Latency.of([tpot for t in timings if (tpot := t.tpot) is not None]),
            Latency.of([t.e2e for t in timings]), buckets, stats.kv_blocks_total, stats.kv_peak,
            stats.kv_block_seconds / stats.seconds if stats.seconds else 0.0, preemptions, hit_rate, stats.steps,
        )  # fmt: skip

    def render(self) -> str:
        """The summary as ``vllm bench serve`` lays it out, plus the NPU's own counters."""
        lines = [
            f"workload: {self.workload} ({self.requests} requests, {self.prompt_tokens:,} prompt and {self.output_tokens:,} output tokens)",
            f"modelled duration: {self.duration_s:.3f} s over {self.steps:,} steps",
            f"output throughput: {self.output_tokens_per_s:,.1f} tokens/s",
            f"request throughput: {self.requests_per_s:,.3f} requests/s",
        ]
        for name, latency in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("E2E", self.e2e_ms)):
            lines.append(f"{name + ' ms':9s} mean {latency.mean:10.2f}  p50 {latency.p50:10.2f}  p90 {latency.p90:10.2f}  p99 {latency.p99:10.2f}")
        lines.append(f"KV blocks: peak {self.kv_blocks_peak} / {self.kv_blocks_total}, mean {self.kv_blocks_mean:.1f} (time-weighted)")
        lines.append(f"preemptions: {self.preemptions}; prefix-cache hit rate: {100 * self.prefix_cache_hit_rate:.1f}%")
        lines.append("bucket                 runs   padding")
        lines += [f"  {b.bucket:18s} {b.runs:7,d}   {100 * b.padding:5.1f}%" for b in self.buckets]
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> None:
        """Every figure as JSON (latencies in ms, throughputs per second)."""
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def _bucket_order(label: str) -> tuple[bool, int, int]:
    phase, _, shape = label.partition(" ")
    batch, _, attention = shape.partition("x")
    return phase != "prefill", int(attention), int(batch)

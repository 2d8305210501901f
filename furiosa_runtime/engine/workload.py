"""Workloads for modelled serving: how many requests, how long, arriving when.

A workload spec is one of

* ``fixed:IN:OUT``: every request has IN prompt tokens and OUT output tokens
  (``fixed:128:4096`` is the published methodology's shape);
* ``uniform:LO-HI:LO-HI``: prompt and output lengths drawn uniformly from the inclusive
  ranges (a single number is a fixed length: ``uniform:100-300:128``);
* ``normal:MEAN,STD:MEAN,STD`` and ``lognormal:MEAN,STD:MEAN,STD``: lengths drawn from a
  normal or log-normal distribution with that mean and standard deviation (of the lengths
  themselves, not of their logarithm), rounded and at least 1;
* a path to a JSONL trace, one request per line:
  ``{"arrival": 0.5, "prompt_tokens": 512, "output_tokens": 128}``; ``arrival`` (seconds,
  default 0) may also be spelled ``arrival_time`` or ``timestamp``, the lengths
  ``input_len``/``prompt_len`` and ``output_len`` as vLLM's benchmark datasets do.

Arrivals: ``request_rate`` None keeps a trace's own arrival times and sends a
distribution's requests all at once; ``inf`` sends everything at time 0 (offline, as
``vllm bench serve --request-rate inf``); a number R draws Poisson arrivals at R requests
per second.  Everything random is drawn from ``seed``, so a workload is reproducible.

Requests carry token ids, not text: random ids below the vocabulary size, the first
``shared_prefix`` of them common to every request (a system prompt, for the prefix cache).
Output lengths are forced (``ignore_eos``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")
_ARRIVAL_KEYS = ("arrival", "arrival_time", "timestamp")
_PROMPT_KEYS = ("prompt_tokens", "input_len", "prompt_len")
_OUTPUT_KEYS = ("output_tokens", "output_len")


class WorkloadError(ValueError):
    """A workload spec or trace that cannot be used; the message is one line."""


@dataclass(frozen=True)
class Shape:
    """One request's lengths and arrival time (seconds on the modelled clock)."""

    arrival: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class TimedRequest:
    """A request of a workload, ready for an engine: its token ids and forced output length."""

    request_id: str
    arrival: float
    prompt_token_ids: list[int]
    output_tokens: int


def parse_workload(spec: str, num_prompts: int | None, request_rate: float | None, seed: int = 0) -> list[Shape]:
    """The request shapes of ``spec`` (see the module docstring), in arrival order.

    ``num_prompts`` is how many requests a distribution draws (required for one) or how
    many lines of a trace are used (None: all).
    """
    rng = np.random.default_rng(seed)
    kind = spec.split(":", 1)[0]
    if kind in DISTRIBUTIONS:
        if num_prompts is None:
            raise WorkloadError(f"{spec}: a distribution needs a number of prompts")
        prompt, output = _lengths(spec, kind, num_prompts, rng)
        arrivals = np.zeros(num_prompts)
    else:
        prompt, output, arrivals = _read_trace(spec, num_prompts)
    if request_rate is not None:
        arrivals = _poisson(len(prompt), request_rate, rng)
    order = np.argsort(arrivals, kind="stable")
    return [Shape(float(arrivals[i]), int(prompt[i]), int(output[i])) for i in order]


def make_requests(shapes: list[Shape], vocab_size: int, shared_prefix: int = 0, seed: int = 0) -> list[TimedRequest]:
    """Token ids for every shape: random ids below ``vocab_size`` after a common prefix of
    ``shared_prefix`` tokens (cut to leave each prompt one token of its own)."""
    rng = np.random.default_rng([seed, 1])
    prefix = rng.integers(0, vocab_size, shared_prefix).tolist()
    requests = []
    for index, shape in enumerate(shapes):
        common = min(shared_prefix, shape.prompt_tokens - 1)
        own = rng.integers(0, vocab_size, shape.prompt_tokens - common).tolist()
        requests.append(TimedRequest(f"req-{index}", shape.arrival, prefix[:common] + own, shape.output_tokens))
    return requests


# -- distributions ----------------------------------------------------------------------


def _lengths(spec: str, kind: str, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths of ``count`` requests drawn as ``spec`` says."""
    parts = spec.split(":")[1:]
    if len(parts) != 2:
        raise WorkloadError(f"{spec}: expected {kind}:{_FORMS[kind]}")
    return _draw(spec, kind, parts[0], count, rng), _draw(spec, kind, parts[1], count, rng)


_FORMS = {"fixed": "IN:OUT", "uniform": "LO-HI:LO-HI", "normal": "MEAN,STD:MEAN,STD", "lognormal": "MEAN,STD:MEAN,STD"}
_INT = re.compile(r"^\d+$")


def _draw(spec: str, kind: str, field: str, count: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "fixed":
        return np.full(count, _length(spec, field))
    if kind == "uniform":
        low, _, high = field.partition("-")
        lo, hi = _length(spec, low), _length(spec, high or low)
        if lo > hi:
            raise WorkloadError(f"{spec}: range {field} is empty")
        return rng.integers(lo, hi + 1, count)
    mean, std = _mean_std(spec, kind, field)
    if kind == "normal":
        values = rng.normal(mean, std, count)
    else:  # a log-normal with this mean and std: sigma^2 = ln(1 + std^2/mean^2), mu = ln(mean) - sigma^2/2
        sigma2 = math.log1p((std / mean) ** 2)
        values = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), count)
    return np.maximum(np.rint(values), 1).astype(np.int64)


def _length(spec: str, text: str) -> int:
    if not _INT.match(text) or int(text) < 1:
        raise WorkloadError(f"{spec}: {text!r} is not a token count >= 1")
    return int(text)


def _mean_std(spec: str, kind: str, field: str) -> tuple[float, float]:
    try:
        mean, std = (float(x) for x in field.split(","))
    except ValueError:
        raise WorkloadError(f"{spec}: expected {kind}:{_FORMS[kind]}, got {field!r}") from None
    if not (mean >= 1 and std >= 0 and math.isfinite(mean + std)):
        raise WorkloadError(f"{spec}: mean must be >= 1 and std >= 0, got {field}")
    return mean, std


def _poisson(count: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process at ``rate`` requests/s (all at 0 for ``inf``)."""
    if math.isinf(rate):
        return np.zeros(count)
    return np.cumsum(rng.exponential(1.0 / rate, count))


# -- traces -----------------------------------------------------------------------------


def _read_trace(spec: str, num_prompts: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prompt lengths, output lengths and arrival times of the first ``num_prompts`` lines."""
    path = Path(spec)
    if not path.is_file():
        raise WorkloadError(f"{spec!r} is neither a file nor a distribution; expected {', '.join(f'{k}:{v}' for k, v in _FORMS.items())} "
                            "or a JSONL trace")  # fmt: skip
    try:
        lines = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise WorkloadError(f"{spec}: cannot read it ({err})") from None
    if num_prompts is not None:
        if num_prompts > len(lines):
            raise WorkloadError(f"{spec}: {num_prompts} prompts asked but the trace has {len(lines)} requests")
        lines = lines[:num_prompts]
    if not lines:
        raise WorkloadError(f"{spec}: the trace has no requests")
    rows = [_trace_row(spec, number, line) for number, line in lines]
    prompt, output, arrival = zip(*rows)
    return np.array(prompt), np.array(output), np.array(arrival, dtype=float)


def _trace_row(spec: str, number: int, line: str) -> tuple[int, int, float]:
    where = f"{spec}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise WorkloadError(f"{where}: not JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise WorkloadError(f"{where}: expected an object with prompt_tokens and output_tokens")
    prompt, output = _field(where, row, _PROMPT_KEYS), _field(where, row, _OUTPUT_KEYS)
    arrival = next((row[k] for k in _ARRIVAL_KEYS if k in row), 0.0)
    if isinstance(arrival, bool) or not isinstance(arrival, int | float) or not 0 <= arrival < math.inf:
        raise WorkloadError(f"{where}: arrival must be seconds >= 0, got {arrival!r}")
    return prompt, output, float(arrival)


def _field(where: str, row: dict, keys: tuple[str, ...]) -> int:
    key = next((k for k in keys if k in row), None)
    if key is None:
        raise WorkloadError(f"{where}: missing {keys[0]} (or {', '.join(keys[1:])})")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise WorkloadError(f"{where}: {key} must be a token count >= 1, got {value!r}")
    return value

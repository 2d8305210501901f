"""The traffic a bucket grid is advised for: the request lengths of a workload, summarised.

``Traffic.read`` takes any workload ``python -m furiosa_runtime simulate`` takes (the
grammar of ``furiosa_runtime/engine/workload.py``: a JSONL trace, or a distribution and a
number of prompts) and keeps at most ``sample`` of its requests, a seeded random subset:
every candidate grid is simulated on the same requests, and simulating a 10,000-line trace
for each of them would take minutes.  Arrivals follow ``request_rate`` as in ``simulate``
(``inf``: all at once, offline; None: a trace's own arrival times).

What the buckets must hold is read off the lengths: a prefill bucket takes a whole prompt,
and a decode step of a request ``j`` tokens into its output needs a bucket of at least
``prompt + j`` positions (the decode contexts), up to ``prompt + output`` for the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from furiosa_build.model_checks import position_limit
from furiosa_runtime.engine.workload import (
    DISTRIBUTIONS,
    Shape,
    WorkloadError,
    parse_workload,
)

#: Percentiles of the lengths the advice's comments report (with the maximum).
REPORTED_PERCENTILES = (50, 90, 99)


class AdviseError(ValueError):
    """A request the advisor cannot serve, as one line ``<field>: <problem>``."""


@dataclass(frozen=True)
class Traffic:
    """The requests a grid is judged on (lengths and arrivals), and where they came from."""

    workload: str
    shapes: tuple[Shape, ...]
    total: int  # requests in the workload before sampling

    @classmethod
    def read(cls, workload: str, *, num_prompts: int | None, request_rate: float | None, sample: int, seed: int) -> Traffic:
        """The workload's requests, at most ``sample`` of them (``AdviseError`` naming ``--workload``,
        or ``--num-prompts`` for a distribution without it)."""
        if num_prompts is None and workload.split(":", 1)[0] in DISTRIBUTIONS:
            raise AdviseError(f"--num-prompts: required with a distribution (--workload {workload}): how many requests to draw")
        try:
            shapes = parse_workload(workload, num_prompts, request_rate, seed)
        except WorkloadError as err:
            raise AdviseError(f"--workload: {err}") from None
        if len(shapes) > sample:
            keep = np.sort(np.random.default_rng(seed).choice(len(shapes), sample, replace=False))
            return cls(workload, tuple(shapes[i] for i in keep), len(shapes))
        return cls(workload, tuple(shapes), len(shapes))

    @property
    def prompts(self) -> np.ndarray:
        return np.array([s.prompt_tokens for s in self.shapes])

    @property
    def outputs(self) -> np.ndarray:
        return np.array([s.output_tokens for s in self.shapes])

    @property
    def contexts(self) -> np.ndarray:
        """Positions each request holds at its end: prompt plus output."""
        return self.prompts + self.outputs

    @property
    def offline(self) -> bool:
        return all(s.arrival == 0 for s in self.shapes)

    def decode_contexts(self) -> np.ndarray:
        """The attention size every decode step of every request needs: ``prompt + j`` for
        ``j`` in ``1 .. output - 1`` (the first output token comes from the prefill)."""
        steps = self.outputs - 1
        starts = np.repeat(self.prompts, steps)
        offsets = np.arange(steps.sum()) - np.repeat(np.cumsum(steps) - steps, steps)
        return starts + offsets + 1

    def check_positions(self, hf_config: dict[str, Any]) -> None:
        """Refuse a request longer than the positions the model has."""
        found = position_limit(hf_config)
        if found is None:
            return
        key, limit = found
        contexts = self.contexts
        worst = int(np.argmax(contexts))
        if contexts[worst] > limit:
            shape = self.shapes[worst]
            raise AdviseError(f"--workload: a request needs {contexts[worst]} positions ({shape.prompt_tokens} prompt + "
                              f"{shape.output_tokens} output tokens), more than the {limit} of the model ({key})")  # fmt: skip

    def describe(self) -> list[str]:
        """The lengths' percentiles, one line each, for the advice's comments."""
        sampled = f" (a seeded sample of {len(self.shapes)} of its {self.total})" if self.total > len(self.shapes) else ""
        arrivals = "all at once (offline)" if self.offline else f"over {self.shapes[-1].arrival:.1f} s"
        lines = [f"{len(self.shapes)} requests{sampled}, arriving {arrivals}"]
        for name, values in (("prompt tokens", self.prompts), ("output tokens", self.outputs), ("decode context", self.decode_contexts())):
            cuts = " / ".join(f"p{q} {_percentile(values, q):,}" for q in REPORTED_PERCENTILES)
            lines.append(f"{name:15s} {cuts} / max {int(values.max(initial=0)):,}; mean {values.mean() if values.size else 0:,.0f}")
        return lines


def _percentile(values: np.ndarray, q: float) -> int:
    """The ``q``-th percentile of lengths, rounded up (a bucket must hold it)."""
    return int(math.ceil(np.percentile(values, q))) if values.size else 0

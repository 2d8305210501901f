"""Beam search with Hugging Face transformers' semantics, and vLLM's ``beam_search`` types.

``BeamSearch`` is the per-request search, NumPy only, step for step what transformers'
``generate(num_beams=k, do_sample=False)`` does (``GenerationMixin._beam_search``), so the
results are token-identical to it:

* each step scores ``max(2, 1 + number of stop ids) * k`` candidates, the best
  continuations of every live beam by cumulative log-probability (ties: lower beam, then
  lower token id first); the first ``k`` that do not stop are the next live beams;
* a candidate among the best ``k`` that stops (a stop id, or the length limit) becomes a
  finished hypothesis scored ``cumulative logprob / generated_len ** length_penalty``;
  the best ``k`` hypotheses are kept (``BeamHypotheses``);
* the search ends at the length limit, when ``early_stopping=True`` and ``k`` hypotheses
  exist, or when no live beam can beat the worst kept hypothesis: its score over the
  current generated length (or over ``max_tokens`` for ``early_stopping="never"`` with a
  positive ``length_penalty``), transformers' heuristic.

The first step has one live beam (the prompt): transformers starts ``k`` copies of it with
all but the first at -1e9, which selects the same candidates.  The engine
(``core.EngineCore``) runs each live beam as a ``Sequence``; beams that continue one parent
fork its KV blocks (``BlockManager.fork``) and pruned beams free theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from furiosa_runtime.engine.outputs import Logprob

__all__ = ["BeamSearch", "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "Hypothesis"]

EarlyStopping = bool | str  # True, False or "never", as in transformers


@dataclass
class BeamSearchParams:
    """vLLM's ``BeamSearchParams`` for ``LLM.beam_search``; ``early_stopping`` (transformers'
    True / False / "never") is an addition.  Only ``temperature=0`` is supported: the search
    ranks raw log-probabilities, as transformers' does without sampling."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: EarlyStopping = False


@dataclass
class BeamSearchSequence:
    """One finished beam (vLLM's type): ``tokens`` are the prompt's and the generated ones,
    ``text`` their decoded text; ``logprobs`` one dict per generated token."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchOutput:
    """The finished beams of one prompt, best first (vLLM's type)."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


class Beam(Protocol):
    """What the search reads of a live beam (an engine ``Sequence``)."""

    output_token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, Logprob]]


@dataclass
class Hypothesis:
    """A finished beam: generated tokens (the stop token included), their per-token logprob
    dicts, the cumulative log-probability and the length-penalised score."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    cumulative_logprob: float
    score: float


class BeamSearch:
    """The search state of one request: ``width`` beams, the kept hypotheses, whether it is done."""

    def __init__(self, width: int, max_tokens: int, stop_ids: set[int], length_penalty: float = 1.0,
                 early_stopping: EarlyStopping = False) -> None:  # fmt: skip
        self.width = width
        self.max_tokens = max_tokens
        self.stop_ids = stop_ids
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.num_candidates = max(2, 1 + len(stop_ids)) * width
        self.hypotheses: list[Hypothesis] = []  # best first, at most ``width``
        self.done = False
        self._improvable = True  # transformers' is_early_stop_heuristic_unsatisfied (sticky)

    def step(self, beams: Seq[Beam], logprobs: np.ndarray, entry: Callable[[int, int], dict[int, Logprob]]) -> list[tuple[int, int]]:
        """One step over the live ``beams`` (best first) and their next-token ``logprobs``
        (num_beams, vocab): keep the hypotheses that finish, and return the next live beams,
        best first, as ``(index of the parent beam, token)``.  ``entry(beam, token)`` is the
        logprob dict recorded for a token a hypothesis ends with."""
        totals = logprobs + np.array([b.cumulative_logprob for b in beams])[:, None]  # (beams, vocab)
        vocab = totals.shape[1]
        generated = len(beams[0].output_token_ids) + 1
        at_limit = generated >= self.max_tokens
        running: list[tuple[int, int]] = []
        finished: list[tuple[int, int]] = []
        for rank, (beam, token) in enumerate(divmod(int(i), vocab) for i in _top(totals.ravel(), self.num_candidates)):
            if at_limit or token in self.stop_ids:
                if rank < self.width:  # only the best k candidates may finish
                    finished.append((beam, token))
            elif len(running) < self.width:
                running.append((beam, token))
        if self._improvable and not self._full_and_early():
            self._keep([self._hypothesis(beams[b], [*beams[b].logprobs, entry(b, t)], t, float(logprobs[b, t]), generated)
                        for b, t in finished])  # fmt: skip
        best_running = float(totals[running[0]]) if running else None
        self._improvable = self._improvable and self._can_improve(best_running, generated)
        self.done = not running or not self._improvable or self._full_and_early()
        return running

    def best(self, n: int) -> list[Hypothesis]:
        """The ``n`` best hypotheses, best first."""
        return self.hypotheses[:n]

    def _hypothesis(self, beam: Beam, logprobs: list[dict[int, Logprob]], token: int, logprob: float, generated: int) -> Hypothesis:
        """``beam`` ended by ``token``, scored with the length penalty on its ``generated`` tokens."""
        cumulative = beam.cumulative_logprob + logprob
        return Hypothesis([*beam.output_token_ids, token], logprobs, cumulative, cumulative / generated**self.length_penalty)

    def _keep(self, new: list[Hypothesis]) -> None:
        """Merge ``new`` into the kept hypotheses, keeping the best ``width`` (earlier first on ties)."""
        merged = sorted([*self.hypotheses, *new], key=lambda h: -h.score)  # stable
        self.hypotheses = merged[: self.width]

    def _full_and_early(self) -> bool:
        return self.early_stopping is True and len(self.hypotheses) == self.width

    def _can_improve(self, best_running: float | None, generated: int) -> bool:
        """transformers' heuristic: whether the best live beam could still beat the worst
        kept hypothesis (always, until ``width`` hypotheses are kept)."""
        if best_running is None or len(self.hypotheses) < self.width:
            return True
        never = self.early_stopping == "never" and self.length_penalty > 0.0
        length = self.max_tokens if never else generated
        return best_running / length**self.length_penalty > self.hypotheses[-1].score


def _top(values: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest ``values``, largest first, lower index first on ties."""
    k = min(k, values.size)
    part = np.argpartition(-values, k - 1)[:k]
    return sorted((int(i) for i in part), key=lambda i: (-values[i], i))

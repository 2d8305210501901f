"""vLLM-compatible `SamplingParams`: how one request turns logits into tokens.

Names, defaults and normalisation follow vLLM so that existing client code works. Every
field is validated on construction with a one-line `ValueError` naming the field and its
allowed values. Contradictory combinations (several samples with greedy decoding, streamed
deltas of a best-of choice, beam search with sampling settings) are rejected too, so nobody
gets a different distribution from the one they asked for.

Beam search takes vLLM's older form: ``use_beam_search=True`` with ``best_of`` beams
(default ``n``), returning the ``n`` best, ranked as transformers ranks them
(``length_penalty``, ``early_stopping`` True / False / "never"; see ``beam_search.py``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from numbers import Integral, Real
from typing import Any

__all__ = ["RequestOutputKind", "SamplingParams", "SamplingType"]

# Temperatures below this are treated as greedy decoding (same threshold as vLLM).
_SAMPLING_EPS = 1e-5


class RequestOutputKind(Enum):
    """What each streamed `RequestOutput` carries."""

    CUMULATIVE = 0  # all text and tokens generated so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # nothing until the request finishes


class SamplingType(IntEnum):
    """How the sampler picks a token (mirrors vLLM's enum)."""

    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    """Sampling parameters for one generation request (vLLM names and defaults).

    `top_k=0` is accepted as "disabled" and normalised to -1; `stop` may be one string or
    a list; `max_tokens=None` means "until the context is full" (the engine resolves it
    against the model length).
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # EOS ids from the model / generation_config, filled by update_from_generation_config.
    _all_stop_token_ids: set[int] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        self._normalize()
        self._verify_ranges()
        self._verify_supported()
        self._all_stop_token_ids.update(self.stop_token_ids)

    # -- validation ---------------------------------------------------------------

    def _normalize(self) -> None:
        """Bring accepted aliases to one canonical form (vLLM does the same).

        Only a string or a list (tuple) is a valid ``stop``/``stop_token_ids``: anything
        else (a number, bytes, a set) is refused here rather than iterated into nonsense.
        """
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            _check(isinstance(self.stop, list | tuple), "stop",
                   "a non-empty string or a list of non-empty strings", self.stop)
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        else:
            _check(isinstance(self.stop_token_ids, list | tuple), "stop_token_ids",
                   "a list of integers >= 0", self.stop_token_ids)
            self.stop_token_ids = [int(t) if _is_int(t) else t for t in self.stop_token_ids]
        for name in _INT_FIELDS:  # NumPy integers become plain ints (seed arithmetic, JSON)
            value = getattr(self, name)
            if _is_int(value):
                setattr(self, name, int(value))
        if self.top_k == 0:
            self.top_k = -1
        if _is_int(self.output_kind):
            _check(self.output_kind in {k.value for k in RequestOutputKind}, "output_kind",
                   "a RequestOutputKind (0, 1 or 2)", self.output_kind)
            self.output_kind = RequestOutputKind(self.output_kind)

    def _verify_ranges(self) -> None:
        """Reject values outside each field's domain."""
        _check(_is_int(self.n) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(
            self.best_of is None or (_is_int(self.best_of) and self.best_of >= self.n),
            "best_of", "None or an integer >= n", self.best_of,
        )
        _check_real(self.presence_penalty, "presence_penalty", "in [-2, 2]",
                    lambda v: -2.0 <= v <= 2.0)
        _check_real(self.frequency_penalty, "frequency_penalty", "in [-2, 2]",
                    lambda v: -2.0 <= v <= 2.0)
        _check_real(self.repetition_penalty, "repetition_penalty", "> 0", lambda v: v > 0.0)
        _check_real(self.temperature, "temperature", ">= 0", lambda v: v >= 0.0)
        _check_real(self.top_p, "top_p", "in (0, 1]", lambda v: 0.0 < v <= 1.0)
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k",
               "-1 or 0 (disabled) or an integer >= 1", self.top_k)
        _check_real(self.min_p, "min_p", "in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        _check(self.seed is None or _is_int(self.seed), "seed", "None or an integer",
               self.seed)
        self._verify_lengths()
        self._verify_stops()
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 0), name,
                   "None or an integer >= 0", value)
        _check(isinstance(self.output_kind, RequestOutputKind), "output_kind",
               "a RequestOutputKind", self.output_kind)
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            _check(isinstance(value, bool), name, "True or False", value)

    def _verify_lengths(self) -> None:
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens", "None or an integer >= 1", self.max_tokens)
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
               "an integer >= 0", self.min_tokens)
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"<= max_tokens ({self.max_tokens})", self.min_tokens)

    def _verify_stops(self) -> None:
        assert isinstance(self.stop, list) and self.stop_token_ids is not None
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "a non-empty string or a list of non-empty strings", self.stop)
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "a list of integers >= 0", self.stop_token_ids)

    def _verify_supported(self) -> None:
        """Reject valid requests the engine cannot honour, and contradictory combinations."""
        self._verify_beam_search()
        greedy = self.temperature < _SAMPLING_EPS
        _check(self.use_beam_search or not (greedy and self.num_samples > 1), "best_of" if self.best_of else "n",
               "1 when using greedy sampling (temperature 0)", self.best_of or self.n)
        _check(not (self.num_samples > self.n and self.output_kind is RequestOutputKind.DELTA),
               "output_kind", "CUMULATIVE or FINAL_ONLY when best_of > n (the best n are only "
               "known at the end)", self.output_kind)

    def _verify_beam_search(self) -> None:
        """Beam search ranks raw log-probabilities of at least two beams: no sampling settings,
        penalties or stop strings; its own settings only with ``use_beam_search``."""
        _check_real(self.length_penalty, "length_penalty", "(of any sign)", lambda v: True)
        _check(isinstance(self.early_stopping, bool) or self.early_stopping == "never", "early_stopping",
               "True, False or 'never'", self.early_stopping)
        if not self.use_beam_search:
            _check(self.length_penalty == 1.0, "length_penalty", "1.0 without use_beam_search", self.length_penalty)
            _check(self.early_stopping is False, "early_stopping", "False without use_beam_search", self.early_stopping)
            return
        _check(self.num_samples >= 2, "best_of", "an integer >= 2 with use_beam_search (the beam width; one beam is "
               "greedy decoding: temperature=0)", self.num_samples)
        defaults = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "presence_penalty": 0.0,
                    "frequency_penalty": 0.0, "repetition_penalty": 1.0}
        for name, default in defaults.items():
            _check(getattr(self, name) == default, name, f"{default} with use_beam_search", getattr(self, name))
        _check(not self.stop, "stop", "empty with use_beam_search (stop_token_ids end beams)", self.stop)

    # -- derived values -----------------------------------------------------------

    @property
    def num_samples(self) -> int:
        """How many sequences the request draws: ``best_of`` (default ``n``)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def sampling_type(self) -> SamplingType:
        """GREEDY for (near-)zero temperature, else RANDOM or RANDOM_SEED."""
        if self.temperature < _SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        """`stop_token_ids` plus the model's EOS ids (after update_from_generation_config)."""
        return self._all_stop_token_ids

    def update_from_generation_config(
        self,
        generation_config: dict[str, Any],
        model_eos_token_id: int | None = None,
    ) -> None:
        """Record the model's EOS ids, as vLLM does when a request enters the engine.

        Extra EOS ids from `generation_config.json` become stop tokens too (unless
        `ignore_eos`), so models with several end tokens stop on each of them.
        """
        if model_eos_token_id is not None:
            self._all_stop_token_ids.add(model_eos_token_id)
        eos = generation_config.get("eos_token_id")
        if eos is None:
            return
        extra = {eos} if isinstance(eos, int) else set(eos)
        extra.discard(model_eos_token_id)  # type: ignore[arg-type]
        if extra and not self.ignore_eos:
            self._all_stop_token_ids.update(extra)
            assert self.stop_token_ids is not None
            self.stop_token_ids = sorted(set(self.stop_token_ids) | extra)

    def verify_vocab(self, vocab_size: int) -> None:
        """Refuse token ids and logprob counts the model's vocabulary cannot satisfy.

        Called when a request meets a model: a stop token id outside the vocabulary would
        never fire (a silent no-op), and more logprobs than there are tokens cannot exist.
        """
        assert self.stop_token_ids is not None
        outside = [t for t in self.stop_token_ids if t >= vocab_size]
        _check(not outside, "stop_token_ids", f"token ids below the vocabulary size ({vocab_size})",
               outside)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or value <= vocab_size, name, f"None or an integer <= the vocabulary size ({vocab_size})", value)

    def clone(self) -> SamplingParams:
        """A deep copy, so per-request updates never leak into a shared default."""
        return copy.deepcopy(self)


# Integer fields: NumPy integers are accepted and stored as plain ints.
_INT_FIELDS = ("n", "best_of", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs")
# Flags that must be real booleans: a string such as "no" would otherwise read as True.
_BOOL_FIELDS = ("use_beam_search", "include_stop_str_in_output", "ignore_eos",
                "skip_special_tokens", "spaces_between_special_tokens")  # fmt: skip


def _is_int(value: object) -> bool:
    """True for integers (NumPy's too) but not bools (True is not a valid token count)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_real(value: object, name: str, allowed: str, in_range: Callable[[float], bool]) -> None:
    """Raise unless `value` is a finite number (not a bool) for which `in_range` holds.

    Checking the type first turns a string or None into the field's one-line error
    instead of a comparison TypeError; inf and NaN would turn the logits into NaNs.
    """
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    _check(ok and in_range(float(value)), name, f"a finite number {allowed}", value)


def _check(ok: bool, name: str, allowed: str, value: object) -> None:
    """Raise a one-line ValueError naming the field and its domain unless `ok`."""
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")

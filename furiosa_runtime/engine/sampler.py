"""Turn one row of logits into the next token id, the way vLLM's sampler does.

Pipeline (vLLM's order): ban ids -> repetition / frequency / presence penalties ->
greedy: first maximum; random: temperature -> top-k -> softmax -> top-p (nucleus) ->
min-p -> draw from the request's own `numpy.random.Generator`. Log-probabilities are
those of the raw model logits (vLLM's default), whatever the sampling settings.

Each request owns its generator: seeded from `SamplingParams.seed` when given (so the
same seed gives the same tokens whatever else is in the batch), otherwise spawned from
the engine-level seed (so a whole run is reproducible from one number).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from furiosa_runtime.engine.sampling_params import SamplingParams, SamplingType

__all__ = [
    "Sampler",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k",
    "apply_top_p",
    "mask_banned",
    "log_softmax",
    "min_tokens_banned_ids",
    "softmax",
    "top_logprobs",
]


def mask_banned(logits: np.ndarray, banned_ids: Iterable[int] | None) -> np.ndarray:
    """Return float64 logits with `banned_ids` set to -inf (a copy; input untouched)."""
    out = np.array(logits, dtype=np.float64, copy=True)
    if banned_ids is not None:
        ids = np.fromiter(banned_ids, dtype=np.int64)
        out[ids[(ids >= 0) & (ids < out.shape[-1])]] = -np.inf
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis; -inf entries get probability 0."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=-1, keepdims=True)


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Set everything below the k-th largest logit to -inf (in place; returns logits).

    Ties with the k-th value are kept, as in vLLM, so more than k ids may survive.
    """
    if top_k < 1 or top_k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -top_k)[-top_k]
    logits[logits < kth] = -np.inf
    return logits


def apply_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Zero all but the smallest high-probability set whose mass reaches `top_p`.

    The most likely token is always kept. Returns new, unnormalised probabilities.
    """
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
    kept = np.zeros_like(probs)
    kept[order[:keep]] = probs[order[:keep]]
    return kept


def apply_min_p(probs: np.ndarray, min_p: float) -> np.ndarray:
    """Zero the tokens less likely than ``min_p`` times the most likely one (in place)."""
    if min_p > 0.0:
        probs[probs < min_p * probs.max()] = 0.0
    return probs


def apply_penalties(
    logits: np.ndarray, params: SamplingParams, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int]
) -> np.ndarray:
    """vLLM's penalties, in place on float64 logits.

    Repetition divides positive (multiplies negative) logits of every token seen in the
    prompt or the output; frequency subtracts ``frequency_penalty`` per occurrence in the
    output; presence subtracts ``presence_penalty`` once for any token in the output.
    """
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.fromiter((*prompt_token_ids, *output_token_ids), dtype=np.int64))
        seen = seen[(seen >= 0) & (seen < vocab)]
        logits[seen] = np.where(logits[seen] > 0, logits[seen] / params.repetition_penalty, logits[seen] * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output_token_ids:
        counts = np.bincount(np.asarray(output_token_ids, dtype=np.int64), minlength=vocab)[:vocab]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return logits


def _no_penalties(params: SamplingParams) -> bool:
    """Whether ``apply_penalties`` leaves the logits as they are."""
    return params.repetition_penalty == 1.0 and not params.frequency_penalty and not params.presence_penalty


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of a logits row, in float64."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def top_logprobs(logprobs: np.ndarray, token: int, k: int) -> dict[int, tuple[float, int]]:
    """The ``k`` most likely ids plus ``token``: id -> (logprob, 1-based rank)."""
    ids = np.argpartition(-logprobs, k - 1)[:k] if k > 0 else np.empty(0, dtype=np.int64)
    ids = sorted({*map(int, ids), token}, key=lambda i: (-logprobs[i], i))
    return {i: (float(logprobs[i]), int(np.count_nonzero(logprobs > logprobs[i])) + 1) for i in ids}


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one index from unnormalised `probs` by inverting the CDF with one uniform."""
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    index = int(np.searchsorted(cdf, u, side="right"))
    if index >= probs.shape[-1]:  # u rounded up to the total: take the last live token
        index = int(np.searchsorted(cdf, cdf[-1], side="left"))
    return index


def min_tokens_banned_ids(
    params: SamplingParams,
    num_generated: int,
    eos_token_ids: Iterable[int] = (),
) -> set[int]:
    """Ids the sampler must not pick yet: EOS and stop tokens until `min_tokens` exist."""
    if num_generated >= params.min_tokens:
        return set()
    return set(eos_token_ids) | params.all_stop_token_ids | set(params.stop_token_ids or ())


class Sampler:
    """Picks next tokens; owns the engine-level seed that unseeded requests derive from."""

    def __init__(self, seed: int | None = None) -> None:
        self._seeds = np.random.SeedSequence(seed)

    def make_generator(self, params: SamplingParams, index: int = 0) -> np.random.Generator:
        """A fresh generator for sample ``index`` of one request (kept with its state).

        Seeded requests depend on their seed (and sample index) only; unseeded ones take
        the next child of the engine seed, so the run is reproducible given request
        arrival order.
        """
        if params.seed is not None:
            seed = params.seed % 2**64
            return np.random.default_rng(seed if index == 0 else [seed, index])
        return np.random.default_rng(self._seeds.spawn(1)[0])

    def sample(
        self,
        logits: np.ndarray,
        params: SamplingParams,
        rng: np.random.Generator | None,
        banned_ids: Iterable[int] | None = None,
        prompt_token_ids: Sequence[int] = (),
        output_token_ids: Sequence[int] = (),
    ) -> int:
        """Return the next token id for a (vocab,) logits row.

        The token ids so far feed the repetition, frequency and presence penalties.
        """
        greedy = params.sampling_type == SamplingType.GREEDY
        if greedy and not banned_ids and _no_penalties(params):
            return int(np.argmax(logits))  # what the float64 copy below would pick, without making it
        masked = apply_penalties(mask_banned(logits, banned_ids), params, prompt_token_ids, output_token_ids)
        if greedy:
            return int(np.argmax(masked))
        if rng is None:
            raise ValueError("rng: a numpy Generator is required for random sampling")
        return int(draw(self.probabilities(masked, params), rng))

    def probabilities(self, logits: np.ndarray, params: SamplingParams) -> np.ndarray:
        """The (unnormalised) distribution a random request samples from.

        `logits` must be float64 and may be modified; exposed for tests and logprobs.
        """
        logits /= params.temperature
        apply_top_k(logits, params.top_k)
        return apply_min_p(apply_top_p(softmax(logits), params.top_p), params.min_p)

    def sample_batch(
        self,
        logits: np.ndarray,
        params: list[SamplingParams],
        rngs: list[np.random.Generator | None],
        banned_ids: list[Iterable[int] | None] | None = None,
    ) -> list[int]:
        """Sample one token per row of a (batch, vocab) logits matrix."""
        banned = banned_ids if banned_ids is not None else [None] * len(params)
        return [
            self.sample(row, p, rng, ban)
            for row, p, rng, ban in zip(logits, params, rngs, banned, strict=True)
        ]

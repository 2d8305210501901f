"""Sampler: greedy, seeded and statistical behaviour on a small vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from furiosa_runtime.engine.sampler import (
    Sampler,
    apply_penalties,
    log_softmax,
    min_tokens_banned_ids,
    softmax,
    top_logprobs,
)
from furiosa_runtime.engine.sampling_params import SamplingParams

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)
DRAWS = 20_000


def empirical(params: SamplingParams, logits: np.ndarray = LOGITS, seed: int = 0) -> np.ndarray:
    """Frequencies of each token over DRAWS samples from one generator."""
    sampler = Sampler(seed)
    rng = sampler.make_generator(params)
    counts = np.bincount(
        [sampler.sample(logits, params, rng) for _ in range(DRAWS)], minlength=logits.size
    )
    return counts / DRAWS


def test_greedy_is_argmax_and_takes_first_maximum() -> None:
    sampler, greedy = Sampler(), SamplingParams(temperature=0.0)
    assert sampler.sample(LOGITS, greedy, rng=None) == 0
    ties = np.array([0.0, 3.0, 3.0, 1.0], dtype=np.float32)
    assert sampler.sample(ties, greedy, rng=None) == 1


def test_banned_ids_are_never_chosen() -> None:
    sampler = Sampler(0)
    greedy = SamplingParams(temperature=0.0)
    assert sampler.sample(LOGITS, greedy, rng=None, banned_ids={0}) == 1
    random = SamplingParams(temperature=1.0)
    rng = sampler.make_generator(random)
    draws = {sampler.sample(LOGITS, random, rng, banned_ids=[0, 1]) for _ in range(500)}
    assert draws.isdisjoint({0, 1})


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    params = SamplingParams(min_tokens=2, stop_token_ids=[4])
    assert min_tokens_banned_ids(params, num_generated=1, eos_token_ids=[5]) == {4, 5}
    assert min_tokens_banned_ids(params, num_generated=2, eos_token_ids=[5]) == set()


def test_seeded_requests_are_reproducible() -> None:
    params = SamplingParams(temperature=1.0, seed=1234)

    def run(engine_seed: int) -> list[int]:
        sampler = Sampler(engine_seed)
        rng = sampler.make_generator(params)
        return [sampler.sample(LOGITS, params, rng) for _ in range(50)]

    assert run(engine_seed=0) == run(engine_seed=99)  # the request seed alone decides


def test_engine_seed_makes_unseeded_runs_reproducible() -> None:
    params = SamplingParams(temperature=1.0)

    def run(seed: int) -> list[int]:
        sampler = Sampler(seed)
        rngs = [sampler.make_generator(params) for _ in range(3)]
        return [sampler.sample(LOGITS, params, rng) for rng in rngs for _ in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_temperature_one_matches_softmax() -> None:
    freq = empirical(SamplingParams(temperature=1.0))
    np.testing.assert_allclose(freq, softmax(LOGITS.astype(np.float64)), atol=0.015)


def test_temperature_rescales_logits() -> None:
    freq = empirical(SamplingParams(temperature=2.0))
    np.testing.assert_allclose(freq, softmax(LOGITS.astype(np.float64) / 2.0), atol=0.015)


def test_low_temperature_concentrates_mass() -> None:
    assert empirical(SamplingParams(temperature=0.1))[0] > 0.99


def test_top_k_keeps_only_the_k_best() -> None:
    freq = empirical(SamplingParams(top_k=2))
    assert freq[2:].sum() == 0
    expected = softmax(LOGITS[:2].astype(np.float64))
    np.testing.assert_allclose(freq[:2], expected, atol=0.015)


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = softmax(LOGITS.astype(np.float64))  # ~[0.57, 0.21, 0.13, 0.08, ...]
    top_p = float(probs[0] + probs[1] + 0.01)  # needs the third token to reach top_p
    freq = empirical(SamplingParams(top_p=top_p))
    assert freq[3:].sum() == 0
    np.testing.assert_allclose(freq[:3], probs[:3] / probs[:3].sum(), atol=0.015)


def test_top_p_always_keeps_the_top_token() -> None:
    assert empirical(SamplingParams(top_p=1e-6))[0] == 1.0


def test_top_k_and_top_p_combine() -> None:
    freq = empirical(SamplingParams(top_k=3, top_p=0.7))
    assert freq[2:].sum() == 0 and freq[1] > 0


@pytest.mark.parametrize("vocab", [1, 32_000])
def test_works_on_any_vocab_size(vocab: int) -> None:
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    sampler = Sampler(0)
    params = SamplingParams(top_k=50, top_p=0.9)
    token = sampler.sample(logits, params, sampler.make_generator(params))
    assert 0 <= token < vocab


def test_sample_batch() -> None:
    sampler = Sampler(0)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1)]
    logits = np.stack([LOGITS, LOGITS[::-1]])
    rngs = [None, sampler.make_generator(params[1])]
    assert sampler.sample_batch(logits, params, rngs) == [0, LOGITS.size - 1]


# -- goodness of fit: chi-square against the distribution each setting must produce ------------


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 quantile of chi-square(df), Wilson-Hilferty approximation (no scipy)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def assert_fits(params: SamplingParams, expected: np.ndarray, seed: int = 0) -> None:
    """The sampler's draws follow ``expected`` (zeros must never be drawn); fixed seed, so
    the verdict is deterministic, and a 1e-4 level keeps a correct sampler far from failing."""
    counts = empirical(params, seed=seed) * DRAWS
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {counts}"
    if support.sum() == 1:  # a single token: every draw must be it
        assert counts[support].sum() == DRAWS
        return
    want = expected[support] / expected[support].sum() * DRAWS
    statistic = float(((counts[support] - want) ** 2 / want).sum())
    assert statistic < chi_square_critical(int(support.sum()) - 1), (statistic, counts, want)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_distribution_chi_square(temperature: float) -> None:
    assert_fits(SamplingParams(temperature=temperature), softmax(LOGITS.astype(np.float64) / temperature))


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_top_k_distribution_chi_square(top_k: int) -> None:
    expected = softmax(LOGITS.astype(np.float64))
    expected[top_k:] = 0  # LOGITS is sorted, so the k best are the first k
    assert_fits(SamplingParams(top_k=top_k), expected)


@pytest.mark.parametrize("top_p", [0.6, 0.8, 0.95])
def test_top_p_distribution_chi_square(top_p: float) -> None:
    probs = softmax(LOGITS.astype(np.float64))
    keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1  # smallest prefix reaching top_p
    expected = np.where(np.arange(probs.size) < keep, probs, 0.0)
    assert_fits(SamplingParams(top_p=top_p), expected)


def test_min_p_distribution_chi_square() -> None:
    probs = softmax(LOGITS.astype(np.float64))
    expected = np.where(probs >= 0.2 * probs.max(), probs, 0.0)
    assert_fits(SamplingParams(min_p=0.2), expected)


def test_temperature_top_k_top_p_together_chi_square() -> None:
    probs = softmax(LOGITS[:4].astype(np.float64) / 0.8)  # top_k=4 first, then temperature
    keep = int(np.searchsorted(np.cumsum(probs), 0.9)) + 1
    expected = np.zeros(LOGITS.size)
    expected[:keep] = probs[:keep]
    assert_fits(SamplingParams(temperature=0.8, top_k=4, top_p=0.9), expected)


# -- penalties and log-probabilities ---------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = np.array([2.0, -1.0, 0.5, 3.0])
    out = apply_penalties(logits.copy(), SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0], output_token_ids=[1])
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])


def test_frequency_and_presence_penalties_count_generated_tokens_only() -> None:
    logits = np.zeros(4)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=1.0)
    out = apply_penalties(logits, params, prompt_token_ids=[3, 3], output_token_ids=[1, 1, 2])
    np.testing.assert_allclose(out, [0.0, -2.0, -1.5, 0.0])


def test_penalties_steer_greedy_decoding() -> None:
    sampler, greedy = Sampler(), SamplingParams(temperature=0.0, presence_penalty=2.0)
    assert sampler.sample(LOGITS, greedy, None, output_token_ids=[0]) == 1  # 2.0 - 2 < 1.0


def test_top_logprobs_ranks_and_includes_the_sampled_token() -> None:
    logprobs = log_softmax(LOGITS)
    np.testing.assert_allclose(np.exp(logprobs).sum(), 1.0)
    top = top_logprobs(logprobs, token=4, k=2)
    assert list(top) == [0, 1, 4]
    assert [rank for _, rank in top.values()] == [1, 2, 5]
    assert top[0][0] == pytest.approx(float(logprobs[0]))
    assert list(top_logprobs(logprobs, token=0, k=0)) == [0]


def test_every_sample_index_of_a_seeded_request_has_its_own_stream() -> None:
    params = SamplingParams(temperature=1.0, seed=5)
    sampler = Sampler()
    first, second = sampler.make_generator(params, 0), sampler.make_generator(params, 1)
    draws = lambda rng: [sampler.sample(LOGITS, params, rng) for _ in range(30)]  # noqa: E731
    assert draws(first) != draws(second)
    assert draws(Sampler().make_generator(params, 1)) == draws(Sampler().make_generator(params, 1))

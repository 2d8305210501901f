"""SamplingParams: vLLM defaults, normalisation, range checks, and honest 'not yet' errors."""

from __future__ import annotations

import pytest

from furiosa_runtime.sampling_params import RequestOutputKind, SamplingParams, SamplingType


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) == (1, 1.0, 1.0, -1, 16)
    assert p.stop == [] and p.stop_token_ids == []
    assert p.output_kind is RequestOutputKind.CUMULATIVE
    assert p.sampling_type is SamplingType.RANDOM


def test_normalisation() -> None:
    p = SamplingParams(stop="\n\n", top_k=0, stop_token_ids=[7])
    assert p.stop == ["\n\n"]
    assert p.top_k == -1  # 0 means disabled, like -1
    assert p.all_stop_token_ids == {7}


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({"temperature": 0.0}, SamplingType.GREEDY),
        ({"temperature": 1e-6}, SamplingType.GREEDY),
        ({"temperature": 0.7}, SamplingType.RANDOM),
        ({"temperature": 0.7, "seed": 3}, SamplingType.RANDOM_SEED),
    ],
)
def test_sampling_type(kwargs: dict, kind: SamplingType) -> None:
    assert SamplingParams(**kwargs).sampling_type is kind


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"n": 0}, "n"),
        ({"best_of": 0}, "best_of"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_out_of_range_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be ") as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"use_beam_search": True}, "use_beam_search"), ({"prompt_logprobs": 1}, "prompt_logprobs")],
)
def test_unimplemented_features_are_refused(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}: not supported yet"):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 2, "temperature": 0.0}, "n"),  # several greedy samples would all be the same
        ({"best_of": 3, "temperature": 0.0}, "best_of"),
        ({"n": 1, "best_of": 2, "output_kind": RequestOutputKind.DELTA}, "output_kind"),
    ],
)
def test_contradictory_combinations_are_refused(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be ") as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_sampling_features_are_accepted() -> None:
    params = SamplingParams(n=2, best_of=4, logprobs=3, min_p=0.05, repetition_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=-0.5, seed=3)  # fmt: skip
    assert params.num_samples == 4
    assert SamplingParams(n=3).num_samples == 3


def test_max_tokens_none_means_until_context_is_full() -> None:
    assert SamplingParams(max_tokens=None, min_tokens=100).max_tokens is None


def test_generation_config_eos_ids_become_stop_tokens() -> None:
    p = SamplingParams(stop_token_ids=[5])
    p.update_from_generation_config({"eos_token_id": [2, 9]}, model_eos_token_id=2)
    assert p.stop_token_ids == [5, 9]
    assert p.all_stop_token_ids == {2, 5, 9}
    ignoring = SamplingParams(ignore_eos=True)
    ignoring.update_from_generation_config({"eos_token_id": 9}, model_eos_token_id=2)
    assert ignoring.stop_token_ids == []


def test_clone_is_independent() -> None:
    p = SamplingParams(stop=["x"])
    q = p.clone()
    q.stop.append("y")
    assert p.stop == ["x"]

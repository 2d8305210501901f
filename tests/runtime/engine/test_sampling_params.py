"""SamplingParams: vLLM defaults, normalisation, range checks, and honest 'not yet' errors."""

from __future__ import annotations

import pytest

from furiosa_runtime.engine.sampling_params import RequestOutputKind, SamplingParams, SamplingType


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


BEAMS = {"use_beam_search": True, "n": 2, "temperature": 0.0}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({**BEAMS, "n": 1}, "best_of"),  # one beam is greedy decoding
        ({**BEAMS, "temperature": 0.8}, "temperature"),  # beam search ranks, it does not sample
        ({**BEAMS, "top_p": 0.9}, "top_p"),
        ({**BEAMS, "repetition_penalty": 1.2}, "repetition_penalty"),
        ({**BEAMS, "stop": "\n"}, "stop"),
        ({**BEAMS, "early_stopping": "sometimes"}, "early_stopping"),
        ({**BEAMS, "length_penalty": float("nan")}, "length_penalty"),
        ({"length_penalty": 2.0}, "length_penalty"),  # beam search settings without beam search
        ({"early_stopping": True}, "early_stopping"),
    ],
)
def test_beam_search_combinations_that_make_no_sense_are_refused(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be ") as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_beam_search_takes_best_of_beams_and_returns_n() -> None:
    params = SamplingParams(use_beam_search=True, n=2, best_of=4, temperature=0, length_penalty=0.5, early_stopping="never")
    assert (params.num_samples, params.n) == (4, 2)


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


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": "0.5"}, "temperature"),  # a string would otherwise fail as a comparison TypeError
        ({"temperature": None}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),  # inf turns -inf logits into NaN
        ({"top_p": "1"}, "top_p"),
        ({"min_p": None}, "min_p"),
        ({"presence_penalty": "0.5"}, "presence_penalty"),
        ({"frequency_penalty": None}, "frequency_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"stop": 5}, "stop"),
        ({"stop": {"a", "b"}}, "stop"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"output_kind": 5}, "output_kind"),
        ({"output_kind": "DELTA"}, "output_kind"),
        ({"ignore_eos": "no"}, "ignore_eos"),  # "no" is truthy: it would silently mean True
        ({"skip_special_tokens": None}, "skip_special_tokens"),
        ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
        ({"spaces_between_special_tokens": "false"}, "spaces_between_special_tokens"),
        ({"use_beam_search": "yes"}, "use_beam_search"),
    ],
)
def test_wrong_types_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be ") as info:
        SamplingParams(**kwargs)
    assert "\n" not in str(info.value)


def test_numpy_numbers_are_accepted_as_plain_values() -> None:
    import numpy as np

    p = SamplingParams(max_tokens=np.int64(5), seed=np.int64(-3), stop_token_ids=[np.int32(4)], temperature=np.float32(0.5))
    assert (p.max_tokens, p.seed, p.stop_token_ids) == (5, -3, [4])
    assert type(p.max_tokens) is int and type(p.stop_token_ids[0]) is int
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA


def test_verify_vocab_refuses_what_the_model_cannot_produce() -> None:
    SamplingParams(stop_token_ids=[511], logprobs=512).verify_vocab(512)
    with pytest.raises(ValueError, match=r"^stop_token_ids must be token ids below the vocabulary size \(512\), got \[512\]"):
        SamplingParams(stop_token_ids=[5, 512]).verify_vocab(512)
    with pytest.raises(ValueError, match=r"^logprobs must be .* <= the vocabulary size \(512\)"):
        SamplingParams(logprobs=513).verify_vocab(512)

"""LLMEngine and EngineArgs as a vLLM user drives them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from furiosa_runtime import LLM, EngineArgs, LLMEngine, RequestOutputKind, SamplingParams
from furiosa_runtime.npu.artifact import load_artifact

GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)


@pytest.fixture()
def engine(engine_artifact: Path) -> LLMEngine:
    with LLMEngine.from_engine_args(EngineArgs(model=str(engine_artifact))) as engine:
        yield engine


def drain(engine: LLMEngine) -> dict[str, list]:
    """Every output each request produced, in order."""
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen.setdefault(output.request_id, []).append(output)
    return seen


def test_add_step_until_done_matches_llm_generate(engine: LLMEngine, engine_artifact: Path) -> None:
    engine.add_request("a", "Hello", GREEDY)
    engine.add_request("b", {"prompt_token_ids": [5, 6, 7]}, GREEDY)
    seen = drain(engine)
    assert set(seen) == {"a", "b"} and all(outs[-1].finished for outs in seen.values())
    assert [o.finished for o in seen["a"]] == [False] * 4 + [True]  # one output per token
    llm = LLM(engine_artifact)
    ids = llm.tokenizer.encode("Hello", add_special_tokens=False)  # engines add no special tokens
    assert seen["a"][-1].outputs[0].token_ids == llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert engine.step() == []  # nothing left: returns at once


def test_output_kinds(engine: LLMEngine) -> None:
    for kind in RequestOutputKind:
        engine.add_request(kind.name, "Hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, output_kind=kind))
    seen = drain(engine)
    cumulative, delta, final = (seen[k.name] for k in RequestOutputKind)
    full = cumulative[-1].outputs[0]
    assert [len(o.outputs[0].token_ids) for o in cumulative] == [1, 2, 3, 4]
    assert [t for o in delta for t in o.outputs[0].token_ids] == full.token_ids
    assert "".join(o.outputs[0].text for o in delta) == full.text
    assert len(final) == 1 and final[0].outputs[0].token_ids == full.token_ids


def test_abort_one_or_many_frees_blocks(engine: LLMEngine) -> None:
    for rid in ("a", "b", "c", "d"):
        engine.add_request(rid, "Hello", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.abort_request("a")
    engine.abort_request(["b", "c"])
    engine.abort_request("never-added")
    assert engine.request_ids == {"d"}
    assert set(drain(engine)) == {"d"}
    blocks = engine.native_engine.blocks
    assert blocks.num_free == blocks.num_usable
    blocks.check_invariants()


def test_request_id_rules(engine: LLMEngine) -> None:
    engine.add_request("same", "Hello", GREEDY)
    with pytest.raises(ValueError, match="already exist"):
        engine.add_request("same", "Hello", GREEDY)
    with pytest.raises(ValueError, match="must be a string"):
        engine.add_request(7, "Hello", GREEDY)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maximum context length"):
        engine.add_request("long", "Hello", SamplingParams(max_tokens=500))
    assert engine.request_ids == {"same"}  # the refused ones left no trace
    drain(engine)
    engine.add_request("same", "Hello", GREEDY)  # finished ids may be reused


def test_shutdown_aborts_what_is_left(engine_artifact: Path) -> None:
    llm = LLM(engine_artifact)
    with LLMEngine.from_llm(llm) as engine:
        engine.add_request("x", "Hello", GREEDY)
        assert engine.model_path == str(engine_artifact) and engine.task_type == "generate"
    assert not engine.has_unfinished_requests() and not llm.engine.has_unfinished_requests()


def test_engine_args_from_the_command_line(engine_artifact: Path) -> None:
    devices = load_artifact(engine_artifact).devices.replace("npu:0", "npu:1")  # the same PEs of another device
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(engine_artifact), "--devices", devices, "--max-processing-samples", "1",
                              "--spare-blocks-ratio", "0.5", "--seed", "3", "--enable-jit-compilation", "false"])  # fmt: skip
    engine_args = EngineArgs.from_cli_args(args)
    assert (engine_args.devices, engine_args.max_processing_samples, engine_args.seed) == (devices, 1, 3)
    assert engine_args.enable_jit_compilation is False and engine_args.npu_queue_limit is None
    engine = LLMEngine.from_engine_args(engine_args)
    config = engine.native_engine.scheduler.config
    assert (config.max_processing_samples, config.spare_blocks_ratio, config.npu_queue_limit) == (1, 0.5, 2)  # 2: the artifact's


def test_prefix_caching_is_on_unless_the_flag_turns_it_off(engine_artifact: Path) -> None:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args(["--model", str(engine_artifact)])).enable_prefix_caching
    off = EngineArgs.from_cli_args(parser.parse_args(["--model", str(engine_artifact), "--no-enable-prefix-caching"]))
    assert not LLMEngine.from_engine_args(off).native_engine.blocks.enable_caching


@pytest.mark.parametrize(("field", "value"), [("jit_unit_size", 1), ("jit_threshold", 0), ("jit_max_workers", 0)])
def test_engine_args_validate_jit_settings(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be >= "):
        EngineArgs(model="unused", **{field: value})


def test_bad_requests_leave_no_trace(engine: LLMEngine) -> None:
    for params, needle in [
        (SamplingParams(max_tokens=2, logprobs=10**6), r"^logprobs must be None or an integer <= the vocabulary size"),
        (SamplingParams(max_tokens=2, stop_token_ids=[10**6]), r"^stop_token_ids must be token ids below the vocabulary size"),
        ({"max_tokens": 2}, r"^Unsupported sampling parameters type: dict"),
    ]:
        with pytest.raises(ValueError, match=needle):
            engine.add_request("bad", "Hello", params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^prompt_token_ids: must be a list of integers, got 5"):
        engine.add_request("bad", {"prompt_token_ids": 5}, GREEDY)
    assert not engine.has_unfinished_requests() and not engine.native_engine.has_unfinished_requests()
    engine.add_request("good", "Hello", GREEDY)
    assert drain(engine)["good"][-1].finished


def test_abort_request_refuses_a_non_string_id(engine: LLMEngine) -> None:
    for bad in (5, None):
        with pytest.raises(ValueError, match=r"^request_id: must be a string or an iterable of strings"):
            engine.abort_request(bad)  # type: ignore[arg-type]


def test_from_engine_args_needs_engine_args(engine_artifact: Path) -> None:
    with pytest.raises(ValueError, match=r"^engine_args must be an EngineArgs \(e.g. EngineArgs\(model=...\)\), got str"):
        LLMEngine.from_engine_args(str(engine_artifact))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("model", None, "model must be a non-empty path"),
        ("seed", -1, "seed must be >= 0, got -1"),
        ("devices", "", "devices must be None or a device string"),
        ("pipeline_parallel_size", 0, "pipeline_parallel_size must be >= 1, got 0"),
        ("data_parallel_size", 1.5, "data_parallel_size must be None or an integer >= 1, got 1.5"),
        ("npu_queue_limit", "x", "npu_queue_limit must be None or an integer >= 1, got 'x'"),
        ("max_processing_samples", 0, "max_processing_samples must be >= 1, got 0"),
        ("spare_blocks_ratio", float("nan"), r"spare_blocks_ratio must be None or a number in \[0, 1\), got nan"),
        ("enable_jit_compilation", "yes", "enable_jit_compilation must be True or False, got 'yes'"),
        ("enable_prefix_caching", 1, "enable_prefix_caching must be True or False, got 1"),
        ("jit_unit_size", "x", "jit_unit_size must be an integer >= 2, got 'x'"),
        ("jit_threshold", None, "jit_threshold must be an integer >= 1, got None"),
    ],
)
def test_engine_args_check_types_and_ranges_before_loading(field: str, value: object, needle: str) -> None:
    kwargs = {"model": "never-loaded", field: value}
    with pytest.raises(ValueError, match=rf"^{needle}"):
        EngineArgs(**kwargs)


def test_from_cli_args_with_a_partial_parser(engine_artifact: Path) -> None:
    args = EngineArgs.from_cli_args(argparse.Namespace(model=str(engine_artifact), seed=3))  # the other flags keep their defaults
    assert (args.seed, args.devices, args.jit_unit_size) == (3, None, 2)
    with pytest.raises(ValueError, match=r"^EngineArgs.from_cli_args: args has no model; add the engine flags with EngineArgs.add_cli_args"):
        EngineArgs.from_cli_args(argparse.Namespace(seed=3))


def test_the_engine_core_refuses_what_the_model_cannot_honour_before_queuing(engine_artifact: Path) -> None:
    core = LLM(engine_artifact).engine  # the layer under LLM, LLMEngine and AsyncLLMEngine
    with pytest.raises(ValueError, match="^logprobs must be None or an integer <= the vocabulary size"):
        core.add_request("a", None, [5, 6], SamplingParams(logprobs=10**6))
    with pytest.raises(ValueError, match="^stop_token_ids must be token ids below the vocabulary size"):
        core.add_request("b", None, [5, 6], SamplingParams(stop_token_ids=[10**6]))
    assert not core.has_unfinished_requests()

"""AsyncLLMEngine: streaming generation, concurrency and aborts, as an asyncio server uses it."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest

from furiosa_runtime import LLM, AsyncEngineArgs, AsyncLLMEngine, RequestOutputKind, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(engine_artifact: Path) -> LLM:
    return LLM(engine_artifact)


async def collect(engine: AsyncLLMEngine, prompt, params: SamplingParams, request_id: str) -> list:
    return [output async for output in engine.generate(prompt, params, request_id)]


def test_streams_and_concurrent_requests_match_llm(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)

    async def main() -> list[list]:
        return await asyncio.gather(*(collect(engine, {"prompt_token_ids": [5 + i, 6, 7]}, GREEDY, f"r{i}") for i in range(5)))

    streams = asyncio.run(main())
    for i, outputs in enumerate(streams):
        assert [o.finished for o in outputs] == [False] * 5 + [True]
        assert outputs[-1].outputs[0].token_ids == llm.generate({"prompt_token_ids": [5 + i, 6, 7]}, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert not engine.request_ids


def test_delta_stream_concatenates_to_the_whole(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)
    delta = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def main():
        return await asyncio.gather(collect(engine, "Hello", delta, "d"), collect(engine, "Hello", GREEDY, "c"))

    deltas, cumulative = asyncio.run(main())
    assert [t for o in deltas for t in o.outputs[0].token_ids] == cumulative[-1].outputs[0].token_ids


def test_abort_ends_the_stream_and_frees_blocks(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)

    async def main() -> tuple[list, list]:
        long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        received: list = []

        async def consume() -> None:
            async for output in engine.generate("Hello", long, "doomed"):
                received.append(output)
                if len(received) == 3:
                    await engine.abort("doomed")

        others = asyncio.create_task(collect(engine, "Hi", GREEDY, "survivor"))
        await consume()
        await engine.abort("no-such-request")  # a no-op
        return received, await others

    received, survivor = asyncio.run(main())
    assert len(received) == 3 and not received[-1].finished
    assert survivor[-1].finished
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable and not llm.engine.has_unfinished_requests()


def test_closing_the_stream_early_aborts_the_request(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)

    async def main() -> None:
        stream = engine.generate("Hello", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), "client")
        await stream.__anext__()
        await stream.aclose()  # the client went away
        await collect(engine, "Hi", GREEDY, "next")  # the driver applies the abort meanwhile

    asyncio.run(main())
    assert not llm.engine.has_unfinished_requests() and not engine.request_ids


def test_a_stream_closed_as_the_event_loop_ends_leaves_nothing_in_the_engine(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)

    async def main() -> None:
        stream = engine.generate("Hello", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), "gone")
        await stream.__anext__()
        await stream.aclose()  # and the loop ends at once: no driver step follows

    asyncio.run(main())
    assert not llm.engine.has_unfinished_requests() and not engine.request_ids
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_usable


def test_bad_requests_raise_before_streaming(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)

    async def main() -> None:
        first = engine.generate("Hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), "dup")
        await first.__anext__()
        with pytest.raises(ValueError, match="already exist"):
            await collect(engine, "Hello", GREEDY, "dup")
        with pytest.raises(ValueError, match="must be a string"):
            await collect(engine, "Hello", GREEDY, 3)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="maximum context length"):
            await collect(engine, "Hello", SamplingParams(max_tokens=100), "long")
        await first.aclose()

    asyncio.run(main())


def test_from_engine_args(engine_artifact: Path) -> None:
    parser = AsyncEngineArgs.add_cli_args(argparse.ArgumentParser())
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", str(engine_artifact), "--npu-queue-limit", "4"]))
    assert isinstance(args, AsyncEngineArgs)
    with AsyncLLMEngine.from_engine_args(args) as engine:
        assert engine.native_engine.scheduler.config.npu_queue_limit == 4
        [*_, last] = asyncio.run(collect(engine, "Hello", GREEDY, "x"))
        assert last.finished and last.request_id == "x"


def test_requests_the_model_cannot_honour_fail_alone(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)

    async def main() -> list:
        with pytest.raises(ValueError, match=r"^logprobs must be None or an integer <= the vocabulary size"):
            await collect(engine, "Hello", SamplingParams(temperature=0, max_tokens=2, logprobs=10**6), "big")
        with pytest.raises(ValueError, match=r"^stop_token_ids must be token ids below the vocabulary size"):
            await collect(engine, "Hello", SamplingParams(max_tokens=2, stop_token_ids=[10**6]), "oov")
        with pytest.raises(ValueError, match=r"^Unsupported sampling parameters type: NoneType"):
            await collect(engine, "Hello", None, "none")  # type: ignore[arg-type]
        return await collect(engine, "Hello", GREEDY, "after")  # the engine is still healthy

    assert asyncio.run(main())[-1].finished
    assert not engine.request_ids and not {"big", "oov", "none", "after"} & set(llm.engine.groups)


def test_abort_refuses_a_non_string_id(llm: LLM) -> None:
    engine = AsyncLLMEngine.from_llm(llm)
    with pytest.raises(ValueError, match="must be a string"):
        asyncio.run(engine.abort(5))  # type: ignore[arg-type]


def test_a_long_prompt_is_tokenized_while_the_event_loop_runs(llm: LLM) -> None:
    """A server's other streams keep going while one request's long text is tokenized (here
    ~1 MB, refused afterwards as too long): the loop ticks many times in the meantime."""
    engine = AsyncLLMEngine.from_llm(llm)
    text = "the quick brown fox jumps over the lazy dog; " * 22000

    async def main() -> int:
        ticks, done = 0, asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        with pytest.raises(ValueError, match="maximum context length|too long"):
            await collect(engine, text, GREEDY, "long")
        done.set()
        await task
        return ticks

    assert asyncio.run(main()) > 100
    assert not engine.request_ids

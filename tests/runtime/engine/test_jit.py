"""JIT compilation of buckets (``enable_jit_compilation``, ``furiosa_runtime/engine/jit.py``).

A tiny Llama whose one prefill bucket holds 32 tokens serves prompts of 33 to 40 tokens with
chunked prefill off: after ``jit_threshold`` of them the engine compiles a 40-token prefill
bucket in a worker process while it keeps serving (the long prompts meanwhile caught up in
decode steps), then prefills them in it; the tokens are those of an artifact built with
that bucket ahead of time, and an engine started later finds the bucket recorded beside
the artifact.  The record is held to the artifact's standard: a tampered one is ignored
and compiled again, and a read-only folder keeps the bucket in memory.  The serving
process never imports torch, and JIT is refused in one line where it cannot apply.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from furiosa_runtime import LLM, SamplingParams
from furiosa_runtime.engine.core import EngineCore
from furiosa_runtime.npu.artifact import Bucket, load_artifact
from furiosa_runtime.npu.jit_store import store_path
from tests.helpers import build, remount_read_only, tmpfs
from tests.runtime.test_no_torch import FORBIDDEN
from tests.runtime.test_no_torch import _run as run_python

BUCKETS = ["model=tiny-llama", "buckets.decode=[[2,64]]", "buckets.max_seq_len_to_capture=64",
           "buckets.paged_attention_block_size=8", "buckets.paged_attention_num_blocks=33"]  # fmt: skip
JIT_BUCKET = Bucket.prefill(1, 40)  # what prompts of 33..40 tokens ask for with jit_unit_size=8
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
COMPILE_TIMEOUT = 120.0  # seconds a worker may take on a busy machine


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("jit") / "tiny-llama"
    build([*BUCKETS, "buckets.prefill=[[1,32]]"], out, cache_dir)
    return out


def jit_llm(path: Path, cache_dir: Path, threshold: int = 2) -> LLM:
    return LLM(path, enable_jit_compilation=True, jit_threshold=threshold, jit_unit_size=8, cache_dir=cache_dir)


def prompt(rng: np.random.Generator, shortest: int, longest: int) -> list[int]:
    return rng.integers(3, 500, size=int(rng.integers(shortest, longest + 1))).tolist()


def step(engine: EngineCore, outputs: dict[str, list[int]]) -> None:
    """One engine step; the tokens of the requests it finished go to ``outputs``."""
    outputs |= {out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished}


def serve_until_compiled(engine: EngineCore, rng: np.random.Generator, sent: dict[str, list[int]], outputs: dict[str, list[int]]) -> None:
    """Keep a stream of long and short prompts going (two in flight) while the worker compiles."""
    deadline = time.monotonic() + COMPILE_TIMEOUT
    while engine.jit.pool.pending:
        assert time.monotonic() < deadline, "the JIT worker did not finish"
        if len(engine.groups) < 2 and len(sent) < 40:
            request_id = f"during-{len(sent)}"
            sent[request_id] = prompt(rng, 33, 40) if len(sent) % 2 else prompt(rng, 25, 32)
            engine.add_request(request_id, None, sent[request_id], GREEDY)
        step(engine, outputs)
        time.sleep(0.01)  # leave the worker a core


def record_buckets(engine: EngineCore) -> list[Bucket]:
    """The bucket of every prefill step the engine runs from now on."""
    used: list[Bucket] = []
    prefill = engine.runner.prefill

    def spy(seqs, bucket: Bucket, spans=None):
        used.append(bucket)
        return prefill(seqs, bucket, spans)

    engine.runner.prefill = spy
    return used


def test_long_prompts_get_a_bucket_compiled_while_serving(artifact: Path, tmp_path: Path, cache_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="furiosa_runtime.engine.jit")
    files_before = sorted(p.name for p in artifact.rglob("*"))
    engine = jit_llm(artifact, cache_dir).engine
    rng = np.random.default_rng(0)
    sent = {f"first-{i}": prompt(rng, 33, 40) for i in range(2)}  # longer than every prefill bucket
    for request_id, tokens in sent.items():
        engine.add_request(request_id, None, tokens, GREEDY)
    assert engine.jit.pool.pending == [JIT_BUCKET]  # the second one reached jit_threshold

    outputs: dict[str, list[int]] = {}
    serve_until_compiled(engine, rng, sent, outputs)
    assert any(len(sent[r]) > 32 for r in outputs), "long prompts kept completing while the bucket compiled"
    step(engine, outputs)  # the finished worker's bucket is added before the next step
    assert JIT_BUCKET in engine.scheduler.prefill_buckets and any("added after" in r.message for r in caplog.records)

    used = record_buckets(engine)
    for i in range(3):
        sent[f"after-{i}"] = prompt(rng, 33, 40)
        engine.add_request(f"after-{i}", None, sent[f"after-{i}"], GREEDY)
    while engine.has_unfinished_requests():
        step(engine, outputs)
    assert used.count(JIT_BUCKET) == 3  # each later long prompt prefilled in one step of the new bucket

    ahead = tmp_path / "tiny-llama-ahead"
    build([*BUCKETS, "buckets.prefill=[[1,32],[1,40]]"], ahead, cache_dir)
    reference = LLM(ahead).generate([{"prompt_token_ids": p} for p in sent.values()], GREEDY, use_tqdm=False)
    tokens = {request_id: out.outputs[0].token_ids for request_id, out in zip(sent, reference)}
    assert outputs == tokens  # every request, served before or after the bucket was in

    assert sorted(p.name for p in artifact.rglob("*")) == files_before  # the artifact itself is untouched
    load_artifact(artifact, verify=True)
    restarted = jit_llm(artifact, cache_dir, threshold=1).engine
    assert JIT_BUCKET in restarted.scheduler.prefill_buckets  # recorded beside the artifact
    restarted.add_request("again", None, prompt(rng, 33, 40), GREEDY)
    assert not restarted.jit.pool.pending  # nothing left to compile


def copy_with_record(artifact: Path, to: Path, cache_dir: Path) -> Path:
    """A copy of the artifact whose JIT store holds the 40-token bucket (compiled by the worker)."""
    from furiosa_build.jit import build_bucket

    shutil.copytree(artifact, to)
    build_bucket(to, 1, 40, cache_dir=str(cache_dir))
    return to


def wait_for_bucket(engine: EngineCore) -> None:
    """Step the engine until its worker has finished and the bucket is in."""
    deadline = time.monotonic() + COMPILE_TIMEOUT
    while engine.jit.pool.pending:
        assert time.monotonic() < deadline, "the JIT worker did not finish"
        engine.step()
        time.sleep(0.05)


def test_a_tampered_record_is_ignored_and_compiled_again(artifact: Path, tmp_path: Path, cache_dir: Path, caplog) -> None:
    copy = copy_with_record(artifact, tmp_path / "tiny-llama", cache_dir)
    entry = store_path(copy) / JIT_BUCKET.pipeline_name("tiny-llama")
    program = next((entry / "programs").iterdir())
    program.write_bytes(program.read_bytes().replace(b"{", b" {", 1))  # still JSON, another digest
    engine = jit_llm(copy, cache_dir, threshold=1).engine
    assert JIT_BUCKET not in engine.scheduler.prefill_buckets
    assert any("does not match its manifest checksum" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    engine.add_request("long", None, list(range(3, 43)), GREEDY)
    wait_for_bucket(engine)
    assert JIT_BUCKET in engine.scheduler.prefill_buckets
    assert JIT_BUCKET in jit_llm(copy, cache_dir).engine.scheduler.prefill_buckets  # the new record verifies


def test_a_read_only_folder_keeps_the_bucket_in_memory(artifact: Path, tmp_path: Path, cache_dir: Path, caplog) -> None:
    with tmpfs(tmp_path / "ro", "size=4m") as disk:
        shutil.copytree(artifact, disk / "tiny-llama")
        remount_read_only(disk)
        engine = jit_llm(disk / "tiny-llama", cache_dir, threshold=1).engine
        warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "cannot record compiled buckets" in warnings[0]
        engine.add_request("long", None, list(range(3, 43)), GREEDY)
        wait_for_bucket(engine)
        assert JIT_BUCKET in engine.scheduler.prefill_buckets and not store_path(disk / "tiny-llama").exists()
        engine.jit.close()


NO_TORCH = """
import sys, time
from furiosa_runtime import LLM, SamplingParams
llm = LLM(sys.argv[1], enable_jit_compilation=True, jit_threshold=1, jit_unit_size=8, cache_dir=sys.argv[2])
params = SamplingParams(temperature=0, max_tokens=2)
llm.generate({"prompt_token_ids": list(range(3, 43))}, params, use_tqdm=False)
while llm.engine.jit.pool.pending:
    llm.generate({"prompt_token_ids": list(range(3, 35))}, params, use_tqdm=False)  # fits the 32-token bucket
    time.sleep(0.05)
assert any(b.attention_size == 40 for b in llm.engine.scheduler.prefill_buckets)
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[3:]))
assert not loaded, f"furiosa_runtime imported {loaded}"
"""


def test_the_runtime_still_imports_no_torch(artifact: Path, tmp_path: Path, cache_dir: Path) -> None:
    copy = tmp_path / "tiny-llama"
    shutil.copytree(artifact, copy)  # without the record the first test may have made
    result = run_python(NO_TORCH, str(copy), str(cache_dir), *FORBIDDEN)
    assert result.returncode == 0, result.stderr


def test_refused_in_one_line_where_it_cannot_apply(tiny_bert_artifact: Path, artifact: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match=r"^enable_jit_compilation: JIT compiles prefill buckets .* is an embed artifact$"):
        LLM(tiny_bert_artifact, enable_jit_compilation=True)
    real = __import__("importlib").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "furiosa_build" else real(name, *a))
    with pytest.raises(ValueError, match=r"^enable_jit_compilation: the JIT worker \(furiosa_build.jit\) needs furiosa_build, not "):
        LLM(artifact, enable_jit_compilation=True)

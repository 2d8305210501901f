"""The bucket advisor, ``python -m furiosa_build.advise``: buckets for a traffic within a budget
of programs and the device's memory, written as a buckets config that builds and serves as
the advisor modelled it; a mistake is one line and nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from furiosa_build.__main__ import prevalidate
from furiosa_build.advise import Options, advise, main, write
from furiosa_build.advise_cost import kv_block_bytes
from furiosa_build.advise_report import MARKER, Advice
from furiosa_build.builder import ArtifactBuilder
from furiosa_runtime.engine.simulate import simulate
from furiosa_runtime.npu.artifact import open_artifact
from furiosa_runtime.npu.simulator import NPUSimulator
from furiosa_runtime.npu.step_times import load_programs

#: A tiny model on one PE; captures in this process (no worker pool to start).
TINY = ("model=tiny-llama", "parallel=single", "build.backend=sequential")


def write_trace(path: Path, requests: list[tuple[int, int]]) -> Path:
    """A JSONL trace of (prompt tokens, output tokens), all arriving at once."""
    path.write_text("".join(json.dumps({"arrival": 0.0, "prompt_tokens": p, "output_tokens": o}) + "\n" for p, o in requests))
    return path


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Short questions and longer ones, short answers: two shapes, eight requests."""
    return write_trace(tmp_path_factory.mktemp("traces") / "chat.jsonl", [(20, 10), (40, 24)] * 4)


@pytest.fixture(scope="module")
def advised(tmp_path_factory: pytest.TempPathFactory, chat: Path, cache_dir: Path) -> tuple[Advice, Path]:
    """The advice for ``chat`` within 3 programs, written to ``<tmp>/conf/buckets/chat.yaml``."""
    options = Options(str(chat), 3, (*TINY, f"build.cache_dir={cache_dir}"), name="chat",
                      out=tmp_path_factory.mktemp("user") / "conf" / "buckets")  # fmt: skip
    advice = advise(options)
    write(advice, options.target(), options.force)
    return advice, options.target()


def test_the_advice_stays_within_the_budget_and_the_device_memory(advised: tuple[Advice, Path]):
    advice, _ = advised

    assert advice.grid.programs <= 3
    block = advice.spec.buckets.paged_attention_block_size
    assert advice.grid.blocks_needed(block) <= advice.num_blocks  # the largest bucket fits the KV cache
    for pe, per_block in advice.memory.block.items():  # and the KV cache fits beside the weights on every PE
        assert advice.memory.weights[pe] + advice.num_blocks * per_block <= advice.memory.pe_bytes


def test_a_kv_block_takes_what_the_simulator_reserves_for_it(tiny_llama_artifact: Path):
    artifact, files = open_artifact(tiny_llama_artifact)
    simulator = NPUSimulator(files, artifact)

    per_block = kv_block_bytes(artifact, load_programs(files, artifact))
    num_blocks = artifact.generator_config.paged_attention_config.num_blocks
    for pe in simulator.pes.values():
        assert sum(layer.nbytes for layer in pe.kv.values()) == num_blocks * per_block[pe.name]


def test_the_advice_serves_the_traffic_at_least_as_well_as_the_default_buckets(advised: tuple[Advice, Path]):
    advice, _ = advised

    assert advice.base_served is not None  # conf/buckets/default.yaml holds these short requests as it is
    assert advice.served.busy_seconds <= advice.base_served.busy_seconds
    assert advice.served.report.output_tokens_per_s >= advice.base_served.report.output_tokens_per_s


def test_the_written_file_is_a_buckets_option_that_builds_and_serves_as_modelled(
    advised: tuple[Advice, Path], chat: Path, cache_dir: Path, tmp_path: Path
):
    advice, written = advised
    assert written.read_text().startswith(MARKER)

    # the folder holding buckets/ is a --config-dir: buckets=chat selects the file, in a build or a sweep
    spec = prevalidate([*TINY, "buckets=chat", "build.weights=none", f"build.save_dir={tmp_path / 'chat'}",
                        f"build.cache_dir={cache_dir}", "build.progress=false"], extra_config_dir=written.parent.parent)[0]  # fmt: skip
    assert [list(p) for p in spec.buckets.decode] == advice.grid.pairs("decode")
    assert spec.buckets.paged_attention_num_blocks == advice.num_blocks
    ArtifactBuilder.from_spec(spec).build_from_spec()

    served = simulate(tmp_path / "chat", str(chat), request_rate=math.inf)
    assert served.output_tokens_per_s == advice.served.report.output_tokens_per_s  # the same schedule, to the last bit
    assert served.ttft_ms == advice.served.report.ttft_ms


def test_the_command_line_prints_the_comparison_and_rewrites_its_own_file(advised, chat: Path, cache_dir: Path, capsys):
    advice, written = advised

    status = main(["--workload", str(chat), "--max-programs", "3", "--name", "chat", "--out", str(written.parent),
                   *TINY, f"build.cache_dir={cache_dir}"])  # fmt: skip

    out = capsys.readouterr().out
    assert status == 0
    assert "advised" in out and "default" in out and f"wrote {written}" in out
    assert written.read_text() == advice.render()  # the same advice: the search is deterministic


# --------------------------------------------------------------------------- mistakes


def _refused(args: list[str], out: Path, capsys) -> str:
    """Run the advisor on a command line it must refuse; its error line (the last one it
    printed: progress lines such as ``advise: building ...`` may come before)."""
    status = main([*args, "--out", str(out)])
    err = capsys.readouterr().err.splitlines()
    assert status == 2
    assert [line for line in err if line.startswith("error:")] == err[-1:] and "Traceback" not in "".join(err), err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return err[-1]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--workload", "no-such-trace.jsonl", "--max-programs", "4", *TINY], "error: --workload: 'no-such-trace.jsonl' is neither a file"),
        (["--workload", "{chat}", "--max-programs", "0", *TINY], "error: --max-programs: must be at least 2"),
        (["--workload", "{long}", "--max-programs", "4", *TINY], "error: --workload: a request needs 620 positions (600 prompt + 20 output "
                                                                  "tokens), more than the 512 of the model (max_position_embeddings)"),
        (["--workload", "{chat}", "--max-programs", "4", "model=no-such-model"], "error: model: unknown option 'no-such-model'"),
        (["--workload", "{chat}", "--max-programs", "4", "--name", "../up", *TINY], "error: --name: expected letters, digits"),
        (["--workload", "{chat}", "--max-programs", "four", *TINY], "error: argument --max-programs: invalid int value: 'four'"),
    ],
    ids=["missing-trace", "budget-0", "longer-than-the-model", "unknown-model", "bad-name", "budget-not-a-number"],
)  # fmt: skip
def test_a_mistake_is_one_line_naming_the_field_and_nothing_is_written(args, line, chat: Path, tmp_path: Path, capsys):
    long = write_trace(tmp_path / "long.jsonl", [(20, 10), (600, 20)])
    args = [a.format(chat=chat, long=long) for a in args]

    assert _refused(args, tmp_path / "buckets", capsys).startswith(line)


def test_a_device_too_small_for_the_longest_request_is_refused(chat: Path, cache_dir: Path, tmp_path: Path, capsys):
    line = _refused(["--workload", str(chat), "--max-programs", "4", "--max-memory", "64KiB", *TINY, f"build.cache_dir={cache_dir}"],
                    tmp_path / "buckets", capsys)  # fmt: skip

    assert line.startswith("error: --max-memory: 64.00 KiB a device leaves room for 0 KV blocks")


def test_a_file_the_advisor_did_not_write_is_left_alone(chat: Path, tmp_path: Path, capsys):
    mine = tmp_path / "buckets" / "mine.yaml"
    mine.parent.mkdir()
    mine.write_text("prefill: [[1, 64]]\ndecode: [[1, 64]]\n")

    status = main(["--workload", str(chat), "--max-programs", "4", "--name", "mine", "--out", str(mine.parent), *TINY])

    assert status == 2
    assert capsys.readouterr().err.startswith(f"error: --name: {mine} exists and was not written by the advisor")
    assert mine.read_text() == "prefill: [[1, 64]]\ndecode: [[1, 64]]\n"

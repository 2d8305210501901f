"""The sweep report: every job of a ``-m`` sweep ranked by the modelled serving of ``sweep.workload``.

A real sweep over tiny decode grids (one job invalid) writes ``sweep.csv``, ``sweep.md`` and
``sweep.png`` into its timestamped folder, best throughput first, the invalid job last with
its one-line error.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from furiosa_build import __main__ as entry

GRIDS = "[[1,64]],[[1,64],[2,64]],[[4,64]],[[4,128]]"  # the last exceeds max_seq_len_to_capture=64
INVALID = "buckets.decode[0]: attention_size 128 exceeds buckets.max_seq_len_to_capture=64"


@pytest.mark.slow
def test_a_sweep_ranks_its_jobs_by_modelled_throughput(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # the invalid job fails the command, after the others built
        entry.main(["-m", "model=tiny-llama", "buckets=tiny", f"buckets.decode={GRIDS}", f"build.cache_dir={cache_dir}",
                    "build.progress=false", "sweep.workload=uniform:8-24:8-32", "sweep.num_prompts=24"])  # fmt: skip
    assert exit_info.value.code == 2
    [sweep] = (tmp_path / "artifacts" / "multirun").iterdir()
    with (sweep / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == ["buckets.decode=[[4,64]]", "buckets.decode=[[1,64],[2,64]]",
                                              "buckets.decode=[[1,64]]", "buckets.decode=[[4,128]]"]  # fmt: skip
    served = [float(row["output_tokens_per_s"]) for row in rows[:3]]
    assert served == sorted(served, reverse=True) and all(row["error"] == "" for row in rows[:3])
    assert all(float(row["ttft_p50_ms"]) > 0 and float(row["max_pe_weight_mib"]) > 0 and int(row["programs"]) > 0 for row in rows[:3])
    assert rows[3]["error"] == INVALID and rows[3]["output_tokens_per_s"] == ""
    table = (sweep / "sweep.md").read_text()
    assert "uniform:8-24:8-32" in table and INVALID in table.splitlines()[-1]
    assert (sweep / "sweep.png").read_bytes().startswith(b"\x89PNG")
    for row in rows[:3]:  # artifacts and reports stay apart: nothing unlisted inside an artifact
        assert {p.name for p in Path(row["artifact"]).iterdir()} <= {"artifact.json", "programs", "params.safetensors",
                                                                   "tokenizer.json", "tokenizer_config.json"}  # fmt: skip


def test_a_job_whose_buckets_cannot_serve_the_workload_is_listed_with_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                          cache_dir: Path) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    entry.main(["-m", "model=tiny-llama", "buckets=tiny", "buckets.paged_attention_block_size=4,8", f"build.cache_dir={cache_dir}",
                "build.progress=false", "sweep.workload=fixed:40:40", "sweep.num_prompts=2"])  # fmt: skip
    [sweep] = (tmp_path / "artifacts" / "multirun").iterdir()
    with (sweep / "sweep.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(row["error"].startswith("simulate: req-0 (40 prompt + 40 output tokens) does not fit") for row in rows)


def test_a_bad_sweep_workload_is_refused_up_front(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        entry.main(["model=tiny-llama", "buckets=tiny", "sweep.workload=fixed:1", "build.dry_run=true"])
    assert capsys.readouterr().err == "error: sweep.workload: fixed:1: expected fixed:IN:OUT\n"

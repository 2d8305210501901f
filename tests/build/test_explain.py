"""Explained cache misses: ``python -m furiosa_build explain [overrides]`` (``build.explain=true``)
names, for each program that would compile, the part of its key that differs from the
nearest cached program, and compiles nothing.

    python -m furiosa_build explain model=tiny-llama buckets=tiny parallel.tensor_parallel_size=2 ...
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import furiosa_build.__main__ as entry
from furiosa_build.builder import ArtifactBuilder
from furiosa_build.explain import MissReport
from tests.helpers import build, compose_spec

SMALL = ["model=tiny-llama", "buckets=tiny", "buckets.prefill=[[1,32]]", "buckets.decode=[[1,32]]"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache holding one build of SMALL (programs and their key records)."""
    root = tmp_path_factory.mktemp("explain")
    build(SMALL, root / "artifact", root / "cache")
    return root / "cache"


def _explain(cache: Path, *overrides: str) -> MissReport:
    spec = compose_spec([*SMALL, *overrides, f"build.cache_dir={cache}", "build.progress=false"])
    return ArtifactBuilder.from_spec(spec).explain()


def _programs(cache: Path) -> set[Path]:
    return set((cache / "programs").glob("*/*.json"))


def test_an_unchanged_config_has_nothing_to_explain(cache: Path) -> None:
    report = _explain(cache)
    assert report.misses == []
    assert "nothing to compile" in report.render()


def test_a_bucket_change(cache: Path) -> None:
    report = _explain(cache, "buckets.decode=[[2,32]]")
    assert {m.unit.parts["unit"] for m in report.misses} == {"decode embed", "decode block:0", "decode head"}
    assert all(m.changed == ["bucket"] for m in report.misses)
    assert "bucket: shape (batch, attention, kv_cache) (1, 32, 31) -> (2, 32, 31)" in report.render()


def test_a_compiler_option_change(cache: Path) -> None:
    report = _explain(cache, "build.compiler_config_overrides={fuse:false}")
    assert len(report.misses) == report.unique
    assert all(m.changed == ["options"] for m in report.misses)
    assert "compiler option fuse: true -> false" in report.render()


def test_a_tensor_parallel_change(cache: Path) -> None:
    report = _explain(cache, "parallel.devices=npu:0:0-1", "parallel.tensor_parallel_size=2")
    assert len(report.misses) == 2 * 6  # every program, once per rank
    assert all(m.changed == ["tp"] for m in report.misses)
    assert "tensor-parallel placement changed from a single PE to rank 1 of 2" in report.render()


def test_a_compiler_version_change(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("furiosa_build.compile.COMPILER_VERSION", "99.0.0")
    report = _explain(cache)
    assert len(report.misses) == report.unique
    assert all(m.changed == ["compiler"] for m in report.misses)
    assert "compiler version 0.2.0 -> 99.0.0" in report.render()


def test_a_program_never_seen_is_a_new_unit(tmp_path: Path) -> None:
    report = _explain(tmp_path / "empty")
    assert all(m.nearest is None for m in report.misses) and len(report.misses) == report.unique
    assert "new unit: no prefill embed program was ever recorded in this cache" in report.render()


def test_a_lost_entry_is_named_as_such(tmp_path: Path, cache: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    lost = min(_programs(copy))
    lost.unlink()
    [miss] = _explain(copy).misses
    assert miss.unit.key == lost.stem and miss.changed == []
    assert "whose cache entry is gone" in miss.causes[0]


def test_the_command_line_alias_prints_and_compiles_nothing(cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _programs(cache)
    entry.main(["explain", *SMALL, "buckets.prefill=[[1,16]]", f"build.cache_dir={cache}", f"build.save_dir={tmp_path / 'out'}"])
    out = capsys.readouterr().out
    assert "programs: 3 of 6 unique programs would compile:" in out
    assert "prefill block:0" in out and "(1, 32, 0) -> (1, 16, 0)" in out
    assert _programs(cache) == before and not (tmp_path / "out").exists()

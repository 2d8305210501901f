"""A shared cache tier behind each host's local cache (``build.shared_cache``): hosts are
simulated as separate local cache folders over one shared folder or fsspec URL.

    python -m furiosa_build model=tiny-llama buckets=tiny build.shared_cache=/mnt/team-cache
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from furiosa_build.cache import CompileCache
from furiosa_build.config import ConfigError
from tests.helpers import REPO, build, compose_spec, remount_read_only, tmpfs

SMALL = ["model=tiny-llama", "buckets=tiny", "buckets.prefill=[[1,32]]", "buckets.decode=[[1,32]]"]


def _build(tmp: Path, host: str, shared: str | Path):
    """Build SMALL on ``host`` (its own local cache under ``tmp``); return the report and warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build([*SMALL, f"build.shared_cache={shared}"], tmp / host / "artifact", tmp / host / "cache")
    return report, [str(w.message) for w in caught if "cache" in str(w.message)]


def _entries(tier: Path) -> list[Path]:
    """Every file of the tier's compile and capture sections."""
    return sorted(p for section in (tier, tier / "captures") for p in (section / "programs").glob("*/*"))


def _assert_all_valid(tier: Path) -> None:
    """Each file in the tier is a whole entry whose digest checks (no scratch files left)."""
    entries = _entries(tier)
    assert entries
    for path in entries:
        assert not path.name.startswith("."), f"scratch file left behind: {path}"
        assert CompileCache(path.parents[2]).get(path.stem) is not None, path


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A shared folder filled by one host's build."""
    root = tmp_path_factory.mktemp("seeded")
    report, lines = _build(root, "seeder", root / "tier")
    assert lines == [] and report.compile.compiled == report.compile.unique
    return root / "tier"


def test_second_host_compiles_nothing(tmp_path: Path) -> None:
    pytest.importorskip("fsspec")
    url = f"memory://furiosa-test/{tmp_path.name}"
    first, _ = _build(tmp_path, "host-a", url)
    assert first.compile.compiled == first.compile.unique and first.compile.shared == 0

    second, lines = _build(tmp_path, "host-b", url)
    assert lines == []
    assert second.compile.compiled == 0
    assert second.compile.shared == second.compile.cached == second.compile.unique
    assert f"{second.compile.unique} of them from the shared cache" in second.render()

    third = build(SMALL, tmp_path / "host-b" / "again", tmp_path / "host-b" / "cache")  # copied into host b's own cache
    assert third.compile.compiled == 0 and third.compile.shared is None


def test_four_concurrent_builders_all_succeed_and_leave_only_valid_entries(tmp_path: Path) -> None:
    tier = tmp_path / "tier"
    env = {**os.environ, "PYTHONWARNINGS": "error::UserWarning"}  # any cache warning would fail the build
    hosts = [
        subprocess.Popen([sys.executable, "-m", "furiosa_build", *SMALL, f"build.shared_cache={tier}", "build.progress=false", "build.backend=sequential",
                          f"build.cache_dir={tmp_path / f'host{i}'}", f"build.save_dir={tmp_path / f'out{i}'}"],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]  # fmt: skip
    for host in hosts:
        _, err = host.communicate(timeout=600)
        assert host.returncode == 0, err
    _assert_all_valid(tier)
    programs = {tuple(sorted(p.name for p in (tmp_path / f"out{i}" / "programs").iterdir())) for i in range(4)}
    assert len(programs) == 1


def test_a_corrupted_shared_entry_is_a_warning_and_a_recompile(tmp_path: Path, seeded: Path) -> None:
    tier = tmp_path / "tier"
    shutil.copytree(seeded, tier)
    victim = next((tier / "programs").glob("*/*.json"))
    data = victim.read_bytes()
    victim.write_bytes(data[:-2] + b"!}")

    report, lines = _build(tmp_path, "host", tier)
    assert lines == [f"shared compile cache entry {victim.stem} is corrupted (payload sha256 mismatch); recompiling"]
    assert report.compile.compiled == 1 and report.compile.shared == report.compile.unique - 1
    assert victim.read_bytes() == data  # the write-back replaced the damaged entry
    _assert_all_valid(tier)


def test_a_read_only_shared_tier_warns_once_and_the_build_goes_on(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tier", "size=4m") as tier:
        remount_read_only(tier)
        report, lines = _build(tmp_path, "host", tier)
    assert report.compile.compiled == report.compile.unique
    assert len(lines) == 1 and lines[0].startswith(f"shared cache {tier} cannot be written (read-only file system")


def test_an_unknown_protocol_is_one_line_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^build\.shared_cache: unknown protocol 'nosuch'") as caught:
        compose_spec([*SMALL, "build.shared_cache=nosuch://bucket/cache"])
    assert "\n" not in str(caught.value)

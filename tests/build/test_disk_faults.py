"""A full or read-only output disk fails the build in one line and keeps the old artifact.

The small file systems are tmpfs mounts the tests make themselves, which needs root;
elsewhere these tests are skipped with the reason.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from furiosa_build.errors import BuildIOError
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import REPO, build, remount_read_only, tmpfs

TINY = ["model=tiny-llama", "buckets=tiny"]


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 640 KiB tmpfs: room for one tiny-llama artifact (about 330 KiB), not for two."""
    with tmpfs(tmp_path / "disk", "size=640k") as mount:
        yield mount


def test_a_full_disk_keeps_the_old_artifact_and_leaves_nothing_half_written(small_disk, tiny_llama_artifact, cache_dir):
    out = small_disk / "tiny"
    shutil.copytree(tiny_llama_artifact, out)
    with pytest.raises(BuildIOError) as err:
        build(TINY, out, cache_dir)
    assert str(err.value) == f"writing the artifact: {out}: no space left on device"
    assert load_artifact(out).metadata.artifact_id == load_artifact(tiny_llama_artifact).metadata.artifact_id
    assert [p.name for p in small_disk.iterdir()] == ["tiny"]


def test_a_read_only_disk_is_one_line_and_the_old_artifact_stays(small_disk, tiny_llama_artifact, cache_dir):
    out = small_disk / "tiny"
    shutil.copytree(tiny_llama_artifact, out)
    remount_read_only(small_disk)
    with pytest.raises(BuildIOError, match=rf"^writing the artifact: {out}: read-only file system$"):
        build(TINY, out, cache_dir)
    assert load_artifact(out).metadata.name == "tiny-llama"


def test_the_build_cli_reports_a_full_disk_in_one_line_with_status_2(small_disk, tiny_llama_artifact, cache_dir):
    shutil.copytree(tiny_llama_artifact, small_disk / "tiny")
    argv = [sys.executable, "-m", "furiosa_build", *TINY, f"build.save_dir={small_disk / 'other'}",
            f"build.cache_dir={cache_dir}", "build.progress=false"]  # fmt: skip
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr == f"error: writing the artifact: {small_disk / 'other'}: no space left on device\n"
    assert [p.name for p in small_disk.iterdir()] == ["tiny"]

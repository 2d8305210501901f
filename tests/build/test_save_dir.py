"""Where a build may write: only over an artifact it made (or an empty or new folder),
replaced without a gap, with the leftovers of crashed builds cleaned up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from furiosa_build import package
from furiosa_build.config import ConfigError
from furiosa_build.package import check_save_dir, prepare_save_dir, recover, write_artifact
from furiosa_build.scratch import make_scratch
from furiosa_build.weight_sources import StoredWeights
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import REPO, build


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def artifact(tmp_path, tiny_llama_artifact) -> Path:
    """A copy of a real artifact that tests may replace."""
    return Path(shutil.copytree(tiny_llama_artifact, tmp_path / "out" / "tiny"))


def dead_pid() -> int:
    """A pid with no process behind it."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def dead_scratch(parent: Path, base: str, kind: str = "tmp") -> Path:
    """A scratch name as a build killed long ago would have left it."""
    live = make_scratch(parent, base, kind).name.split(".")
    live[-3] = str(dead_pid())
    return parent / ".".join(live)


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("where", [".", "~", "/", "..", REPO])
def test_the_current_folder_home_root_and_their_parents_are_refused(where, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match=r"^build\.save_dir: .* current folder, one of its parents") as err:
        check_save_dir(Path(os.path.expanduser(str(where))))
    assert "\n" not in str(err.value)


def test_a_folder_of_user_files_is_refused_and_kept(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds 'notes.txt' and is not an artifact"):
        check_save_dir(user)
    assert (user / "notes.txt").read_text() == "keep me"


def test_a_file_and_a_symlink_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_save_dir(tmp_path / "f")
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(ConfigError, match="symbolic link"):
        check_save_dir(tmp_path / "link")


def test_an_artifact_holding_a_file_it_does_not_list_is_refused(artifact):
    (artifact / "programs" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"also holds 'programs/mine.txt'"):
        check_save_dir(artifact)


def test_an_artifact_holding_another_runs_artifact_is_refused(artifact, tiny_llama_artifact):
    shutil.copytree(tiny_llama_artifact, artifact / "sweep-job")
    with pytest.raises(ConfigError, match="also holds 'sweep-job'"):
        check_save_dir(artifact)


def test_a_new_path_an_empty_folder_and_an_artifact_are_accepted(tmp_path, artifact):
    (tmp_path / "empty").mkdir()
    for ok in (tmp_path / "new" / "deeper", tmp_path / "empty", artifact):
        check_save_dir(ok)


def test_the_build_cli_refuses_a_user_folder_in_one_line_and_deletes_nothing(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for argv in (
        [sys.executable, "-m", "furiosa_build", "model=tiny-llama", "buckets=tiny", f"build.save_dir={user}",
         f"build.cache_dir={tmp_path / 'cache'}"],
        [sys.executable, "-m", "furiosa_build", "model=tiny-llama", "buckets=tiny", "build.save_dir=."],
    ):  # fmt: skip
        done = subprocess.run(argv, cwd=user, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: build.save_dir: ") and done.stderr.count("\n") == 1, done.stderr
    assert tree(user) == {"notes.txt": b"keep me"}


# --------------------------------------------------------------------------- replacing


def test_rebuilding_replaces_the_artifact_and_leaves_nothing_beside_it(artifact, cache_dir):
    before = load_artifact(artifact).metadata.artifact_id
    build(["model=tiny-llama", "buckets=tiny"], artifact, cache_dir)
    assert load_artifact(artifact).metadata.artifact_id != before
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["tiny"]


def test_artifacts_honour_the_umask(tmp_path, cache_dir):
    old = os.umask(0o027)
    try:
        build(["model=tiny-llama", "buckets=tiny"], tmp_path / "a", cache_dir)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "a", *(tmp_path / "a").rglob("*")]}
    assert modes["a"] == modes["programs"] == 0o750
    assert {mode for name, mode in modes.items() if name not in ("a", "programs")} == {0o640}


def test_the_swap_exchanges_so_the_path_is_never_empty(artifact, monkeypatch):
    """Between the two sides of the exchange the old artifact is still whole at the path."""
    seen = []

    def exchange(a: Path, b: Path) -> bool:
        seen.append(load_artifact(b).metadata.artifact_id)
        return real(a, b)

    real = package._exchange
    monkeypatch.setattr(package, "_exchange", exchange)
    fields = json.loads((artifact / "artifact.json").read_text())
    old_id = fields["metadata"]["artifact_id"]
    fields["metadata"]["artifact_id"] = "new"
    for key in ("manifest", "param_files", "format_version"):
        fields.pop(key)
    programs = {p.stem: p.read_bytes() for p in (artifact / "programs").iterdir()}
    params = StoredWeights(artifact / "params.safetensors")
    write_artifact(artifact, fields, programs, params.specs(), params.tensor, [])
    assert seen == [old_id]
    assert load_artifact(artifact, verify=False).metadata.artifact_id == "new"
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["tiny"]


def test_recover_puts_back_an_artifact_a_crashed_two_step_swap_left_aside(artifact):
    aside = dead_scratch(artifact.parent, artifact.name, "old")
    artifact.rename(aside)
    recover(artifact)
    assert load_artifact(artifact).metadata.name == "tiny-llama"
    assert not aside.exists()


def test_recover_leaves_a_live_builds_aside_folder_alone(artifact):
    aside = make_scratch(artifact.parent, artifact.name, "old")
    artifact.rename(aside)
    recover(artifact)
    assert aside.is_dir() and not artifact.exists()


def test_the_next_build_removes_dead_builds_scratch_and_keeps_live_ones_and_user_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = dead_scratch(out, "a")
    dead.mkdir()
    (dead / "params.safetensors").write_bytes(b"x" * 100)
    live = make_scratch(out, "a")
    live.mkdir()
    (out / ".a.tmp-1234").mkdir()  # looks temporary, but this tool never names things so
    prepare_save_dir(out / "a")
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, ".a.tmp-1234"])

"""A build killed at any stage loses nothing, and the next build completes and leaves
no litter; concurrent builds into one folder on one cache all succeed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from furiosa_build.scratch import ScratchName
from furiosa_runtime.npu.artifact import load_artifact
from tests.helpers import REPO, build

TINY = ["model=tiny-llama", "buckets=tiny"]

# Each stage names the function that the build calls at that point; the child process
# runs the real function (or part of it) and then kills itself with SIGKILL.
KILL_POINTS = {
    # the converted model is written into its scratch folder in the model cache, but not
    # its entry.json (random weights: config, recipe and tokenizer; no weights file)
    "load": """
        from furiosa_build import model_cache
        from furiosa_build.weight_sources import RANDOM_FILE
        def write_entry(folder, *a, **k):
            assert (folder / RANDOM_FILE).is_file() and "models" in str(folder)
            die()
        model_cache._write_entry = write_entry
    """,
    # one bucket's capture is in the cache, the others are not
    "capture": """
        from furiosa_build.cache import CompileCache
        real = CompileCache.put
        def put(self, *a, **k):
            real(self, *a, **k)
            if self.root is not None and self.root.name == "captures":
                die()
        CompileCache.put = put
    """,
    # one compiled program is in the cache, the others are not
    "compile": """
        from furiosa_build.cache import CompileCache
        real = CompileCache.put
        def put(self, *a, **k):
            real(self, *a, **k)
            if self.root is not None and self.root.name != "captures":
                die()
        CompileCache.put = put
    """,
    # the new artifact is complete in its scratch folder, the old one still in place
    "package": """
        from furiosa_build import package
        package._install = lambda staging, save_dir: die()
    """,
    # the folders have traded places; the old artifact sits under the scratch name
    "swap": """
        from furiosa_build import package
        real = package._exchange
        def exchange(a, b):
            real(a, b)
            die()
        package._exchange = exchange
    """,
    # a file system without exchange: the old artifact was moved aside, the new one not yet in
    "two-step-swap": """
        import os
        from furiosa_build import package
        package._exchange = lambda a, b: False
        def two_steps(staging, save_dir):
            os.rename(save_dir, package.make_scratch(save_dir.parent, save_dir.name, "old"))
            die()
        package._replace_in_two_steps = two_steps
    """,
}

CHILD = """
import os, signal, sys
from pathlib import Path
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
{patch}
from tests.helpers import build
build({overrides!r}, Path(sys.argv[1]), Path(sys.argv[2]))
"""


def run_child(script: str, out: Path, cache: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", script, str(out), str(cache)], cwd=REPO, env=env, **popen)


def litter(*folders: Path) -> list[str]:
    """Anything a build leaves behind that is not an artifact or a cache entry."""
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            name = path.name
            if ScratchName.parse(name) or ".tmp" in name or name.startswith((".load-", ".old")):
                found.append(str(path.relative_to(folder)))
    return found


@pytest.mark.parametrize("stage", list(KILL_POINTS))
def test_a_build_killed_at_each_stage_keeps_the_old_artifact_and_the_rerun_cleans_up(stage, tmp_path, tiny_llama_artifact):
    out, cache = tmp_path / "out" / "tiny", tmp_path / "cache"
    shutil.copytree(tiny_llama_artifact, out)
    old_id = load_artifact(out).metadata.artifact_id
    script = CHILD.format(patch=textwrap.dedent(KILL_POINTS[stage]), overrides=TINY)
    child = run_child(script, out, cache, stderr=subprocess.PIPE)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]

    if stage == "two-step-swap":
        assert not out.exists()  # the gap a file system without exchange has; recovered below
    else:  # the path holds a whole artifact: the old one, or after the exchange the new one
        assert (load_artifact(out).metadata.artifact_id == old_id) == (stage != "swap")

    build(TINY, out, cache)
    assert load_artifact(out).metadata.name == "tiny-llama"
    assert litter(tmp_path) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]


def test_killing_a_build_ends_its_worker_processes(tmp_path):
    """Capture runs in two loky workers; SIGKILL of the build ends them within seconds."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    keep_workers = "import furiosa_build.pool as pool\npool.plan_workers = lambda requested, items, *args: (requested, None)"
    script = CHILD.format(patch=keep_workers, overrides=[*TINY, "build.num_pipeline_builder_workers=2"])
    child = run_child(script, out, cache, stderr=subprocess.DEVNULL)
    parent = psutil.Process(child.pid)
    deadline = time.monotonic() + 120
    workers: list[psutil.Process] = []
    while time.monotonic() < deadline and len(workers) < 2:
        workers = [p for p in parent.children(recursive=True) if "loky" in " ".join(_cmdline(p))]
        time.sleep(0.1)
    assert len(workers) >= 2, "the capture workers never started"
    everyone = parent.children(recursive=True)
    time.sleep(1.0)  # let the workers take their first unit
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    _, alive = psutil.wait_procs(everyone, timeout=15)
    assert alive == [], [(p.pid, _cmdline(p)) for p in alive]
    build(TINY, out, cache)
    assert litter(tmp_path) == []


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


CONCURRENT = """
import sys, traceback
from pathlib import Path
from tests.helpers import build
failures = 0
for round in range(int(sys.argv[3])):
    try:
        build({overrides!r}, Path(sys.argv[1]), Path(sys.argv[2]))
    except Exception:
        failures += 1
        traceback.print_exc()
sys.exit(1 if failures else 0)
"""


@pytest.mark.slow
def test_four_concurrent_builds_into_one_folder_on_one_cache_all_succeed_for_50_rounds(tmp_path):
    out, cache = tmp_path / "out" / "tiny", tmp_path / "cache"
    build(TINY, out, cache)  # warm the cache, so the rounds race on packaging and swapping
    script = CONCURRENT.format(overrides=TINY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        subprocess.Popen([sys.executable, "-c", script, str(out), str(cache), "50"], cwd=REPO, env=env,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]  # fmt: skip
    results = [(child.wait(timeout=900), child.stderr.read()) for child in children]
    assert [code for code, _ in results] == [0, 0, 0, 0], "\n".join(err[-3000:] for _, err in results)
    assert load_artifact(out).metadata.name == "tiny-llama"
    assert litter(tmp_path) == []
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]

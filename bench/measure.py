"""Measuring a command: wall time and the peak memory of its whole process tree."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_SECONDS = 0.05
MIB = 2**20


def tree_memory(root: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) in bytes summed over ``root`` and its live descendants.

    RSS counts the pages of shared libraries (libtorch...) once per process; PSS splits
    each shared page between the processes that map it, so its sum is the tree's real
    footprint.
    """
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    rss = pss = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # a worker that exited between listing and sampling
        rss += info.rss
        pss += info.pss
    return rss, pss


def run_measured(cmd: list[str], log_path: Path) -> tuple[float, int, int, int]:
    """Run ``cmd`` with output to ``log_path``; return (wall s, peak RSS, peak PSS, exit status)."""
    with log_path.open("wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        peak_rss = peak_pss = 0
        while proc.poll() is None:
            rss, pss = tree_memory(root)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(SAMPLE_SECONDS)
        wall = time.perf_counter() - start
    return wall, peak_rss, peak_pss, proc.returncode



"""Build benchmark: cold vs warm build time, and peak memory by number of pipeline builder workers.

    python bench/build.py                                   # SmolLM2-135M-Instruct, workers 1 and 4
    python bench/build.py --model tiny-llama --extra-override buckets=tiny --workers 1 2 4
    python bench/build.py --cluster                         # compile time on local Ray / Dask clusters

Every build is a subprocess ``sys.executable -m furiosa_build model=<model> ...`` run from the
repository root into temporary directories (nothing is written to ``artifacts/`` or to the
user cache). Figures:

1. cold build: an empty cache dir (GGUF conversion, capture and compile all run);
2. warm rebuild: the same command again, same cache, unchanged config;
3. peak memory of a build with ``build.num_pipeline_builder_workers=W`` for each ``--workers``
   value (``build.num_compile_workers=1``), each from a fresh cache holding only the converted
   model (``models/`` of the cold build's cache), so capture and compile really run.

With ``--cluster``: the build time of a compile-heavy config (``--model``, seven buckets,
``build.use_blockwise_compile=false`` so every layer of every bucket is its own program)
with 1 and 2 workers on each backend (``loky``, then a local ``ray`` and ``dask`` cluster that
the build starts and stops), twice each: from a cache holding the converted model and the
captures but no programs (only compile runs), and from one holding only the converted model
(capture and compile run); then a build whose local cache holds no programs but whose
``build.shared_cache`` tier was filled by another build (a second host of a fleet).

Wall time is measured here around the subprocess (interpreter start and imports included);
the build's own total comes from its closing summary. Peak memory is sampled every 50 ms over
the build process and all its descendants (joblib/loky workers) as two sums: PSS, which splits
shared pages between the processes that map them (the real footprint), and RSS, which counts
them once per process (an upper bound).
Only psutil and the standard library are needed.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from measure import MIB, run_measured

_PROGRAMS_RE = re.compile(r"(\d+) compiled, (\d+) served from cache")
_TOTAL_RE = re.compile(r"^seconds: .*total ([0-9.]+)\s*$", re.MULTILINE)
_STAGES_RE = re.compile(r"^seconds: (.*)$", re.MULTILINE)
_STAGE_RE = re.compile(r"(\w+) ([0-9.]+)")
CLUSTER_BUCKETS = ["buckets.prefill=[[1,64],[1,128],[4,128]]", "buckets.decode=[[1,256],[2,256],[4,256],[8,256]]",
                   "build.use_blockwise_compile=false"]


@dataclass
class BuildRun:
    """One measured build: what the bench saw and what the build's summary said."""

    label: str
    overrides: list[str]
    wall_seconds: float
    peak_rss_bytes: int
    peak_pss_bytes: int
    build_seconds: float
    compiled: int
    cached: int


class BuildFailed(RuntimeError):
    """A build subprocess exited with a non-zero status."""


# --------------------------------------------------------------------------- measuring


def parse_summary(output: str) -> tuple[float, int, int]:
    """(total seconds, programs compiled, programs served from cache) from a build's summary."""
    programs = _PROGRAMS_RE.search(output)
    total = _TOTAL_RE.search(output)
    if programs is None or total is None:
        raise ValueError("no closing summary found in the build output")
    return float(total.group(1)), int(programs.group(1)), int(programs.group(2))


def build(label: str, overrides: list[str], cache_dir: Path, save_dir: Path, log_dir: Path) -> BuildRun:
    """Run one build into ``save_dir`` with ``cache_dir``; measure it and parse its summary."""
    build_overrides = [*overrides, f"build.cache_dir={cache_dir}", f"build.save_dir={save_dir}"]
    cmd = [sys.executable, "-m", "furiosa_build", *build_overrides]
    log_path = log_dir / f"{re.sub(r'[^A-Za-z0-9]+', '-', label)}.log"
    print(f"... {label}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    wall, peak_rss, peak_pss, status = run_measured(cmd, log_path)
    output = log_path.read_text(errors="replace")
    if status != 0:
        tail = "\n".join(output.splitlines()[-20:])
        raise BuildFailed(f"{label}: exit status {status}\n{tail}")
    total, compiled, cached = parse_summary(output)
    return BuildRun(label, overrides, wall, peak_rss, peak_pss, total, compiled, cached)


def copy_models(src_cache: Path, dst_cache: Path) -> None:
    """Give ``dst_cache`` the converted models of ``src_cache`` only (hard links when possible)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    dst_cache.mkdir(parents=True)
    if (src_cache / "models").is_dir():
        shutil.copytree(src_cache / "models", dst_cache / "models", copy_function=link_or_copy)


# --------------------------------------------------------------------------- the benchmark


def run_benchmark(model: str, workers: Sequence[int], extra: Sequence[str], work: Path) -> list[BuildRun]:
    """Cold build, warm rebuild, then one cold-compile build per pipeline builder worker count."""
    base = [f"model={model}", *extra]
    cache = work / "cache"
    save = work / "artifact"
    runs = [build("cold build", base, cache, save, work), build("warm rebuild", base, cache, save, work)]
    for count in workers:
        run_cache = work / f"cache-w{count}"
        copy_models(cache, run_cache)
        overrides = [*base, f"build.num_pipeline_builder_workers={count}", "build.num_compile_workers=1"]
        runs.append(build(f"{count} pipeline worker{'s' if count != 1 else ''}", overrides,
                          run_cache, work / f"artifact-w{count}", work))
        shutil.rmtree(run_cache)
        shutil.rmtree(work / f"artifact-w{count}")
    return runs


def without(src_cache: Path, dst_cache: Path, sections: Sequence[str]) -> None:
    """Give ``dst_cache`` everything of ``src_cache`` but its top-level ``sections``."""
    shutil.copytree(src_cache, dst_cache, ignore=lambda folder, names: list(sections) if Path(folder) == src_cache else [])


#: What a cluster run starts from: a cache without programs (only compile runs), or without
#: captures and programs (capture and compile run; the converted model is kept).
CLUSTER_RUNS = {"compile": ("programs",), "capture+compile": ("captures", "programs")}


def run_cluster_benchmark(model: str, workers: Sequence[int], extra: Sequence[str], work: Path) -> list[tuple[BuildRun, dict[str, float]]]:
    """Per backend and worker count a compile-only and a capture+compile build, then a
    compile-only build served by a warm shared tier; each with its summary's stage seconds."""
    base = [f"model={model}", *CLUSTER_BUCKETS, *extra]
    warm = work / "cache"
    build("prepare (loky)", base, warm, work / "artifact", work)
    runs = []
    for backend in ("loky", "ray", "dask"):
        for count in workers:
            cluster = [f"build.cluster.num_workers={count}"] if backend != "loky" else []
            overrides = [*base, f"build.backend={backend}", f"build.num_compile_workers={count}",
                         f"build.num_pipeline_builder_workers={count}", *cluster]  # fmt: skip
            for what, dropped in CLUSTER_RUNS.items():
                label = f"{what}, {backend}, {count} worker{'s' if count != 1 else ''}"
                runs.append(_measured(label, overrides, warm, dropped, work))
    shared = [*base, "build.backend=dask", f"build.cluster.num_workers={workers[-1]}", f"build.shared_cache={work / 'shared'}"]
    _measured("fill the shared tier", shared, warm, CLUSTER_RUNS["compile"], work)
    runs.append(_measured(f"compile, dask, {workers[-1]} workers, warm shared tier", shared, warm, CLUSTER_RUNS["compile"], work))
    return runs


def _measured(label: str, overrides: list[str], warm: Path, dropped: Sequence[str], work: Path) -> tuple[BuildRun, dict[str, float]]:
    """One build from a copy of ``warm`` less ``dropped``; the run and its stage seconds."""
    cache = work / "cache-run"
    without(warm, cache, dropped)
    try:
        run = build(label, overrides, cache, work / "artifact-run", work)
        log = (work / f"{re.sub(r'[^A-Za-z0-9]+', '-', label)}.log").read_text(errors="replace")
        stages = _STAGES_RE.search(log)
        return run, {k: float(v) for k, v in _STAGE_RE.findall(stages.group(1))} if stages else {}
    finally:
        shutil.rmtree(cache)


def cluster_report(runs: Sequence[tuple[BuildRun, dict[str, float]]], command: str) -> str:
    """One line per run: capture and compile seconds, build and wall seconds, programs compiled."""
    width = max(len(run.label) for run, _ in runs)
    lines = [f"{'run'.ljust(width)}  capture s  compile s  build s  wall s  compiled  cached"]
    lines += [f"{run.label.ljust(width)}  {stages.get('capture', 0.0):9.2f}  {stages.get('compile', 0.0):9.2f}  "
              f"{run.build_seconds:7.2f}  {run.wall_seconds:6.1f}  {run.compiled:8d}  {run.cached:6d}"
              for run, stages in runs]  # fmt: skip
    return "\n".join([f"{command} ({os.cpu_count()} CPUs)", *lines])


# --------------------------------------------------------------------------- reporting

HEADERS = ("run", "wall s", "build s", "compiled", "cached", "peak PSS MiB", "peak RSS MiB")


def table_rows(runs: Sequence[BuildRun]) -> list[tuple[str, ...]]:
    """One row of strings per run, in HEADERS order."""
    return [(r.label, f"{r.wall_seconds:.1f}", f"{r.build_seconds:.1f}", str(r.compiled), str(r.cached),
             f"{r.peak_pss_bytes / MIB:.0f}", f"{r.peak_rss_bytes / MIB:.0f}") for r in runs]


def text_table(runs: Sequence[BuildRun]) -> str:
    """An aligned plain-text table (first column left-aligned, numbers right-aligned)."""
    rows = [HEADERS, *table_rows(runs)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(runs: Sequence[BuildRun]) -> str:
    """The same table in GitHub markdown."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join([":---", *["---:"] * (len(HEADERS) - 1)]) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    return "\n".join(lines)


def figure_lines(runs: Sequence[BuildRun], workers: Sequence[int]) -> list[str]:
    """One line per headline figure."""
    cold, warm, *by_workers = runs
    lines = [
        f"cold build: {cold.wall_seconds:.1f} s",
        f"warm rebuild: {warm.wall_seconds:.1f} s",
        f"warm/cold: {warm.wall_seconds / cold.wall_seconds:.2f}",
        f"warm rebuild programs: {warm.compiled} compiled, {warm.cached} served from cache",
    ]
    for run in by_workers:
        lines.append(f"peak memory (PSS), {run.label}: {run.peak_pss_bytes / MIB:.0f} MiB")
    first = by_workers[0] if by_workers else None
    for count, run in zip(workers[1:], by_workers[1:]):
        ratio = run.peak_pss_bytes / first.peak_pss_bytes if first and first.peak_pss_bytes else float("nan")
        lines.append(f"peak memory (PSS) {count}/{workers[0]} workers: {ratio:.2f}")
    return lines


def report(runs: Sequence[BuildRun], workers: Sequence[int], command: str) -> str:
    """Table, figure lines and a markdown snippet for the README."""
    snippet = f"`{command}` ({os.cpu_count()} CPUs, Python {sys.version.split()[0]}):\n\n{markdown_table(runs)}"
    return "\n".join([text_table(runs), "", *figure_lines(runs, workers), "", "markdown:", "", snippet])


# --------------------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a conf/model option (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="build.num_pipeline_builder_workers values for the memory runs (default: 1 4), "
                             "or with --cluster the workers of each backend (default: 1 2)")
    parser.add_argument("--cluster", action="store_true",
                        help="compile time of a compile-heavy config on loky and local Ray and Dask clusters")
    parser.add_argument("--extra-override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Hydra override added to every build (repeatable)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/build.py", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="furiosa-bench-") as tmp:
        try:
            if args.cluster:
                print(cluster_report(run_cluster_benchmark(args.model, args.workers or [1, 2], args.extra_override,
                                                           Path(tmp)), command))  # fmt: skip
                return 0
            runs = run_benchmark(args.model, args.workers or [1, 4], args.extra_override, Path(tmp))
        except BuildFailed as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    print(report(runs, args.workers or [1, 4], command))
    return 0


if __name__ == "__main__":
    sys.exit(main())

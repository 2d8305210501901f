"""The report at the end of a sweep: which of its builds serves ``sweep.workload`` best.

Every sweep job leaves a record beside its composed config,
``<sweep dir>/configs/<job folder>.build.json`` (``write_job_record``, called by the task
function in ``__main__.py``): what the build report says (programs compiled, build time,
artifact size, the largest per-PE weight memory) or the job's one-line error.  Never
inside the artifact, whose files are checked against its manifest.

At the end of the multirun, Hydra calls ``SweepReport.on_multirun_end`` (registered under
``hydra.callbacks`` in ``conf/config.yaml``), which simulates serving ``sweep.workload``
(``sweep.num_prompts`` requests at once, ``python -m furiosa_runtime simulate``) on every
artifact and writes into the sweep folder, ranked by modelled output throughput:
``sweep.csv`` (every figure), ``sweep.md`` (the table, failed jobs with their error) and
``sweep.png`` (the throughput bars, with TTFT and TPOT).  A job that failed, or whose
buckets cannot hold the workload, is listed last with its reason.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from furiosa_build.config_sections import SweepOptions
from furiosa_build.errors import io_error
from furiosa_build.scratch import atomic_write

if TYPE_CHECKING:
    from furiosa_build.builder import BuildReport

RECORD_SUFFIX = ".build.json"
MIB = 2**20


def write_job_record(sweep_dir: str, name: str, job: int, overrides: list[str], *,
                     report: BuildReport | None = None, error: str | None = None) -> None:  # fmt: skip
    """Save what sweep job ``job`` (folder ``name``) built, or its error, for the report;
    a folder that cannot be written costs a warning, never the job."""
    record: dict[str, Any] = {"job": job, "overrides": overrides, "error": error}
    if report is not None:
        per_pe = report.weights.per_pe.values() if report.weights is not None else ()
        record |= {
            "artifact": str(Path(str(report.save_dir)).resolve()), "programs": report.compile.unique,
            "programs_compiled": report.compile.compiled,
            "build_seconds": round(sum(report.seconds.values()), 3), "artifact_bytes": report.artifact_bytes,
            "max_pe_weight_bytes": max(per_pe, default=0),
        }  # fmt: skip
    target = Path(sweep_dir) / "configs" / f"{name}{RECORD_SUFFIX}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, json.dumps(record, indent=2).encode())
    except OSError as exc:
        print(f"warning: {io_error(exc, 'saving the job record', target)}", file=sys.stderr)


@dataclass
class JobRow:
    """One line of the report: a job, how it built and how it serves the workload."""

    job: int
    label: str  # the overrides that set it apart from the other jobs
    output_tokens_per_s: float | None = None
    requests_per_s: float | None = None
    ttft_p50_ms: float | None = None
    tpot_p50_ms: float | None = None
    programs: int | None = None  # unique programs the artifact holds
    programs_compiled: int | None = None  # of which this build compiled (the others came from the cache)
    build_seconds: float | None = None
    artifact_mib: float | None = None
    max_pe_weight_mib: float | None = None
    artifact: str | None = None
    error: str | None = None


class SweepReport(Callback):
    """Hydra callback: rank a finished sweep's jobs (see the module docstring)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        options = SweepOptions(**OmegaConf.to_container(config.sweep, resolve=True)) if "sweep" in config else SweepOptions()  # type: ignore[arg-type]
        records = read_records(sweep_dir)
        if not records:  # a dry run or explain sweep builds nothing to rank
            return
        rows = rank([serve_row(record, options, labels) for record, labels in zip(records, distinct_overrides(records))])
        try:
            write_report(sweep_dir, rows, options)
        except OSError as exc:
            print(f"warning: {io_error(exc, 'writing the sweep report', sweep_dir)}", file=sys.stderr)
            return
        best = rows[0]
        summary = f"best: {best.label}, {best.output_tokens_per_s:,.0f} tokens/s" if best.error is None else "no job served it"
        print(f"sweep report: {sweep_dir / 'sweep.md'} ({len(rows)} jobs on {options.workload}; {summary})")


def read_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """The job records of a sweep folder, by job number."""
    records = [json.loads(path.read_text()) for path in (sweep_dir / "configs").glob(f"*{RECORD_SUFFIX}")]
    return sorted(records, key=lambda r: r["job"])


def distinct_overrides(records: list[dict[str, Any]]) -> list[str]:
    """Each job's overrides without those every job shares: what names it in a chart."""
    common = set.intersection(*(set(r["overrides"]) for r in records))
    return [" ".join(o for o in r["overrides"] if o not in common) or f"job {r['job']}" for r in records]


def serve_row(record: dict[str, Any], options: SweepOptions, label: str) -> JobRow:
    """A job's row: its build figures and, if it built, the modelled serving of the workload."""
    row = JobRow(record["job"], label, error=record["error"])
    if record["error"] is not None:
        return row
    row.programs, row.programs_compiled = record["programs"], record["programs_compiled"]
    row.build_seconds, row.artifact = record["build_seconds"], record["artifact"]
    row.artifact_mib, row.max_pe_weight_mib = record["artifact_bytes"] / MIB, record["max_pe_weight_bytes"] / MIB
    from furiosa_runtime.engine.simulate import simulate

    try:
        served = simulate(record["artifact"], options.workload, num_prompts=options.num_prompts, request_rate=math.inf)
    except (ValueError, OSError) as err:  # buckets that cannot hold the workload, an artifact gone since
        row.error = f"simulate: {' '.join(str(err).split())}"
        return row
    row.output_tokens_per_s, row.requests_per_s = served.output_tokens_per_s, served.requests_per_s
    row.ttft_p50_ms, row.tpot_p50_ms = served.ttft_ms.p50, served.tpot_ms.p50
    return row


def rank(rows: list[JobRow]) -> list[JobRow]:
    """Best modelled throughput first; jobs without one last, by job number."""
    return sorted(rows, key=lambda r: (r.output_tokens_per_s is None, -(r.output_tokens_per_s or 0.0), r.job))


def write_report(sweep_dir: Path, rows: list[JobRow], options: SweepOptions) -> None:
    """``sweep.csv``, ``sweep.md`` and ``sweep.png`` in ``sweep_dir``, ranked as ``rows``."""
    _write_csv(sweep_dir / "sweep.csv", rows)
    (sweep_dir / "sweep.md").write_text(_markdown(rows, options))
    _write_chart(sweep_dir / "sweep.png", rows, options)


def _write_csv(path: Path, rows: list[JobRow]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["rank", *asdict(rows[0])])
        writer.writeheader()
        for rank_, row in enumerate(rows, 1):
            writer.writerow({"rank": rank_, **asdict(row)})


def _markdown(rows: list[JobRow], options: SweepOptions) -> str:
    lines = [
        f"# Sweep report: `{options.workload}`, {options.num_prompts} prompts at once",
        "",
        ("Ranked by modelled output throughput (`python -m furiosa_runtime simulate`; estimates of the timing model, "
         "not measurements). TTFT and TPOT are medians."),
        "",
        "| rank | job | overrides | output tokens/s | requests/s | TTFT ms | TPOT ms | programs (compiled) | build s | artifact MiB | max weights/PE MiB | error |",
        "|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for rank_, r in enumerate(rows, 1):
        cells = [rank_, r.job, f"`{r.label}`", _num(r.output_tokens_per_s, ",.1f"), _num(r.requests_per_s, ",.3f"),
                 _num(r.ttft_p50_ms, ",.2f"), _num(r.tpot_p50_ms, ",.3f"), "" if r.programs is None else f"{r.programs} ({r.programs_compiled})",
                 _num(r.build_seconds, ".2f"), _num(r.artifact_mib, ".2f"), _num(r.max_pe_weight_mib, ".2f"),
                 (r.error or "").replace("|", "\\|")]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _write_chart(path: Path, rows: list[JobRow], options: SweepOptions) -> None:
    """Horizontal bars of modelled throughput, best on top; failed jobs named at zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import StrMethodFormatter

    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.55 * len(rows)))
    labels = [f"#{r.job} {r.label}" for r in rows][::-1]  # barh draws bottom-up: the best on top
    values = [r.output_tokens_per_s or 0.0 for r in rows][::-1]
    bars = ax.barh(labels, values, color=["#4c72b0" if r.error is None else "#bbbbbb" for r in rows][::-1])
    top = max(values, default=0.0) or 1.0
    for bar, row in zip(bars, rows[::-1]):
        note = (f"{row.output_tokens_per_s:,.0f} tok/s · TTFT {row.ttft_p50_ms:,.3g} ms · TPOT {row.tpot_p50_ms:,.3g} ms"
                if row.error is None else f"failed: {_shorten(row.error, 90)}")  # fmt: skip
        ax.text(bar.get_width() + 0.01 * top, bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
    ax.set_xlim(0, top * 1.9)
    ax.set_xlabel("modelled output throughput (tokens/s)")
    ax.xaxis.set_major_formatter(StrMethodFormatter("{x:,.0f}"))
    ax.set_title(f"Sweep: {options.workload}, {options.num_prompts} prompts at once (TTFT/TPOT: medians)", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"

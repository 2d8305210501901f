"""Bucket advisor benchmark: the advisor's grid against the default and a powers-of-two grid,
within the same budget of programs, on three traces.

    python bench/advise.py                       # shape-llama-3.2-1b on one PE, 8 programs
    python bench/advise.py --max-programs 6 --model shape-qwen2.5-0.5b --parallel tp4

The three traces are drawn here, seeded, and written as JSONL in the workload format of
``furiosa_runtime/engine/workload.py`` (arrival, prompt_tokens, output_tokens):

- **chat**: short prompts and answers (log-normal, prompts ~300, outputs ~220 tokens);
- **rag**: long retrieved prompts, short answers (prompts ~2,600, outputs ~140 tokens);
- **mixed**: 55% chat, 30% rag and 15% long generations (prompts ~200, outputs ~900).

For each trace, the grids compared are:

- **advised**: ``python -m furiosa_build.advise`` with ``--max-programs``;
- **default**: ``conf/buckets/default.yaml`` (prefill 1 x L, decode 1 x L and 4 x L) with L
  stretched to the trace's longest prompt and request: the default cannot hold them at 256;
- **pow2**: the budget split evenly; prefill batch 1 at the power of two above the longest
  prompt and the ones below it, decode likewise from the longest request, each with the
  largest power-of-two batch the KV cache holds (a hand-made grid in the usual style).

The advisor starts its search from the best of several grids, among them the stretched
default and a powers-of-two grid built the same way (its decode batches capped by the
requests the KV cache holds at once, not at 256), so it is never worse than them: the margin
is what its search adds.

Every grid is built (shape-only) with the same KV cache, every block that fits beside the
weights (what the advisor writes into its file), and served offline with ``simulate``:
the figures are those of real builds, not of the advisor's own bookkeeping (the advised
grid's must match the advisor's; the table says whether they do).  Timings are the timing
model's estimates; the bench only prints them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from furiosa_build.advise import Options, advise, write  # noqa: E402
from furiosa_build.advise_cost import Grid  # noqa: E402
from furiosa_build.advise_report import Advice  # noqa: E402
from furiosa_runtime.engine.serving_report import ServingReport  # noqa: E402
from furiosa_runtime.npu.artifact import Bucket  # noqa: E402

TRACES = ("chat", "rag", "mixed")


def _lognormal(rng: np.random.Generator, mean: float, std: float, count: int, low: int, high: int) -> np.ndarray:
    """Lengths with this mean and standard deviation, clipped to [low, high]."""
    sigma2 = math.log1p((std / mean) ** 2)
    values = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), count)
    return np.clip(np.rint(values), low, high).astype(int)


def _lengths(kind: str, rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    if kind == "chat":
        return _lognormal(rng, 300, 250, count, 16, 2048), _lognormal(rng, 220, 160, count, 4, 1024)
    if kind == "rag":
        return _lognormal(rng, 2600, 900, count, 400, 6000), _lognormal(rng, 140, 80, count, 8, 512)
    if kind == "long":
        return _lognormal(rng, 200, 100, count, 16, 1024), _lognormal(rng, 900, 300, count, 128, 2048)
    parts = [_lengths(k, rng, n) for k, n in (("chat", count * 55 // 100), ("rag", count * 30 // 100), ("long", count - count * 85 // 100))]
    prompts, outputs = (np.concatenate(x) for x in zip(*parts))
    order = rng.permutation(count)
    return prompts[order], outputs[order]


def write_trace(kind: str, path: Path, count: int, rate: float, seed: int) -> Path:
    """``count`` requests of ``kind`` with Poisson arrivals at ``rate`` requests/s, as JSONL."""
    rng = np.random.default_rng([seed, TRACES.index(kind)])
    prompts, outputs = _lengths(kind, rng, count)
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    lines = [json.dumps({"arrival": round(float(t), 4), "prompt_tokens": int(p), "output_tokens": int(o)})
             for t, p, o in zip(arrivals, prompts, outputs)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def pow2_grid(advice: Advice, budget: int) -> Grid:
    """Powers of two: half the budget for prefill, the rest for decode (see the docstring)."""
    block = advice.spec.buckets.paged_attention_block_size
    longest = {"prefill": int(advice.traffic.prompts.max()), "decode": int(advice.traffic.contexts.max())}
    buckets = []
    for phase, count in (("prefill", budget // 2), ("decode", budget - budget // 2)):
        top = 1 << math.ceil(math.log2(longest[phase]))
        for size in (top >> k for k in range(count)):
            batch = 1 if phase == "prefill" else min(1 << int(math.log2((advice.num_blocks - 1) / math.ceil(size / block))), 256)
            buckets.append(Bucket.prefill(1, size) if phase == "prefill" else Bucket.decode(batch, size))
    return Grid.of(buckets)


@dataclass
class Row:
    trace: str
    grid: str
    programs: int
    report: ServingReport
    note: str = ""


def serve_built(advice: Advice, grid: Grid, folder: Path, cache: str) -> ServingReport:
    """Build ``grid`` shape-only with the advice's KV cache and simulate the trace offline."""
    from furiosa_build.builder import ArtifactBuilder
    from furiosa_build.config import load_spec
    from furiosa_runtime.engine.simulate import simulate

    data = advice.spec.model_dump()
    data["buckets"].update(prefill=grid.pairs("prefill"), decode=grid.pairs("decode"), paged_attention_num_blocks=advice.num_blocks,
                           max_seq_len_to_capture=max(b.attention_size for b in grid.buckets))  # fmt: skip
    data["build"].update(weights="none", save_dir=str(folder), progress=False, cache_dir=cache)
    ArtifactBuilder.from_spec(load_spec(data)).build_from_spec()
    return simulate(folder, advice.traffic.workload, request_rate=math.inf)


def run_trace(kind: str, args: argparse.Namespace, work: Path) -> list[Row]:
    trace = write_trace(kind, work / f"{kind}.jsonl", args.requests, args.rate, args.seed)
    overrides = (f"model={args.model}", f"parallel={args.parallel}", f"build.cache_dir={args.cache_dir}")
    options = Options(str(trace), args.max_programs, overrides, out=work / "buckets", name=f"advised-{kind}")
    start = time.perf_counter()
    advice = advise(options, lambda line: print(f"  [{kind}] {line}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    write(advice, options.target(), force=True)
    rows = []
    for label, grid in (("advised", advice.grid), ("default", advice.base), ("pow2", pow2_grid(advice, args.max_programs))):
        report = serve_built(advice, grid, work / f"{kind}-{label}", args.cache_dir)
        note = ""
        if label == "advised":
            same = report.output_tokens_per_s == advice.served.report.output_tokens_per_s
            note = f"advisor {seconds:.0f} s; {'matches' if same else 'DIFFERS from'} its model"
        rows.append(Row(kind, label, grid.programs, report, note))
        print(f"  [{kind}] {label}: {grid.label()}", file=sys.stderr)
    return rows


def render(rows: list[Row]) -> str:
    lines = ["| trace | grid | programs | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | note |",
             "|:--|:--|--:|--:|--:|--:|--:|:--|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r.trace} | {r.grid} | {r.programs} | {r.report.output_tokens_per_s:,.0f} | {r.report.ttft_ms.p50:,.0f} | "
                     f"{r.report.ttft_ms.p99:,.0f} | {r.report.tpot_ms.p50:.2f} | {r.note} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shape-llama-3.2-1b")
    parser.add_argument("--parallel", default="single")
    parser.add_argument("--max-programs", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300, help="requests per trace")
    parser.add_argument("--rate", type=float, default=8.0, help="arrival rate written into the traces (requests/s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(Path("~/.cache/furiosa/llm").expanduser()), help="build cache (reruns are fast)")
    parser.add_argument("--traces", nargs="+", choices=TRACES, default=list(TRACES))
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-advise-") as tmp:
        rows = [row for kind in args.traces for row in run_trace(kind, args, Path(tmp))]
    print(f"{args.model}, parallel={args.parallel}, at most {args.max_programs} programs, {args.requests} requests a trace, offline "
          f"({time.perf_counter() - start:.0f} s)")
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

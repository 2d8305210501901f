"""``python -m furiosa_runtime simulate ARTIFACT --workload SPEC``: modelled serving.

    python -m furiosa_runtime simulate artifacts/llama --workload fixed:128:4096            # offline, 3 x concurrency prompts
    python -m furiosa_runtime simulate artifacts/llama --workload uniform:64-512:128 --num-prompts 1000 --request-rate 4
    python -m furiosa_runtime simulate artifacts/llama --workload trace.jsonl --json report.json

Runs the engine's scheduler and block manager on the workload with step latencies from
the timing model and no numerics (``engine/simulate.py``; the grammar of ``--workload`` is
in ``engine/workload.py``), prints the summary and with ``--json`` writes it.  Works on
shape-only artifacts.  A workload that cannot be read or does not fit the artifact is one
line ``error: --workload: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from furiosa_runtime.engine.simulate import PROMPTS_PER_SLOT, simulate
from furiosa_runtime.engine.workload import WorkloadError
from furiosa_runtime.entrypoints.arg_checks import non_negative_int, positive_int


def _rate(text: str) -> float:
    """``--request-rate``: requests per second (> 0) or ``inf``."""
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {text}")
    return rate


def add_simulate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``simulate`` flags: artifact, workload and arrivals, the layout and scheduler knobs, output."""
    parser.description = "Model serving a workload on the artifact's NPU: the engine's schedule, the timing model's clock, no numerics."
    add = parser.add_argument
    add("artifact", help="artifact directory (shape-only artifacts too)")
    add("--workload", required=True, metavar="SPEC",
        help="fixed:IN:OUT, uniform:LO-HI:LO-HI, normal:MEAN,STD:MEAN,STD, lognormal:MEAN,STD:MEAN,STD or a JSONL trace "
             "({\"arrival\": s, \"prompt_tokens\": n, \"output_tokens\": m} per line)")  # fmt: skip
    add("--num-prompts", type=positive_int, default=None,
        help=f"requests drawn from a distribution (default: {PROMPTS_PER_SLOT} x the largest decode batch of every "
             "pipeline stage and data-parallel replica, the published methodology's choice); of a trace, its first N lines (default: all)")  # fmt: skip
    add("--request-rate", type=_rate, default=None,
        help="Poisson arrivals at this many requests/s, or inf for all at once (default: a trace's own arrival times; "
             "a distribution's requests all at once)")  # fmt: skip
    add("--seed", type=non_negative_int, default=0, help="seed of lengths, token ids and arrivals (default: 0)")
    add("--shared-prefix", type=int, default=0, metavar="TOKENS", help="prompt tokens every request shares, as a system prompt (default: 0)")
    add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="reuse cached KV blocks of shared prefixes, as the engine does (default: on)")
    add("--devices", default=None, help="devices to lay the artifact out on (default: the artifact's)")
    add("--pipeline-parallel-size", type=positive_int, default=None, help="pipeline stages (blockwise artifacts; default: as built)")
    add("--data-parallel-size", type=positive_int, default=None, help="data-parallel replicas (default: as many as the PEs allow)")
    add("--max-processing-samples", type=positive_int, default=None, help="scheduler: sequences holding KV blocks at once")
    add("--spare-blocks-ratio", type=float, default=None, help="scheduler: share of KV blocks kept free for running sequences")
    add("--prefill-chunk-size", type=positive_int, default=None, help="scheduler: prefill prompts in chunks of this many tokens")
    add("--offline", action="store_true", help="scheduler: throughput mode (is_offline), admit only what the largest decode batch holds")
    add("--json", default=None, metavar="PATH", help="also write the report as JSON")
    return parser


def run_simulate(args: argparse.Namespace, out: TextIO) -> None:
    """Simulate, print the summary, write the JSON; raise ValueError with one line on a mistake."""
    overrides = {name: value for name, value in (
        ("max_processing_samples", args.max_processing_samples), ("spare_blocks_ratio", args.spare_blocks_ratio),
        ("prefill_chunk_size", args.prefill_chunk_size), ("is_offline", args.offline or None)) if value is not None}  # fmt: skip
    if not args.artifact.strip():  # Path("") would be the current folder
        raise ValueError(f"artifact: expected an artifact folder, got {args.artifact!r}")
    if args.shared_prefix < 0:
        raise ValueError(f"--shared-prefix: must be >= 0, got {args.shared_prefix}")
    if args.json is not None:
        _check_json_path(args.json)
    try:
        report = simulate(
            args.artifact, args.workload, num_prompts=args.num_prompts, request_rate=args.request_rate, seed=args.seed,
            shared_prefix=args.shared_prefix, enable_prefix_caching=args.enable_prefix_caching, scheduler_overrides=overrides,
            devices=args.devices, pipeline_parallel_size=args.pipeline_parallel_size, data_parallel_size=args.data_parallel_size,
        )  # fmt: skip
    except WorkloadError as err:
        raise ValueError(f"--workload: {err}") from None
    out.write(report.render() + "\n")
    if args.json is not None:
        try:
            report.write_json(args.json)
        except OSError as err:
            raise ValueError(f"--json: {args.json}: {(err.strerror or str(err)).lower()}") from None


def _check_json_path(path: str) -> None:
    """Refuse, before the simulation runs, a ``--json`` path the report could not be written
    to: empty, a folder, or in a folder that does not exist."""
    if not path.strip():
        raise ValueError(f"--json: expected a file path, got {path!r}")
    target = Path(path).expanduser()
    if target.is_dir():
        raise ValueError(f"--json: {path}: is a folder; give a file path")
    if not target.parent.is_dir():
        raise ValueError(f"--json: {path}: {target.parent} is not an existing folder")


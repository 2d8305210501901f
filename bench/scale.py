"""Scale benchmark: build real-size model shapes (random weights) and run one, measuring
wall time and the peak memory of the whole process tree against the artifact's size.

    python bench/scale.py                          # Qwen2.5-0.5B, Llama-3.2-1B and Llama-3.1-8B shapes
    python bench/scale.py --shapes shape-qwen2.5-0.5b --no-generate

Every build is ``python -m furiosa_build model=<shape> ...`` in a subprocess with a fresh
cache in a temporary folder (so nothing is reused); the run loads the last artifact with
``LLM`` and generates 8 greedy tokens for one prompt of token ids.  The figure that
matters is peak RSS against the artifact size: a build or a run whose memory grows with
the model cannot handle models larger than the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from measure import run_measured

#: The buckets each shape is built with.
BUCKETS = {
    "shape-qwen2.5-0.5b": [
        "buckets.prefill=[[1,128],[1,256],[1,512],[1,1024],[4,256],[4,512]]",
        "buckets.decode=[[1,1024],[2,1024],[4,1024],[8,1024],[16,1024],[32,1024],[1,2048],[4,2048]]",
        "buckets.max_seq_len_to_capture=2048",
    ],
    "shape-llama-3.2-1b": ["buckets.prefill=[[1,1024]]", "buckets.decode=[[1,2048],[16,2048]]", "buckets.max_seq_len_to_capture=2048"],
    # 15 GiB of weights and 8 GiB of KV cache need more than one PE's 6 GB: eight pipeline stages
    "shape-llama-3.1-8b": ["buckets.prefill=[[1,1024]]", "buckets.decode=[[1,2048],[16,2048]]", "buckets.max_seq_len_to_capture=2048",
                           "parallel.devices=npu:0", "parallel.pipeline_parallel_size=8"],
}

GENERATE = """
import json, sys, time
from furiosa_runtime import LLM, SamplingParams
start = time.perf_counter()
llm = LLM(sys.argv[1])
loaded = time.perf_counter()
out = llm.generate({"prompt_token_ids": list(range(1, 17))}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                   use_tqdm=False)
done = time.perf_counter()
print(json.dumps({"load_s": loaded - start, "generate_s": done - loaded, "tokens": out[0].outputs[0].token_ids}))
"""


@dataclass
class Measured:
    label: str
    wall_seconds: float
    peak_rss: int
    peak_pss: int
    artifact_bytes: int


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(label: str, cmd: list[str], work: Path, artifact: Path) -> tuple[Measured, str]:
    log = work / f"{label}.log"
    print(f"... {label}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    wall, rss, pss, status = run_measured(cmd, log)
    output = log.read_text(errors="replace")
    if status != 0:
        raise SystemExit(f"error: {label} exited with {status}\n" + "\n".join(output.splitlines()[-20:]))
    return Measured(label, wall, rss, pss, folder_bytes(artifact)), output


def build_shape(shape: str, work: Path) -> Measured:
    out = work / shape
    cmd = [sys.executable, "-m", "furiosa_build", f"model={shape}", *BUCKETS[shape], f"build.save_dir={out}",
           f"build.cache_dir={work / 'cache'}", "build.progress=false"]  # fmt: skip
    measured, _ = run(f"build {shape}", cmd, work, out)
    return measured


def generate(artifact: Path, work: Path) -> tuple[Measured, dict]:
    measured, output = run(f"generate {artifact.name}", [sys.executable, "-c", GENERATE, str(artifact)], work, artifact)
    return measured, json.loads(output.strip().splitlines()[-1])


def table(rows: Sequence[Measured]) -> str:
    lines = ["| run | wall s | peak RSS GiB | peak PSS GiB | artifact GiB | RSS / artifact |", "|:---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.label} | {r.wall_seconds:.1f} | {r.peak_rss / 2**30:.2f} | {r.peak_pss / 2**30:.2f} | "
                     f"{r.artifact_bytes / 2**30:.2f} | {r.peak_rss / max(r.artifact_bytes, 1):.2f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shapes", nargs="+", default=list(BUCKETS), choices=list(BUCKETS))
    parser.add_argument("--no-generate", action="store_true", help="only build")
    parser.add_argument("--work", type=Path, help="where to make the temporary folder (a disk with room for the artifacts)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="furiosa-scale-", dir=args.work) as tmp:
        work = Path(tmp)
        rows = [build_shape(shape, work) for shape in args.shapes]
        extra = []
        if not args.no_generate:
            measured, figures = generate(work / args.shapes[-1], work)
            rows.append(measured)
            extra.append(f"{args.shapes[-1]}: load {figures['load_s']:.1f} s, 8 tokens in {figures['generate_s']:.1f} s "
                         f"({8 / figures['generate_s']:.2f} tokens/s), tokens {figures['tokens']}")  # fmt: skip
    print(table(rows))
    print(*extra, sep="\n")
    print("(peak memory sampled every 50 ms over the whole process tree)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

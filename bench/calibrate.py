"""The timing model against published RNGD figures: build shape-only artifacts and simulate the
published methodology (fixed input/output lengths, offline, 3 x concurrency prompts).

    python bench/calibrate.py            # Llama-3.1-8B FP8 on one card, 128 in / 4096 out, and its bf16-KV variant
    python bench/calibrate.py --70b      # also Llama-3.1-70B FP8 on 8 cards, 2048 in / 128 out
    python bench/calibrate.py --gpus     # also the H100 SXM and L40S figures of the same comparison

Every figure comes from ``conf/hardware/rngd.yaml`` as it stands (no factor is fitted here):
the published peaks and bandwidth, and the sustained shares of them (``compute_efficiency``,
``hbm_efficiency``).  The published figures are FuriosaAI's (FuriosaSDK, FP8; the 8B one is
what ``tests`` do not check either: this script prints, it asserts nothing).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from furiosa_runtime.engine.simulate import simulate

#: FP8 weights planned without a checkpoint (W8A8 dynamic; embedding and lm_head bf16), one card
#: (tensor parallelism over its 8 PEs).  KV pool: 36,000 blocks of 16 tokens (35.2 GiB of fp8 KV
#: beside 8.5 GiB of weights: the card's 48 GiB, less room for activations); decode buckets of
#: 64 and 128 rows on a ladder of attention sizes (128 rows of 8,192 would not fit).
LLAMA_8B = ("model=shape-llama-3.1-8b", "quantization=fp8-dynamic", "quantization.kv_cache_dtype=f8_e4m3fn",
            "parallel=device", "parallel.tensor_parallel_size=8", "buckets.prefill=[[1,128],[1,512],[1,1024]]",
            "buckets.decode=[[64,1024],[64,2048],[64,4096],[64,8192],[128,1024],[128,2048],[128,4096]]",
            "buckets.max_seq_len_to_capture=8192", "buckets.paged_attention_num_blocks=36000")  # fmt: skip
#: The same card with a bf16 KV cache: the same 35.2 GiB pool holds half the tokens, so 64 rows.
LLAMA_8B_BF16_KV = (*LLAMA_8B[:2], *LLAMA_8B[3:6], "buckets.decode=[[64,1024],[64,2048],[64,4096],[32,8192]]",
                    "buckets.max_seq_len_to_capture=8192", "buckets.paged_attention_num_blocks=18000")  # fmt: skip
#: FP8 Llama-3.1-70B on 4 cards (8 PEs of tensor parallelism per card, one pipeline stage per
#: card), loaded on 8 cards as two replicas.
LLAMA_70B = ("model=shape-llama-3.1-70b", "quantization=fp8-dynamic", "quantization.kv_cache_dtype=f8_e4m3fn",
             "parallel.devices='npu:0,npu:1,npu:2,npu:3'", "parallel.tensor_parallel_size=8", "parallel.pipeline_parallel_size=4",
             "buckets.prefill=[[1,1024],[1,2048]]", "buckets.decode=[[64,1024],[64,2048],[64,4096],[128,1024],[128,2048],[128,4096]]",
             "buckets.max_seq_len_to_capture=4096")  # fmt: skip
EIGHT_CARDS = ",".join(f"npu:{d}" for d in range(8))
#: Data-sheet figures of the GPUs FuriosaAI compared RNGD with (dense FP8/BF16 peaks; TensorRT-LLM
#: 0.15, FP8), with RNGD's sustained shares: a check that the physics is not RNGD-specific.
H100_SXM = ("hardware.name=H100-SXM", "hardware.bf16_tflops=989", "hardware.fp8_tflops=1979", "hardware.int8_tops=1979",
            "hardware.hbm_bytes=85899345920", "hardware.hbm_bandwidth=3.35e12", "hardware.pe_link_bandwidth=900e9")  # fmt: skip
L40S = ("hardware.name=L40S", "hardware.bf16_tflops=362", "hardware.fp8_tflops=733", "hardware.int8_tops=733",
        "hardware.hbm_bandwidth=864e9", "hardware.pe_link_bandwidth=900e9")  # fmt: skip


def gpu_8b(hardware: tuple[str, ...], rows: int, blocks: int) -> tuple[str, ...]:
    """The 8B FP8 with fp8 KV on a GPU: a GPU engine attends over each row's exact context,
    which a ladder of decode buckets 512 positions apart stands in for."""
    ladder = ",".join(f"[{rows},{a}]" for a in (*range(512, 4097, 512), 4352))
    return (*LLAMA_8B[:5], "buckets.prefill=[[1,128]]", f"buckets.decode=[{ladder}]", "buckets.max_seq_len_to_capture=4352",
            f"buckets.paged_attention_num_blocks={blocks}", *hardware)  # fmt: skip


@dataclass(frozen=True)
class Case:
    """A build, the workload it serves and the published output throughput it is compared with."""

    label: str
    overrides: tuple[str, ...]
    workload: str
    published: float | None  # output tokens/s; None: a variant for the physics, not a published setup
    devices: str | None = None  # load-time devices (None: the artifact's)


CASES = [
    Case("Llama-3.1-8B FP8, fp8 KV, 1 card, 128/4096", LLAMA_8B, "fixed:128:4096", 3935.25),
    Case("  the same with a bf16 KV cache", LLAMA_8B_BF16_KV, "fixed:128:4096", None),
]
CASE_70B = Case("Llama-3.1-70B FP8, fp8 KV, 8 cards, 2048/128", LLAMA_70B, "fixed:2048:128", 957.05, EIGHT_CARDS)
GPU_CASES = [
    Case("H100 SXM: Llama-3.1-8B FP8, 128/4096", gpu_8b(H100_SXM, 256, 70000), "fixed:128:4096", 13222.06),
    Case("L40S: Llama-3.1-8B FP8, 128/4096", gpu_8b(L40S, 128, 36000), "fixed:128:4096", 2989.17),
]


def build(case: Case, out: Path, cache: str) -> None:
    """``python -m furiosa_build`` of the case's shape-only artifact into ``out``."""
    cmd = [sys.executable, "-m", "furiosa_build", *case.overrides, "build.weights=none", f"build.save_dir={out}",
           f"build.cache_dir={Path(cache).expanduser()}", "build.progress=false"]  # fmt: skip
    print(f"... building {out.name}", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: building {out.name}: {done.stderr.strip().splitlines()[-1]}")


def modelled(case: Case, artifact: Path) -> float:
    """Output tokens/s of the case's workload served offline (``python -m furiosa_runtime simulate --offline``)."""
    report = simulate(artifact, case.workload, scheduler_overrides={"is_offline": True}, devices=case.devices)
    return report.output_tokens_per_s


def row(case: Case, tokens_per_s: float) -> str:
    if case.published is None:
        return f"| {case.label} | {tokens_per_s:,.0f} | | |"
    return f"| {case.label} | {tokens_per_s:,.0f} | {case.published:,.0f} | {tokens_per_s / case.published:.2f} |"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--70b", dest="with_70b", action="store_true", help="also the 70B on 8 cards (about a minute more)")
    parser.add_argument("--gpus", action="store_true", help="also the H100 and L40S of the same published comparison")
    parser.add_argument("--out", type=Path, default=Path("artifacts/calibrate"), help="where the shape-only artifacts go")
    parser.add_argument("--cache-dir", default="~/.cache/furiosa/llm", help="the compile cache (build.cache_dir)")
    args = parser.parse_args(argv)
    lines = ["| setup | modelled tokens/s | published tokens/s | ratio |", "|:---|---:|---:|---:|"]
    cases = [*CASES, *([CASE_70B] if args.with_70b else []), *(GPU_CASES if args.gpus else [])]
    for index, case in enumerate(cases):
        artifact = args.out / f"case{index}"
        build(case, artifact, args.cache_dir)
        lines.append(row(case, modelled(case, artifact)))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

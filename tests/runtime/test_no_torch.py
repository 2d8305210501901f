"""The runtime serves an artifact without importing torch, transformers or Hydra."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "transformers", "hydra", "omegaconf")

SCRIPT = textwrap.dedent(
    """
    import sys

    import furiosa_runtime
    from furiosa_runtime import LLM, SamplingParams

    llm = LLM(sys.argv[1])
    [out] = llm.generate("Hello", SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    assert len(out.outputs[0].token_ids) > 0, out
    if llm.tokenizer.has_chat_template:
        llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[2:]))
    assert not loaded, f"furiosa_runtime imported {loaded}"
    print("ok", len(out.outputs[0].token_ids))
    """
)


def _run(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_generate_without_torch(tiny_llama_artifact: Path) -> None:
    result = _run(SCRIPT, str(tiny_llama_artifact), *FORBIDDEN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok ")


def test_import_is_light() -> None:
    code = "import sys, furiosa_runtime; from furiosa_runtime import SamplingParams, RequestOutput, CompletionOutput, RequestOutputKind; print(sorted(m for m in ('furiosa_runtime.entrypoints.llm', 'furiosa_runtime.npu.simulator', *sys.argv[1:]) if m in sys.modules))"
    result = _run(code, *FORBIDDEN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_without_torch(tiny_llama_artifact: Path) -> None:
    code = "import runpy, sys; sys.argv = ['furiosa_runtime', sys.argv[1], 'Hello', '--max-tokens', '2']\ntry:\n    runpy.run_module('furiosa_runtime', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code, e.code\nbad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'hydra', 'omegaconf'})\nassert not bad, bad"
    result = _run(code, str(tiny_llama_artifact))
    assert result.returncode == 0, result.stderr

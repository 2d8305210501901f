"""`python -m furiosa_runtime ARTIFACT PROMPT`: output on stdout, one-line user errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from furiosa_runtime.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "furiosa_runtime", *map(str, args)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=REPO, timeout=300,
    )  # fmt: skip


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_generate_prints_completion(tiny_llama_artifact: Path) -> None:
    result = run_cli(tiny_llama_artifact, "Hello", "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Traceback" not in result.stderr


def test_greedy_is_deterministic_and_matches_llm(tiny_llama_artifact: Path, capsys) -> None:
    from furiosa_runtime import LLM, SamplingParams

    assert main([str(tiny_llama_artifact), "Hello", "--max-tokens", "4"]) == 0
    first = capsys.readouterr().out
    assert main([str(tiny_llama_artifact), "Hello", "--max-tokens", "4", "--no-chat-template"]) == 0
    assert capsys.readouterr().out == first  # tiny-llama has no chat template
    expected = LLM(tiny_llama_artifact).generate("Hello", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert first == expected[0].outputs[0].text + ("" if expected[0].outputs[0].text.endswith("\n") else "\n")


def test_seeded_sampling_is_reproducible(tiny_llama_artifact: Path, capsys) -> None:
    argv = [str(tiny_llama_artifact), "Hello", "--max-tokens", "6", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "50", "--seed", "7"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first


def test_missing_artifact(tmp_path: Path) -> None:
    assert_user_error(run_cli(tmp_path / "does-not-exist", "Hello"), "not a directory")


def test_corrupted_artifact(tiny_llama_artifact: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_artifact, broken)
    params = broken / "params.safetensors"
    data = bytearray(params.read_bytes())
    data[len(data) // 2] ^= 0xFF
    params.write_bytes(bytes(data))
    assert_user_error(run_cli(broken, "Hello", "--max-tokens", "4"), "params.safetensors", "checksum")


def test_context_length_exceeded(tiny_llama_artifact: Path) -> None:
    # The tiny buckets hold 64 tokens; a short prompt plus 100 new tokens cannot fit.
    line = assert_user_error(run_cli(tiny_llama_artifact, "Hello", "--max-tokens", "100"), "maximum context length is 64 tokens")
    assert "100 in the completion" in line


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"), (["--max-tokens", "0"], "max_tokens")],
)
def test_bad_sampling_values(tiny_llama_artifact: Path, capsys, flags: list[str], needle: str) -> None:
    assert main([str(tiny_llama_artifact), "Hello", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and needle in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["some-artifact", "Hello", "--max-tokens", "many"])
    assert exc.value.code == 2
    assert "--max-tokens" in capsys.readouterr().err

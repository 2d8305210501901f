"""`python -m furiosa_runtime ARTIFACT PROMPT`: output on stdout, one-line user errors."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from furiosa_runtime.entrypoints.cli import COMMANDS, main
from tests.helpers import REPO


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
    assert_user_error(run_cli(tmp_path / "does-not-exist", "Hello"), "does not exist")


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


# -- sub-commands: generate, chat, embed with the EngineArgs flags -----------------------------


def test_generate_subcommand_prints_a_header_before_each_completion(tiny_llama_artifact: Path, capsys) -> None:
    from furiosa_runtime import LLM, SamplingParams

    argv = ["generate", "--model", str(tiny_llama_artifact), "--prompt", "Hello", "--prompt", "The cat",
            "--max-tokens", "4", "--max-processing-samples", "1", "--devices", "npu:0:0"]  # fmt: skip
    assert main(argv) == 0
    expected = LLM(tiny_llama_artifact).generate(["Hello", "The cat"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    want = "".join(f"--- prompt {i} ---\n{o.outputs[0].text}" + ("" if o.outputs[0].text.endswith("\n") else "\n")
                   for i, o in enumerate(expected, 1))  # fmt: skip
    assert capsys.readouterr().out == want


def test_generate_samples_are_numbered(tiny_llama_artifact: Path, capsys) -> None:
    argv = ["generate", "--model", str(tiny_llama_artifact), "--prompt", "Hello", "--n", "2", "--temperature", "0.8", "--seed", "1",
            "--max-tokens", "3"]  # fmt: skip
    assert main(argv) == 0
    headers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--- ")]
    assert headers == ["--- prompt 1, sample 1 ---", "--- prompt 1, sample 2 ---"]
    assert main(argv[:5] + ["--max-tokens", "3"]) == 0  # one completion: no header
    assert not capsys.readouterr().out.startswith("--- ")


@pytest.mark.slow
def test_a_text_prompt_gets_the_chat_template_everywhere(smollm2_artifact: Path, capsys) -> None:
    question = "What is the capital of France?"
    assert main([str(smollm2_artifact), question, "--max-tokens", "8"]) == 0
    default = capsys.readouterr().out
    assert main(["generate", "--model", str(smollm2_artifact), "--prompt", question, "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out == default and "Paris" in default


def test_chat_subcommand_streams_each_reply(smollm2_artifact: Path, capsys, monkeypatch) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(smollm2_artifact), "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "> " not in out  # no prompts when stdin is not a terminal


@pytest.mark.slow
def test_chat_on_a_terminal_shows_a_prompt(smollm2_artifact: Path, capsys, monkeypatch) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal("What is the capital of France?\n"))
    assert main(["chat", "--model", str(smollm2_artifact), "--max-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "/exit" in lines[0] and "Ctrl-D" in lines[0]  # how to leave
    assert lines[1].startswith("> ") and "Paris" in lines[1]  # the reply follows the prompt
    assert lines[2:] == ["> "]  # asked again, then Ctrl-D (EOF) ends the chat on a fresh line


def test_help_names_the_program_as_invoked(capsys, monkeypatch) -> None:
    monkeypatch.setattr("sys.argv", ["/venv/bin/furiosa-run", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert capsys.readouterr().out.startswith("usage: furiosa-run ")
    monkeypatch.setattr("sys.argv", [str(REPO / "furiosa_runtime" / "__main__.py")])
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m furiosa_runtime generate ")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "--prompt", "x", "--jit-unit-size", "1"], "jit_unit_size must be >= 2"),
        (["generate", "--prompt", "x", "--spare-blocks-ratio", "1.5"], "spare_blocks_ratio"),
        (["generate", "--prompt", "x", "--devices", "gpu:0"], "devices"),
        (["generate", "--prompt", "x", "--top-p", "0"], "top_p"),
        (["generate", "--prompt", "x" * 300], "maximum context length"),
        (["chat"], "chat_template"),  # tiny-llama has no chat template
        (["embed", "--prompt", "x"], "generation model"),  # embeddings need an embed artifact
        (["generate", "--prompt", "x", "--tokenizer", "/no/such/folder"], "tokenizer: tokenizer.json not found"),  # was a traceback
        (["generate", "--prompt", "x", "--devices", ""], "devices must be None or a device string"),  # was silently ignored
        (["generate", "--prompt", "x", "--seed", "-1"], "seed must be >= 0, got -1"),
        (["generate", "--prompt", "x", "--temperature", "inf"], "temperature must be a finite number"),
        (["generate", "--prompt", "x", "--data-parallel-size", "0"], "data_parallel_size must be >= 1, got 0"),
        (["generate", "--prompt", "x", "--npu-queue-limit", "0"], "npu_queue_limit must be >= 1, got 0"),
    ],
)
def test_subcommand_user_errors_are_one_line(tiny_llama_artifact: Path, capsys, monkeypatch, argv: list[str], needle: str) -> None:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    assert main([argv[0], "--model", str(tiny_llama_artifact), *argv[1:]]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and needle in captured.err
    assert len(captured.err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "--prompt", "x"], "the following arguments are required: --model"),
        (["embed", "--model", "a"], "the following arguments are required: --prompt"),
        (["chat", "--model", "a", "--max-tokens", "x"], "argument --max-tokens: invalid int value: 'x'"),
        (["generate", "--model", "a", "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "--model", "a", "--prompt", "x", "--tokenizer-mode", "fast"], "argument --tokenizer-mode: invalid choice"),
        (["a", "Hello", "--top-k", "1.5"], "argument --top-k: invalid int value"),
        (["serve", "a", "--port", "-1"], "argument --port: expected a port 0-65535, got '-1'"),
        (["serve", "a", "--port", "70000"], "argument --port: expected a port 0-65535, got '70000'"),
        (["serve", "a", "--max-body-bytes", "0"], "argument --max-body-bytes: expected an integer >= 1, got '0'"),
    ],
)
def test_subcommand_usage_errors_exit_2_with_one_line(capsys, argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()  # no usage block
    assert line.startswith("error: ") and needle in line and line.endswith("--help)")


def test_interrupt_exits_quietly(capsys, monkeypatch) -> None:
    def interrupted(*args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(COMMANDS, "generate", interrupted)
    assert main(["generate", "--model", "a", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == ""


def test_unreadable_files_are_one_line_errors(tiny_llama_artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "artifact.json").write_bytes(b"\xff\xfe{")
    assert_user_error(run_cli("generate", "--model", bad, "--prompt", "Hi"), "artifact.json is not a valid artifact description")
    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{not json")
    assert_user_error(run_cli("generate", "--model", tiny_llama_artifact, "--prompt", "Hi", "--max-tokens", "2", "--tokenizer", tokenizer),
                      "tokenizer: cannot read the tokenizer files")  # fmt: skip


def test_subcommand_in_a_subprocess(tiny_llama_artifact: Path) -> None:
    result = run_cli("generate", "--model", tiny_llama_artifact, "--prompt", "Hello", "--max-tokens", "3")
    assert result.returncode == 0 and result.stdout.strip() and not result.stderr.strip()
    assert_user_error(run_cli("generate", "--model", tiny_llama_artifact, "--prompt", "Hello", "--max-tokens", "100"), "maximum context length")


# -- serve: the HTTP server's command line (its behaviour: test_openai_server.py) -------------------


def test_serve_user_errors_are_one_line(tiny_llama_artifact: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--port", "x"])
    assert exc.value.code == 2 and "argument --port: expected a port 0-65535, got 'x'" in capsys.readouterr().err
    for argv, needle in [
        (["serve"], "required: ARTIFACT (or --model)"),
        (["serve", "a", "--model", "b"], "ARTIFACT 'a' and --model 'b' differ"),
        (["serve", str(tiny_llama_artifact), "--spare-blocks-ratio", "2"], "spare_blocks_ratio"),
        (["serve", str(tiny_llama_artifact), "--chat-template", "tmplate.jinja"], "neither a file nor a Jinja template"),
    ]:
        assert main(argv) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("error: ") and needle in line
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", str(tiny_llama_artifact), "--host", "127.0.0.1", "--port", str(port)]) == 2
    assert f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_furiosa_llm_serve_is_the_runtime_server_without_torch(tmp_path: Path) -> None:
    code = ("import sys\nfrom furiosa_build.cli import main\nstatus = main(sys.argv[1:])\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'hydra', 'omegaconf'})\n"
            "print(status, loaded)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code, "serve", str(tmp_path / "missing"), "--host", "127.0.0.1", "--port", "0"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
    assert result.stdout.strip() == "2 []", result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "missing" in result.stderr
    from furiosa_build.cli import make_parser

    assert "serve" in make_parser().format_help()

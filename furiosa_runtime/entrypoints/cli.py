"""``python -m furiosa_runtime`` / ``furiosa-run``: generate, chat, embed or serve with a built artifact.

    python -m furiosa_runtime ARTIFACT "prompt"                      # one completion
    python -m furiosa_runtime generate --model ARTIFACT --prompt "a" --prompt "b" --max-tokens 32
    python -m furiosa_runtime chat --model ARTIFACT                  # interactive, streams each reply
    python -m furiosa_runtime embed --model ARTIFACT --prompt "a"    # one JSON vector per line
    python -m furiosa_runtime serve ARTIFACT --port 8000             # the OpenAI-compatible HTTP server
    python -m furiosa_runtime simulate ARTIFACT --workload fixed:128:128   # modelled serving (simulate_cli.py)

A text prompt means the same everywhere: when the artifact's tokenizer has a chat
template, the prompt is sent as a user message of it (as ``chat`` does), so the default
command and ``generate`` answer a question alike; ``--no-chat-template`` sends the raw
text.  When ``generate`` prints more than one completion (several prompts, or ``--n``),
each starts with a header line, ``--- prompt 2 ---`` or ``--- prompt 2, sample 1 ---``; a
single completion prints alone.  ``chat`` shows a ``> `` prompt when reading a terminal.

The sub-commands take the ``EngineArgs`` flags (``--devices``, ``--npu-queue-limit``, ...).
Completions go to stdout.  Mistakes a user can fix (an unknown or malformed flag, a missing
or corrupted artifact, an out-of-range value, a prompt that does not fit the buckets, a
busy port) print one ``error: ...`` line on stderr and exit with status 2; Ctrl-C exits
with 130, quietly.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

__all__ = ["build_parser", "main", "run_command"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
SUBCOMMANDS = ("generate", "chat", "embed", "serve", "simulate")
EXIT_WORDS = ("/exit", "/quit")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``error: ... (see --help)``) instead of the
    whole usage block; still exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _invoked_as() -> str:
    """How the user started the program: ``python -m furiosa_runtime`` or the script's name (``furiosa-run``)."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m furiosa_runtime" if name in ("", "-c", "__main__.py") else name


def _add_sampling_args(parser: argparse.ArgumentParser, with_seed: bool) -> None:
    add = parser.add_argument
    add("--max-tokens", type=int, default=64, help="maximum new tokens (default: 64)")
    add("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    add("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    add("--top-k", type=int, default=-1, help="top-k sampling; -1 or 0 disables (default: -1)")
    add("--min-p", type=float, default=0.0, help="drop tokens less likely than min-p x the best (default: 0)")
    add("--repetition-penalty", type=float, default=1.0, help="penalty for tokens already seen (default: 1.0)")
    add("--presence-penalty", type=float, default=0.0, help="penalty for tokens already generated (default: 0)")
    add("--frequency-penalty", type=float, default=0.0, help="penalty per repetition of a generated token (default: 0)")
    add("--stop", action="append", default=None, help="stop string (repeatable)")
    if with_seed:
        add("--seed", type=int, default=None, help="random seed for sampling")


def _add_raw_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-chat-template", action="store_true",
                        help="send each prompt as raw text even when the tokenizer has a chat template")  # fmt: skip


def _sampling_params(args: argparse.Namespace, **extra: Any):
    from furiosa_runtime.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, stop=args.stop, seed=args.seed, **extra,
    )  # fmt: skip


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The default command: a positional artifact and prompt plus sampling options."""
    prog = prog or _invoked_as()
    parser = _Parser(
        prog=prog,
        description=f"Generate a completion for one prompt with a built artifact (sub-commands: {', '.join(SUBCOMMANDS)}; "
        f"see {prog} generate --help).",
    )
    parser.add_argument("artifact", help="artifact directory built by furiosa_build")
    parser.add_argument("prompt", help="prompt text")
    _add_sampling_args(parser, with_seed=True)
    _add_raw_flag(parser)
    return parser


def build_subcommand_parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """``generate``, ``chat``, ``embed``, ``serve`` or ``simulate``: the EngineArgs flags plus the command's own."""
    from furiosa_runtime.entrypoints.engine_args import EngineArgs

    parser = _Parser(prog=f"{prog or _invoked_as()} {command}")
    if command == "serve":
        from furiosa_runtime.entrypoints.openai.cli_args import add_serve_args

        parser.description = "Serve the artifact over an OpenAI-compatible HTTP API."
        return add_serve_args(parser)
    if command == "simulate":
        from furiosa_runtime.entrypoints.simulate_cli import add_simulate_args

        return add_simulate_args(parser)
    EngineArgs.add_cli_args(parser)
    if command in ("generate", "embed"):
        parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    if command in ("generate", "chat"):
        _add_sampling_args(parser, with_seed=False)
    if command == "generate":
        parser.add_argument("--n", type=int, default=1, help="completions per prompt (needs --temperature > 0; default: 1)")
        _add_raw_flag(parser)
    if command == "chat":
        parser.add_argument("--system", default=None, help="system message opening the conversation")
    return parser


def _load(args: argparse.Namespace):
    """The LLM the EngineArgs flags describe."""
    from furiosa_runtime.entrypoints.engine_args import EngineArgs

    return EngineArgs.from_cli_args(args).create_llm()


def _complete(llm, prompts: list[str], params, raw: bool) -> list:
    """Each prompt's RequestOutput: a user message of the chat template when the tokenizer
    has one (unless ``raw``), the text as it is otherwise."""
    if llm.tokenizer.has_chat_template and not raw:
        return llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    return llm.generate(prompts, params, use_tqdm=False)


def _default(args: argparse.Namespace, out: TextIO, _in: TextIO) -> None:
    from furiosa_runtime.entrypoints.llm import LLM

    params = _sampling_params(args)  # validated before the (slower) artifact load
    [output] = _complete(LLM(args.artifact, seed=args.seed), [args.prompt], params, args.no_chat_template)
    _write(out, output.outputs[0].text)


def _generate(args: argparse.Namespace, out: TextIO, _in: TextIO) -> None:
    params = _sampling_params(args, n=args.n)
    outputs = _complete(_load(args), args.prompt, params, args.no_chat_template)
    several = len(outputs) * args.n > 1
    for number, output in enumerate(outputs, 1):
        for completion in output.outputs:
            if several:
                _write(out, f"--- prompt {number}" + (f", sample {completion.index + 1}" if args.n > 1 else "") + " ---")
            _write(out, completion.text)


def _chat(args: argparse.Namespace, out: TextIO, stdin: TextIO) -> None:
    """Read user turns from stdin (until EOF or /exit), stream each reply as it is generated.
    On a terminal, each turn is asked for with ``> ``."""
    from furiosa_runtime.engine.sampling_params import RequestOutputKind
    from furiosa_runtime.entrypoints.llm_engine import LLMEngine

    params = _sampling_params(args, output_kind=RequestOutputKind.DELTA)
    engine = LLMEngine.from_llm(_load(args))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = stdin.isatty()
    if interactive:
        _write(out, f"Chatting with {args.model}: type a message and press Enter; {' or '.join(EXIT_WORDS)} or Ctrl-D quits.")
    for turn in itertools.count():
        if interactive:
            _write(out, "> ", newline=False)
        line = stdin.readline()
        if not line or line.strip() in EXIT_WORDS:
            if interactive and not line:
                _write(out, "")  # Ctrl-D left the cursor after the prompt
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        engine.add_request(f"turn-{turn}", prompt, params.clone())
        reply = ""
        while engine.has_unfinished_requests():
            for output in engine.step():
                reply += output.outputs[0].text
                _write(out, output.outputs[0].text, newline=False)
        _write(out, "")
        messages.append({"role": "assistant", "content": reply})


def _embed(args: argparse.Namespace, out: TextIO, _in: TextIO) -> None:
    llm = _load(args)
    for output in llm.embed(args.prompt, use_tqdm=False):
        _write(out, json.dumps([round(float(x), 7) for x in output.outputs.embedding]))


def _serve(args: argparse.Namespace, _out: TextIO, _in: TextIO) -> None:
    from furiosa_runtime.entrypoints.openai.api_server import run_server

    run_server(args)


def _simulate(args: argparse.Namespace, out: TextIO, _in: TextIO) -> None:
    from furiosa_runtime.entrypoints.simulate_cli import run_simulate

    run_simulate(args, out)


def _write(out: TextIO, text: str, newline: bool = True) -> None:
    """Write text, replacing what the console cannot encode (random byte tokens) instead of failing."""
    if newline and not text.endswith("\n"):
        text += "\n"
    encoding = getattr(out, "encoding", None) or "utf-8"
    out.write(text.encode(encoding, errors="replace").decode(encoding))
    out.flush()


def _error(message: object) -> int:
    """Print ``error: <one line>``; an OSError as ``<path>: <reason>`` (not ``[Errno N] ...``)."""
    if isinstance(message, OSError) and message.strerror and message.filename is not None:
        message = f"{message.filename}: {message.strerror.lower()}"
    line = " ".join(str(message).split()) or "unknown error"
    print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE


COMMANDS: dict[str, Callable[[argparse.Namespace, TextIO, TextIO], None]] = {
    "generate": _generate, "chat": _chat, "embed": _embed, "serve": _serve, "simulate": _simulate,
}  # fmt: skip


def run_command(command: str | None, args: argparse.Namespace) -> int:
    """Run a parsed command (None: the default one) and return the exit status; also how
    ``furiosa-llm serve`` runs the server."""
    from furiosa_runtime.npu.artifact import ArtifactError

    try:
        COMMANDS.get(command or "", _default)(args, sys.stdout, sys.stdin)
    except (ArtifactError, ValueError, OSError) as err:  # includes ContextLengthExceededError, unreadable files, a busy port
        return _error(err)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments) and run it; ``prog`` names the
    program in help and errors (default: as it was invoked)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_subcommand_parser(command, prog) if command else build_parser(prog)
    args = parser.parse_args(argv[1:] if command else argv)  # argparse exits with status 2 on bad usage
    return run_command(command, args)


if __name__ == "__main__":
    sys.exit(main())

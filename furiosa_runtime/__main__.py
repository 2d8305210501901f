"""``python -m furiosa_runtime ARTIFACT "prompt"``: run one prompt on the simulated NPU.

Prints only the completion text on stdout.  Mistakes a user can fix (a missing or
corrupted artifact, out-of-range sampling values, a prompt that does not fit the
buckets) print a single ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The default command: a positional artifact and prompt plus sampling options.

    Sub-commands (generate/chat/embed) can be added by dispatching on ``argv[0]`` in
    `main` before this parser runs, so ``ARTIFACT PROMPT`` keeps working unchanged.
    """
    parser = argparse.ArgumentParser(
        prog="python -m furiosa_runtime",
        description="Generate a completion for one prompt with a built artifact.",
    )
    parser.add_argument("artifact", help="artifact directory built by furiosa_build")
    parser.add_argument("prompt", help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=64, help="maximum new tokens (default: 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=-1, help="top-k sampling; -1 or 0 disables (default: -1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="send the prompt as raw text even when the tokenizer has a chat template",
    )
    return parser


def _generate(args: argparse.Namespace) -> str:
    from furiosa_runtime.llm import LLM
    from furiosa_runtime.sampling_params import SamplingParams

    # Validate sampling values before the (slower) artifact load.
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    llm = LLM(args.artifact, seed=args.seed)
    if llm.tokenizer.has_chat_template and not args.no_chat_template:
        [output] = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        [output] = llm.generate(args.prompt, params, use_tqdm=False)
    return output.outputs[0].text


def _error(message: object) -> int:
    line = " ".join(str(message).split()) or "unknown error"
    print(f"error: {line}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse exits with status 2 on bad usage
    from furiosa_runtime.artifact import ArtifactError

    try:
        text = _generate(args)
    except (ArtifactError, ValueError) as err:  # includes ContextLengthExceededError
        return _error(err)
    if not text.endswith("\n"):
        text += "\n"
    # Random or partial byte tokens may not be encodable on a narrow console: replace them
    # rather than die with a traceback after the generation succeeded.
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout.write(text.encode(encoding, errors="replace").decode(encoding))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

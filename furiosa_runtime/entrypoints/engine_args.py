"""``EngineArgs`` / ``AsyncEngineArgs``: engine settings from Python or the command line.

Names, defaults, flags and the validation of the experimental JIT settings follow
furiosa-llm, so ``EngineArgs.add_cli_args(parser)`` gives the same ``--model``,
``--devices``, ``--npu-queue-limit``, ... flags.  The scheduler values left as None keep
the artifact's own scheduler config.  ``weight_cache_bytes`` (``--weight-cache-bytes``,
which also takes sizes such as ``4GiB``) is the simulator's own: how much memory its
float32 copies of bf16 weights may hold.  ``enable_prefix_caching`` (on by default;
``--enable-prefix-caching`` / ``--no-enable-prefix-caching`` as in vLLM) reuses the KV
blocks of earlier prompts that start with the same tokens.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import MISSING, dataclass, fields
from decimal import Decimal
from numbers import Real
from pathlib import Path
from typing import Any, Literal

from furiosa_runtime.engine.jit import CACHE_DIR, DEFAULT_JIT_MAX_WORKERS, DEFAULT_JIT_THRESHOLD, DEFAULT_JIT_UNIT_SIZE
from furiosa_runtime.entrypoints.arg_checks import (
    check_bool,
    check_devices,
    check_int,
    check_jit,
    check_path,
    check_seed,
)
from furiosa_runtime.entrypoints.llm import LLM
from furiosa_runtime.npu.artifact import load_artifact

TokenizerModeType = Literal["auto", "slow"]


def _bool(text: str | bool) -> bool:
    """argparse type for true/false flags given a value (``--enable-jit-compilation false``)."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value in ("true", "1", "yes")


def parse_size(text: str) -> int:
    """argparse type of byte counts: ``4294967296``, ``4GiB``, ``512MiB``, ``1.5GB``, ``8G``
    (KiB/MiB/GiB/TiB and K/M/G/T are powers of 1024, KB/MB/GB/TB of 1000; case ignored)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
    unit = _SIZE_UNITS.get(match[2].lower()) if match else None
    if match is None or unit is None:
        raise argparse.ArgumentTypeError(f"expected a number of bytes such as 4294967296, 4GiB or 512MiB, got {text!r}")
    return int(Decimal(match[1]) * unit)


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}  # fmt: skip


@dataclass
class EngineArgs:
    """Arguments of ``LLMEngine.from_engine_args`` (the model must be a built artifact)."""

    model: str
    revision: str | None = None
    pipeline_parallel_size: int | None = None
    data_parallel_size: int | None = None
    tokenizer: str | None = None
    tokenizer_mode: TokenizerModeType = "auto"
    seed: int | None = None
    devices: str | None = None
    cache_dir: str | Path = CACHE_DIR
    # scheduler config; None keeps the artifact's value
    npu_queue_limit: int | None = None
    max_processing_samples: int | None = None
    spare_blocks_ratio: float | None = None
    # experimental JIT compilation of buckets (engine/jit.py)
    enable_jit_compilation: bool = False
    jit_threshold: int = DEFAULT_JIT_THRESHOLD
    jit_max_workers: int = DEFAULT_JIT_MAX_WORKERS
    jit_unit_size: int = DEFAULT_JIT_UNIT_SIZE
    # simulator memory: bytes of float32 copies of bf16 weights kept (None: what fits)
    weight_cache_bytes: int | None = None
    # automatic prefix caching: reuse the KV blocks of shared prompt prefixes
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        """Check every value's type and range before any work, one line per mistake.

        The JIT settings follow furiosa-llm; the scheduler values get the ranges the
        scheduler enforces, so a bad flag fails before the artifact is read.
        """
        check_path("model", self.model)
        check_path("tokenizer", self.tokenizer, optional=True)
        check_path("cache_dir", self.cache_dir)
        check_int("pipeline_parallel_size", self.pipeline_parallel_size, 1, optional=True)
        check_int("data_parallel_size", self.data_parallel_size, 1, optional=True)
        check_seed(self.seed)
        check_devices(self.devices)
        check_int("weight_cache_bytes", self.weight_cache_bytes, 0, optional=True)
        self._check_scheduler_values()
        check_bool("enable_jit_compilation", self.enable_jit_compilation)
        check_bool("enable_prefix_caching", self.enable_prefix_caching)
        check_jit(self.jit_threshold, self.jit_max_workers, self.jit_unit_size)

    def _check_scheduler_values(self) -> None:
        """The scheduler's own ranges (``validate_scheduler_config``), for the values given."""
        check_int("npu_queue_limit", self.npu_queue_limit, 1, optional=True)
        check_int("max_processing_samples", self.max_processing_samples, 1, optional=True)
        ratio = self.spare_blocks_ratio
        finite = isinstance(ratio, Real) and not isinstance(ratio, bool) and math.isfinite(ratio)
        if ratio is not None and not (finite and 0.0 <= ratio < 1.0):  # type: ignore[operator]
            raise ValueError(f"spare_blocks_ratio must be None or a number in [0, 1), got {ratio!r}")

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add the engine flags (``--model``, ``--devices``, scheduler, JIT) to ``parser``."""
        add = parser.add_argument
        add("--model", type=str, required=True, help="Path to a model artifact built by furiosa_build.")
        add("--revision", type=str, default=None, help="Model revision on the Hugging Face Hub (artifacts: leave unset).")
        add("--tokenizer", type=str, default=None, help="Folder of a Hugging Face tokenizer to use instead of the artifact's.")
        add("--tokenizer-mode", type=str, default="auto", choices=["auto", "slow"], help='"auto" or "slow" (one implementation serves both).')
        add("--seed", type=int, default=None, help="Seed of the random number generator for sampling.")
        add("--devices", type=str, default=None, help='Devices to run on: "npu:X" (whole device), "npu:X:Y" (one PE) or "npu:X:Y-Z" (fused PEs), comma-separated.')
        add("--pipeline-parallel-size", type=int, default=None, help="Pipeline parallelism; default: the artifact's.")
        add("--data-parallel-size", type=int, default=None, help="Data parallelism; default: inferred.")
        add("--cache-dir", type=Path, default=CACHE_DIR, help='Cache directory for files generated by this LLM (default "$HOME/.cache/furiosa/llm").')
        add("--npu-queue-limit", type=int, default=None, help="NPU queue limit of the scheduler config.")
        add("--max-processing-samples", type=int, default=None, help="Maximum samples processed at once (scheduler hint).")
        add("--spare-blocks-ratio", type=float, default=None, help="Share of KV blocks kept for running requests (scheduler hint).")
        add("--enable-jit-compilation", type=_bool, default=False, help="[EXPERIMENTAL] Enable JIT compilation (true/false).")
        add("--jit-threshold", type=int, default=DEFAULT_JIT_THRESHOLD, help="[EXPERIMENTAL] Requests before triggering JIT compilation.")
        add("--jit-max-workers", type=int, default=DEFAULT_JIT_MAX_WORKERS, help="[EXPERIMENTAL] Maximum concurrent background JIT compilations.")
        add("--jit-unit-size", type=int, default=DEFAULT_JIT_UNIT_SIZE, help="[EXPERIMENTAL] JIT buckets' attention sizes are multiples of it; must be >= 2.")
        add("--weight-cache-bytes", type=parse_size, default=None,
            help="Simulator memory for float32 copies of bf16 weights, least recently used evicted first: bytes or a size "
                 "such as 4GiB or 512MiB; 0 widens on every use (default: half the available memory left after the "
                 "mapped weights and KV cache). Outputs do not depend on it.")  # fmt: skip
        add("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
            help="Reuse the KV cache of earlier prompts that start with the same tokens (on by default; "
                 "--no-enable-prefix-caching turns it off). Outputs do not depend on it.")  # fmt: skip
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        """Build from parsed flags (extra attributes of ``args`` are ignored; a flag the
        parser lacks keeps its default, but ``--model`` is required)."""
        if getattr(args, "model", None) is None:
            raise ValueError(f"{cls.__name__}.from_cli_args: args has no model; add the engine flags with "
                             f"{cls.__name__}.add_cli_args(parser) and pass --model")  # fmt: skip
        values = {f.name: getattr(args, f.name, f.default) for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if value is not MISSING})

    def scheduler_overrides(self) -> dict[str, Any]:
        """The scheduler values given explicitly (the artifact's config supplies the rest)."""
        values = {
            "npu_queue_limit": self.npu_queue_limit,
            "max_processing_samples": self.max_processing_samples,
            "spare_blocks_ratio": self.spare_blocks_ratio,
        }
        return {name: value for name, value in values.items() if value is not None}

    def create_llm(self) -> LLM:
        """Load the artifact with these settings; scheduler values given here override the
        artifact's scheduler config."""
        overrides = self.scheduler_overrides()
        scheduler_config = None
        if overrides:  # rebuilt, not model_copy(update=...), so the merged values are validated
            base = load_artifact(self.model, verify=False).scheduler_config
            scheduler_config = type(base)(**{**base.model_dump(), **overrides})
        names = ["revision", "pipeline_parallel_size", "data_parallel_size", "tokenizer", "tokenizer_mode", "seed",
                 "devices", "cache_dir", "enable_jit_compilation", "jit_threshold", "jit_max_workers", "jit_unit_size",
                 "weight_cache_bytes", "enable_prefix_caching"]  # fmt: skip
        return LLM(self.model, scheduler_config=scheduler_config, **{name: getattr(self, name) for name in names})


@dataclass
class AsyncEngineArgs(EngineArgs):
    """Arguments of ``AsyncLLMEngine.from_engine_args`` (the same as ``EngineArgs``)."""

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return EngineArgs.add_cli_args(parser)

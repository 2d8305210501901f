"""furiosa_runtime: load a built artifact onto the simulated NPU and generate.

The public surface follows vLLM / furiosa-llm::

    from furiosa_runtime import LLM, SamplingParams
    llm = LLM("artifacts/tiny-llama")
    print(llm.generate("Hello", SamplingParams(max_tokens=8))[0].outputs[0].text)

Names are resolved lazily, so ``import furiosa_runtime`` stays cheap (no simulator,
tokenizer or tqdm until ``LLM`` is touched) and never imports torch, transformers or Hydra.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# OpenBLAS's worker threads spin for about 0.1 s (2**28 cycles) after every BLAS call before
# they sleep, on the core the simulator's own host threads need between two GEMMs (paged
# attention): 2**20 cycles still bridge back-to-back BLAS calls.  OpenBLAS reads this when numpy
# loads it, so it applies when furiosa_runtime is imported first; a value set by the user wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

__all__ = [
    "LLM",
    "AsyncEngineArgs",
    "AsyncLLMEngine",
    "BeamSearchOutput",
    "BeamSearchParams",
    "BeamSearchSequence",
    "CompletionOutput",
    "ContextLengthExceededError",
    "EngineArgs",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "PoolingRequestOutput",
    "EmbeddingRequestOutput",
    "SchedulerConfig",
    "TextPrompt",
    "TokensPrompt",
]

# public name -> module that defines it
_EXPORTS = {
    "LLM": "furiosa_runtime.entrypoints.llm",
    "SamplingParams": "furiosa_runtime.engine.sampling_params",
    "RequestOutputKind": "furiosa_runtime.engine.sampling_params",
    "RequestOutput": "furiosa_runtime.engine.outputs",
    "CompletionOutput": "furiosa_runtime.engine.outputs",
    "Logprob": "furiosa_runtime.engine.outputs",
    "LLMEngine": "furiosa_runtime.entrypoints.llm_engine",
    "AsyncLLMEngine": "furiosa_runtime.entrypoints.async_llm_engine",
    "EngineArgs": "furiosa_runtime.entrypoints.engine_args",
    "AsyncEngineArgs": "furiosa_runtime.entrypoints.engine_args",
    "ContextLengthExceededError": "furiosa_runtime.engine.errors",
    "SchedulerConfig": "furiosa_runtime.npu.artifact",
    "PoolingRequestOutput": "furiosa_runtime.engine.pooling",
    "EmbeddingRequestOutput": "furiosa_runtime.engine.pooling",
    "TextPrompt": "furiosa_runtime.engine.inputs",
    "TokensPrompt": "furiosa_runtime.engine.inputs",
    "BeamSearchParams": "furiosa_runtime.engine.beam_search",
    "BeamSearchOutput": "furiosa_runtime.engine.beam_search",
    "BeamSearchSequence": "furiosa_runtime.engine.beam_search",
}

if TYPE_CHECKING:
    from furiosa_runtime.engine.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
    from furiosa_runtime.engine.errors import ContextLengthExceededError
    from furiosa_runtime.engine.inputs import TextPrompt, TokensPrompt
    from furiosa_runtime.engine.outputs import CompletionOutput, Logprob, RequestOutput
    from furiosa_runtime.engine.pooling import EmbeddingRequestOutput, PoolingRequestOutput
    from furiosa_runtime.engine.sampling_params import RequestOutputKind, SamplingParams
    from furiosa_runtime.entrypoints.async_llm_engine import AsyncLLMEngine
    from furiosa_runtime.entrypoints.engine_args import AsyncEngineArgs, EngineArgs
    from furiosa_runtime.entrypoints.llm import LLM
    from furiosa_runtime.entrypoints.llm_engine import LLMEngine
    from furiosa_runtime.npu.artifact import SchedulerConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'furiosa_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""``POST /v1/embeddings``: the pooled vectors of a pooling artifact (built with ``model.task=embed``).

Each input (a text or token ids) runs through ``AsyncLLMEngine.encode``, tokenized and
truncated as sentence-transformers does, pooled as the artifact's pooling config says.
``encoding_format="base64"`` (what the openai client asks for by default) sends the
little-endian float32 bytes of each vector, base64-encoded.
"""

from __future__ import annotations

import asyncio
import base64
import time

import numpy as np

from furiosa_runtime.engine.pooling import PoolingRequestOutput
from furiosa_runtime.entrypoints.openai.protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, usage
from furiosa_runtime.entrypoints.openai.serving_engine import OpenAIServing, RequestRecord, bad_request, random_id


class OpenAIServingEmbedding(OpenAIServing):
    """Embeddings over the async engine."""

    async def create_embedding(self, request: EmbeddingRequest) -> EmbeddingResponse:
        received_at = time.time()
        self.check_model(request.model, "embed")
        inputs = request.input
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]  # type: ignore[list-item]
        request_id = random_id("embd")
        try:
            if not inputs:
                raise ValueError("input: must not be empty")
            if any(not x for x in inputs):  # the engine would take [] for a list of no prompts
                raise ValueError("input: must contain at least one token in every input")
            outputs = await asyncio.gather(*(self._encode(f"{request_id}-{i}", x) for i, x in enumerate(inputs)))
        except ValueError as err:
            raise bad_request(err, request, "input") from None
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        self.finish(RequestRecord(request_id, prompt_tokens, received_at, finish_reasons=["stop"]))
        data = [EmbeddingData(index=i, embedding=_encoded(o.outputs.data, request.encoding_format)) for i, o in enumerate(outputs)]
        return EmbeddingResponse(model=self.model_name, data=data, usage=usage(prompt_tokens, 0))

    async def _encode(self, request_id: str, prompt: str | list[int]) -> PoolingRequestOutput:
        [output] = [o async for o in self.engine.encode(prompt, None, request_id)]
        return output


def _encoded(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]

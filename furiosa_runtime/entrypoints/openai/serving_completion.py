"""``POST /v1/completions``: text completion of one prompt or several.

Prompts are texts (tokenized with the special tokens the tokenizer adds, as ``LLM.generate``
does) or token ids.  Each prompt is one engine request; with ``n`` samples each, choice
``i * n + j`` is sample ``j`` of prompt ``i``.  ``logprobs`` gives the legacy parallel lists
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from furiosa_runtime.engine.inputs import parse_prompt
from furiosa_runtime.engine.outputs import CompletionOutput, RequestOutput
from furiosa_runtime.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    usage,
)
from furiosa_runtime.entrypoints.openai.serving_engine import (
    SSE_DONE,
    OpenAIError,
    OpenAIServing,
    bad_request,
    merge,
    new_completions,
    random_id,
    sse,
    sse_error,
    token_text,
)


class OpenAIServingCompletion(OpenAIServing):
    """Completions over the async engine."""

    async def create_completion(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """The whole response, or its server-sent events when ``stream`` is set."""
        received_at = time.time()
        self.check_model(request.model, "generate")
        if request.stream and request.best_of is not None and request.best_of > request.n:
            raise OpenAIError(400, "best_of: cannot be streamed when best_of > n (the best n are known only at the end)", param="best_of")
        try:
            prompts = [parse_prompt(p, self.engine.native_engine.tokenizer) for p in _prompt_list(request.prompt)]
            params = request.sampling_params(request.max_tokens, request.logprobs, request.best_of)
            for _, token_ids in prompts:
                self.validate(token_ids, params)
        except ValueError as err:
            raise bad_request(err, request, "prompt") from None
        request_id = random_id("cmpl")
        streams = [self.generate(f"{request_id}-{i}", text, ids, params, received_at) for i, (text, ids) in enumerate(prompts)]
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        response = CompletionResponse(id=request_id, created=int(received_at), model=self.model_name, choices=[])
        if request.stream:
            return self._stream(request, response, merge(streams), prompt_tokens)
        finals: dict[int, RequestOutput] = {}
        async for index, output in merge(streams):
            finals[index] = output
        choices = [self._choice(request, index * request.n + c.index, c) for index in sorted(finals) for c in finals[index].outputs]
        completion_tokens = sum(len(c.token_ids) for output in finals.values() for c in output.outputs)
        return response.model_copy(update={"choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    async def _stream(self, request: CompletionRequest, head: CompletionResponse,
                      outputs: AsyncGenerator[tuple[int, RequestOutput], None], prompt_tokens: int) -> AsyncIterator[str]:  # fmt: skip
        """One event per engine output with new text, the usage when asked, then ``[DONE]``."""
        done: dict[int, set[int]] = {}  # prompt index -> finished sample indexes
        offsets: dict[int, int] = {}  # choice index -> characters of token text sent (logprobs' text_offset)
        completion_tokens = 0
        try:
            async with aclosing(outputs):  # closing the events (a client gone) aborts the requests
                async for index, output in outputs:
                    fresh = new_completions(output, done.setdefault(index, set()))
                    completion_tokens += sum(len(c.token_ids) for c in fresh)
                    choices = []
                    for c in fresh:
                        choice = index * request.n + c.index
                        logprobs, offsets[choice] = self._logprobs(request, c, offsets.get(choice, 0))
                        choices.append(CompletionChoice(index=choice, text=c.text, logprobs=logprobs, finish_reason=c.finish_reason))
                    if choices:
                        yield sse(head.model_copy(update={"choices": choices}))
            if request.include_usage:
                yield sse(head.model_copy(update={"usage": usage(prompt_tokens, completion_tokens)}))
        except Exception as err:
            yield sse_error(err)
        yield SSE_DONE

    def _choice(self, request: CompletionRequest, index: int, completion: CompletionOutput) -> CompletionChoice:
        logprobs, _ = self._logprobs(request, completion, 0)
        return CompletionChoice(index=index, text=completion.text, logprobs=logprobs, finish_reason=completion.finish_reason)

    @staticmethod
    def _logprobs(request: CompletionRequest, completion: CompletionOutput, offset: int) -> tuple[CompletionLogprobs | None, int]:
        """The logprobs of ``completion``'s tokens when asked, whose text starts at ``offset``
        characters; and the offset after them."""
        if request.logprobs is None:
            return None, offset
        as_ids = request.return_tokens_as_token_ids
        logprobs = CompletionLogprobs()
        for token_id, top in zip(completion.token_ids, completion.logprobs or []):
            text = token_text(token_id, top[token_id], as_ids)
            logprobs.tokens.append(text)
            logprobs.token_logprobs.append(top[token_id].logprob)
            logprobs.top_logprobs.append({token_text(i, lp, as_ids): lp.logprob for i, lp in top.items()})
            logprobs.text_offset.append(offset)
            offset += len(text)
        return logprobs, offset


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The request's prompts as a list: one text or one list of token ids is one prompt."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    if not prompt:
        raise ValueError("prompt: must be a text, a list of texts, token ids or a list of token id lists, got []")
    return list(prompt)  # type: ignore[arg-type]

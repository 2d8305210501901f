"""``POST /v1/completions``: text completion of one prompt or several.

Prompts are texts (tokenized with the special tokens the tokenizer adds, as ``LLM.generate``
does) or token ids.  Each prompt is one engine request; with ``n`` samples each, choice
``i * n + j`` is sample ``j`` of prompt ``i`` (with ``use_beam_search``, its ``j``-th best
beam of ``best_of``, default ``n``).  ``logprobs`` gives the legacy parallel lists
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``); ``prompt_logprobs``,
vLLM's list per prompt position, comes on each choice of its prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator

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
    OpenAIError,
    OpenAIServing,
    bad_request,
    merge,
    random_id,
    stream_events,
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
            prompts = await asyncio.to_thread(self._tokenize, request)  # off the event loop: other streams go on
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
        choices = [choice for index in sorted(finals) for choice in self._choices(request, index, finals[index])]
        completion_tokens = sum(len(c.token_ids) for output in finals.values() for c in output.outputs)
        return response.model_copy(update={"choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    def _tokenize(self, request: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        """Each prompt's text (None for token ids) and token ids."""
        return [parse_prompt(p, self.engine.native_engine.tokenizer) for p in _prompt_list(request.prompt)]

    def _stream(self, request: CompletionRequest, head: CompletionResponse,
                outputs: AsyncGenerator[tuple[int, RequestOutput], None], prompt_tokens: int) -> AsyncIterator[str]:  # fmt: skip
        """The events: each new piece of text a choice, its logprobs' ``text_offset`` counted on
        from the choice's previous pieces."""
        offsets: dict[int, int] = {}  # choice index -> characters of token text sent

        def choice(prompt: int, completion: CompletionOutput) -> CompletionChoice:
            index = prompt * request.n + completion.index
            logprobs, offsets[index] = self._logprobs(request, completion, offsets.get(index, 0))
            return CompletionChoice(index=index, text=completion.text, logprobs=logprobs, finish_reason=completion.finish_reason)

        return stream_events(head, outputs, choice, prompt_tokens, request.include_usage)

    def _choices(self, request: CompletionRequest, prompt: int, output: RequestOutput) -> list[CompletionChoice]:
        """The finished choices of prompt number ``prompt``, each with the prompt's logprobs when asked."""
        return [
            CompletionChoice(index=prompt * request.n + c.index, text=c.text, logprobs=self._logprobs(request, c, 0)[0],
                             finish_reason=c.finish_reason, prompt_logprobs=output.prompt_logprobs)
            for c in output.outputs
        ]  # fmt: skip

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

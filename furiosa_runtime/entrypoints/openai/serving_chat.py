"""``POST /v1/chat/completions``: a conversation, rendered with the chat template, completed.

The prompt is built as ``LLM.chat`` builds it: the tokenizer's chat template (or the
server's ``--chat-template``) renders the messages with the generation prompt, and the
text is tokenized without adding special tokens (the template placed them).  Message
contents may be strings or lists of text parts (joined); other parts (images, audio) are
refused.  ``logprobs``/``top_logprobs`` give OpenAI's per-token ``content`` list.  With
``use_beam_search`` the choices are the ``n`` beams, best first; ``prompt_logprobs`` (vLLM's
list per prompt position) comes on the response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from furiosa_runtime.engine.outputs import CompletionOutput, RequestOutput
from furiosa_runtime.engine.tokenizer import require_tokenizer
from furiosa_runtime.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
    usage,
)
from furiosa_runtime.entrypoints.openai.serving_engine import (
    OpenAIServing,
    bad_request,
    merge,
    random_id,
    stream_events,
    token_text,
)

ROLE = "assistant"


class OpenAIServingChat(OpenAIServing):
    """Chat completions over the async engine."""

    async def create_chat_completion(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """The whole response, or its server-sent events when ``stream`` is set."""
        received_at = time.time()
        self.check_model(request.model, "generate")
        try:
            prompt, token_ids = await asyncio.to_thread(self._render, request)  # off the event loop: other streams go on
            max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
            top = (request.top_logprobs or 0) if request.logprobs else None
            params = request.sampling_params(max_tokens, top)
            self.validate(token_ids, params)
        except ValueError as err:
            raise bad_request(err, request, "messages") from None
        request_id = random_id("chatcmpl")
        outputs = self.generate(request_id, prompt, token_ids, params, received_at)
        if request.stream:
            head = ChatCompletionChunk(id=request_id, created=int(received_at), model=self.model_name, choices=[])
            return self._stream(request, head, outputs, len(token_ids))
        final = [output async for output in outputs][-1]
        choices = [
            ChatChoice(index=c.index, message=ChatMessage(role=ROLE, content=c.text), logprobs=self._logprobs(request, c),
                       finish_reason=c.finish_reason)
            for c in final.outputs
        ]  # fmt: skip
        return ChatCompletionResponse(id=request_id, created=int(received_at), model=self.model_name, choices=choices,
                                      usage=usage(len(token_ids), sum(len(c.token_ids) for c in final.outputs)),
                                      prompt_logprobs=final.prompt_logprobs)  # fmt: skip

    def _render(self, request: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The prompt text and its token ids (raises ValueError for bad messages or no template)."""
        tokenizer = require_tokenizer(self.engine.native_engine.tokenizer, "messages")
        messages = [_text_message(m, f"messages[{i}]") for i, m in enumerate(request.messages)]
        if not messages:
            raise ValueError("messages: must contain at least one message")
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=request.add_generation_prompt, chat_template=self.config.chat_template,
            continue_final_message=request.continue_final_message, **(request.chat_template_kwargs or {}),
        )  # fmt: skip
        assert isinstance(text, str)
        return text, tokenizer.encode(text, add_special_tokens=False)

    def _stream(self, request: ChatCompletionRequest, head: ChatCompletionChunk,
                outputs: AsyncGenerator[RequestOutput, None], prompt_tokens: int) -> AsyncIterator[str]:  # fmt: skip
        """The events: every choice's role first, then each new piece of text a delta (the
        last one with the finish reason)."""
        roles = [ChatStreamChoice(index=i, delta=DeltaMessage(role=ROLE, content="")) for i in range(request.n)]

        def choice(_: int, c: CompletionOutput) -> ChatStreamChoice:
            return ChatStreamChoice(index=c.index, delta=DeltaMessage(content=c.text), logprobs=self._logprobs(request, c),
                                    finish_reason=c.finish_reason)  # fmt: skip

        return stream_events(head, merge([outputs]), choice, prompt_tokens, request.include_usage, opening=roles)

    @staticmethod
    def _logprobs(request: ChatCompletionRequest, completion: CompletionOutput) -> ChatLogprobs | None:
        """Each token's logprob with the ``top_logprobs`` most likely alternatives."""
        if not request.logprobs:
            return None
        as_ids = request.return_tokens_as_token_ids

        def entry(token_id: int, top: dict) -> TopLogprob:
            text = token_text(token_id, top[token_id], as_ids)
            return TopLogprob(token=text, logprob=top[token_id].logprob, bytes=list(text.encode("utf-8")))

        content = []
        for token_id, top in zip(completion.token_ids, completion.logprobs or []):
            best = sorted((i for i in top if top[i].rank is not None and top[i].rank <= (request.top_logprobs or 0)), key=lambda i: top[i].rank)
            sampled = entry(token_id, top)
            content.append(ChatLogprob(**sampled.model_dump(), top_logprobs=[entry(i, top) for i in best]))
        return ChatLogprobs(content=content)


def _text_message(message: dict[str, Any], where: str) -> dict[str, Any]:
    """``message`` with a list of text parts joined into one string (templates expect text)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported")
        texts.append(part["text"])
    return {**message, "content": "\n".join(texts)}

"""Prompt inputs the vLLM way: a string, ``{"prompt": ...}``, ``{"prompt_token_ids": ...}``
or a list of token ids, turned into ``(text or None, token ids)``."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Any

from furiosa_runtime.tokenizer import Tokenizer

PromptType = str | dict[str, Any] | list[int]


def parse_prompt(prompt: PromptType, tokenizer: Tokenizer, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
    """The prompt text (None for token-id prompts) and its token ids."""
    if isinstance(prompt, str):
        return prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return prompt.get("prompt"), _token_ids(prompt["prompt_token_ids"])
    if isinstance(prompt, dict) and "prompt" in prompt:
        return prompt["prompt"], tokenizer.encode(prompt["prompt"], add_special_tokens=add_special_tokens)
    if isinstance(prompt, list):
        return None, _token_ids(prompt)
    raise ValueError(f"prompt: unsupported prompt {prompt!r}; use a str, a list of token ids, or a dict with 'prompt' or 'prompt_token_ids'")


def is_single_prompt(prompts: PromptType | Sequence[PromptType]) -> bool:
    """True for one prompt (a string, a dict, or a flat list of token ids)."""
    return isinstance(prompts, str | dict) or (isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], Integral))


def _token_ids(ids: Sequence[Any]) -> list[int]:
    """Plain ints; NumPy integers are accepted too (token ids often come from arrays)."""
    if not all(isinstance(t, Integral) and not isinstance(t, bool) for t in ids):
        raise ValueError("prompt_token_ids: must be a list of integers")
    return [int(t) for t in ids]

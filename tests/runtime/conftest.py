"""Fixtures of the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ENGINE_LAYOUTS, build


@pytest.fixture(scope="session")
def tiny_llama_layouts(tmp_path_factory, cache_dir, tiny_llama_artifact) -> dict[str, Path]:
    """tiny-llama (tiny buckets) built for every engine layout."""
    layouts = {"single-pe": tiny_llama_artifact}
    for name, overrides in ENGINE_LAYOUTS.items():
        if name not in layouts:
            layouts[name] = tmp_path_factory.mktemp("artifacts") / f"tiny-llama-{name}"
            build(["model=tiny-llama", "buckets=tiny", *overrides], layouts[name], cache_dir)
    return layouts


@pytest.fixture(scope="module", params=list(ENGINE_LAYOUTS))
def engine_artifact(request, tiny_llama_layouts) -> Path:
    """The tiny-llama artifact in each engine layout: engine tests must hold on all of them."""
    return tiny_llama_layouts[request.param]


@pytest.fixture(scope="session")
def tiny_bert_artifact(tmp_path_factory, cache_dir) -> Path:
    """A random-weight BERT embedding artifact (task embed): CLS pooling without
    normalisation, so its vectors are exactly transformers' first-token states."""
    out = tmp_path_factory.mktemp("embed") / "tiny-bert"
    overrides = [
        "model=all-minilm-l6-v2", "model.name=tiny-bert", "model.model_id_or_path=null", "model.seed_for_random_weight=0",
        "model.auto_bfloat16_cast=false", "+model.pooling={mode: cls, normalize: false}", "buckets=embed",
        "buckets.prefill=[[1,16],[4,32]]", "buckets.max_seq_len_to_capture=32", "buckets.paged_attention_block_size=8",
        "model.hf_config={model_type: bert, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, "
        "intermediate_size: 128, vocab_size: 512, max_position_embeddings: 64, dtype: bfloat16}",
    ]  # fmt: skip
    build(overrides, out, cache_dir)
    return out

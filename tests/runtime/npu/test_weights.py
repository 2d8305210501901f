"""Weights are mapped, not read, and their float32 widenings live within a budget.

The simulator holds every weight as a read-only view of one mapping of the verified
param file (``weights.map_safetensors``); the float32 copies the kernels read of bf16
weights are kept within ``weight_cache_bytes``, least recently used evicted first.  The
budget changes memory and speed, never outputs: greedy tokens and logits are the same
bytes for every budget, on one PE and on a tensor- and pipeline-parallel layout.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from furiosa_runtime import LLM, EngineArgs, LLMEngine, SamplingParams
from furiosa_runtime.npu import weights as weights_module
from furiosa_runtime.npu.artifact import ArtifactError, ArtifactFiles, load_artifact
from furiosa_runtime.npu.isa import KERNELS, ExecContext
from furiosa_runtime.npu.simulator import STORED_OPERANDS, NPUSimulator
from furiosa_runtime.npu.weights import (
    SafetensorsFormatError,
    WidenedWeights,
    default_budget,
    map_safetensors,
    parse_header,
)
from tests.helpers import npu_greedy

PROMPTS = [[5, 17, 33, 101, 7, 9], [300, 2, 44, 12, 8, 90, 1, 3, 250, 77, 6]]
NEW_TOKENS = 6
HUGE = 2**62
BF16 = np.dtype(ml_dtypes.bfloat16)


def run(artifact: Path, budget: int | None) -> tuple[LLM, list[tuple[list[int], list[np.ndarray]]], list[list[int]]]:
    """Greedy tokens and every step's logits of each prompt alone, and the tokens of both
    prompts batched through ``LLM.generate``."""
    llm = LLM(artifact, weight_cache_bytes=budget)
    alone = [npu_greedy(llm, prompt, NEW_TOKENS) for prompt in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)]
    return llm, alone, batched


@pytest.mark.parametrize("layout", ["single-pe", "tp2-pp2"])
def test_outputs_are_the_same_bytes_for_every_budget(layout: str, tiny_llama_layouts: dict[str, Path]) -> None:
    artifact = tiny_llama_layouts[layout]
    reference, want, want_batched = run(artifact, HUGE)
    kept = reference.engine.simulator.widened.kept()
    one_tensor = max(kept.values())
    assert reference.engine.simulator.widened.stats["evictions"] == 0
    for budget in (0, 1000, one_tensor, None):
        llm, got, batched = run(artifact, budget)
        widened = llm.engine.simulator.widened
        assert batched == want_batched, budget
        for (tokens, logits), (want_tokens, want_logits) in zip(got, want):
            assert tokens == want_tokens, budget
            assert len(logits) == len(want_logits)
            for step, want_step in zip(logits, want_logits):
                assert step.dtype == want_step.dtype and np.array_equal(step, want_step), budget  # bit for bit
        assert widened.used <= widened.budget and sum(widened.kept().values()) == widened.used
        if budget == 0:
            assert widened.used == 0 and widened.stats["hits"] == 0  # widened on every use
        elif budget is not None:
            assert widened.budget == budget and widened.stats["evictions"] > 0
        else:  # the default holds all of tiny-llama: each weight widened once
            assert widened.kept() .keys() == kept.keys() and widened.stats["misses"] == len(kept)


def test_weights_are_read_only_views_of_one_mapping(tiny_llama_artifact: Path) -> None:
    llm = LLM(tiny_llama_artifact)
    simulator = llm.engine.simulator
    (pe,) = simulator.pes.values()
    stored = load_file(tiny_llama_artifact / "params.safetensors")
    roots = set()
    for name, array in pe.weights.items():
        assert not array.flags.writeable and not array.flags.owndata
        root = array
        while isinstance(root, np.ndarray) and root.base is not None:
            root = root.base
        root = root.obj if isinstance(root, memoryview) else root
        assert isinstance(root, mmap.mmap)
        roots.add(id(root))
        assert array.tobytes() == stored[name].tobytes() and array.shape == stored[name].shape
    assert len(roots) == 1  # one mapping of the file, no copy of any tensor
    # Memory accounting counts the stored bytes of the weights, as before, plus the KV cache.
    kv = sum(layer.nbytes for layer in pe.kv.values())
    assert simulator.memory_report() == {pe.name: sum(stored[name].nbytes for name in pe.weights) + kv}
    # The embedding table is only gathered from: its rows are widened, never the whole table.
    llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert "model.embed_tokens.weight" not in simulator.widened.kept()
    assert "lm_head.weight" in simulator.widened.kept()


def test_per_pe_accounting_of_a_parallel_layout_counts_stored_bytes(tiny_llama_layouts: dict[str, Path]) -> None:
    artifact = tiny_llama_layouts["tp2-pp2"]
    stored = load_file(artifact / "params.safetensors")
    simulator = NPUSimulator(artifact, load_artifact(artifact), weight_cache_bytes=0)
    for name, pe in simulator.pes.items():
        kv = sum(layer.nbytes for layer in pe.kv.values())
        assert simulator.memory_report()[name] == sum(stored[t].nbytes for t in pe.weights) + kv


def test_the_default_budget_is_what_fits_and_at_least_the_largest_widened_weight(tiny_llama_layouts, monkeypatch) -> None:
    for artifact in tiny_llama_layouts.values():
        llm, _, _ = run(artifact, HUGE)
        largest = max(llm.engine.simulator.widened.kept().values())
        monkeypatch.setattr(weights_module, "available_memory", lambda: 0)  # nothing left: the floor
        assert NPUSimulator(artifact, load_artifact(artifact)).widened.budget == largest
        monkeypatch.setattr(weights_module, "available_memory", lambda: 10 * 2**30)
        simulator = NPUSimulator(artifact, load_artifact(artifact))
        mapped = sum({n: a.nbytes for pe in simulator.pes.values() for n, a in pe.weights.items()}.values())
        kv = sum(layer.nbytes for pe in simulator.pes.values() for layer in pe.kv.values())
        assert simulator.widened.budget == (10 * 2**30 - mapped - kv) // 2
    assert default_budget(100, 10, 5, available=1000) == 492
    assert default_budget(100, 900, 50, available=1000) == 100  # never below the largest weight
    assert default_budget(7, 0, available=None) >= 7


def test_weight_cache_bytes_is_plumbed_and_validated(engine_artifact: Path) -> None:
    assert LLM(engine_artifact, weight_cache_bytes=12345).engine.simulator.widened.budget == 12345
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(engine_artifact), weight_cache_bytes=0))
    assert engine.native_engine.simulator.widened.budget == 0
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    for flag, want in [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("123", 123), ("1.5GB", 1_500_000_000), ("8g", 8 * 2**30)]:
        args = EngineArgs.from_cli_args(parser.parse_args(["--model", str(engine_artifact), "--weight-cache-bytes", flag]))
        assert args.weight_cache_bytes == want
    assert EngineArgs.from_cli_args(parser.parse_args(["--model", "x"])).weight_cache_bytes is None
    for bad in (-1, 1.5, True, "4GiB"):
        needle = r"weight_cache_bytes must be >= 0, got -1" if bad == -1 else rf"weight_cache_bytes must be None or an integer >= 0, got {bad!r}"
        for make in (lambda: LLM(engine_artifact, weight_cache_bytes=bad), lambda: EngineArgs(model="unused", weight_cache_bytes=bad),
                     lambda: NPUSimulator(engine_artifact, load_artifact(engine_artifact), weight_cache_bytes=bad)):  # fmt: skip
            with pytest.raises(ValueError, match=rf"^{needle}$"):
                make()


@pytest.mark.parametrize("flag", ["-1", "4 parsecs", "GiB", "1e9"])
def test_bad_weight_cache_bytes_flags_name_the_flag(flag: str, capsys) -> None:
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "x", f"--weight-cache-bytes={flag}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --weight-cache-bytes: expected a number of bytes such as 4294967296, 4GiB or 512MiB" in err


# -- the widened-weight cache -----------------------------------------------------------------


def bf16(n: int, value: float = 1.5) -> np.ndarray:
    return np.full(n, value, dtype=BF16)


def test_the_cache_evicts_least_recently_used_first_and_never_exceeds_its_budget() -> None:
    cache = WidenedWeights(100)  # float32: 25 elements
    a, b, c = bf16(10), bf16(10, 2.5), bf16(5, -3.0)
    wa = cache.get("a", a)
    assert wa.dtype == np.float32 and np.array_equal(wa, a.astype(np.float32)) and not wa.flags.writeable
    assert cache.get("a", a) is wa and cache.stats["hits"] == 1
    cache.get("b", b)
    cache.get("a", a)  # a is now the most recently used
    cache.get("c", c)  # 40 + 40 + 20 = 100: fits
    assert list(cache.kept()) == ["b", "a", "c"] and cache.used == 100
    cache.get("d", bf16(10))  # needs 40: evicts b, the least recently used
    assert list(cache.kept()) == ["a", "c", "d"] and cache.used == 100 and cache.stats["evictions"] == 1
    cache.get("e", bf16(15))  # needs 60: evicts a, then c
    assert list(cache.kept()) == ["d", "e"] and cache.used == 100 and cache.stats["evictions"] == 3
    big = cache.get("big", bf16(26))  # larger than the whole budget: widened for this use only, nothing evicted
    assert big.dtype == np.float32 and "big" not in cache and list(cache.kept()) == ["d", "e"]
    f32 = np.ones(4, np.float32)
    assert cache.get("f32", f32) is f32 and "f32" not in cache  # needs no widening: as stored
    zero = WidenedWeights(0)
    assert np.array_equal(zero.get("a", a), wa) and zero.get("a", a) is not zero.get("a", a) and zero.used == 0


def test_linear_weights_are_widened_column_major_with_the_same_values() -> None:
    """A ``linear`` multiplies by its weight transposed: the copy is kept column-major, so
    that transpose is the row-major operand BLAS wants; values and results are unchanged."""
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((6, 4)).astype(BF16), rng.standard_normal((3, 4)).astype(np.float32)
    cache = WidenedWeights(1000, column_major={"w"})
    wide, row_major = cache.get("w", w), cache.get("other", w)
    assert wide.flags.f_contiguous and wide.T.flags.c_contiguous and row_major.flags.c_contiguous
    assert np.array_equal(wide, row_major)
    assert np.array_equal(KERNELS["linear"]([x, wide], {}, ExecContext())[0], KERNELS["linear"]([x, row_major], {}, ExecContext())[0])


def test_operands_handed_over_stored_give_the_same_bytes_as_widened() -> None:
    """``STORED_OPERANDS``: the kernel indexes these operands before widening them, so
    the stored weight gives what the widened one gives (guards a change in isa.py)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(BF16)
    ids = rng.integers(0, 50, (2, 3))
    x = rng.standard_normal((6, 8)).astype(np.float32)
    experts, routes = rng.integers(0, 4, (6, 2)), rng.random((6, 2)).astype(np.float32)
    gate_up, down = rng.standard_normal((4, 10, 8)).astype(BF16), rng.standard_normal((4, 8, 5)).astype(BF16)
    cases = {"gather": ([table, ids], {}), "moe_experts": ([x, experts, routes, gate_up, down], {"act": "silu"})}
    assert set(cases) == set(STORED_OPERANDS)
    for op, (ins, attrs) in cases.items():
        widened = [a.astype(np.float32) if i in STORED_OPERANDS[op] else a for i, a in enumerate(ins)]
        got, want = KERNELS[op](ins, attrs, ExecContext()), KERNELS[op](widened, attrs, ExecContext())
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w), op


# -- the mapped safetensors reader ------------------------------------------------------------


def write_raw(path: Path, header: dict, data: bytes, pad: bool = True) -> Path:
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_the_reader_matches_the_safetensors_library(tmp_path: Path) -> None:
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "i64": np.array([1, -2], np.int64),
              "f16": np.array([0.5], np.float16), "b": np.array([True, False, True]), "empty": np.zeros((0, 4), np.float32),
              "scalar": np.array(3.0, np.float32)}  # fmt: skip
    save_file(arrays, tmp_path / "w.safetensors", metadata={"format": "np"})
    with open(tmp_path / "w.safetensors", "rb") as f:
        mapped = map_safetensors(f)
    assert mapped.keys() == arrays.keys()
    for name, array in arrays.items():
        assert mapped[name].dtype == array.dtype and mapped[name].shape == array.shape and np.array_equal(mapped[name], array)
        assert not mapped[name].flags.writeable


def test_the_reader_maps_bf16_and_fp8(tmp_path: Path) -> None:
    values = np.array([1.0, -2.0, 0.5, 448.0], np.float32)
    bf, e4m3, e5m2 = values.astype(BF16), values.astype(ml_dtypes.float8_e4m3fn), values.astype(ml_dtypes.float8_e5m2)
    header = {"bf": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
              "e4m3": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [8, 12]},
              "e5m2": {"dtype": "F8_E5M2", "shape": [4], "data_offsets": [12, 16]}}  # fmt: skip
    path = write_raw(tmp_path / "w.safetensors", header, bf.tobytes() + e4m3.tobytes() + e5m2.tobytes(), pad=False)  # unaligned data
    with open(path, "rb") as f:
        mapped = map_safetensors(f)
    assert mapped["bf"].dtype == BF16 and np.array_equal(mapped["bf"].astype(np.float32), values.reshape(2, 2))
    assert mapped["e4m3"].dtype == np.dtype(ml_dtypes.float8_e4m3fn) and np.array_equal(mapped["e4m3"].astype(np.float32), values)
    assert np.array_equal(mapped["e5m2"].astype(np.float32), e5m2.astype(np.float32))


@pytest.mark.parametrize(
    ("header", "data", "needle"),
    [
        (None, b"", "shorter than the 8-byte header length"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "the tensors cover 8 bytes of data but the file holds 4"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes but data_offsets span 4"),
        ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype 'F33'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "invalid data_offsets"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
         b"\0" * 4, "tensor b starts at byte 4 of the data, expected 4|starts at byte 0 of the data, expected 4"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"", "must be described by dtype, shape and data_offsets"),
        ([1, 2], b"", "header must be a JSON object"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path: Path, header, data: bytes, needle: str) -> None:
    path = tmp_path / "w.safetensors"
    if header is None:
        path.write_bytes(b"\1\2\3")
    else:
        write_raw(path, header, data)
    with open(path, "rb") as f, pytest.raises(SafetensorsFormatError) as info:
        map_safetensors(f)
    assert "\n" not in str(info.value) and any(part in str(info.value) for part in needle.split("|")), str(info.value)


def test_header_lengths_past_the_end_or_absurd_are_refused() -> None:
    with pytest.raises(SafetensorsFormatError, match="runs past the end of the 12-byte file"):
        parse_header(struct.pack("<Q", 100) + b"{}  ")
    with pytest.raises(SafetensorsFormatError, match="larger than"):
        parse_header(struct.pack("<Q", 2**62) + b"{}  ")
    with pytest.raises(SafetensorsFormatError, match="header is not JSON"):
        parse_header(struct.pack("<Q", 4) + b"\xff{}x")


# -- what is mapped is what was verified ------------------------------------------------------


def test_a_file_rewritten_in_place_while_verified_is_refused(tiny_llama_artifact: Path, tmp_path: Path) -> None:
    art = Path(shutil.copytree(tiny_llama_artifact, tmp_path / "art"))
    files = ArtifactFiles(art, load_artifact(art).manifest)
    with pytest.raises(ArtifactError, match=r"^artifact: file params\.safetensors changed while it was being read \(rewritten in place\?\)$"):
        with files.open_verified("params.safetensors") as f:
            map_safetensors(f)
            with open(art / "params.safetensors", "ab") as writer:  # after the hash, before the end of the load
                writer.write(b"\0")


def test_a_loaded_artifact_keeps_its_verified_weights_when_the_file_is_replaced(tiny_llama_artifact: Path, tmp_path: Path) -> None:
    """The mapping holds the verified file (its inode), not the path: a file renamed over
    it later, as a rebuild does, changes nothing for the running LLM."""
    art = Path(shutil.copytree(tiny_llama_artifact, tmp_path / "art"))
    llm = LLM(art, weight_cache_bytes=0)  # widen on every use: every step reads the mapping
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    want = llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)[0].outputs[0].token_ids
    zeros = {name: np.zeros_like(a) for name, a in load_file(art / "params.safetensors").items()}
    save_file(zeros, art / "replacement.safetensors")
    os.replace(art / "replacement.safetensors", art / "params.safetensors")
    assert llm.generate({"prompt_token_ids": PROMPTS[0]}, params, use_tqdm=False)[0].outputs[0].token_ids == want
    assert math.isclose(sum(a.sum() for a in zeros.values()), 0.0)

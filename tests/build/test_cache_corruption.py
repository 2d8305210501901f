"""Cache damage is never fatal: a catalogue of corruptions of the compile, capture and
model caches, each of which the next build reports in one warning line, rebuilds around,
and turns into the same artifact as a clean build; plus caches that cannot be written
(a file as cache_dir, read-only, full) and the scratch litter of killed builds.

One clean build per module gives the reference manifest and a golden cache; each case
copies the golden cache (half a megabyte), damages it and builds ``tiny-llama``.  Its
random weights are not stored: the model entry holds the recipe ``random_weights.json``.
A second golden builds the same model from a Hugging Face folder, whose entry holds the
converted ``model.safetensors`` (written as it streams, its digest computed on the way).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from furiosa_build.cache import canonical_json
from furiosa_build.scratch import ScratchName, make_scratch
from tests.helpers import build, remount_read_only, tmpfs

TINY = ["model=tiny-llama", "buckets=tiny"]
RECIPE = "random_weights.json"
CACHE_WARNING = re.compile(r"^(model|compile|capture) cache ")


@dataclass(frozen=True)
class Golden:
    cache: Path
    manifest: dict[str, str]
    unique_programs: int
    overrides: tuple[str, ...] = tuple(TINY)


def _manifest(artifact: Path) -> dict[str, str]:
    return json.loads((artifact / "artifact.json").read_text())["manifest"]


def _build(cache: Path | None, out: Path, overrides: tuple[str, ...] = tuple(TINY)):
    """Build tiny-llama; return the report and the cache warnings (one line each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = build(list(overrides), out, cache)
    lines = [str(w.message) for w in caught if CACHE_WARNING.match(str(w.message))]
    assert all("\n" not in line for line in lines), lines
    return report, lines


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Golden:
    root = tmp_path_factory.mktemp("golden")
    report, lines = _build(root / "cache", root / "artifact")
    assert lines == []
    return Golden(root / "cache", _manifest(root / "artifact"), report.compile.unique)


@pytest.fixture(scope="module")
def folder_golden(tmp_path_factory) -> Golden:
    """tiny-llama's random weights saved as a Hugging Face folder, built from the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from furiosa_build.convert import _write_random_tokenizer
    from furiosa_build.load import random_state_dict
    from tests.helpers import compose_spec

    root = tmp_path_factory.mktemp("golden-folder")
    spec = compose_spec(TINY)
    hf_config = spec.model.hf_config
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), dtype=torch.bfloat16)
    model.load_state_dict({k: torch.from_numpy(v.view("int16")).view(torch.bfloat16) for k, v in random_state_dict(hf_config, 0).items()})
    model.save_pretrained(root / "hf")
    _write_random_tokenizer(root / "hf", hf_config["vocab_size"], hf_config)
    overrides = (*TINY, f"model.model_id_or_path={root / 'hf'}", "model.hf_config=null", "model.seed_for_random_weight=null")
    report, lines = _build(root / "cache", root / "artifact", overrides)
    assert lines == []
    assert (_model(root / "cache") / "model.safetensors").is_file()
    return Golden(root / "cache", _manifest(root / "artifact"), report.compile.unique, overrides)


@pytest.fixture
def cache(golden: Golden, tmp_path: Path) -> Path:
    """A private copy of the golden cache."""
    shutil.copytree(golden.cache, tmp_path / "cache", symlinks=True)
    return tmp_path / "cache"


@pytest.fixture
def folder_cache(folder_golden: Golden, tmp_path: Path) -> Path:
    """A private copy of the folder golden's cache."""
    shutil.copytree(folder_golden.cache, tmp_path / "cache", symlinks=True)
    return tmp_path / "cache"


# ------------------------------------------------------------------ where things are


def _program(cache: Path) -> Path:
    return sorted((cache / "programs").glob("*/*.json"))[0]


def _capture(cache: Path) -> Path:
    return sorted((cache / "captures" / "programs").glob("*/*.json"))[0]


def _model(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "models").iterdir() if not p.name.startswith(".")]
    return entry


def _key(entry: Path) -> str:
    return entry.stem


def _with_header(key: str, payload: bytes, **lies) -> bytes:
    """A compile-cache entry whose header is right for ``payload`` unless told to lie."""
    header = {"key": key, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), **lies}
    return canonical_json(header) + b"\n" + payload


def _flip(path: Path, offset: int = -3, bit: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _to_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


def _to_file(path: Path) -> None:
    shutil.rmtree(path)
    path.write_text("not a folder")


def _lie_in_entry_json(cache: Path, edit: Callable[[dict], None]) -> None:
    path = _model(cache) / "entry.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _consistent(cache: Path, name: str, payload: bytes) -> None:
    """Replace a file of the model entry and make entry.json agree with it."""
    (_model(cache) / name).write_bytes(payload)
    _lie_in_entry_json(cache, lambda m: m["files"].update(
        {name: {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}}))  # fmt: skip


def _garbage_config_with_consistent_manifest(cache: Path) -> None:
    _consistent(cache, "config.json", b"{this is not json")


def _recipe_of_another_rule(cache: Path) -> None:
    recipe = json.loads((_model(cache) / RECIPE).read_text())
    _consistent(cache, RECIPE, json.dumps({**recipe, "rule": "torch-init"}).encode())


def _recipe_with_a_bad_tensor(cache: Path) -> None:
    recipe = json.loads((_model(cache) / RECIPE).read_text())
    recipe["tensors"]["lm_head.weight"]["shape"] = [-1, 64]
    _consistent(cache, RECIPE, json.dumps(recipe).encode())


# ------------------------------------------------------------------ the catalogue

# name -> (damage, what the one warning line says, whether the next build heals the cache)
CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, bool]] = {
    # compile cache: programs/<ab>/<key>.json
    "program-flipped-byte": (lambda c: _flip(_program(c)), r"^compile cache entry \w+ is corrupted \(payload sha256 mismatch\); recompiling$", True),
    "program-truncated": (lambda c: _truncate(_program(c)), r"compile cache entry \w+ is corrupted \(payload is \d+ bytes, header says \d+\)", True),
    "program-emptied": (lambda c: _program(c).write_bytes(b""), r"compile cache entry \w+ is corrupted \(missing header\)", True),
    "program-header-lies-about-size": (
        lambda c: _program(c).write_bytes(_with_header(_key(_program(c)), b"{}", size=3)),
        r"payload is 2 bytes, header says 3", True),
    "program-header-names-another-key": (
        lambda c: _program(c).write_bytes(_with_header("0" * 64, b"{}")), r"header names key '0{64}'", True),
    "program-non-json-payload-valid-header": (
        lambda c: _program(c).write_bytes(_with_header(_key(_program(c)), b"\x00not json at all")),
        r"compile cache entry \w+ is corrupted \(payload cannot be decoded: ", True),
    "program-wrong-schema-payload-valid-header": (
        lambda c: _program(c).write_bytes(_with_header(_key(_program(c)), b'{"format":"furiosa-npu-program/1"}')),
        r"compile cache entry \w+ is corrupted \(payload cannot be decoded: .*validation error", True),
    "program-entry-is-a-folder": (lambda c: _to_folder(_program(c)), r"compile cache entry \w+ is corrupted \(it is a folder, not a file\)", True),
    "program-shard-is-a-file": (lambda c: _to_file(_program(c).parent), r"compile cache entry \w+ is corrupted \(programs/\w\w is a file, not a folder\)", True),
    "programs-folder-is-a-file": (lambda c: _to_file(c / "programs"), r"^compile cache .+ is unusable \(.+/programs is not a folder\)", False),
    # capture cache: captures/programs/<ab>/<key>.json
    "capture-flipped-byte": (lambda c: _flip(_capture(c), 200, 0x10), r"^capture cache entry \w+ is corrupted \(payload sha256 mismatch\); recapturing$", True),
    "capture-non-json-payload-valid-header": (
        lambda c: _capture(c).write_bytes(_with_header(_key(_capture(c)), b"garbage")),
        r"capture cache entry \w+ is corrupted \(payload cannot be decoded: ", True),
    "capture-wrong-schema-payload-valid-header": (
        lambda c: _capture(c).write_bytes(_with_header(_key(_capture(c)), b'{"bucket":{"batch_size":1}}')),
        r"capture cache entry \w+ is corrupted \(payload cannot be decoded: ", True),
    "capture-entry-is-a-folder": (lambda c: _to_folder(_capture(c)), r"capture cache entry \w+ is corrupted \(it is a folder", True),
    "capture-shard-is-a-file": (lambda c: _to_file(_capture(c).parent), r"capture cache entry \w+ is corrupted \(programs/\w\w is a file", True),
    "captures-folder-is-a-file": (lambda c: _to_file(c / "captures"), r"^capture cache .+ is unusable \(.+/captures is not a folder\)", False),
    # model cache: models/<key>/{entry.json, config.json, random_weights.json, tokenizer*.json}
    "model-weights-bit-flipped": (lambda c: _flip(_model(c) / RECIPE, -100, 0x04), r"^model cache entry .+ is corrupted \(random_weights.json sha256 mismatch\); converting the model again$", True),
    "model-weights-truncated": (lambda c: _truncate(_model(c) / RECIPE), r"random_weights.json is \d+ bytes, entry.json says \d+", True),
    "model-weights-deleted": (lambda c: (_model(c) / RECIPE).unlink(), r"random_weights.json is missing", True),
    "model-recipe-garbage-consistent-manifest": (lambda c: _consistent(c, RECIPE, b"[not a recipe"), r"random_weights.json is not a random-weight recipe", True),
    "model-recipe-of-another-rule-consistent-manifest": (_recipe_of_another_rule, r"random_weights.json is not a random-weight recipe \(not a furiosa-random/1 recipe\)", True),
    "model-recipe-bad-shape-consistent-manifest": (_recipe_with_a_bad_tensor, r"random_weights.json is not a random-weight recipe \(lm_head.weight: not a tensor entry\)", True),
    "model-entry-json-lists-no-weights": (
        lambda c: _lie_in_entry_json(c, lambda m: m["files"].pop(RECIPE)), r"entry.json does not list the weights", True),
    "model-config-garbage": (lambda c: (_model(c) / "config.json").write_text("{garbage"), r"config.json is \d+ bytes, entry.json says", True),
    "model-config-garbage-consistent-manifest": (_garbage_config_with_consistent_manifest, r"config.json is not valid JSON", True),
    "model-tokenizer-garbage": (lambda c: _flip(_model(c) / "tokenizer.json", 10, 0x20), r"tokenizer.json sha256 mismatch", True),
    "model-entry-json-missing": (lambda c: (_model(c) / "entry.json").unlink(), r"entry.json is missing", True),
    "model-entry-json-garbage": (lambda c: (_model(c) / "entry.json").write_bytes(b"\xff\xfe garbage"), r"entry.json is not valid JSON", True),
    "model-entry-json-lies-digest": (
        lambda c: _lie_in_entry_json(c, lambda m: m["files"][RECIPE].update(sha256="0" * 64)),
        r"random_weights.json sha256 mismatch", True),
    "model-entry-json-of-another-key": (
        lambda c: _lie_in_entry_json(c, lambda m: m.update(key="f" * 64)), r"entry.json is not the manifest of this entry", True),
    "model-extra-unexpected-file": (lambda c: (_model(c) / "pytorch_model.bin").write_bytes(b"x"), r"unexpected file pytorch_model.bin", True),
    "model-file-is-a-folder": (lambda c: _to_folder(_model(c) / "tokenizer_config.json"), r"tokenizer_config.json is not a file", True),
    "model-entry-is-a-file": (lambda c: _to_file(_model(c)), r"^model cache entry .+ is corrupted \(it is a file, not a folder\)", True),
    "model-entry-emptied": (lambda c: [p.unlink() for p in _model(c).iterdir()], r"entry.json is missing", True),
    "models-folder-is-a-file": (lambda c: _to_file(c / "models"), r"^model cache .+/models is unusable \(.+/models is not a folder\); converting the model into a temporary folder$", False),
}  # fmt: skip


# The same for an entry holding converted weights (a model from a Hugging Face folder).
STORED_CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str, bool]] = {
    "stored-weights-bit-flipped": (lambda c: _flip(_model(c) / "model.safetensors", -100, 0x04), r"^model cache entry .+ is corrupted \(model.safetensors sha256 mismatch\); converting the model again$", True),
    "stored-weights-truncated": (lambda c: _truncate(_model(c) / "model.safetensors"), r"model.safetensors is \d+ bytes, entry.json says \d+", True),
    "stored-weights-deleted": (lambda c: (_model(c) / "model.safetensors").unlink(), r"model.safetensors is missing", True),
    "stored-entry-json-lies-digest": (
        lambda c: _lie_in_entry_json(c, lambda m: m["files"]["model.safetensors"].update(sha256="0" * 64)),
        r"model.safetensors sha256 mismatch", True),
    "stored-weights-beside-a-recipe": (
        lambda c: _consistent(c, RECIPE, b"{}"), r"entry.json does not list the weights \(model.safetensors or random_weights.json, one of them\)", True),
}  # fmt: skip


def test_the_catalogue_is_large_enough() -> None:
    assert len(CORRUPTIONS) >= 20
    assert len(CORRUPTIONS) + len(STORED_CORRUPTIONS) >= 40


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_damaged_cache_warns_once_rebuilds_and_gives_the_same_artifact(name: str, golden: Golden, cache: Path, tmp_path: Path) -> None:
    damage, expected, heals = CORRUPTIONS[name]
    damage(cache)

    report, lines = _build(cache, tmp_path / "a")

    assert len(lines) == 1, lines
    assert re.search(expected, lines[0]), lines[0]
    assert _manifest(tmp_path / "a") == golden.manifest
    assert not _scratch_names(cache)

    report, lines = _build(cache, tmp_path / "b")  # the cache healed (or stays off, saying so once)
    assert _manifest(tmp_path / "b") == golden.manifest
    if heals:
        assert lines == []
        assert report.compile.cached == golden.unique_programs
    else:
        assert len(lines) == 1


@pytest.mark.parametrize("name", list(STORED_CORRUPTIONS))
def test_a_damaged_entry_of_converted_weights_warns_once_and_converts_again(name: str, folder_golden: Golden, folder_cache: Path, tmp_path: Path) -> None:
    damage, expected, _ = STORED_CORRUPTIONS[name]
    damage(folder_cache)

    _, lines = _build(folder_cache, tmp_path / "a", folder_golden.overrides)

    assert len(lines) == 1, lines
    assert re.search(expected, lines[0]), lines[0]
    assert _manifest(tmp_path / "a") == folder_golden.manifest
    assert not _scratch_names(folder_cache)
    report, lines = _build(folder_cache, tmp_path / "b", folder_golden.overrides)
    assert lines == [] and report.compile.cached == folder_golden.unique_programs
    assert _manifest(tmp_path / "b") == folder_golden.manifest


def test_compile_cache_damage_is_counted_and_repaired(golden: Golden, cache: Path, tmp_path: Path) -> None:
    """Every program entry damaged at once: one warning line each, all recompiled and stored again."""
    entries = sorted((cache / "programs").glob("*/*.json"))
    for entry in entries:
        _flip(entry)
    report, lines = _build(cache, tmp_path / "a")
    assert len(lines) == len(entries) == golden.unique_programs
    assert report.compile.compiled == golden.unique_programs
    assert _manifest(tmp_path / "a") == golden.manifest
    assert _build(cache, tmp_path / "b")[0].compile.cached == golden.unique_programs


# ------------------------------------------------------------------ caches that cannot be written


def _by_cache(lines: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in lines:
        kind = CACHE_WARNING.match(line).group(1)  # type: ignore[union-attr]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _scratch_names(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ScratchName.parse(p.name) is not None]


def test_a_cache_dir_that_is_a_file_warns_once_per_cache(golden: Golden, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.write_text("my notes")
    _, lines = _build(cache, tmp_path / "a")
    assert lines and set(_by_cache(lines).values()) == {1}, lines
    assert all("is unusable" in line or "cannot be written" in line for line in lines), lines
    assert _manifest(tmp_path / "a") == golden.manifest
    assert cache.read_text() == "my notes"


def test_an_empty_read_only_cache_warns_once_per_cache(golden: Golden, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "size=4m") as cache:
        remount_read_only(cache)
        _, lines = _build(cache, tmp_path / "a")
        assert lines and set(_by_cache(lines).values()) == {1}, lines
        assert any("read-only file system" in line for line in lines), lines
        assert list(cache.iterdir()) == []
    assert _manifest(tmp_path / "a") == golden.manifest


def test_a_filled_read_only_cache_serves_every_entry_silently(golden: Golden, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "size=4m") as cache:
        shutil.copytree(golden.cache, cache, dirs_exist_ok=True)
        remount_read_only(cache)
        report, lines = _build(cache, tmp_path / "a")
    assert lines == []
    assert report.compile.cached == golden.unique_programs
    assert _manifest(tmp_path / "a") == golden.manifest


@pytest.mark.parametrize("which", ["random", "folder"])
def test_a_full_cache_disk_warns_once_per_cache_and_leaves_no_scratch(which: str, request, tmp_path: Path) -> None:
    # Random weights: the entry (config, recipe, tokenizer: ~40 KB of tmpfs pages) does not
    # fit in 24 KB, nor does anything else.  Folder: ~500 KB would hold the whole cache;
    # 160 KB holds the captures but not the converted weights, which fail mid-stream.
    golden = request.getfixturevalue("golden" if which == "random" else "folder_golden")
    with tmpfs(tmp_path / "full", "size=24k" if which == "random" else "size=160k") as cache:
        _, lines = _build(cache, tmp_path / "a", golden.overrides)
        counts = _by_cache(lines)
        assert set(counts.values()) == {1} and "model" in counts, lines
        assert any("no space left on device" in line for line in lines), lines
        assert not _scratch_names(cache)
        assert not (cache / "models").exists() or not any((cache / "models").iterdir())
    assert _manifest(tmp_path / "a") == golden.manifest


# ------------------------------------------------------------------ litter of killed builds


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _litter(folder: Path, base: str, pid: int, host: str | None = None, file: bool = False) -> Path:
    """A scratch item as a build with ``pid`` (on ``host``) would have named it."""
    mine = ScratchName.parse(make_scratch(folder, base).name)
    assert mine is not None
    path = folder / f".{base}.furiosa-tmp.{host or mine.host}.{pid}.{mine.start}.0dead0"
    if file:
        path.write_bytes(b"half a write")
    else:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half a model")
    return path


def test_litter_of_dead_builds_is_removed_and_everything_else_kept(golden: Golden, cache: Path, tmp_path: Path) -> None:
    models = cache / "models"
    program = _program(cache)
    dead = _dead_pid()
    gone = [
        _litter(models, "f" * 64, dead),
        _litter(program.parent, program.name, dead, file=True),  # the shard this build rewrites
    ]
    kept = [
        make_scratch(models, "e" * 64),  # a live build's (this process)
        _litter(models, "d" * 64, dead, host="0badf00d"),  # another host's: cannot tell, keep
        models / "notes.txt",  # the user's
        models / "my-model",  # not key-shaped
    ]
    kept[0].mkdir()
    kept[2].write_text("mine")
    kept[3].mkdir()
    _flip(program)  # so the build writes into that shard

    _, lines = _build(cache, tmp_path / "a")

    assert len(lines) == 1 and "sha256 mismatch" in lines[0]
    assert [p for p in gone if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert _manifest(tmp_path / "a") == golden.manifest


def test_a_build_without_cache_cleans_its_temporary_model_and_dead_ones(golden: Golden, tmp_path: Path, monkeypatch) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = _litter(tmp, "furiosa-load", _dead_pid())

    _, lines = _build(None, tmp_path / "a")

    assert lines == []
    assert not dead.exists()
    assert not _scratch_names(tmp)
    assert _manifest(tmp_path / "a") == golden.manifest


def test_a_model_conversion_that_fails_leaves_no_scratch(cache: Path, tmp_path: Path, monkeypatch) -> None:
    from furiosa_build import model_cache

    def half_then_crash(request, out: Path):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    shutil.rmtree(_model(cache))
    monkeypatch.setattr(model_cache, "convert_model", half_then_crash)
    with pytest.raises(RuntimeError, match="killed"):
        build(TINY, tmp_path / "a", cache)
    assert list((cache / "models").iterdir()) == []


def test_scratch_names_in_this_module_have_the_shape_remove_stale_expects(tmp_path: Path) -> None:
    path = _litter(tmp_path, "a" * 64, os.getpid())
    assert ScratchName.parse(path.name) is not None

"""Program bundles: an artifact's compiled programs without weights seed another cache, so
a fine-tune of the same architecture (here: tiny-llama's config with other random weights)
builds without compiling anything.

    furiosa-llm bundle export artifacts/tiny-llama bundles/tiny-llama
    furiosa-llm bundle import bundles/tiny-llama --cache-dir ~/.cache/furiosa/llm
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from furiosa_build import cli
from furiosa_build.bundle import BundleError, export_bundle, import_bundle
from furiosa_runtime import LLM, SamplingParams
from tests.helpers import build

FINE_TUNE = ["model=tiny-llama", "buckets=tiny", "model.seed_for_random_weight=1", "model.name=tiny-llama-ft"]
PROMPTS = [[1, 17, 250, 3], [1, 400, 9, 88, 120, 7]]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama_artifact: Path) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-llama"
    assert cli.main(["bundle", "export", str(tiny_llama_artifact), str(out)]) == 0
    return out


def _greedy(artifact: Path) -> list[list[int]]:
    outputs = LLM(str(artifact)).generate([{"prompt_token_ids": p} for p in PROMPTS],
                                          SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)  # fmt: skip
    return [list(o.outputs[0].token_ids) for o in outputs]


def _manifest(artifact: Path) -> dict[str, str]:
    return json.loads((artifact / "artifact.json").read_text())["manifest"]


def test_a_fine_tune_builds_with_no_compiles_after_import(tmp_path: Path, bundle: Path, tiny_llama_artifact: Path) -> None:
    cache = tmp_path / "empty-cache"
    assert cli.main(["bundle", "import", str(bundle), "--cache-dir", str(cache)]) == 0

    seeded = build(FINE_TUNE, tmp_path / "seeded", cache)
    assert seeded.compile.compiled == 0 and seeded.compile.cached == seeded.compile.unique

    scratch = build(FINE_TUNE, tmp_path / "scratch", None)
    assert scratch.compile.compiled == scratch.compile.unique
    assert _manifest(tmp_path / "seeded") == _manifest(tmp_path / "scratch")
    assert _manifest(tmp_path / "seeded")["params.safetensors"] != _manifest(tiny_llama_artifact)["params.safetensors"]
    assert _greedy(tmp_path / "seeded") == _greedy(tmp_path / "scratch")


def test_the_fingerprint_ignores_weights_and_name(tmp_path: Path, bundle: Path) -> None:
    build(FINE_TUNE, tmp_path / "ft", tmp_path / "cache")
    other = export_bundle(tmp_path / "ft", tmp_path / "ft-bundle")
    assert other.fingerprint == json.loads((bundle / "bundle.json").read_text())["fingerprint"]
    build([*FINE_TUNE, "buckets.decode=[[1,64]]"], tmp_path / "other", tmp_path / "cache")  # other buckets
    assert export_bundle(tmp_path / "other", tmp_path / "other-bundle").fingerprint != other.fingerprint


def _copy(bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy, next((copy / "programs").iterdir())


def test_a_tampered_program_refuses_the_bundle(tmp_path: Path, bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy, program = _copy(bundle, tmp_path)
    program.write_bytes(program.read_bytes() + b" ")  # still a valid program: only its digest tells
    assert cli.main(["bundle", "import", str(copy), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: bundle {copy} refused: ") and "does not match its manifest checksum" in err and err.count("\n") == 1
    assert not (tmp_path / "cache").exists()  # nothing imported


def test_a_path_escaping_the_bundle_is_refused(tmp_path: Path, bundle: Path) -> None:
    copy, _ = _copy(bundle, tmp_path)
    description = json.loads((copy / "bundle.json").read_text())
    description["manifest"]["programs/../../etc/passwd"] = "0" * 64
    (copy / "bundle.json").write_text(json.dumps(description))
    with pytest.raises(BundleError, match=r"manifest entry 'programs/\.\./\.\./etc/passwd' is not programs/<sha256>\.json"):
        import_bundle(copy, tmp_path / "cache")


def test_a_symlinked_program_is_refused(tmp_path: Path, bundle: Path) -> None:
    copy, program = _copy(bundle, tmp_path)
    outside = tmp_path / "outside.json"
    program.rename(outside)
    program.symlink_to(outside)
    with pytest.raises(BundleError, match="refused: .*resolves outside .*symlink"):
        import_bundle(copy, tmp_path / "cache")


def test_an_edited_architecture_is_refused(tmp_path: Path, bundle: Path) -> None:
    copy, _ = _copy(bundle, tmp_path)
    description = json.loads((copy / "bundle.json").read_text())
    description["architecture"]["tensor_parallel_size"] = 2
    (copy / "bundle.json").write_text(json.dumps(description))
    with pytest.raises(BundleError, match="the fingerprint does not match the architecture"):
        import_bundle(copy, tmp_path / "cache")

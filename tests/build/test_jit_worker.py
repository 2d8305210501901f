"""``python -m furiosa_build.jit``: the worker that compiles one more bucket for a built
artifact (the runtime's JIT compilation runs it in the background).

The bucket it records is the very pipeline a build with that bucket makes (same programs,
placement and weight bindings), on one PE and with tensor and pipeline parallelism; what
it cannot add is refused in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from furiosa_build.jit import main
from furiosa_runtime.npu.artifact import Bucket, load_artifact
from furiosa_runtime.npu.jit_store import JitEntry, artifact_digest
from tests.helpers import ENGINE_LAYOUTS, build

TINY = ["model=tiny-llama", "buckets=tiny"]
ADDED = Bucket.prefill(1, 48)


@pytest.fixture(scope="module", params=list(ENGINE_LAYOUTS))
def built(request, tmp_path_factory, cache_dir) -> tuple[Path, Path]:
    """tiny-llama in one layout, and the same with the 1x48 prefill bucket built ahead of time."""
    root = tmp_path_factory.mktemp("jit-worker")
    layout = ENGINE_LAYOUTS[request.param]
    build([*TINY, *layout], root / "tiny-llama", cache_dir)
    build([*TINY, *layout, "buckets.prefill=[[1,32],[2,64],[1,48]]"], root / "ahead", cache_dir)
    return root / "tiny-llama", root / "ahead"


def test_the_recorded_bucket_is_the_one_a_build_makes(built, tmp_path: Path, cache_dir: Path, capsys) -> None:
    artifact, ahead = built
    assert main([str(artifact), "-pb", "1,48", "--out", str(tmp_path / "entry"), "--cache-dir", str(cache_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "entry")
    entry = JitEntry.model_validate_json((tmp_path / "entry" / "entry.json").read_text())
    assert entry.pipeline == load_artifact(ahead).pipeline_for(ADDED)
    assert entry.artifact_sha256 == artifact_digest(artifact)
    assert sorted(f"programs/{p.name}" for p in (tmp_path / "entry" / "programs").iterdir()) == sorted(entry.manifest)


@pytest.mark.parametrize(
    ("bucket", "needle"),
    [("1,32", "error: tiny-llama already has the prefill bucket 1,32"),
     ("1,100", "error: buckets.prefill[1]: attention_size 100 exceeds buckets.max_seq_len_to_capture=64")],
)  # fmt: skip
def test_refused_in_one_line(tiny_llama_artifact: Path, tmp_path: Path, bucket: str, needle: str, capsys) -> None:
    assert main([str(tiny_llama_artifact), "-pb", bucket, "--out", str(tmp_path / "entry")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(needle) and err.count("\n") == 1 and not (tmp_path / "entry").exists()


def test_an_artifact_of_another_compiler_is_refused(tiny_llama_artifact: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "tiny-llama"
    shutil.copytree(tiny_llama_artifact, copy)
    meta = json.loads((copy / "artifact.json").read_text())
    meta["metadata"]["version"]["furiosa_compiler"] = "0.0.1"
    (copy / "artifact.json").write_text(json.dumps(meta))
    assert main([str(copy), "-pb", "1,48"]) == 2
    assert "was compiled by furiosa compiler 0.0.1" in capsys.readouterr().err


def test_the_recorded_compiler_options_and_kv_dtype_are_built_with(tmp_path: Path, cache_dir: Path) -> None:
    """An artifact built unfused with a bf16 KV cache gets its JIT bucket compiled the same way."""
    settings = ["+build.compiler_config_overrides={fuse: false}", "quantization.kv_cache_dtype=bf16"]
    build([*TINY, *settings], tmp_path / "tiny-llama", cache_dir)
    build([*TINY, *settings, "buckets.prefill=[[1,32],[2,64],[1,48]]"], tmp_path / "ahead", cache_dir)
    assert main([str(tmp_path / "tiny-llama"), "-pb", "1,48", "--out", str(tmp_path / "entry"), "--cache-dir", str(cache_dir)]) == 0
    entry = JitEntry.model_validate_json((tmp_path / "entry" / "entry.json").read_text())
    assert entry.pipeline == load_artifact(tmp_path / "ahead").pipeline_for(ADDED)

"""``python -m furiosa_build.jit ARTIFACT -pb B,L [--out DIR] [--cache-dir DIR]``: compile
one more prefill bucket for a built artifact and record it in the artifact's JIT store.

This is the worker the runtime starts when ``enable_jit_compilation`` finds traffic a
missing bucket would serve better (``furiosa_runtime/engine/jit.py``); run by hand, it adds
a bucket ahead of serving.  ``--out`` defaults to the bucket's entry in the store beside
the artifact (``furiosa_runtime/npu/jit_store.py``); the artifact's own files are only read.

The bucket is built from what the artifact records, through the builder's own stages
(capture, compile, partition): the model config, the bucket and paged-attention settings,
the KV cache dtype, the parallel layout, blockwise compile, compiler options and
quantization.  The settings are then proven: recapturing the artifact's smallest prefill
bucket must give exactly its program keys (graph, options and compiler version), which
fails when torch or transformers capture the model differently than at build.  The new
pipeline binds the artifact's own weights by name; a constant it captures must equal the
artifact's.  Captures and programs go through the compile cache at ``--cache-dir`` (the
builds' default), so what a build or an earlier worker compiled is reused.

The entry is written to a scratch folder and renamed into place.  Errors print one line
``error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from furiosa_build.builder import ArtifactBuilder
from furiosa_build.cli import _bucket
from furiosa_build.compile import compile_all
from furiosa_build.compiler import COMPILER_VERSION
from furiosa_build.compiler.shard import cut
from furiosa_build.config import USER_ERRORS, BuildSpec, load_spec
from furiosa_build.errors import EXIT_USER_ERROR, io_error
from furiosa_build.partition import TensorSlice
from furiosa_build.scratch import make_scratch, remove, remove_stale, scratch_dir
from furiosa_build.supertask import CaptureResult
from furiosa_runtime.npu.artifact import (
    Artifact,
    ArtifactFiles,
    Bucket,
    Pipeline,
    QuantizationConfig,
    open_artifact,
    program_file,
    smallest_bucket,
)
from furiosa_runtime.npu.jit_store import ENTRY_FILE, JitEntry, artifact_digest, store_path
from furiosa_runtime.npu.weights import map_safetensors

DEFAULT_CACHE_DIR = "~/.cache/furiosa/llm"


class JitError(ValueError):
    """A bucket that cannot be compiled for this artifact, with the reason in one line."""


class JitBuilder(ArtifactBuilder):
    """The builder's stages under a spec made from an artifact; the quantized linears are
    the artifact's own (it records them), not a checkpoint's."""

    def __init__(self, spec: BuildSpec, quantization: QuantizationConfig | None) -> None:
        self.spec, self.pools, self._recorded = spec, {}, quantization

    def _quantization(self, captures, hf_config) -> QuantizationConfig | None:
        return self._recorded

    def program_keys(self, capture: CaptureResult, hf_config: dict[str, Any]) -> set[str]:
        """The keys of every program one captured bucket compiles to (nothing compiled)."""
        units, _ = self._compile_units([capture], hf_config)
        return {unit.key for unit in units}


def build_bucket(artifact_dir: Path, batch_size: int, attention_size: int, out: Path | None = None,
                 cache_dir: str = DEFAULT_CACHE_DIR) -> Path:  # fmt: skip
    """Compile the prefill bucket ``(batch_size, attention_size)`` for the artifact at
    ``artifact_dir`` and record it at ``out`` (default: its entry in the artifact's JIT
    store); returns where it was written."""
    digest = artifact_digest(artifact_dir)
    artifact, files = open_artifact(artifact_dir)
    bucket = Bucket.prefill(batch_size, attention_size)
    _check_applies(artifact, bucket)
    reference = smallest_bucket(artifact.generator_config.prefill_buckets, 1, 1)
    assert reference is not None, "a generate artifact has prefill buckets"
    builder = JitBuilder(_spec(artifact, [reference, bucket], cache_dir), artifact.model_metadata.quantization)
    ref_capture, capture = builder._capture(artifact.hf_config, {})
    _check_reproduces(builder, artifact.pipeline_for(reference), ref_capture, artifact.hf_config)
    units, roles = builder._compile_units([capture], artifact.hf_config)
    compiled = compile_all(units, builder._cache(), 1, "sequential", False)
    [pipeline], slices = builder._pipelines([capture], roles, artifact.hf_config, compiled.programs)
    _check_constants(files, artifact, slices, capture)
    programs = {t.program: compiled.programs[t.program] for t in pipeline.tasks}
    if artifact_digest(artifact_dir) != digest:
        raise JitError(f"{artifact_dir} was rebuilt while the bucket compiled; its JIT buckets are compiled again on demand")
    target = out or store_path(artifact_dir) / pipeline.name
    write_entry(target, digest, pipeline, programs)
    return target


def _check_applies(artifact: Artifact, bucket: Bucket) -> None:
    """Refuse a bucket this worker cannot add: to an embed artifact, one it already has,
    or with another compiler than the artifact was built with."""
    if artifact.model_metadata.task != "generate":
        raise JitError(f"JIT compiles prefill buckets of generate artifacts; {artifact.metadata.name} is an "
                       f"{artifact.model_metadata.task} artifact")  # fmt: skip
    if bucket in artifact.generator_config.buckets:
        raise JitError(f"{artifact.metadata.name} already has the prefill bucket {bucket.batch_size},{bucket.attention_size}")
    built = artifact.metadata.version.furiosa_compiler
    if built != COMPILER_VERSION:
        raise JitError(f"{artifact.metadata.name} was compiled by furiosa compiler {built}, this is {COMPILER_VERSION}; "
                       "rebuild the artifact to add buckets to it")  # fmt: skip


def _spec(artifact: Artifact, prefill: list[Bucket], cache_dir: str) -> BuildSpec:
    """A build of ``prefill`` buckets with the artifact's recorded settings."""
    gen, rewriting, par = artifact.generator_config, artifact.model_rewriting_config, artifact.parallel_config
    return load_spec({
        "model": {"name": artifact.metadata.name, "hf_config": artifact.hf_config, "seed_for_random_weight": 0,
                  "task": "generate", "trust_remote_code": artifact.model_metadata.trust_remote_code},
        "buckets": {"prefill": [[b.batch_size, b.attention_size] for b in prefill], "decode": [],
                    "max_seq_len_to_capture": gen.max_seq_len_to_capture,
                    "paged_attention_block_size": gen.paged_attention_config.block_size,
                    "calculate_logit_only_for_last_token": rewriting.calculate_logit_only_for_last_token,
                    "add_prefill_last_block_slice": rewriting.add_prefill_last_block_slice},
        "parallel": {"devices": artifact.devices, "tensor_parallel_size": par.tensor_parallel_size,
                     "pipeline_parallel_size": par.pipeline_parallel_size, "data_parallel_size": par.data_parallel_size,
                     "num_blocks_per_pp_stage": par.num_blocks_per_pp_stage},
        "quantization": {"kv_cache_dtype": gen.kv_cache_dtype},
        "build": {"cache_dir": cache_dir, "backend": "sequential", "progress": False,
                  "compiler_config_overrides": rewriting.compiler_config_overrides,
                  "use_blockwise_compile": rewriting.use_blockwise_compile,
                  "num_blocks_per_supertask": rewriting.num_blocks_per_supertask,
                  "embed_all_constants_into_graph": rewriting.embed_all_constants_into_graph},
        "hardware": artifact.hardware.model_dump(),
    })  # fmt: skip


def _check_reproduces(builder: JitBuilder, reference: Pipeline, capture: CaptureResult, hf_config: dict[str, Any]) -> None:
    """The recorded settings must compile the reference bucket to exactly its programs."""
    if builder.program_keys(capture, hf_config) != {t.program for t in reference.tasks}:
        raise JitError(f"recompiling bucket {reference.name} does not give the artifact's programs (another transformers "
                       "or torch than it was built with?); rebuild the artifact to add buckets to it")  # fmt: skip


def _check_constants(files: ArtifactFiles, artifact: Artifact, slices: list[TensorSlice], capture: CaptureResult) -> None:
    """Every captured constant the new pipeline binds is in the artifact's weights, equal
    (a shape-only artifact has no weights to bind)."""
    wanted = [s for s in slices if s.source.startswith("const:")]
    if not wanted or artifact.shape_only:
        return
    held: dict[str, np.ndarray] = {}
    for rel in artifact.param_files:
        with files.open_verified(rel) as f:
            held.update(map_safetensors(f))
    for s in wanted:
        whole = capture.constants[s.source.removeprefix("const:")]
        value = whole if s.layout is None else cut(whole, s.layout, s.chunk)
        if s.name not in held or held[s.name].dtype != value.dtype or not np.array_equal(held[s.name], value):
            raise JitError(f"the new bucket needs constant {s.name} with other values than the artifact holds; "
                           "rebuild the artifact with this bucket")  # fmt: skip


def write_entry(target: Path, digest: str, pipeline: Pipeline, programs: dict[str, bytes]) -> None:
    """Write the JIT entry of ``pipeline`` at ``target``: a scratch folder renamed into place
    (an older entry there is moved aside first, then removed)."""
    target = Path(os.path.abspath(target))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target.parent)
        with scratch_dir(target.parent, target.name) as staging:
            (staging / "programs").mkdir()
            manifest = {}
            for key, payload in sorted(programs.items()):
                (staging / program_file(key)).write_bytes(payload)
                manifest[program_file(key)] = hashlib.sha256(payload).hexdigest()
            entry = JitEntry(artifact_sha256=digest, manifest=manifest, pipeline=pipeline)
            (staging / ENTRY_FILE).write_text(entry.model_dump_json(indent=2) + "\n")
            _install(staging, target)
    except OSError as exc:
        raise io_error(exc, "writing the JIT bucket", target) from None


def _install(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``, moving an entry already there aside first (another
    worker may install the same bucket meanwhile: then its entry is replaced)."""
    while True:
        if os.path.lexists(target):
            aside = make_scratch(target.parent, target.name, "old")
            try:
                os.rename(target, aside)
            except FileNotFoundError:
                continue  # the other worker moved it first
            remove(aside)
        try:
            os.rename(staging, target)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m furiosa_build.jit", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="the artifact folder to add a bucket to")
    parser.add_argument("-pb", "--prefill-bucket", type=_bucket, required=True, metavar="B,L",
                        help="the prefill bucket BATCH_SIZE,CONTEXT_LENGTH to compile")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="where to write its entry (default: the artifact's JIT store)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="the compile cache (default: the builds')")
    args = parser.parse_args(argv)
    try:
        out = build_bucket(args.artifact, *args.prefill_bucket, args.out, args.cache_dir)
    except (*USER_ERRORS, ValueError, OSError) as exc:  # ArtifactError and JitError are ValueErrors
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

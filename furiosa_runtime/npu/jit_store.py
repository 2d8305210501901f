"""Buckets compiled after the build (JIT), recorded beside their artifact.

The JIT store of ``artifacts/NAME`` is the sibling folder ``artifacts/NAME.jit``; each
bucket is one entry, a folder named after its pipeline::

    artifacts/NAME.jit/NAME-kv0-b1-attn40/
        entry.json            JitEntry: the artifact it extends (sha256 of its artifact.json),
                              the pipeline, the manifest (sha256 of every program file)
        programs/<key>.json   every program the pipeline runs

A sibling, not a sub-folder: the artifact's files and manifest stay exactly as built, and
a rebuild (which replaces only a folder holding nothing but its manifest's files) is not
blocked by them.  An entry is held to the artifact's standard: the worker
(``furiosa_build/jit.py``) writes it to a scratch folder and renames it into place, and it
is read only through ``ArtifactFiles`` (confined to its folder, manifest-listed files
only, each checked against its sha256).  Its pipeline binds the artifact's own weights by
name; the simulator checks every task against them, as at load (``NPUSimulator.add_pipeline``).
An entry recorded for another build of the artifact, or one that does not verify, is
refused with a one-line ``ArtifactError`` (the engine then ignores it with a warning and
compiles the bucket again when traffic asks for it).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from furiosa_runtime.npu.artifact import (
    SHA256_HEX,
    Artifact,
    ArtifactError,
    ArtifactFiles,
    Pipeline,
    check_manifest,
    first_error,
    program_file,
)
from furiosa_runtime.npu.isa import Program
from furiosa_runtime.npu.step_times import load_program

ENTRY_FILE = "entry.json"
STORE_SUFFIX = ".jit"


class JitEntry(BaseModel):
    """The description of one JIT bucket (``entry.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal["1"] = "1"
    artifact_sha256: str  # of the artifact.json this bucket was compiled for
    manifest: dict[str, str]  # relative path -> sha256
    pipeline: Pipeline

    @field_validator("artifact_sha256")
    @classmethod
    def _digest(cls, digest: str) -> str:
        if not re.fullmatch(SHA256_HEX, digest):
            raise ValueError(f"must be 64 lowercase hex digits, got {digest!r}")
        return digest

    @field_validator("manifest")
    @classmethod
    def _safe_manifest(cls, manifest: dict[str, str]) -> dict[str, str]:
        return check_manifest(manifest)

    @model_validator(mode="after")
    def _programs_listed(self) -> JitEntry:
        for task in self.pipeline.tasks:
            if program_file(task.program) not in self.manifest:
                raise ValueError(f"task {task.name}: {program_file(task.program)} is not listed in the manifest (tampered?)")
        return self


def store_path(artifact_dir: str | Path) -> Path:
    """Where the JIT buckets of the artifact at ``artifact_dir`` are recorded."""
    root = Path(artifact_dir).absolute()
    return root.parent / f"{root.name}{STORE_SUFFIX}"


def artifact_digest(artifact_dir: str | Path) -> str:
    """The sha256 of the artifact's ``artifact.json``: what a JIT entry is bound to (it
    changes with every build, through ``metadata.artifact_id``)."""
    return hashlib.sha256(ArtifactFiles(artifact_dir, {}).read_description()).hexdigest()


def read_entry(folder: Path, artifact: Artifact, digest: str) -> tuple[Pipeline, dict[str, Program]]:
    """The pipeline and programs of the JIT entry in ``folder``, verified (see the module
    docstring); a one-line ArtifactError naming the entry when it is not a bucket of this
    very artifact."""
    try:
        return _read_entry(folder, artifact, digest)
    except ArtifactError as err:
        raise ArtifactError(f"JIT bucket {folder}: {str(err).removeprefix('artifact: ')}") from None


def _read_entry(folder: Path, artifact: Artifact, digest: str) -> tuple[Pipeline, dict[str, Program]]:
    try:
        entry = JitEntry.model_validate_json(ArtifactFiles(folder, {}).read_description(ENTRY_FILE))
    except ValidationError as err:
        raise ArtifactError(f"{ENTRY_FILE} is not a valid JIT entry ({first_error(err)})") from None
    pipeline = entry.pipeline
    if entry.artifact_sha256 != digest:
        raise ArtifactError("compiled for another build of the artifact (its artifact.json changed since)")
    if pipeline.name != folder.name or pipeline.name != pipeline.bucket.pipeline_name(artifact.metadata.name):
        raise ArtifactError(f"holds pipeline {pipeline.name!r}, not the one its folder names")
    if pipeline.bucket in artifact.generator_config.buckets:
        raise ArtifactError(f"the artifact already has bucket {pipeline.name}")
    files = ArtifactFiles(folder, entry.manifest)
    files.check_layout()
    return pipeline, {t.program: load_program(files, t.program, f"JIT entry {folder}") for t in pipeline.tasks}


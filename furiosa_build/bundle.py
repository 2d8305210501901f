"""Program bundles: an artifact's compiled programs without its weights, to seed a compile cache.

    furiosa-llm bundle export artifacts/tiny-llama bundles/tiny-llama
    furiosa-llm bundle import bundles/tiny-llama [--cache-dir DIR]

Why a bundle serves another model: a program's cache key is
``sha256(graph + compiler options + compiler version)``
(:attr:`furiosa_build.compile.CompileUnit.key`), and the graph is captured from the
model's *config* on fake tensors.  Weights never enter it: they are parameters bound when
the artifact is loaded, and the constants a graph may carry (rotary tables) are buffers
computed from the config.  So a fine-tune with the same architecture and build settings
asks for exactly the same keys, and after ``bundle import`` its build compiles nothing.
Reuse is decided by those keys alone; a bundle never makes a build use a program whose
key it did not ask for.

A bundle is a folder::

    bundle.json            {"format", "fingerprint", "architecture", "manifest": {"programs/<key>.json": sha256}}
    programs/<key>.json    the program, byte for byte as in the artifact and the cache

``architecture`` holds the graph- and option-relevant parts of the artifact's
configuration (:func:`architecture`: the model config without its name or path, task,
pooling, buckets, rewriting and tensor-parallel settings, compiler version) and
``fingerprint`` is its sha256: the key that tells which builds the bundle is for.
Import checks everything before storing anything: the fingerprint against the
architecture, every path against the layout (no ``..``, absolute paths, symlinks or other
non-regular files), every program against its sha256 and the program schema; one
failure refuses the whole bundle in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from furiosa_build.cache import CompileCache, canonical_json
from furiosa_build.compile import checked_program
from furiosa_build.config_sections import BuildOptions
from furiosa_build.errors import EXIT_USER_ERROR, io_error
from furiosa_build.scratch import scratch_dir
from furiosa_runtime.npu.artifact import (
    Artifact,
    ArtifactError,
    ArtifactFiles,
    first_error,
    open_artifact,
    parse_json,
    program_file,
)

__all__ = ["BundleError", "add_parser", "architecture", "export_bundle", "import_bundle"]

BUNDLE_FILE = "bundle.json"
FORMAT = "furiosa-program-bundle/1"
#: Config keys that name or date a model rather than shape its graphs.
_IDENTITY_KEYS = frozenset({"_name_or_path", "name_or_path", "_commit_hash", "transformers_version"})
_PROGRAM = re.compile(r"programs/[0-9a-f]{64}\.json")
_MAX_DESCRIPTION = 64 << 20  # bytes of bundle.json read at most


class BundleError(ValueError):
    """A bundle that cannot be written or is refused; the message is one line naming it."""


class _Description(BaseModel):
    """``bundle.json``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["furiosa-program-bundle/1"]
    fingerprint: str
    architecture: dict[str, Any]
    manifest: dict[str, str]


@dataclass(frozen=True)
class BundleInfo:
    """What an export wrote or an import stored."""

    path: Path
    fingerprint: str
    programs: int


def architecture(artifact: Artifact) -> dict[str, Any]:
    """The parts of an artifact's configuration its programs depend on: not the weights,
    not the model's name or path, not the scheduler or device choice."""
    meta = artifact.model_metadata
    return {
        "hf_config": {k: v for k, v in artifact.hf_config.items() if k not in _IDENTITY_KEYS},
        "task": meta.task,
        "pooling": None if meta.pooling is None else meta.pooling.model_dump(mode="json"),
        "num_hidden_layers": meta.num_hidden_layers,
        "generator_config": artifact.generator_config.model_dump(mode="json"),
        "model_rewriting_config": artifact.model_rewriting_config.model_dump(mode="json"),
        "tensor_parallel_size": artifact.parallel_config.tensor_parallel_size,
        "compiler_version": artifact.metadata.version.furiosa_compiler,
    }


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of :func:`architecture`'s parts."""
    return hashlib.sha256(canonical_json(parts)).hexdigest()


# --------------------------------------------------------------------------- export


def export_bundle(artifact_dir: Path, out: Path) -> BundleInfo:
    """Write the programs of the artifact at ``artifact_dir`` (each checked against its
    manifest) as a new bundle folder ``out``: staged beside it, then renamed into place."""
    if os.path.lexists(out):
        raise BundleError(f"bundle export: {out} already exists; give a new folder")
    if Path(os.path.realpath(out)).is_relative_to(os.path.realpath(artifact_dir)):
        raise BundleError(f"bundle export: {out} is inside the artifact {artifact_dir}, which holds only the files its "
                          "manifest lists; give a folder outside it")  # fmt: skip
    try:
        artifact, files = open_artifact(artifact_dir)
        keys = sorted({task.program for pipeline in artifact.pipelines for task in pipeline.tasks})
        programs = {program_file(key): files.read(program_file(key)) for key in keys}
    except ArtifactError as error:
        raise BundleError(f"bundle export: {error}") from None
    parts = architecture(artifact)
    manifest = {rel: hashlib.sha256(payload).hexdigest() for rel, payload in programs.items()}
    description = {"format": FORMAT, "fingerprint": fingerprint(parts), "architecture": parts, "manifest": manifest}
    out.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(out.parent, out.name) as staging:
        (staging / "programs").mkdir()
        for rel, payload in programs.items():
            (staging / rel).write_bytes(payload)
        (staging / BUNDLE_FILE).write_text(json.dumps(description, indent=1, sort_keys=True) + "\n")
        os.rename(staging, out)
    return BundleInfo(out, description["fingerprint"], len(programs))


# --------------------------------------------------------------------------- import


def import_bundle(bundle: Path, cache_dir: Path) -> BundleInfo:
    """Verify every program of ``bundle``, then store them in the compile cache at ``cache_dir``.

    Nothing is stored unless the whole bundle checks out (see the module docstring).
    """
    description = _read_description(bundle)
    files = ArtifactFiles(bundle, description.manifest)
    try:
        files.check_layout()
        programs = {rel.removeprefix("programs/").removesuffix(".json"): files.read(rel) for rel in description.manifest}
    except ArtifactError as error:
        raise _refused(bundle, str(error).removeprefix("artifact: ")) from None
    for key, payload in programs.items():
        try:
            checked_program(payload)
        except ValidationError as error:
            raise _refused(bundle, f"programs/{key}.json is not a program ({first_error(error)})") from None
    cache = CompileCache(cache_dir)
    for key, payload in programs.items():
        cache.put(key, payload)
    if cache.stats.writes != len(programs):
        raise BundleError(f"bundle import: the compile cache {cache_dir} could not store the programs (see the warning above)")
    return BundleInfo(bundle, description.fingerprint, len(programs))


def _read_description(bundle: Path) -> _Description:
    """``bundle.json``, parsed and checked: a regular file (no symlink), known format,
    the fingerprint of its architecture, only ``programs/<key>.json`` paths."""
    path = bundle / BUNDLE_FILE
    if not bundle.is_dir():
        raise _refused(bundle, "not a folder")
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise _refused(bundle, f"{BUNDLE_FILE} is not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as f:
            text = f.read(_MAX_DESCRIPTION + 1)
    except FileNotFoundError:
        raise _refused(bundle, f"{BUNDLE_FILE} is missing; is it a bundle made by furiosa-llm bundle export?") from None
    if len(text) > _MAX_DESCRIPTION:
        raise _refused(bundle, f"{BUNDLE_FILE} is larger than {_MAX_DESCRIPTION >> 20} MiB")
    try:
        description = _Description.model_validate(parse_json(text))
    except ValidationError as error:
        raise _refused(bundle, f"{BUNDLE_FILE}: {first_error(error)}") from None
    except ValueError as error:
        raise _refused(bundle, f"{BUNDLE_FILE} is not JSON ({error})") from None
    if fingerprint(description.architecture) != description.fingerprint:
        raise _refused(bundle, f"{BUNDLE_FILE}: the fingerprint does not match the architecture (tampered?)")
    for rel, digest in description.manifest.items():
        if not _PROGRAM.fullmatch(rel) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _refused(bundle, f"{BUNDLE_FILE}: manifest entry {rel!r} is not programs/<sha256>.json with a sha256")
    return description


def _refused(bundle: Path, problem: str) -> BundleError:
    return BundleError(f"bundle {bundle} refused: {problem}; nothing imported")


# --------------------------------------------------------------------------- command line


def add_parser(commands: argparse._SubParsersAction) -> None:
    """``furiosa-llm bundle export|import``, added to the ``furiosa-llm`` subcommands."""
    bundle = commands.add_parser("bundle", help="export or import compiled programs without weights",
                                 description="Move compiled programs between caches, without weights (program bundles).")
    actions = bundle.add_subparsers(dest="action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="write an artifact's programs as a bundle folder")
    export.add_argument("artifact", metavar="ARTIFACT", type=_path, help="a built artifact folder")
    export.add_argument("out", metavar="OUT", type=_path, help="the bundle folder to create")
    into = actions.add_parser("import", help="verify a bundle and store its programs in a compile cache")
    into.add_argument("bundle", metavar="BUNDLE", type=_path, help="a bundle folder")
    into.add_argument("--cache-dir", type=_path, default=Path(BuildOptions.model_fields["cache_dir"].default),
                      help="the compile cache to seed (default: %(default)s)")


def _path(text: str) -> Path:
    """An argparse type: a non-empty path (``Path("")`` would silently mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return Path(text)


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``furiosa-llm bundle`` command; one line ``error: ...`` and 2 on failure."""
    from furiosa_build.__main__ import report_error

    try:
        if args.action == "export":
            info = export_bundle(args.artifact, args.out)
            print(f"bundle {info.path}: {info.programs} programs, architecture {info.fingerprint}")
        else:
            info = import_bundle(args.bundle, args.cache_dir.expanduser())
            print(f"imported {info.programs} programs (architecture {info.fingerprint}) into {args.cache_dir}")
    except BundleError as error:
        report_error(error)
        return EXIT_USER_ERROR
    except OSError as error:
        report_error(io_error(error, f"running bundle {args.action}"))
        return EXIT_USER_ERROR
    return 0

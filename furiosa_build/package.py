"""Package stage: write the artifact directory atomically.

Everything goes into a temporary sibling folder first (programs, weights, tokenizer
files, then ``artifact.json`` with the manifest of every file's sha256); only a complete
folder is renamed to ``save_dir``.  A failed build leaves the previous artifact, if any,
untouched and no partial directory behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from furiosa_runtime.artifact import ARTIFACT_FILE, Artifact, sha256_file

PARAMS_FILE = "params.safetensors"


def write_artifact(
    save_dir: Path,
    fields: Mapping[str, Any],
    programs: Mapping[str, bytes],
    tensors: Mapping[str, np.ndarray],
    extra_files: list[Path],
) -> Artifact:
    """Write a complete artifact to ``save_dir`` (replacing an older one) and return it."""
    save_dir = save_dir.resolve()
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
    try:
        artifact = _fill(staging, fields, programs, tensors, extra_files)
        _swap_into_place(staging, save_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return artifact


def _fill(root: Path, fields, programs, tensors, extra_files) -> Artifact:
    (root / "programs").mkdir()
    for key, payload in sorted(programs.items()):
        (root / "programs" / f"{key}.json").write_bytes(payload)
    save_file({name: np.ascontiguousarray(t) for name, t in sorted(tensors.items())}, str(root / PARAMS_FILE))
    for file in extra_files:
        shutil.copyfile(file, root / file.name)
    manifest = {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()
    }
    artifact = Artifact.model_validate({**fields, "param_files": [PARAMS_FILE], "manifest": manifest})
    text = json.dumps(artifact.model_dump(mode="json"), indent=2, sort_keys=True)
    (root / ARTIFACT_FILE).write_text(text + "\n")
    return artifact


def _swap_into_place(staging: Path, save_dir: Path) -> None:
    old = None
    if save_dir.exists():
        old = save_dir.with_name(f".{save_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        save_dir.rename(old)
    staging.rename(save_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

"""Package stage: write the artifact directory, then put it in place without a gap.

Everything goes into a scratch folder beside ``save_dir`` first (programs, weights,
tokenizer files, then ``artifact.json`` with the manifest of every file's sha256).  The
complete folder then trades places with the old artifact in one ``renameat2``
exchange, so at every instant ``save_dir`` holds the old complete artifact or the new
one; where the file system cannot exchange, the old artifact is first moved aside and
:func:`recover` (run by the next build) puts it back if the build died in between.

A build only ever replaces what it can recognise as its own: an artifact folder
(``artifact.json`` with a manifest) holding nothing but the files its manifest lists, or
an empty folder.  Anything else at ``save_dir`` is refused before any work starts
(:func:`check_save_dir`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from furiosa_build.config import ConfigError
from furiosa_build.errors import io_error
from furiosa_build.safetensors_file import TensorSpec, write_safetensors
from furiosa_build.scratch import ScratchName, make_scratch, remove, remove_stale, scratch_dir
from furiosa_runtime.npu.artifact import ARTIFACT_FILE, Artifact, sha256_file

PARAMS_FILE = "params.safetensors"


def write_artifact(
    save_dir: Path,
    fields: Mapping[str, Any],
    programs: Mapping[str, bytes],
    specs: Mapping[str, TensorSpec],
    tensor: Callable[[str], np.ndarray] | None,
    extra_files: list[Path],
) -> int:
    """Write a complete artifact to ``save_dir`` (replacing an older one) and return its size in bytes.

    The weights are the tensors ``specs`` describes; ``tensor(name)`` produces each in turn
    (in name order) while ``params.safetensors`` is written, so only one is held at a time.
    ``tensor`` None writes a shape-only artifact: no param file at all."""
    save_dir = Path(os.path.abspath(save_dir))
    try:
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        with scratch_dir(save_dir.parent, save_dir.name) as staging:
            size = _fill(staging, fields, programs, specs, tensor, extra_files)
            _install(staging, save_dir)
    except OSError as exc:
        raise io_error(exc, "writing the artifact", save_dir) from None
    return size


def prepare_save_dir(save_dir: Path) -> None:
    """Before a build: refuse a ``save_dir`` this tool may not replace, put back an old
    artifact that a crashed swap left aside, and remove the scratch folders of dead builds."""
    save_dir = Path(os.path.abspath(save_dir))
    check_save_dir(save_dir)
    recover(save_dir)
    remove_stale(save_dir.parent)


def check_save_dir(save_dir: Path) -> None:
    """Raise ConfigError (one line naming the path) unless a build may write ``save_dir``."""
    save_dir = Path(os.path.abspath(save_dir))
    protected = {Path("/"), Path.home(), Path.cwd(), *Path.cwd().parents}
    if save_dir in protected:
        raise ConfigError(f"build.save_dir: {save_dir} is the current folder, one of its parents, the home folder or "
                          "the root; give a folder of its own, such as artifacts/NAME")  # fmt: skip
    if os.path.islink(save_dir):
        raise ConfigError(f"build.save_dir: {save_dir} is a symbolic link; give the folder it points to, or a new path")
    if not os.path.lexists(save_dir):
        return
    if not save_dir.is_dir():
        raise ConfigError(f"build.save_dir: {save_dir} is a file, not an artifact folder; choose another path")
    stranger = _foreign_entry(save_dir)
    if stranger is not None:
        raise ConfigError(f"build.save_dir: {save_dir} {stranger}; a build replaces only an artifact made by "
                          "furiosa_build or an empty folder, so choose another path")  # fmt: skip


def _foreign_entry(folder: Path) -> str | None:
    """Why ``folder`` is not an artifact this tool may replace (None when it is, or is empty)."""
    try:
        first = next(folder.iterdir(), None)
        if first is None:
            return None
        manifest = _manifest(folder / ARTIFACT_FILE)
        if manifest is None:
            return f"holds {first.name!r} and is not an artifact made by furiosa_build (no readable {ARTIFACT_FILE})"
        entries = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))
    except OSError as exc:
        raise io_error(exc, "reading build.save_dir", folder) from None
    folders = {Path(rel).parent.as_posix() for rel in manifest}
    for rel in entries:
        path = folder / rel
        expected = folders if path.is_dir() and not path.is_symlink() else manifest
        if rel != ARTIFACT_FILE and rel not in expected:
            return f"is an artifact but also holds {rel!r}, which its manifest does not list"
    return None


def _manifest(meta: Path) -> set[str] | None:
    """The relative paths an ``artifact.json`` lists, or None when it is not one."""
    try:
        manifest = json.loads(meta.read_text(encoding="utf-8"))["manifest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(rel) for rel in manifest} if isinstance(manifest, dict) else None


def recover(save_dir: Path) -> None:
    """Put back the old artifact that a build killed mid-swap left aside (only when
    ``save_dir`` is missing and the build that moved it is gone)."""
    if os.path.lexists(save_dir):
        return
    aside = []
    for path in _siblings(save_dir):
        name = ScratchName.parse(path.name)
        if name is not None and name.kind == "old" and name.base == save_dir.name and name.owner_gone():
            aside.append(path)
    if aside:
        newest = max(aside, key=lambda p: p.stat().st_mtime)
        os.rename(newest, save_dir)


def _siblings(path: Path) -> list[Path]:
    try:
        return list(path.parent.iterdir())
    except OSError:
        return []


def _fill(root: Path, fields, programs, specs, tensor, extra_files) -> int:
    """Write every file into ``root``, then ``artifact.json`` with their digests; return the bytes written."""
    manifest: dict[str, str] = {}
    (root / "programs").mkdir()
    for key, payload in sorted(programs.items()):
        rel = f"programs/{key}.json"
        (root / rel).write_bytes(payload)
        manifest[rel] = hashlib.sha256(payload).hexdigest()
    if tensor is not None:
        manifest[PARAMS_FILE] = write_safetensors(root / PARAMS_FILE, specs, tensor)
    for file in extra_files:
        shutil.copyfile(file, root / file.name)
        manifest[file.name] = sha256_file(root / file.name)
    mode = 0o666 & ~_umask()
    for rel in manifest:  # copyfile keeps the source's mode; artifacts follow the umask
        os.chmod(root / rel, mode)
    params = [PARAMS_FILE] if tensor is not None else []
    artifact = Artifact.model_validate({**fields, "param_files": params, "manifest": dict(sorted(manifest.items()))})
    text = json.dumps(artifact.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    (root / ARTIFACT_FILE).write_text(text)
    return sum((root / rel).stat().st_size for rel in manifest) + len(text.encode())


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _install(staging: Path, save_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``save_dir``, trading places with an old artifact."""
    while True:
        if not os.path.lexists(save_dir):
            try:
                os.rename(staging, save_dir)  # also replaces a folder made empty meanwhile
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                continue  # a concurrent build installed its artifact first: exchange with it
        check_save_dir(save_dir)  # what is there now may differ from what the build started with
        if _exchange(staging, save_dir):
            remove(staging)  # the scratch name now holds the old artifact
            return
        if _replace_in_two_steps(staging, save_dir):
            return


def _replace_in_two_steps(staging: Path, save_dir: Path) -> bool:
    """Where no exchange exists: move the old artifact aside, then the new one in.  A
    crash between the two renames leaves the old one aside for :func:`recover`."""
    aside = make_scratch(save_dir.parent, save_dir.name, "old")
    try:
        os.rename(save_dir, aside)
    except FileNotFoundError:
        return False  # a concurrent build moved it first; start over
    try:
        os.rename(staging, save_dir)
    except OSError:
        os.rename(aside, save_dir)
        raise
    remove(aside)
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system cannot (the caller then falls back), OSError on other errors."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    if code == errno.ENOENT:
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def check_param_file(dst: Path) -> None:
    """Raise ConfigError unless ``build.param_file_path`` may be written: a new path, or a
    safetensors file (which a previous build could have written) to replace."""
    if os.path.lexists(dst) and not _is_safetensors(dst):
        raise ConfigError(f"build.param_file_path: {dst} exists and is not a safetensors file; choose another path")


def write_param_file(src: Path, dst: Path) -> None:
    """``build.param_file_path``: keep a copy of the converted weights at ``dst``."""
    check_param_file(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_scratch(dst.parent, dst.name)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except BaseException:
            remove(tmp)
            raise
    except OSError as exc:
        raise io_error(exc, "writing build.param_file_path", dst) from None


def _is_safetensors(path: Path) -> bool:
    """A regular file that starts with a safetensors header (8-byte length, then JSON)."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = f.read(min(length, 100_000_000))
        return path.is_file() and not path.is_symlink() and 0 < length == len(header) and isinstance(json.loads(header), dict)
    except (OSError, ValueError):
        return False

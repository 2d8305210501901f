"""The converted model on disk (:class:`LoadedModel`): a model cache entry, verified on every read.

The model cache, ``<cache_dir>/models/<key>/``, holds ``config.json``, the weights
(``model.safetensors``, or ``random_weights.json``), the tokenizer files and
``entry.json``: the sha256 and size of every other file, written last (the weights'
digest is the one computed while writing them).  An entry is converted in a scratch
folder beside it (:mod:`furiosa_build.scratch`) and renamed into place whole, and it is
verified on every read: a damaged, incomplete or mistyped entry is reported in one
warning line, removed and converted again.  When the cache cannot be used (a file where a
folder should be, read-only, full) the model is converted into a scratch folder under the
system temp dir instead, which the build removes.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import warnings
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from furiosa_build.cache import first_line, first_non_folder, reason
from furiosa_build.convert import WriteError, convert_model, writing
from furiosa_build.errors import io_error
from furiosa_build.safetensors_file import write_safetensors
from furiosa_build.scratch import atomic_write, make_scratch, remove, remove_stale, temp_root
from furiosa_build.weight_sources import RANDOM_FILE, WEIGHTS_FILE, RandomWeights, StoredWeights, WeightSource
from furiosa_runtime.npu.artifact import sha256_file

if TYPE_CHECKING:
    from furiosa_build.load import LoadRequest

LOADER_VERSION = "3"  # 2: entries carry entry.json and live in <cache_dir>/models/<key>; 3: streamed, random weights by rule
ENTRY_FILE = "entry.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class LoadedModel:
    """A converted model on disk: ``folder`` holds config.json, the weights
    (``model.safetensors``, or ``random_weights.json`` for random weights) and tokenizer files.

    ``temporary`` models were converted outside the cache, into ``folder.parent`` (a
    scratch folder under the system temp dir) that the build removes when it is done.
    """

    folder: Path
    hf_config: dict[str, Any]
    temporary: bool = False

    def weights(self) -> WeightSource:
        """The model's bf16 weights: every tensor's spec at once, the tensors one at a time."""
        if (self.folder / RANDOM_FILE).is_file():
            return RandomWeights.from_file(self.folder / RANDOM_FILE)
        return StoredWeights(self.folder / WEIGHTS_FILE)

    @cached_property
    def weights_file(self) -> Path:
        """A safetensors file of the weights (``build.param_file_path`` copies it).  Random
        weights are not stored, so they are written out here, on first use, into a scratch
        folder under the system temp dir that goes away with this object (or, after a
        crash, with the next build's sweep of dead builds' scratch)."""
        if not (self.folder / RANDOM_FILE).is_file():
            return self.folder / WEIGHTS_FILE
        parent = temp_root()
        remove_stale(parent)
        root = make_scratch(parent, "furiosa-weights")
        root.mkdir()
        weakref.finalize(self, remove, root)
        source = self.weights()
        write_safetensors(root / WEIGHTS_FILE, source.specs(), source.tensor)
        return root / WEIGHTS_FILE

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in (*TOKENIZER_FILES, "generation_config.json") if (self.folder / n).is_file()]


class _Damaged(Exception):
    """A model cache entry failed verification; the message says why."""


class ModelCache:
    """``<cache_dir>/models``: one verified folder per :meth:`LoadRequest.key`."""

    def __init__(self, models: Path) -> None:
        self.models = models
        self.usable = True
        self._warned = False

    def load(self, request: LoadRequest, key: str) -> LoadedModel | None:
        """The cached conversion of ``key``, converting it first on a miss; None when the
        cache cannot be used (the caller converts into a temporary folder)."""
        remove_stale(self.models)  # scratch folders of killed builds
        folder = self.models / key
        hit = self._verified(folder, key)
        if hit is not None or not self.usable:
            return hit
        scratch = self._stage(key)
        if scratch is None:
            return None
        try:
            converted = convert_model(request, scratch)
            _write_entry(scratch, key, converted.digests)
            return self._publish(scratch, folder, key, converted.config)
        except WriteError as exc:
            remove(scratch)
            self._unusable(f"cannot be written ({exc.path.name}: {exc.why})")
            return None
        except BaseException:
            remove(scratch)
            raise

    def _verified(self, folder: Path, key: str) -> LoadedModel | None:
        """The entry at ``folder`` if it is whole; a damaged one is discarded (warning)."""
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            return None
        except OSError as exc:  # ENOTDIR: models/ or cache_dir is a file; EACCES
            self._unusable(self._problem(exc))
            return None
        if not stat.S_ISDIR(mode):
            return self._discard(folder, "it is a file, not a folder" if stat.S_ISREG(mode) else "it is not a folder")
        try:
            return LoadedModel(folder, _check_entry(folder, key))
        except _Damaged as exc:
            return self._discard(folder, str(exc))
        except OSError as exc:
            return self._discard(folder, f"cannot be read: {reason(exc)}")

    def _stage(self, key: str) -> Path | None:
        """A fresh scratch folder in ``models/``, or None (with a warning) when it cannot be made."""
        try:
            self.models.mkdir(parents=True, exist_ok=True)
            scratch = make_scratch(self.models, key)
            scratch.mkdir()
        except OSError as exc:
            self._unusable(self._problem(exc))
            return None
        return scratch

    def _publish(self, scratch: Path, folder: Path, key: str, config: dict[str, Any]) -> LoadedModel:
        """Rename the finished scratch folder into place (or use what a concurrent build published)."""
        for _ in range(2):
            try:
                os.rename(scratch, folder)
                return LoadedModel(folder, config)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise WriteError(folder, exc) from None
            other = self._verified(folder, key)  # published meanwhile, or damaged (then discarded)
            if other is not None:
                remove(scratch)
                return other
            if not self.usable:
                break
        raise WriteError(folder, OSError(errno.EEXIST, "cannot replace the entry"))

    def _discard(self, folder: Path, why: str) -> None:
        """Remove a damaged entry (renamed aside first, so a crash mid-removal leaves only
        scratch litter) and warn in one line."""
        try:
            retired = make_scratch(self.models, folder.name, "old")
            os.rename(folder, retired)
        except OSError as exc:
            self.usable = False
            self._warned = True
            warnings.warn(f"model cache entry {folder} is corrupted ({why}) and cannot be removed ({reason(exc)}); "
                          "converting the model into a temporary folder", stacklevel=4)  # fmt: skip
            return None
        remove(retired)
        warnings.warn(f"model cache entry {folder} is corrupted ({why}); converting the model again", stacklevel=4)
        return None

    def _unusable(self, problem: str) -> None:
        """Turn the cache off for this build, saying ``problem`` in one warning line."""
        self.usable = False
        if not self._warned:
            self._warned = True
            warnings.warn(f"model cache {self.models} {problem}; converting the model into a temporary folder", stacklevel=4)

    def _problem(self, exc: OSError) -> str:
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
            blocker = first_non_folder(self.models)
            if blocker is not None:
                return f"is unusable ({blocker} is not a folder)"
        return f"cannot be written ({exc.filename or self.models}: {reason(exc)})"


def _check_entry(folder: Path, key: str) -> dict[str, Any]:
    """Verify every file of a cache entry against ``entry.json``; return its config."""
    found = {entry.name: entry for entry in os.scandir(folder)}
    manifest_entry = found.get(ENTRY_FILE)
    if manifest_entry is None:
        raise _Damaged(f"{ENTRY_FILE} is missing")
    if not manifest_entry.is_file(follow_symlinks=False):
        raise _Damaged(f"{ENTRY_FILE} is not a file")
    try:
        manifest = json.loads((folder / ENTRY_FILE).read_bytes())
    except ValueError:
        raise _Damaged(f"{ENTRY_FILE} is not valid JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(files, dict) or manifest.get("key") != key or manifest.get("version") != LOADER_VERSION
            or not all(isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int) for v in files.values())):  # fmt: skip
        raise _Damaged(f"{ENTRY_FILE} is not the manifest of this entry")
    if "config.json" not in files:
        raise _Damaged(f"{ENTRY_FILE} does not list config.json")
    if (WEIGHTS_FILE in files) == (RANDOM_FILE in files):
        raise _Damaged(f"{ENTRY_FILE} does not list the weights ({WEIGHTS_FILE} or {RANDOM_FILE}, one of them)")
    for name, entry in sorted(found.items()):
        if name == ENTRY_FILE:
            continue
        if not entry.is_file(follow_symlinks=False):
            raise _Damaged(f"{name} is not a file")
        if name not in files:
            raise _Damaged(f"unexpected file {name}")
    for name, want in sorted(files.items()):
        if name not in found:
            raise _Damaged(f"{name} is missing")
        size = found[name].stat(follow_symlinks=False).st_size
        if size != want["size"]:
            raise _Damaged(f"{name} is {size} bytes, {ENTRY_FILE} says {want['size']}")
        if sha256_file(folder / name) != want["sha256"]:
            raise _Damaged(f"{name} sha256 mismatch")
    try:
        config = json.loads((folder / "config.json").read_bytes())
    except ValueError:
        raise _Damaged("config.json is not valid JSON") from None
    if not isinstance(config, dict):
        raise _Damaged("config.json is not a JSON object")
    if RANDOM_FILE in files:
        try:
            RandomWeights.from_file(folder / RANDOM_FILE)
        except ValueError as exc:  # JSON or recipe
            raise _Damaged(f"{RANDOM_FILE} is not a random-weight recipe ({first_line(exc)})") from None
    return config


def _write_entry(folder: Path, key: str, digests: dict[str, str]) -> None:
    """Write ``entry.json``, the manifest of every file of a finished conversion (last);
    ``digests`` are the sha256 of files hashed while they were written (the weights)."""
    files = {}
    for path in sorted(folder.iterdir()):
        assert path.is_file() and not path.is_symlink(), f"{path}: a model cache entry holds only files"
        digest = digests.get(path.name) or sha256_file(path)
        files[path.name] = {"sha256": digest, "size": path.stat().st_size}
    document = {"key": key, "version": LOADER_VERSION, "files": files}
    with writing(folder / ENTRY_FILE):
        atomic_write(folder / ENTRY_FILE, json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")


def load_temporary(request: LoadRequest, key: str) -> LoadedModel:
    """Convert into ``<tmp>/.furiosa-load.furiosa-tmp.*/<key>`` (no cache, or an unusable one)."""
    parent = temp_root()
    remove_stale(parent)  # temporary conversions of killed builds
    root = make_scratch(parent, "furiosa-load")
    try:
        root.mkdir()
        (root / key).mkdir()
        config = convert_model(request, root / key).config
    except WriteError as exc:
        remove(root)
        raise exc.io_error("converting the model") from None
    except OSError as exc:
        remove(root)
        raise io_error(exc, "converting the model", exc.filename or root) from None
    except BaseException:
        remove(root)
        raise
    return LoadedModel(root / key, config, temporary=True)

"""Load stage: model config, weights (bf16), tokenizer and generation config.

Sources are a Hugging Face folder, a GGUF file, or a config with random weights from
``seed_for_random_weight``.  ``task`` picks the model class: a causal LM for
``generate``, the bare encoder (``AutoModel``) for ``embed``, whose pooling comes from the
model's sentence-transformers files (``load_pooling``).

Weights stream: memory is bounded by one tensor, never by the model.  The model's
names, shapes and tied parameters come from an instance on the meta device (no memory);
a safetensors checkpoint (one file or sharded with an index) is read one tensor at a time
and renamed by transformers' own rules; a GGUF file is de-quantised tensor by tensor with
transformers' GGUF name map and tensor processors (q/k ``reverse_permute``...), large
tensors a block of rows at a time.  Each tensor is rounded to bfloat16 as torch's
``.to(torch.bfloat16)`` would, and written into ``model.safetensors`` as it comes
(:func:`furiosa_build.safetensors_file.write_safetensors`, which hashes as it writes).
Checkpoints only transformers can convert (``.bin`` files, fused-expert conversions, MoE
GGUF files) are loaded whole by transformers, as before, then written one tensor at a time.

Random weights (:data:`RANDOM_RULE`) are a pure function of the user's seed and each
tensor's name, so they do not depend on the order tensors are made in nor on the
framework's init: tensor ``name`` holds the first ``size`` draws of
``Generator(PCG64(int(sha256(f"{seed}:{canonical}"), little-endian)))).random(dtype=float32)``
in C order, mapped to ``center + (u - 0.5) * 0.02 * sqrt(12)`` in float32 (uniform, standard
deviation 0.02) and truncated to bfloat16 (the upper 16 bits).  ``canonical`` is the first
name of a tied parameter (``lm_head.weight`` tied to the embedding draws the embedding's
values); ``center`` is the constant the framework initialises a normalisation layer's
parameter to (1 for norm weights, 0 for biases and for Gemma's ``(1 + weight)`` norms) and
0 for everything else.  ``seed_for_random_weight`` on a real model follows the same rule.
Random weights are generated on demand, a block of rows at a time, and never stored: the
cache entry of a random model holds ``random_weights.json`` (seed, rule, and every
tensor's shape, centre and canonical name) instead of ``model.safetensors``.

The model cache, ``<cache_dir>/models/<key>/``, holds ``config.json``, the weights
(``model.safetensors``, or ``random_weights.json``), the tokenizer files and
``entry.json``: the sha256 and size of every other file, written last (the weights'
digest is the one computed while writing them).  An entry is converted in a scratch
folder beside it (:mod:`furiosa_build.scratch`) and renamed into place whole, and it is
verified on every read: a damaged, incomplete or mistyped entry is reported in one
warning line, removed and converted again.  When the cache cannot be used (a file where a
folder should be, read-only, full) the model is converted into a scratch folder under the
system temp dir instead, which the build removes.

Every error met while reading the user's model (transformers, safetensors, gguf,
tokenizers, JSON, the OS) is a one-line :class:`LoadError` naming the file or the field.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import json
import os
import re
import stat
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import ml_dtypes
import numpy as np

from furiosa_build.cache import canonical_json, first_line, first_non_folder, reason
from furiosa_build.errors import BuildIOError, io_error
from furiosa_build.safetensors_file import SafetensorsFormatError, StoredTensor, TensorSpec, read_header, read_tensor, write_safetensors
from furiosa_build.scratch import atomic_write, make_scratch, remove, remove_stale, temp_root
from furiosa_build.source_memo import SourceMemo
from furiosa_build.sources import ModelSource
from furiosa_runtime.artifact import PoolingConfig, sha256_file

LOADER_VERSION = "3"  # 2: entries carry entry.json and live in <cache_dir>/models/<key>; 3: streamed, random weights by rule
WEIGHTS_FILE = "model.safetensors"
RANDOM_FILE = "random_weights.json"
RANDOM_RULE = "furiosa-random/1"  # see the module docstring; a new rule needs a new name (and LOADER_VERSION)
BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
ENTRY_FILE = "entry.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Files a tokenizer can be made from; a model folder with none of them builds without one.
TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                     "vocab.json", "vocab.txt", "merges.txt", "tiktoken.model")  # fmt: skip
ALLOWED_DTYPES = ("bfloat16",)
SOURCE_FIELD = "model.model_id_or_path"


class LoadError(ValueError):
    """The model cannot be loaded as configured (dtype policy, missing files...)."""


@dataclass(frozen=True)
class LoadRequest:
    source: ModelSource
    hf_config: dict[str, Any] | None
    num_hidden_layers: int | None
    seed_for_random_weight: int | None
    auto_bfloat16_cast: bool
    trust_remote_code: bool
    task: Literal["generate", "embed"] = "generate"
    pooling: PoolingConfig | None = None  # overrides the sentence-transformers files for "embed"
    memo: SourceMemo | None = field(default=None, compare=False)  # remembers config reads and source hashes

    def key(self) -> str:
        """Content hash of the source plus every option that changes the loaded weights."""
        digest = hashlib.sha256()
        digest.update(self._source_digest().encode())
        options = {
            "hf_config": self.hf_config,
            "layers": self.num_hidden_layers,
            "seed": self.seed_for_random_weight,
            "cast": self.auto_bfloat16_cast,
            "version": LOADER_VERSION,
        }
        if self.task != "generate":  # keys of generate models stay as they were, so their caches remain valid
            options["task"] = self.task
        digest.update(canonical_json(options))
        return digest.hexdigest()

    def _source_digest(self) -> str:
        """sha256 over the source files' names and contents (remembered by ``memo``)."""
        if self.memo is not None:
            return self.memo.get("content", self.source, {}, self._hash_source)
        return self._hash_source()

    def _hash_source(self) -> str:
        digest = hashlib.sha256()
        if self.source.path is not None:
            path = self.source.path
            try:
                files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
            except OSError as exc:
                raise _unreadable(path, exc) from None
            for file in files:
                try:
                    digest.update(file.name.encode() + sha256_file(file).encode())
                except OSError as exc:
                    raise _unreadable(file, exc) from None
        return digest.hexdigest()


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


# --------------------------------------------------------------------------- weight sources


class WeightSource:
    """A model's weights, converted to bfloat16: :meth:`specs` gives the dtype and shape of
    every tensor without reading any, :meth:`tensor` one tensor on demand."""

    def specs(self) -> dict[str, TensorSpec]:
        raise NotImplementedError

    def tensor(self, name: str) -> np.ndarray:
        raise NotImplementedError


class StoredWeights(WeightSource):
    """A safetensors file (a model cache entry's bf16 ``model.safetensors``), read one tensor at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._header: dict[str, StoredTensor] | None = None

    @property
    def header(self) -> dict[str, StoredTensor]:
        if self._header is None:
            self._header = read_header(self.path)
        return self._header

    def specs(self) -> dict[str, TensorSpec]:
        return {name: (entry.dtype, entry.shape) for name, entry in self.header.items()}

    def tensor(self, name: str) -> np.ndarray:
        return read_tensor(self.path, self.header[name])


@dataclass(frozen=True)
class RandomTensor:
    """One tensor of a random-weight model: its shape, centre and the name its values are keyed by."""

    shape: tuple[int, ...]
    center: float
    canonical: str


class RandomWeights(WeightSource):
    """Random weights by :data:`RANDOM_RULE`, generated when asked for (never stored)."""

    def __init__(self, seed: int, tensors: dict[str, RandomTensor]) -> None:
        self.seed = seed
        self.tensors = tensors

    def specs(self) -> dict[str, TensorSpec]:
        return {name: (BF16, t.shape) for name, t in self.tensors.items()}

    def tensor(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return random_tensor(self.seed, t.canonical, t.shape, t.center)

    def to_json(self) -> bytes:
        tensors = {name: {"shape": list(t.shape), "center": t.center, "canonical": t.canonical} for name, t in self.tensors.items()}
        return json.dumps({"rule": RANDOM_RULE, "seed": self.seed, "tensors": tensors}, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_file(cls, path: Path) -> RandomWeights:
        """Read ``random_weights.json``; ValueError when it is not one of this rule."""
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or data.get("rule") != RANDOM_RULE or type(data.get("seed")) is not int:
            raise ValueError(f"not a {RANDOM_RULE} recipe")
        tensors = data.get("tensors")
        if not isinstance(tensors, dict):
            raise ValueError("no tensors")
        plan = {}
        for name, t in tensors.items():
            try:
                shape = tuple(t["shape"])
                center, canonical = t["center"], t["canonical"]
            except (KeyError, TypeError):
                raise ValueError(f"{name}: not a tensor entry") from None
            if (not all(type(d) is int and d >= 0 for d in shape) or type(center) not in (int, float)
                    or not isinstance(canonical, str) or canonical not in tensors):  # fmt: skip
                raise ValueError(f"{name}: not a tensor entry")
            plan[name] = RandomTensor(shape, float(center), canonical)
        return cls(data["seed"], plan)


_RANDOM_BLOCK = 1 << 20  # float32 draws per block: the only temporary a random tensor needs
_RANDOM_WIDTH = np.float32(0.02 * 12**0.5)  # uniform on (-w/2, w/2) has standard deviation 0.02


def random_tensor(seed: int, name: str, shape: tuple[int, ...], center: float = 0.0) -> np.ndarray:
    """The bf16 values :data:`RANDOM_RULE` gives tensor ``name`` (its canonical name) of a
    model with ``seed_for_random_weight=seed``: made a block of draws at a time, straight
    into the bf16 result."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    out = np.empty(shape, BF16)
    bits = out.reshape(-1).view(np.uint16)
    buffer = np.empty(min(_RANDOM_BLOCK, bits.size), np.float32)
    center32 = np.float32(center)
    for lo in range(0, bits.size, _RANDOM_BLOCK):
        block = buffer[: min(_RANDOM_BLOCK, bits.size - lo)]
        rng.random(out=block, dtype=np.float32)
        block -= np.float32(0.5)
        block *= _RANDOM_WIDTH
        if center32:
            block += center32
        np.right_shift(block.view(np.uint32), 16, out=block.view(np.uint32))  # truncate to the upper 16 bits
        bits[lo : lo + block.size] = block.view(np.uint32)
    return out


def random_weight_plan(hf_config: dict[str, Any], task: str = "generate") -> dict[str, RandomTensor]:
    """Every floating tensor a random-weight model of ``hf_config`` has, with what
    :data:`RANDOM_RULE` draws for it (needs torch and transformers; allocates no weights)."""
    config = _config_for_model(hf_config, "model.hf_config")
    return _random_plan(_meta_model(auto_model_class(task), config, hf_config))


def random_state_dict(hf_config: dict[str, Any], seed: int, task: str = "generate") -> dict[str, np.ndarray]:
    """The whole random-weight state dict (bf16) of ``hf_config``: for oracles of small models."""
    source = RandomWeights(seed, random_weight_plan(hf_config, task))
    return {name: source.tensor(name) for name in source.specs()}


# --------------------------------------------------------------------------- config


def load_config(request: LoadRequest) -> dict[str, Any]:
    """The Hugging Face config alone (cheap: no weights), with overrides applied; read
    once per unchanged source when the request has a ``memo``."""
    if request.memo is None:
        return _read_config(request)
    options = {"hf_config": request.hf_config, "layers": request.num_hidden_layers, "remote": request.trust_remote_code}
    return request.memo.get("config", request.source, options, lambda: _read_config(request))


def _read_config(request: LoadRequest) -> dict[str, Any]:
    from transformers import AutoConfig

    if request.source.kind == "config":
        config = _config_for_model(request.hf_config or {}, "model.hf_config")
    else:
        if request.source.kind == "folder":
            _check_config_file(_folder(request.source) / "config.json", request.trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(str(_folder(request.source)), **_gguf_kwargs(request.source), trust_remote_code=request.trust_remote_code)
            if request.hf_config:
                config.update(request.hf_config)
        except Exception as exc:  # transformers, gguf, json, OS errors on the user's files
            raise _source_failure(request.source, exc, "cannot read the model config") from None
    if request.num_hidden_layers is not None:
        config.num_hidden_layers = request.num_hidden_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: request.num_hidden_layers]
    return json.loads(config.to_json_string(use_diff=False))


def _config_for_model(hf_config: dict[str, Any], field: str):
    """``AutoConfig.for_model`` with a one-line error naming the field at fault."""
    from transformers import AutoConfig

    model_type = hf_config.get("model_type")
    if not isinstance(model_type, str):
        raise LoadError(f"{field}.model_type: required, a string such as 'llama'")
    if not _known_model_type(model_type):
        raise LoadError(f"{field}.model_type: {_unknown_model_type(model_type)}")
    try:
        return AutoConfig.for_model(**hf_config)
    except Exception as exc:  # a value transformers' config class refuses
        raise LoadError(f"{field}: {first_line(exc)}") from None


def _check_config_file(path: Path, trust_remote_code: bool) -> None:
    """Read the folder's config.json ourselves first, so its problems name the file."""
    data = _read_json(path, None)
    if not isinstance(data, dict):
        raise LoadError(f"{SOURCE_FIELD}: {path}: not a JSON object")
    model_type = data.get("model_type")
    if model_type is None or (trust_remote_code and "auto_map" in data):
        return  # transformers decides (remote code, or a type guessed from the folder name)
    if not isinstance(model_type, str) or not _known_model_type(model_type):
        raise LoadError(f"{SOURCE_FIELD}: {path}: model_type: {_unknown_model_type(model_type)}")


def _known_model_type(model_type: str) -> bool:
    from transformers import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _unknown_model_type(model_type: Any) -> str:
    import transformers
    from transformers import CONFIG_MAPPING

    close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {model_type!r} (not a model type of transformers {transformers.__version__}){hint}"


# --------------------------------------------------------------------------- load + cache


def load(request: LoadRequest, models_dir: Path | None) -> LoadedModel:
    """Convert the model to a bf16 folder, reusing a previous conversion when possible.

    ``models_dir`` is the model cache (``<cache_dir>/models``), or None to convert into a
    temporary folder.  Cache problems warn and fall back to a temporary folder.
    """
    key = request.key()
    loaded = _ModelCache(Path(models_dir).expanduser()).load(request, key) if models_dir is not None else None
    if loaded is None:
        loaded = _load_temporary(request, key)
    if not (loaded.folder / "tokenizer.json").is_file():
        warnings.warn(
            f"{SOURCE_FIELD}: {request.source.path} has no tokenizer files, so the artifact has no tokenizer: "
            "text prompts will not work, token ids will", stacklevel=2,
        )  # fmt: skip
    return loaded


class _Damaged(Exception):
    """A model cache entry failed verification; the message says why."""


class _ModelCache:
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
            converted = _convert(request, scratch)
            _write_entry(scratch, key, converted.digests)
            return self._publish(scratch, folder, key, converted.config)
        except _WriteError as exc:
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
                    raise _WriteError(folder, exc) from None
            other = self._verified(folder, key)  # published meanwhile, or damaged (then discarded)
            if other is not None:
                remove(scratch)
                return other
            if not self.usable:
                break
        raise _WriteError(folder, OSError(errno.EEXIST, "cannot replace the entry"))

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
    with _writing(folder / ENTRY_FILE):
        atomic_write(folder / ENTRY_FILE, json.dumps(document, indent=2, sort_keys=True).encode() + b"\n")


def _load_temporary(request: LoadRequest, key: str) -> LoadedModel:
    """Convert into ``<tmp>/.furiosa-load.furiosa-tmp.*/<key>`` (no cache, or an unusable one)."""
    parent = temp_root()
    remove_stale(parent)  # temporary conversions of killed builds
    root = make_scratch(parent, "furiosa-load")
    try:
        root.mkdir()
        (root / key).mkdir()
        config = _convert(request, root / key).config
    except _WriteError as exc:
        remove(root)
        raise exc.io_error("converting the model") from None
    except OSError as exc:
        remove(root)
        raise io_error(exc, "converting the model", exc.filename or root) from None
    except BaseException:
        remove(root)
        raise
    return LoadedModel(root / key, config, temporary=True)


class _WriteError(Exception):
    """Writing the converted model failed (full disk, read-only...): ``path`` and ``why``."""

    def __init__(self, path: Path, error: BaseException) -> None:
        super().__init__(path, error)
        self.error = error
        self.path = path
        self.errno = error.errno if isinstance(error, OSError) else None
        rust = None if isinstance(error, OSError) else re.search(r"os error (\d+)", str(error))
        if rust is not None:  # a Rust library's io::Error: "... (os error 28)"
            self.errno = int(rust.group(1))
            error = OSError(self.errno, os.strerror(self.errno))
        self.why = reason(error) if isinstance(error, OSError) else first_line(error)

    def io_error(self, doing: str) -> BuildIOError:
        return BuildIOError(self.errno, f"{doing}: {self.path}: {self.why}")


_IO_MESSAGE = re.compile(r"os error \d+|I/O error|No space left|Read-only file system|Permission denied", re.IGNORECASE)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` (an OSError, or a Rust library's I/O error) into
    a :class:`_WriteError`; other errors pass through."""
    try:
        yield
    except LoadError:
        raise
    except OSError as exc:
        raise _WriteError(path, exc) from exc
    except Exception as exc:
        if _IO_MESSAGE.search(str(exc)):
            raise _WriteError(path, exc) from exc
        raise


# --------------------------------------------------------------------------- pooling


def auto_model_class(task: str) -> type:
    """The transformers auto class of a task: a causal LM, or the bare encoder for embeddings."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if task == "embed" else AutoModelForCausalLM


def load_pooling(request: LoadRequest) -> PoolingConfig | None:
    """The pooling of an ``embed`` model (None for ``generate``).

    ``request.pooling`` wins; otherwise the sentence-transformers files of the source say
    it (``modules.json`` -> ``Pooling`` config, a ``Normalize`` module,
    ``sentence_bert_config.json``); a model without them gets mean pooling + normalize.
    """
    if request.task != "embed":
        return None
    if request.pooling is not None:
        return request.pooling
    folder = _folder(request.source) if request.source.path is not None else None
    if folder is None or not (folder / "modules.json").is_file():
        return PoolingConfig()
    modules = _read_json(folder / "modules.json", [])
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in modules):
        raise LoadError(f"{SOURCE_FIELD}: {folder / 'modules.json'}: not a list of modules with a 'type' each")
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in kinds:
        raise LoadError(f"model.pooling: {folder / 'modules.json'} has no Pooling module; set model.pooling explicitly")
    settings = _read_json(folder / str(kinds["Pooling"].get("path", "")) / "config.json", {})
    if not isinstance(settings, dict):
        raise LoadError(f"{SOURCE_FIELD}: {folder / str(kinds['Pooling'].get('path', '')) / 'config.json'}: not a JSON object")
    modes = [name for name, on in settings.items() if name.startswith("pooling_mode_") and on]
    allowed = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in allowed:
        raise LoadError(f"model.pooling: sentence-transformers pooling {modes} is not supported yet (only "
                        "pooling_mode_mean_tokens or pooling_mode_cls_token)")  # fmt: skip
    sbert = _read_json(folder / "sentence_bert_config.json", {})
    max_len = sbert.get("max_seq_length") if isinstance(sbert, dict) else None
    return PoolingConfig(mode=allowed[modes[0]], normalize="Normalize" in kinds, max_seq_length=max_len)


def _read_json(path: Path, default: Any) -> Any:
    """A JSON file of the user's model (``default`` when absent), errors in one line."""
    try:
        if not path.is_file():
            return default
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise LoadError(f"{SOURCE_FIELD}: {path}: not valid JSON ({first_line(exc)})") from None


def _folder(source: ModelSource) -> Path:
    assert source.path is not None
    return source.path.parent if source.kind == "gguf" else source.path


def _gguf_kwargs(source: ModelSource) -> dict[str, str]:
    return {"gguf_file": source.path.name} if source.kind == "gguf" and source.path is not None else {}


# --------------------------------------------------------------------------- errors on the user's files


def _unreadable(path: Path, exc: OSError) -> LoadError:
    return LoadError(f"{SOURCE_FIELD}: {path}: cannot read ({reason(exc)})")


def _source_failure(source: ModelSource, exc: BaseException, doing: str) -> LoadError:
    """A one-line LoadError for a library failing on the user's model: names the file at
    fault when a cheap check finds it (bad GGUF, truncated safetensors), else the source."""
    assert source.path is not None
    if isinstance(exc, LoadError):
        return exc
    if source.kind == "gguf":
        problem = _gguf_problem(source.path)
        if problem is not None:
            return LoadError(f"{SOURCE_FIELD}: {source.path}: {problem}")
    else:
        found = _safetensors_problem(source.path)
        if found is not None:
            return LoadError(f"{SOURCE_FIELD}: {found[0]}: {found[1]}")
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return _unreadable(Path(exc.filename), exc)
    return LoadError(f"{SOURCE_FIELD}: {source.path}: {doing} ({first_line(exc)})")


def _gguf_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable GGUF file, or None when it parses."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"cannot read ({reason(exc)})"
    if magic != b"GGUF":
        return "not a GGUF file (it does not start with the GGUF magic bytes)"
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as exc:  # struct/numpy errors on a short or garbled file
        return f"truncated or not a GGUF file ({first_line(exc)})"
    return None


def _safetensors_problem(folder: Path) -> tuple[Path, str] | None:
    """The first safetensors file of ``folder`` that does not open, and why."""
    from safetensors import safe_open

    try:
        files = sorted(folder.glob("*.safetensors"))
    except OSError:
        return None
    for file in files:
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except OSError as exc:
            return file, f"cannot read ({reason(exc)})"
        except Exception as exc:  # SafetensorError: header length, coverage, JSON
            return file, f"truncated or not a safetensors file ({first_line(exc)})"
    return None


def _has_tokenizer_sources(folder: Path) -> bool:
    try:
        return any((folder / name).is_file() for name in TOKENIZER_SOURCES) or any(folder.glob("*.tiktoken"))
    except OSError:
        return True  # let the tokenizer's own loading report the problem


# --------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class _Converted:
    """What :func:`_convert` wrote: the config, and the sha256 of files it hashed as it wrote them."""

    config: dict[str, Any]
    digests: dict[str, str]


@dataclass(frozen=True)
class _Stream:
    """Weights to write: the spec of every tensor, one bf16 tensor produced at a time."""

    specs: dict[str, TensorSpec]
    tensor: Callable[[str], np.ndarray]


def _convert(request: LoadRequest, out: Path) -> _Converted:
    """Convert the model of ``request`` into the folder ``out`` (config.json, tokenizer
    files, and the weights: ``model.safetensors`` written one tensor at a time, or the
    ``random_weights.json`` recipe)."""
    source = request.source
    model_class = auto_model_class(request.task)
    config_dict = load_config(request)
    config = _config_for_model(config_dict, "model.hf_config")
    model = _meta_model(model_class, config, config_dict)  # names, shapes and ties; no weights
    random = source.kind == "config" or request.seed_for_random_weight is not None
    if source.kind == "config":
        with _writing(out / "tokenizer.json"):
            _write_random_tokenizer(out, int(config_dict["vocab_size"]), config_dict)
    elif source.kind == "gguf" or _has_tokenizer_sources(_folder(source)):
        _save_tokenizer(request, out)
    _check_vocab(out / "tokenizer.json", config_dict, source)
    stream = None
    if random:
        plan = _random_plan(model)
        source_dtype = _source_dtype(request, config_dict)
    else:
        stream = _gguf_stream(source.path, model, config_dict) if source.kind == "gguf" else _folder_stream(source, model)
        source_dtype = _source_dtype(request, config_dict)
        if stream is None:  # a checkpoint only transformers can convert (see _whole_model_stream)
            model, stream, source_dtype = _whole_model_stream(request, model_class, config)
    if source.kind == "folder":
        _save_generation_config(_folder(source), model, out)
    if source_dtype not in ALLOWED_DTYPES and not request.auto_bfloat16_cast:
        raise LoadError(
            f"model.auto_bfloat16_cast: the model's weights are {source_dtype}; builds use bfloat16, "
            "so set auto_bfloat16_cast=true to allow the cast"
        )
    digests = {}
    if stream is None:
        with _writing(out / RANDOM_FILE):
            (out / RANDOM_FILE).write_bytes(RandomWeights(request.seed_for_random_weight or 0, plan).to_json())
    else:
        with _writing(out / WEIGHTS_FILE):
            digests[WEIGHTS_FILE] = write_safetensors(out / WEIGHTS_FILE, stream.specs, stream.tensor)
    config_dict["dtype"] = "bfloat16"
    with _writing(out / "config.json"):
        (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    return _Converted(config_dict, digests)


def _from_config(model_class: type, config, config_dict: dict[str, Any]):
    """A random-weight model of ``config``; an architecture without a class of this task
    is a one-line error naming the model type."""
    import torch

    try:
        return model_class.from_config(config, dtype=torch.float32)
    except Exception as exc:
        kind = model_class.__name__
        raise LoadError(f"model.hf_config.model_type: {config_dict.get('model_type')!r} cannot be built as "
                        f"{kind} ({first_line(exc)})") from None  # fmt: skip


def _meta_model(model_class: type, config, config_dict: dict[str, Any]):
    """The model of ``config`` on the meta device: parameter names, shapes and ties, no memory."""
    import torch

    with torch.device("meta"):
        return _from_config(model_class, config, config_dict)


def _aliases(model) -> dict[str, str]:
    """Every parameter name -> the first name of the same tensor (tied weights share one)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def _float_entries(model) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every floating-point tensor of the model's state dict (what is converted)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if t.is_floating_point()}


def _source_dtype(request: LoadRequest, config_dict: dict[str, Any]) -> str:
    """The dtype the model's weights come in, as transformers' ``dtype="auto"`` would load
    them: the config's dtype, else the checkpoint's first floating tensor (GGUF: float32)."""
    source = request.source
    if source.kind == "config":
        return str(config_dict.get("dtype") or config_dict.get("torch_dtype") or "bfloat16")
    if source.kind == "gguf":
        return "float32"  # transformers de-quantises GGUF tensors to float32
    if config_dict.get("dtype"):
        return str(config_dict["dtype"]).removeprefix("torch.")
    files = _checkpoint_files(_folder(source))
    for file in files or ():
        try:
            stored = read_header(file)
        except (OSError, SafetensorsFormatError):
            break  # the conversion reports the file
        for name in sorted(stored):
            if stored[name].dtype.kind == "f" or stored[name].dtype == BF16:
                return _dtype_name(stored[name].dtype)
    return "float32"


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == BF16 else np.dtype(dtype).name


# ---- safetensors folders


def _checkpoint_files(folder: Path) -> list[Path] | None:
    """The safetensors files transformers would read from ``folder`` (a sharded index, or
    ``model.safetensors``); None when the weights are not safetensors (``.bin``)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, {})
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{SOURCE_FIELD}: {index}: not a safetensors index (no weight_map of file names)")
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / WEIGHTS_FILE
    return [single] if single.is_file() else None


def _folder_stream(source: ModelSource, model) -> _Stream | None:
    """Stream a safetensors checkpoint tensor by tensor, renamed the way transformers
    renames checkpoint keys for this model; None when only transformers can convert it
    (``.bin`` weights, many-to-one conversions such as fused experts, missing or
    mismatched tensors, which transformers fills or reports)."""
    folder = _folder(source)
    files = _checkpoint_files(folder)
    if files is None:
        return None
    stored: dict[str, tuple[Path, StoredTensor]] = {}
    for file in files:
        try:
            header = read_header(file)
        except OSError as exc:
            raise _unreadable(file, exc) from None
        except SafetensorsFormatError as exc:
            raise LoadError(f"{SOURCE_FIELD}: {file}: truncated or not a safetensors file ({exc})") from None
        stored.update((name, (file, entry)) for name, entry in header.items())
    found = _checkpoint_names(model, list(stored))
    if found is None:
        return None
    aliases = _aliases(model)
    plan: dict[str, tuple[Path, StoredTensor]] = {}
    for name, shape in _float_entries(model).items():
        key = found.get(aliases.get(name, name))
        if key is None:
            return None
        file, entry = stored[key]
        if entry.shape != shape or not (entry.dtype.kind == "f" or entry.dtype in _FLOAT8):
            return None
        plan[name] = (file, entry)

    def tensor(name: str) -> np.ndarray:
        file, entry = plan[name]
        try:
            return _read_bf16(file, entry)
        except OSError as exc:
            raise _unreadable(file, exc) from None
        except SafetensorsFormatError as exc:
            raise LoadError(f"{SOURCE_FIELD}: {file}: truncated or not a safetensors file ({exc})") from None

    return _Stream({name: (BF16, entry.shape) for name, (_, entry) in plan.items()}, tensor)


def _checkpoint_names(model, keys: list[str]) -> dict[str, str] | None:
    """Model tensor name -> checkpoint key, by transformers' own renaming rules for the
    model (legacy names, base-model prefix); None when a key needs a conversion beyond a
    rename."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta = model.state_dict()
    prefix = model.base_model_prefix
    found: dict[str, str] = {}
    for key in keys:
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta and key in meta:
            target, pattern = rename_source_key(key, [], [], prefix, meta)
        if target not in meta:
            continue  # not a tensor of this model (layers beyond num_hidden_layers, an unused head)
        if pattern is not None or target in found:
            return None
        found[target] = key
    return found


def _read_bf16(file: Path, entry: StoredTensor) -> np.ndarray:
    if entry.dtype == BF16:
        return read_tensor(file, entry)
    return read_tensor(file, entry, convert=_to_bf16, dtype=BF16)


def _to_bf16(source: np.ndarray, out: np.ndarray) -> None:
    """Round ``source`` to bfloat16 into ``out``, as torch's ``.to(torch.bfloat16)`` does."""
    import torch

    if source.dtype in (np.float16, np.float32, np.float64):
        if not source.flags.writeable:  # a view of a memory-mapped file, which torch will not wrap
            source = source.copy()
        out.reshape(-1).view(np.int16)[:] = torch.from_numpy(source.reshape(-1)).to(torch.bfloat16).view(torch.int16).numpy()
    else:  # float8 (exact in bfloat16) and bfloat16
        out[...] = source.astype(BF16).reshape(out.shape)


# ---- GGUF

#: GGUF tensor processors of transformers that keep every tensor's name and work on one
#: tensor alone; the others (MoE expert merges, GPT-2, T5) go through transformers whole.
_GGUF_STREAMING = frozenset({"TensorProcessor", "LlamaTensorProcessor", "Gemma2TensorProcessor",
                             "NemotronTensorProcessor", "BloomTensorProcessor"})  # fmt: skip
_GGUF_BLOCK_ELEMENTS = 1 << 22  # rows de-quantised at a time for a large tensor the processor leaves alone


def _gguf_stream(path: Path, model, config_dict: dict[str, Any]) -> _Stream | None:
    """De-quantise a GGUF file tensor by tensor with the same name map and per-tensor
    processing as transformers' ``load_gguf_checkpoint``; None when its processor needs
    several tensors at once (then transformers converts the model whole)."""
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field

        reader = GGUFReader(str(path))  # memory-mapped: tensors are read when de-quantised
        architecture = read_field(reader, "general.architecture")[0]
        processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        if processor_class.__name__ not in _GGUF_STREAMING:
            return None
        processor = processor_class(config=config_dict)
        with _cached_gguf_name_maps():
            mapping = get_gguf_hf_weights_map(model, processor)  # GGUF name -> model name
    except LoadError:
        raise
    except Exception as exc:  # gguf / numpy errors on a damaged file
        raise _source_failure(ModelSource("gguf", path), exc, "cannot read the weights") from None
    by_name: dict[str, Any] = {}
    for tensor in reader.tensors:
        target = mapping.get(tensor.name)
        if target is None:
            continue  # a tensor this model does not have (layers beyond num_hidden_layers...)
        if target in by_name:
            return None
        by_name[target] = tensor
    aliases = _aliases(model)
    plan = {}
    for name, shape in _float_entries(model).items():
        tensor = by_name.get(aliases.get(name, name))
        if tensor is None or tuple(int(d) for d in reversed(tensor.shape.tolist())) != shape:
            return None  # missing or reshaped: transformers decides
        plan[name] = tensor

    def produce(name: str) -> np.ndarray:
        try:
            return _gguf_bf16(plan[name], processor, _float_shape(plan[name]))
        except LoadError:
            raise
        except Exception as exc:
            raise LoadError(f"{SOURCE_FIELD}: {path}: cannot de-quantise {plan[name].name} ({first_line(exc)})") from None

    return _Stream({name: (BF16, _float_shape(t)) for name, t in plan.items()}, produce)


@contextmanager
def _cached_gguf_name_maps() -> Iterator[None]:
    """``get_gguf_hf_weights_map`` walks every submodule and builds gguf's tensor name map
    of the architecture anew for each (seconds per model); the map depends only on its
    arguments, so let the walk build it once."""
    import functools

    import gguf

    real = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(real)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = real


def _float_shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _gguf_bf16(tensor, processor, shape: tuple[int, ...]) -> np.ndarray:
    """One GGUF tensor de-quantised, processed like transformers does, rounded to bfloat16.
    A large tensor the processor leaves untouched is de-quantised a block of rows at a
    time, so its float32 form is never whole."""
    from gguf.quants import dequantize

    data = tensor.data
    elements = int(np.prod(shape, dtype=np.int64))
    if data.ndim > 1 and elements > _GGUF_BLOCK_ELEMENTS:
        probe = dequantize(data[:1], tensor.tensor_type)
        result = processor.process(weights=probe, name=tensor.name)
        if result.weights is probe and result.name == tensor.name:
            out = np.empty(shape, BF16)
            flat = out.reshape(-1)
            per_row = elements // data.shape[0]
            step = max(1, _GGUF_BLOCK_ELEMENTS // per_row)
            for lo in range(0, data.shape[0], step):
                block = dequantize(data[lo : lo + step], tensor.tensor_type)
                _to_bf16(np.ascontiguousarray(block), flat[lo * per_row : lo * per_row + block.size])
            return out
    result = processor.process(weights=dequantize(data, tensor.tensor_type), name=tensor.name)
    if result.name != tensor.name:
        raise LoadError(f"{SOURCE_FIELD}: GGUF tensor {tensor.name} is renamed by transformers' processor; not supported")
    weights = np.ascontiguousarray(result.weights)
    if weights.shape != shape:
        raise LoadError(f"{SOURCE_FIELD}: GGUF tensor {tensor.name} has shape {weights.shape}, the model expects {shape}")
    out = np.empty(shape, BF16)
    _to_bf16(weights, out)
    return out


# ---- what only transformers can convert


def _whole_model_stream(request: LoadRequest, model_class: type, config) -> tuple[Any, _Stream, str]:
    """The model loaded whole by transformers (``.bin`` weights, fused-expert checkpoints,
    MoE GGUF files): memory grows with the model here, as before streaming; the weights
    are still written one tensor at a time."""
    import torch

    source = request.source
    try:
        model = model_class.from_pretrained(
            str(_folder(source)), **_gguf_kwargs(source), dtype="auto",
            trust_remote_code=request.trust_remote_code, num_hidden_layers=config.num_hidden_layers,
        )  # fmt: skip
    except Exception as exc:  # safetensors, torch.load, gguf, transformers
        raise _source_failure(source, exc, "cannot load the weights") from None
    source_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    state = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}

    def tensor(name: str) -> np.ndarray:
        return state[name].detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(BF16)

    return model, _Stream({name: (BF16, tuple(t.shape)) for name, t in state.items()}, tensor), source_dtype


def _save_generation_config(folder: Path, model, out: Path) -> None:
    """The generation config a folder model loads with: its generation_config.json, else
    the one transformers derives from the model config."""
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(str(folder))
        except Exception as exc:
            raise LoadError(f"{SOURCE_FIELD}: {folder / 'generation_config.json'}: {first_line(exc)}") from None
    with _writing(out / "generation_config.json"):
        generation.save_pretrained(out)


# ---- random weights


def _random_plan(model) -> dict[str, RandomTensor]:
    """What :data:`RANDOM_RULE` draws for every floating tensor of ``model`` (a meta-device
    model): its shape, its centre and the canonical name its stream is keyed by."""
    aliases = _aliases(model)
    centers = _norm_centers(model)
    plan = {}
    for name, shape in _float_entries(model).items():
        if name not in aliases:
            raise LoadError(f"model.seed_for_random_weight: {name} is a buffer of the model, which random weights cannot fill")
        canonical = aliases[name]
        plan[name] = RandomTensor(shape, centers.get(canonical, 0.0), canonical)
    return plan


def _is_norm(module) -> bool:
    """A normalisation layer, found by type the way transformers' ``_init_weights`` does."""
    from torch import nn

    kind = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)) or "LayerNorm" in kind or "RMSNorm" in kind


def _norm_centers(model) -> dict[str, float]:
    """Parameter name -> the constant the framework initialises a normalisation layer's
    parameter to (1 for a weight, 0 for a bias; 0 for Gemma's ``(1 + weight)`` norms),
    found by running the model's own ``_init_weights`` on an empty CPU copy of the layer."""
    import copy

    import torch

    centers: dict[str, float] = {}
    for prefix, module in model.named_modules():
        own = [name for name, _ in module.named_parameters(recurse=False)]
        if not own or not _is_norm(module):
            continue
        values: dict[str, Any] = {}
        try:
            probe = copy.deepcopy(module).to_empty(device="cpu")
            with torch.no_grad():
                for p in probe.parameters(recurse=False):
                    p.fill_(float("nan"))
            model._init_weights(probe)
            values = {name: p.detach().reshape(-1) for name, p in probe.named_parameters(recurse=False)}
        except Exception:  # a layer the model cannot initialise alone: the usual constants
            pass
        for name in own:
            full = f"{prefix}.{name}" if prefix else name
            value = values.get(name)
            if value is not None and value.numel() and bool(torch.isfinite(value[0])) and bool((value == value[0]).all()):
                centers[full] = float(value[0])
            else:
                centers[full] = 1.0 if name == "weight" else 0.0
    return centers


def _check_vocab(tokenizer_file: Path, config: dict[str, Any], source: ModelSource) -> None:
    """A tokenizer with more tokens than the embedding has rows would emit ids the model
    cannot hold."""
    vocab = config.get("vocab_size")
    if not tokenizer_file.is_file() or not isinstance(vocab, int):
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:
        raise LoadError(f"{SOURCE_FIELD}: {source.path}: the tokenizer cannot be read back ({first_line(exc)})") from None
    if size > vocab and source.path is None:
        raise LoadError(f"model.hf_config.vocab_size: {vocab} is smaller than the {size} tokens of the random-weight "
                        f"model's byte-level tokenizer; use at least {size}")  # fmt: skip
    if size > vocab:
        raise LoadError(f"{SOURCE_FIELD}: {source.path}: the tokenizer has {size} tokens but the model's vocab_size "
                        f"is {vocab} (ids {vocab}..{size - 1} have no embedding row)")  # fmt: skip


def _save_tokenizer(request: LoadRequest, out: Path) -> None:
    from transformers import AutoTokenizer

    source = request.source
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(_folder(source)), **_gguf_kwargs(source), trust_remote_code=request.trust_remote_code
        )
    except Exception as exc:  # tokenizers, sentencepiece, gguf, JSON, OS errors
        raise _source_failure(source, exc, "cannot load the tokenizer") from None
    with _writing(out / "tokenizer.json"):
        tokenizer.save_pretrained(str(out))
    _without_padding(out / "tokenizer.json", source)


def _without_padding(path: Path, source: ModelSource) -> None:
    """Drop the fixed padding / truncation some tokenizer.json files carry (MiniLM pads
    every text to 128): the runtime pads into buckets itself and truncates per task."""
    from tokenizers import Tokenizer

    if not path.is_file():
        return
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # what transformers saved, read back by the tokenizers library
        raise LoadError(f"{SOURCE_FIELD}: {source.path}: the tokenizer cannot be read back ({first_line(exc)})") from None
    if tokenizer.padding is None and tokenizer.truncation is None:
        return
    tokenizer.no_padding()
    tokenizer.no_truncation()
    with _writing(path):
        tokenizer.save(str(path))


# A fixed corpus makes the tokenizer of random-weight models deterministic.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Compilers lower graphs to instructions; simulators execute them.",
    "Tensor, pipeline and data parallelism split a model across processing elements.",
    "def main():\n    print('hello world')\n",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
]


def _write_random_tokenizer(out: Path, vocab_size: int, config: dict[str, Any]) -> None:
    """A byte-level BPE of ``vocab_size`` trained on a fixed corpus, for random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    # Every id the model can emit must decode, so pad the vocabulary to the model's size.
    missing = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(max(missing, 0))])
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": config.get("max_position_embeddings", 2048)}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))

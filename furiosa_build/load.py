"""Load stage: model config, weights (bf16), tokenizer and generation config.

Sources are a Hugging Face folder, a GGUF file, or a config with random weights from
``seed_for_random_weight``.  ``task`` picks the model class: a causal LM for
``generate``, the bare encoder (``AutoModel``) for ``embed``, whose pooling comes from the
model's sentence-transformers files (``load_pooling``).  The result is written once as a
bf16 safetensors file plus tokenizer files in a folder keyed by the content hash of the
source and the options, so a second build (or a dry run) never converts the model again.

The model cache, ``<cache_dir>/models/<key>/``, holds ``config.json``, the weights, the
tokenizer files and ``entry.json``: the sha256 and size of every other file, written last.
An entry is converted in a scratch folder beside it (:mod:`furiosa_build.scratch`) and
renamed into place whole, and it is verified on every read: a damaged, incomplete or
mistyped entry is reported in one warning line, removed and converted again.  When the
cache cannot be used (a file where a folder should be, read-only, full) the model is
converted into a scratch folder under the system temp dir instead, which the build removes.

Every error met while reading the user's model (transformers, safetensors, gguf,
tokenizers, JSON, the OS) is a one-line :class:`LoadError` naming the file or the field.
"""

from __future__ import annotations

import difflib
import errno
import json
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from furiosa_build.cache import canonical_json, first_line, first_non_folder, reason
from furiosa_build.errors import BuildIOError, io_error
from furiosa_build.scratch import atomic_write, make_scratch, remove, remove_stale, temp_root
from furiosa_build.sources import ModelSource
from furiosa_runtime.artifact import PoolingConfig, sha256_file

LOADER_VERSION = "2"  # 2: entries carry entry.json and live in <cache_dir>/models/<key>
WEIGHTS_FILE = "model.safetensors"
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

    def key(self) -> str:
        """Content hash of the source plus every option that changes the loaded weights."""
        import hashlib

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


@dataclass(frozen=True)
class LoadedModel:
    """A converted model on disk: ``folder`` holds config.json, weights and tokenizer files.

    ``temporary`` models were converted outside the cache, into ``folder.parent`` (a
    scratch folder under the system temp dir) that the build removes when it is done.
    """

    folder: Path
    hf_config: dict[str, Any]
    temporary: bool = False

    @property
    def weights_file(self) -> Path:
        return self.folder / WEIGHTS_FILE

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in (*TOKENIZER_FILES, "generation_config.json") if (self.folder / n).is_file()]


# --------------------------------------------------------------------------- config


def load_config(request: LoadRequest) -> dict[str, Any]:
    """The Hugging Face config alone (cheap: no weights), with overrides applied."""
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
            config = _convert(request, scratch)
            _write_entry(scratch, key)
            return self._publish(scratch, folder, key, config)
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
    for name in (WEIGHTS_FILE, "config.json"):
        if name not in files:
            raise _Damaged(f"{ENTRY_FILE} does not list {name}")
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
    return config


def _write_entry(folder: Path, key: str) -> None:
    """Write ``entry.json``, the manifest of every file of a finished conversion (last)."""
    files = {}
    for path in sorted(folder.iterdir()):
        assert path.is_file() and not path.is_symlink(), f"{path}: a model cache entry holds only files"
        files[path.name] = {"sha256": sha256_file(path), "size": path.stat().st_size}
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
        config = _convert(request, root / key)
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


def _convert(request: LoadRequest, out: Path) -> dict[str, Any]:
    import torch

    source = request.source
    model_class = auto_model_class(request.task)
    config_dict = load_config(request)
    config = _config_for_model(config_dict, "model.hf_config")
    if source.kind == "config":
        torch.manual_seed(request.seed_for_random_weight or 0)
        model = _from_config(model_class, config, config_dict)
        source_dtype = str(config_dict.get("dtype") or config_dict.get("torch_dtype") or "bfloat16")
        with _writing(out / "tokenizer.json"):
            _write_random_tokenizer(out, int(config_dict["vocab_size"]), config_dict)
    else:
        overrides = {"num_hidden_layers": config.num_hidden_layers}
        try:
            model = model_class.from_pretrained(
                str(_folder(source)), **_gguf_kwargs(source), dtype="auto",
                trust_remote_code=request.trust_remote_code, **overrides,
            )  # fmt: skip
        except Exception as exc:  # safetensors, torch.load, gguf, transformers
            raise _source_failure(source, exc, "cannot load the weights") from None
        source_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if source.kind == "gguf" or _has_tokenizer_sources(_folder(source)):
            _save_tokenizer(request, out)
        if getattr(model, "generation_config", None) is not None and source.kind == "folder":
            with _writing(out / "generation_config.json"):
                model.generation_config.save_pretrained(out)
    _check_vocab(out / "tokenizer.json", config_dict, source)
    if source_dtype not in ALLOWED_DTYPES and not request.auto_bfloat16_cast:
        raise LoadError(
            f"model.auto_bfloat16_cast: the model's weights are {source_dtype}; builds use bfloat16, "
            "so set auto_bfloat16_cast=true to allow the cast"
        )
    if request.seed_for_random_weight is not None and source.kind != "config":
        torch.manual_seed(request.seed_for_random_weight)
        model = _from_config(model_class, model.config, config_dict)
    config_dict["dtype"] = "bfloat16"
    with _writing(out / WEIGHTS_FILE):
        _save_bf16(model, out / WEIGHTS_FILE)
    with _writing(out / "config.json"):
        (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    return config_dict


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


def _save_bf16(model, path: Path) -> None:
    import ml_dtypes
    import torch
    from safetensors.numpy import save_file

    tensors = {
        name: t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    }
    save_file(tensors, str(path))


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

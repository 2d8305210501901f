"""Load stage: model config, weights (bf16), tokenizer and generation config.

Sources are a Hugging Face folder, a GGUF file, or a config with random weights from
``seed_for_random_weight``.  ``task`` picks the model class: a causal LM for
``generate``, the bare encoder (``AutoModel``) for ``embed``, whose pooling comes from the
model's sentence-transformers files (``load_pooling``).

:func:`load` converts a model once per :meth:`LoadRequest.key` and reuses the conversion
after that.  The stage's parts, each a module:

* :mod:`furiosa_build.model_cache`: the verified ``<cache_dir>/models/<key>/`` entries,
  the temporary folder when the cache cannot be used, and :class:`LoadedModel`;
* :mod:`furiosa_build.convert`: converting a source into an entry's files (weights,
  config, tokenizer, generation config);
* :mod:`furiosa_build.weight_streams`: a checkpoint's tensors one at a time in bf16
  (safetensors folders, GGUF files, or the whole model through transformers);
* :mod:`furiosa_build.weight_sources`: the converted weights, stored or random, and the
  random-weight rule (:data:`~furiosa_build.weight_sources.RANDOM_RULE`);
* :mod:`furiosa_build.hf_model`: the model without its weights: config
  (:func:`load_config`), model class, meta-device instance;
* :mod:`furiosa_build.source_files`: reading the user's files, every error a one-line
  :class:`LoadError`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from furiosa_build.cache import canonical_json
from furiosa_build.hf_model import load_config
from furiosa_build.model_cache import LOADER_VERSION, LoadedModel, ModelCache, load_temporary
from furiosa_build.source_files import SOURCE_FIELD, LoadError, read_json, source_folder, unreadable
from furiosa_build.source_memo import SourceMemo
from furiosa_build.sources import ModelSource
from furiosa_build.weight_sources import ShapeOnlyWeights, WeightSource, random_state_dict
from furiosa_runtime.npu.artifact import PoolingConfig, sha256_file

__all__ = ["LoadError", "LoadRequest", "LoadedModel", "ShapeOnlyModel", "load", "load_config", "load_pooling", "random_state_dict"]


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
                raise unreadable(path, exc) from None
            for file in files:
                try:
                    digest.update(file.name.encode() + sha256_file(file).encode())
                except OSError as exc:
                    raise unreadable(file, exc) from None
        return digest.hexdigest()


def load(request: LoadRequest, models_dir: Path | None) -> LoadedModel:
    """Convert the model to a bf16 folder, reusing a previous conversion when possible.

    ``models_dir`` is the model cache (``<cache_dir>/models``), or None to convert into a
    temporary folder.  Cache problems warn and fall back to a temporary folder.
    """
    key = request.key()
    loaded = ModelCache(Path(models_dir).expanduser()).load(request, key) if models_dir is not None else None
    if loaded is None:
        loaded = load_temporary(request, key)
    if not (loaded.folder / "tokenizer.json").is_file():
        warnings.warn(
            f"{SOURCE_FIELD}: {request.source.path} has no tokenizer files, so the artifact has no tokenizer: "
            "text prompts will not work, token ids will", stacklevel=2,
        )  # fmt: skip
    return loaded


@dataclass(frozen=True)
class ShapeOnlyModel:
    """A model known by its config alone, for a shape-only build (``build.weights=none``):
    nothing of the source but its config is read, nothing is converted or cached, and the
    artifact gets no weights nor tokenizer, so a model of any size is planned in minutes."""

    hf_config: dict[str, Any]
    task: str

    def weights(self) -> WeightSource:
        return ShapeOnlyWeights(self.hf_config, self.task)

    def tokenizer_files(self) -> list[Path]:
        return []


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
    folder = source_folder(request.source) if request.source.path is not None else None
    if folder is None or not (folder / "modules.json").is_file():
        return PoolingConfig()
    modules = read_json(folder / "modules.json", [])
    if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in modules):
        raise LoadError(f"{SOURCE_FIELD}: {folder / 'modules.json'}: not a list of modules with a 'type' each")
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
    if "Pooling" not in kinds:
        raise LoadError(f"model.pooling: {folder / 'modules.json'} has no Pooling module; set model.pooling explicitly")
    settings = read_json(folder / str(kinds["Pooling"].get("path", "")) / "config.json", {})
    if not isinstance(settings, dict):
        raise LoadError(f"{SOURCE_FIELD}: {folder / str(kinds['Pooling'].get('path', '')) / 'config.json'}: not a JSON object")
    modes = [name for name, on in settings.items() if name.startswith("pooling_mode_") and on]
    allowed = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in allowed:
        raise LoadError(f"model.pooling: sentence-transformers pooling {modes} is not supported yet (only "
                        "pooling_mode_mean_tokens or pooling_mode_cls_token)")  # fmt: skip
    sbert = read_json(folder / "sentence_bert_config.json", {})
    max_len = sbert.get("max_seq_length") if isinstance(sbert, dict) else None
    return PoolingConfig(mode=allowed[modes[0]], normalize="Normalize" in kinds, max_seq_length=max_len)

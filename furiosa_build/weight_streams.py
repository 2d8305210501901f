"""A checkpoint's weights as a stream of bf16 tensors, one at a time.

Weights stream: memory is bounded by one tensor, never by the model.  The model's
names, shapes and tied parameters come from an instance on the meta device (no memory);
a safetensors checkpoint (one file or sharded with an index) is read one tensor at a time
and renamed by transformers' own rules; a GGUF file is de-quantised tensor by tensor with
transformers' GGUF name map and tensor processors (q/k ``reverse_permute``...), large
tensors a block of rows at a time.  Each tensor is rounded to bfloat16 as torch's
``.to(torch.bfloat16)`` would.  Checkpoints only transformers can convert (``.bin`` files,
fused-expert conversions, MoE GGUF files) are loaded whole by transformers, as before
(:func:`whole_model_stream`); their tensors are still handed out one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from furiosa_build.cache import first_line
from furiosa_build.hf_model import canonical_names, float_entries
from furiosa_build.safetensors_file import SafetensorsFormatError, StoredTensor, TensorSpec, read_header, read_tensor
from furiosa_build.source_files import (
    SOURCE_FIELD,
    LoadError,
    gguf_kwargs,
    read_json,
    source_failure,
    source_folder,
    unreadable,
)
from furiosa_build.sources import ModelSource
from furiosa_build.weight_sources import BF16, WEIGHTS_FILE

if TYPE_CHECKING:
    from furiosa_build.load import LoadRequest

_FLOAT8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))


@dataclass(frozen=True)
class Stream:
    """Weights to write: the spec of every tensor, one bf16 tensor produced at a time."""

    specs: dict[str, TensorSpec]
    tensor: Callable[[str], np.ndarray]


# ---- safetensors folders


def checkpoint_files(folder: Path) -> list[Path] | None:
    """The safetensors files transformers would read from ``folder`` (a sharded index, or
    ``model.safetensors``); None when the weights are not safetensors (``.bin``)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, {})
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{SOURCE_FIELD}: {index}: not a safetensors index (no weight_map of file names)")
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / WEIGHTS_FILE
    return [single] if single.is_file() else None


def folder_stream(source: ModelSource, model) -> Stream | None:
    """Stream a safetensors checkpoint tensor by tensor, renamed the way transformers
    renames checkpoint keys for this model; None when only transformers can convert it
    (``.bin`` weights, many-to-one conversions such as fused experts, missing or
    mismatched tensors, which transformers fills or reports)."""
    folder = source_folder(source)
    files = checkpoint_files(folder)
    if files is None:
        return None
    stored: dict[str, tuple[Path, StoredTensor]] = {}
    for file in files:
        try:
            header = read_header(file)
        except OSError as exc:
            raise unreadable(file, exc) from None
        except SafetensorsFormatError as exc:
            raise LoadError(f"{SOURCE_FIELD}: {file}: truncated or not a safetensors file ({exc})") from None
        stored.update((name, (file, entry)) for name, entry in header.items())
    found = _checkpoint_names(model, list(stored))
    if found is None:
        return None
    aliases = canonical_names(model)
    plan: dict[str, tuple[Path, StoredTensor]] = {}
    for name, shape in float_entries(model).items():
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
            raise unreadable(file, exc) from None
        except SafetensorsFormatError as exc:
            raise LoadError(f"{SOURCE_FIELD}: {file}: truncated or not a safetensors file ({exc})") from None

    return Stream({name: (BF16, entry.shape) for name, (_, entry) in plan.items()}, tensor)


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


def gguf_stream(path: Path, model, config_dict: dict[str, Any]) -> Stream | None:
    """De-quantise a GGUF file tensor by tensor with the same name map and per-tensor
    processing as transformers' ``load_gguf_checkpoint``; None when its processor needs
    several tensors at once (then transformers converts the model whole)."""
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

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
        raise source_failure(ModelSource("gguf", path), exc, "cannot read the weights") from None
    by_name: dict[str, Any] = {}
    for tensor in reader.tensors:
        target = mapping.get(tensor.name)
        if target is None:
            continue  # a tensor this model does not have (layers beyond num_hidden_layers...)
        if target in by_name:
            return None
        by_name[target] = tensor
    aliases = canonical_names(model)
    plan = {}
    for name, shape in float_entries(model).items():
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

    return Stream({name: (BF16, _float_shape(t)) for name, t in plan.items()}, produce)


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


def whole_model_stream(request: LoadRequest, model_class: type, config) -> tuple[Any, Stream, str]:
    """The model loaded whole by transformers (``.bin`` weights, fused-expert checkpoints,
    MoE GGUF files): memory grows with the model here, as before streaming; the weights
    are still written one tensor at a time."""
    import torch

    source = request.source
    try:
        model = model_class.from_pretrained(
            str(source_folder(source)), **gguf_kwargs(source), dtype="auto",
            trust_remote_code=request.trust_remote_code, num_hidden_layers=config.num_hidden_layers,
        )  # fmt: skip
    except Exception as exc:  # safetensors, torch.load, gguf, transformers
        raise source_failure(source, exc, "cannot load the weights") from None
    source_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    state = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}

    def tensor(name: str) -> np.ndarray:
        return state[name].detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(BF16)

    return model, Stream({name: (BF16, tuple(t.shape)) for name, t in state.items()}, tensor), source_dtype

"""Write a safetensors file one tensor at a time, hashing the bytes as they go out.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte offsets; padded with spaces to a multiple of 8) and the tensors' bytes in
header order.  Writing it here instead of through ``safetensors.numpy.save_file`` keeps
only one tensor in flight, gives the file's sha256 without reading it back, and
surfaces OS errors (a full disk) as ``OSError`` rather than the library's own error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}  # fmt: skip

TensorSpec = tuple[np.dtype, tuple[int, ...]]


def write_safetensors(path: Path, specs: Mapping[str, TensorSpec], tensor: Callable[[str], np.ndarray]) -> str:
    """Write the tensors ``specs`` describes (in name order), asking ``tensor(name)`` for
    each in turn, to a new file at ``path``; return the file's sha256."""
    names = sorted(specs)
    header, offset = {}, 0
    for name in names:
        dtype, shape = specs[name]
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    digest = hashlib.sha256()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        for chunk in (len(text).to_bytes(8, "little"), text):
            f.write(chunk)
            digest.update(chunk)
        for name in names:
            data = _checked(name, tensor(name), specs[name])
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def specs_of(tensors: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    """The dtype and shape of every array of ``tensors``."""
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _code(dtype: np.dtype) -> str:
    try:
        return _DTYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"safetensors has no dtype for {np.dtype(dtype).name}") from None


def _checked(name: str, array: np.ndarray, spec: TensorSpec) -> memoryview:
    """The little-endian C-order bytes of ``array``, which must match its spec."""
    dtype, shape = spec
    assert array.dtype == dtype and tuple(array.shape) == tuple(shape), f"{name}: {array.dtype}{array.shape} != {spec}"
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8))

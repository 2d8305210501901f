"""Write a safetensors file one tensor at a time, hashing the bytes as they go out, and
read one back one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte offsets; padded with spaces to a multiple of 8) and the tensors' bytes in
header order.  Writing it here instead of through ``safetensors.numpy.save_file`` keeps
only one tensor in flight, gives the file's sha256 without reading it back, and
surfaces OS errors (a full disk) as ``OSError`` rather than the library's own error.
Reading it here (:func:`read_header`, :func:`read_tensor`) handles bfloat16, which
``safetensors.safe_open(framework="numpy")`` cannot return, and reads a tensor's bytes
with plain ``pread`` calls (row blocks, when the caller converts as it reads), so neither
the file nor more than the tensor asked for is ever mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64",
}  # fmt: skip

_CODES = {code: dtype for dtype, code in _DTYPES.items()}
_MAX_HEADER = 100_000_000

TensorSpec = tuple[np.dtype, tuple[int, ...]]


class SafetensorsFormatError(ValueError):
    """A file is not a well-formed safetensors file (the message says why)."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor of a safetensors file lies: its dtype, shape and absolute byte range."""

    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    nbytes: int


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
            del data  # before the next tensor is made: only one is ever held here
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


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors file at ``path``, without reading any tensor data.

    Raises :class:`SafetensorsFormatError` for a malformed or truncated file, OSError when
    it cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise SafetensorsFormatError("shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, _MAX_HEADER):
            raise SafetensorsFormatError(f"header length {length} exceeds the file")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise SafetensorsFormatError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _CODES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(f"{name}: not a tensor entry with a known dtype") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if begin < 0 or end - begin != nbytes or base + end > size:
            raise SafetensorsFormatError(f"{name}: byte range [{begin}, {end}) does not fit its shape or the file")
        tensors[name] = StoredTensor(dtype, shape, base + begin, nbytes)
    return tensors


def read_tensor(path: Path, stored: StoredTensor, convert: Callable[[np.ndarray, np.ndarray], None] | None = None,
                dtype: np.dtype | None = None, block_bytes: int = 64 << 20) -> np.ndarray:
    """Read one tensor of the file at ``path``.

    Without ``convert`` the tensor comes back in its stored dtype.  With it, the result
    is a new array of ``dtype`` filled block by block: ``convert(source_block, out_block)``
    turns each block of at most ``block_bytes`` source bytes (whole rows of the flattened
    tensor) into the matching slice of the result, so a conversion never holds the whole
    tensor in its source dtype."""
    with open(path, "rb", buffering=0) as f:
        if convert is None:
            out = np.empty(stored.shape, stored.dtype)
            _read_into(f, stored.start, memoryview(out.reshape(-1).view(np.uint8)))
            return out
        assert dtype is not None
        out = np.empty(stored.shape, dtype)
        flat = out.reshape(-1)
        step = max(1, block_bytes // stored.dtype.itemsize)
        buffer = np.empty(min(step, flat.size), stored.dtype)
        for lo in range(0, flat.size, step):
            block = buffer[: min(step, flat.size - lo)]
            _read_into(f, stored.start + lo * stored.dtype.itemsize, memoryview(block.view(np.uint8)))
            convert(block, flat[lo : lo + block.size])
        return out


def _read_into(f, offset: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(f.fileno(), [view[done:]], offset + done)
        if n == 0:
            raise SafetensorsFormatError("the file ends inside a tensor")
        done += n

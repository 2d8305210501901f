"""Write a safetensors file one tensor at a time, hashing the bytes as they go out, and
read one back one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte offsets; padded with spaces to a multiple of 8) and the tensors' bytes in
header order.  Writing it here instead of through ``safetensors.numpy.save_file`` keeps
only one tensor in flight, gives the file's sha256 without reading it back, and
surfaces OS errors (a full disk) as ``OSError`` rather than the library's own error.
Reading it here (:func:`read_header`, :func:`read_tensor`) handles bfloat16, which
``safetensors.safe_open(framework="numpy")`` cannot return: the header is checked by the
runtime's own parser (``furiosa_runtime.npu.weights.parse_header``, one set of rules and
dtype names for both sides), and a tensor's bytes are read with plain ``pread`` calls (row
blocks, when the caller converts as it reads), so no more than the tensor asked for is
ever held in memory.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from furiosa_runtime.npu.weights import SAFETENSORS_DTYPES, SafetensorsFormatError, parse_header, safetensors_dtype

TensorSpec = tuple[np.dtype, tuple[int, ...]]


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
    code = safetensors_dtype(dtype)
    if code not in SAFETENSORS_DTYPES:
        raise TypeError(f"safetensors has no dtype for {np.dtype(dtype).name}")
    return code


def _checked(name: str, array: np.ndarray, spec: TensorSpec) -> memoryview:
    """The little-endian C-order bytes of ``array``, which must match its spec."""
    dtype, shape = spec
    assert array.dtype == dtype and tuple(array.shape) == tuple(shape), f"{name}: {array.dtype}{array.shape} != {spec}"
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8))


def read_header(path: Path) -> dict[str, StoredTensor]:
    """Every tensor of the safetensors file at ``path``, without reading any tensor data
    (the runtime's parser, over a read-only mapping of the file).

    Raises :class:`SafetensorsFormatError` for a malformed or truncated file, OSError when
    it cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise SafetensorsFormatError(f"{size} bytes, shorter than the 8-byte header length")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            entries, base = parse_header(mapped)
    return {name: StoredTensor(dtype, shape, base + start, end - start) for name, (dtype, shape, start, end) in entries.items()}


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

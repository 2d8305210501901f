"""Weights as the simulator holds them: mapped from the artifact, widened within a budget.

``map_safetensors`` turns an open ``.safetensors`` file into read-only NumPy arrays that
are views of one ``mmap`` of the file (the page cache), never private copies: loading a
16 GB artifact costs address space, not 16 GB of process memory, and pages are read as
the kernels touch them.  The caller maps the very descriptor ``ArtifactFiles.open_verified``
hashed, so what is mapped is the verified file (the mapping keeps that inode alive even if
the path is later renamed over; a build never rewrites an artifact file in place).

The kernels compute in float32 (``isa.py``): a bf16 weight is widened when read.
``WidenedWeights`` keeps at most ``budget`` bytes of those float32 copies, evicting the
least recently used first; a weight that needs no widening is handed out as stored (no
copy, nothing counted).  Outputs do not depend on the budget: a widened copy is the same
bytes whether it was kept or made again (budget 0 widens on every use).
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections import Counter, OrderedDict
from collections.abc import Collection
from typing import BinaryIO

import ml_dtypes
import numpy as np

#: safetensors dtype names -> NumPy dtypes (little-endian, as the format stores them).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap


class SafetensorsFormatError(ValueError):
    """Bytes that are not a well-formed safetensors file (the reason, in one line)."""


def safetensors_dtype(dtype: np.dtype) -> str:
    """The safetensors name of a NumPy dtype (``BF16``...)."""
    return _NAMES.get(np.dtype(dtype), str(dtype))


def parse_header(buffer: memoryview | bytes | mmap.mmap) -> tuple[dict[str, tuple[np.dtype, tuple[int, ...], int, int]], int]:
    """The tensors of a safetensors buffer: name -> (dtype, shape, start, end) with offsets
    from the start of the data section, and where that section starts.

    Checked as the safetensors library checks: an 8-byte little-endian header length
    within the buffer, a JSON object header (``__metadata__`` aside) of known dtypes,
    non-negative shapes and offsets whose spans match the shapes, the tensors tiling the
    data section with neither gap nor overlap to its very end.
    """
    size = len(buffer)
    if size < 8:
        raise SafetensorsFormatError(f"{size} bytes, shorter than the 8-byte header length")
    length = int.from_bytes(buffer[:8], "little")
    if length > MAX_HEADER_BYTES:
        raise SafetensorsFormatError(f"header of {length} bytes is larger than {MAX_HEADER_BYTES}")
    if 8 + length > size:
        raise SafetensorsFormatError(f"header of {length} bytes runs past the end of the {size}-byte file (truncated?)")
    try:
        header = json.loads(bytes(buffer[8 : 8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SafetensorsFormatError(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"header must be a JSON object, got {type(header).__name__}")
    data_bytes = size - 8 - length
    entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(name, info)
    covered = 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if start != covered:
            raise SafetensorsFormatError(f"tensor {name} starts at byte {start} of the data, expected {covered} (gap or overlap)")
        covered = end
    if covered != data_bytes:
        raise SafetensorsFormatError(f"the tensors cover {covered} bytes of data but the file holds {data_bytes} (truncated?)")
    return entries, 8 + length


def _entry(name: str, info: object) -> tuple[np.dtype, tuple[int, ...], int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFormatError(f"tensor {name} must be described by dtype, shape and data_offsets, got {info!r:.80}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise SafetensorsFormatError(f"tensor {name} has the unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"tensor {name} has an invalid shape {shape!r:.80}")
    valid = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    if not valid or not 0 <= offsets[0] <= offsets[1]:
        raise SafetensorsFormatError(f"tensor {name} has invalid data_offsets {offsets!r:.80}")
    start, end = offsets
    nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
    if end - start != nbytes:
        raise SafetensorsFormatError(f"tensor {name} of shape {shape} ({dtype}) needs {nbytes} bytes but data_offsets span {end - start}")
    return SAFETENSORS_DTYPES[dtype], tuple(shape), start, end


def map_safetensors(f: BinaryIO) -> dict[str, np.ndarray]:
    """Every tensor of the open safetensors file ``f``, as read-only views of one mapping of
    its descriptor (zero-copy; pages are read when touched).  The mapping lives as long as
    any of the arrays.  Raises ``SafetensorsFormatError`` for malformed content."""
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise SafetensorsFormatError(f"{size} bytes, shorter than the 8-byte header length")
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    entries, data_start = parse_header(mapped)
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        count = (end - start) // dtype.itemsize
        array = np.frombuffer(mapped, dtype=dtype, count=count, offset=data_start + start).reshape(shape)
        tensors[name] = array  # read-only: the mapping is ACCESS_READ
    return tensors


# -- the widened-weight budget ------------------------------------------------------------

WIDE_DTYPE = np.dtype(np.float32)
#: Without an explicit budget: this share of the memory left once the mapped weights and
#: the KV cache are counted (``default_budget``).
DEFAULT_BUDGET_SHARE = 0.5


def needs_widening(dtype: np.dtype) -> bool:
    """Whether a stored weight is widened to float32 before the kernels read it (bf16, and
    any other ml_dtypes float stored as a void-kind dtype)."""
    return dtype.kind == "V" or dtype == SAFETENSORS_DTYPES["BF16"]


def widened_nbytes(array: np.ndarray) -> int:
    return array.size * WIDE_DTYPE.itemsize


def available_memory() -> int | None:
    """Bytes the machine can still give: ``MemAvailable`` (free plus reclaimable page cache),
    else the free pages; None when neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def default_budget(largest: int, mapped: int, reserved: int = 0, available: int | None = None) -> int:
    """The widened-weight budget when none is given: half of what the machine has left once
    the mapped weights (``mapped``, which end up in the page cache) and ``reserved`` bytes
    (the KV cache) are set aside, but never less than ``largest``, the biggest single
    widened weight, so the cache always holds at least one."""
    available = available_memory() if available is None else available
    left = 0 if available is None else max(0, available - mapped - reserved)
    return max(largest, int(left * DEFAULT_BUDGET_SHARE))


def check_budget(value: object) -> None:
    """A budget is None (the default) or an integer >= 0 (a bool is not)."""
    if value is None:
        return
    if not isinstance(value, int | np.integer) or isinstance(value, bool):
        raise ValueError(f"weight_cache_bytes must be None or an integer >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"weight_cache_bytes must be >= 0, got {value}")


class WidenedWeights:
    """float32 copies of stored weights, at most ``budget`` bytes, least recently used
    evicted first; keyed by tensor name (the same tensor on every PE and replica).

    ``get`` returns the weight the kernels read: as stored when it needs no widening,
    else its float32 copy, kept when it fits the budget.  Room is made before a copy is
    made, so the kept copies never exceed the budget; a weight larger than the whole budget
    is widened for the use at hand and dropped after it.  ``stats`` counts hits, misses,
    evictions and widened bytes.

    The copies of the tensors named in ``column_major`` are laid out column-major: a
    ``linear`` instruction multiplies by the transpose of its ``[N, K]`` weight, and the
    transpose of a column-major copy is the row-major ``[K, N]`` operand BLAS multiplies
    fastest (the GEMMs of a 64-row decode step take about an eighth less time than with a
    transposed row-major one).  The values are the same in either layout.
    """

    def __init__(self, budget: int, column_major: Collection[str] = ()) -> None:
        check_budget(budget)
        self.budget = int(budget)
        self.column_major = frozenset(column_major)
        self.used = 0
        self._kept: OrderedDict[str, np.ndarray] = OrderedDict()
        self.stats: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._kept)

    def __contains__(self, name: object) -> bool:
        return name in self._kept

    def get(self, name: str, stored: np.ndarray) -> np.ndarray:
        if not needs_widening(stored.dtype):
            return stored
        wide = self._kept.get(name)
        if wide is not None:
            self._kept.move_to_end(name)
            self.stats["hits"] += 1
            return wide
        self.stats["misses"] += 1
        nbytes = widened_nbytes(stored)
        keep = nbytes <= self.budget
        if keep:
            while self.used + nbytes > self.budget:
                _, old = self._kept.popitem(last=False)
                self.used -= old.nbytes
                self.stats["evictions"] += 1
        wide = stored.astype(WIDE_DTYPE, order="F" if name in self.column_major else "C")
        wide.flags.writeable = False  # shared by every use and replica
        self.stats["widened_bytes"] += nbytes
        if keep:
            self._kept[name] = wide
            self.used += nbytes
        return wide

    def kept(self) -> dict[str, int]:
        """The weights kept widened, least recently used first, with their bytes."""
        return {name: wide.nbytes for name, wide in self._kept.items()}

    def clear(self) -> None:
        self._kept.clear()
        self.used = 0


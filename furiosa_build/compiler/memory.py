"""Static memory planning: liveness of every intermediate value and its arena offset.

Values are placed first-fit in one activation arena by live interval (from the
instruction that defines them to their last reader), so buffers whose lifetimes do not
overlap share space.  The plan gives the peak activation footprint of a program, and
each instruction's ``free`` list lets the simulator release values at last use.
"""

from __future__ import annotations

from furiosa_build.compiler.lower import Lowered
from furiosa_runtime.npu.isa import DTYPES, Instruction, MemoryPlan

ALIGN = 64


def _aligned(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def last_uses(lowered: Lowered) -> dict[str, int]:
    """Index of the last instruction reading each value (outputs live to the end)."""
    last: dict[str, int] = {}
    for index, inst in enumerate(lowered.instructions):
        for name in inst.ins:
            last[name] = index
    for name in lowered.outputs:
        last[name] = len(lowered.instructions)
    return last


def plan_memory(lowered: Lowered) -> tuple[list[Instruction], MemoryPlan]:
    """Annotate instructions with the values they free and place values in the arena."""
    last = last_uses(lowered)
    transient = {o for inst in lowered.instructions for o in inst.outs}
    placed: list[tuple[int, int, int]] = []  # (offset, size, end)
    offsets: dict[str, int] = {}
    annotated: list[Instruction] = []
    for index, inst in enumerate(lowered.instructions):
        live = [p for p in placed if p[2] >= index]
        for out in inst.outs:
            spec = lowered.values[out]
            size = _aligned(max(spec.nbytes, DTYPES[spec.dtype].itemsize))
            offsets[out] = _first_fit(live, size)
            entry = (offsets[out], size, last.get(out, index))
            live.append(entry)
            placed.append(entry)
        frees = tuple(sorted(n for n in set(inst.ins) if last.get(n) == index and n in transient))
        annotated.append(inst.model_copy(update={"free": frees}))
    arena = max((o + s for o, s, _ in placed), default=0)
    return annotated, MemoryPlan(arena_bytes=arena, offsets=offsets)


def _first_fit(live: list[tuple[int, int, int]], size: int) -> int:
    offset = 0
    for start, length, _ in sorted(live):
        if offset + size <= start:
            return offset
        offset = max(offset, start + length)
    return offset

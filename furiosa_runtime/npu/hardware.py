"""The hardware description of the simulated NPU (RNGD-class), in one place.

``HardwareSpec`` holds every figure the simulator and the timing model use.  Its defaults
are RNGD's, and ``conf/hardware/rngd.yaml`` repeats them with where each comes from: the
public per-chip figures (8 processing elements (PEs), BF16 256 TFLOPS, FP8/INT8 512
TFLOPS/TOPS, 48 GB HBM3 at 1.5 TB/s, 256 MB SRAM, 150 W, 1 GHz) and the assumptions the
timing model needs beyond them (links, dispatch, efficiencies).  A PE gets an equal share
of compute, memory and bandwidth.  A build records the description it was built for in
the artifact (``Artifact.hardware``); the runtime can be given another one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

GB = 1024**3


class HardwareSpec(BaseModel):
    """One NPU model: published figures and timing-model assumptions (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(default="RNGD", min_length=1)
    pes_per_device: int = Field(default=8, ge=1)
    bf16_tflops: float = Field(default=256.0, gt=0)
    fp8_tflops: float = Field(default=512.0, gt=0)
    int8_tops: float = Field(default=512.0, gt=0)
    hbm_bytes: int = Field(default=48 * GB, gt=0)
    hbm_bandwidth: float = Field(default=1.5e12, gt=0)  # bytes/s
    sram_bytes: int = Field(default=256 * 1024**2, ge=0)
    power_watts: float = Field(default=150.0, gt=0)
    clock_hz: float = Field(default=1.0e9, gt=0)
    # Timing-model assumptions (not published figures): links between the PEs of one device,
    # the device-to-device link (PCIe Gen5 x16), the latency of one hop, the cycles to
    # dispatch one instruction, and the share of the peak compute and HBM bandwidth a
    # kernel sustains.
    pe_link_bandwidth: float = Field(default=256e9, gt=0)  # bytes/s
    device_link_bandwidth: float = Field(default=64e9, gt=0)  # bytes/s
    link_latency_seconds: float = Field(default=1e-6, ge=0)
    dispatch_cycles: int = Field(default=100, ge=0)
    compute_efficiency: float = Field(default=0.75, gt=0, le=1)  # large GEMMs sustain ~70-80% of peak
    hbm_efficiency: float = Field(default=0.85, gt=0, le=1)  # HBM streams at ~80-90% of its pin bandwidth

    @property
    def pe_hbm_bytes(self) -> int:
        return self.hbm_bytes // self.pes_per_device

    @property
    def pe_flops(self) -> float:
        """A PE's sustained share of the BF16 peak, FLOP/s."""
        return self.bf16_tflops * 1e12 * self.compute_efficiency / self.pes_per_device

    @property
    def pe_fp8_flops(self) -> float:
        """A PE's sustained share of the FP8 peak, FLOP/s (the W8A8 linear layers)."""
        return self.fp8_tflops * 1e12 * self.compute_efficiency / self.pes_per_device

    @property
    def pe_hbm_bandwidth(self) -> float:
        """A PE's sustained share of the HBM bandwidth, bytes/s."""
        return self.hbm_bandwidth * self.hbm_efficiency / self.pes_per_device

    @property
    def pe_sram_bytes(self) -> int:
        return self.sram_bytes // self.pes_per_device


RNGD = HardwareSpec()

_DEVICE = re.compile(r"^npu:(\d+)(?::(\d+)(?:-(\d+))?)?$")


@dataclass(frozen=True)
class DeviceRef:
    """A parsed device string: ``npu:D`` (all PEs), ``npu:D:P`` or ``npu:D:P-Q`` (fused PEs)."""

    device: int
    pes: tuple[int, ...]

    def __str__(self) -> str:
        if len(self.pes) == RNGD.pes_per_device:
            return f"npu:{self.device}"
        if len(self.pes) == 1:
            return f"npu:{self.device}:{self.pes[0]}"
        return f"npu:{self.device}:{self.pes[0]}-{self.pes[-1]}"

    def pe(self, index: int) -> str:
        return f"npu:{self.device}:{self.pes[index]}"


@dataclass(frozen=True)
class Mesh:
    """The PEs of a run arranged as ``dp`` replicas x ``pp`` pipeline stages x ``tp`` shards.

    PEs are taken in the order the devices string lists them, shards innermost, so a
    tensor-parallel group is a run of neighbouring PEs and, with one device per stage,
    pipeline stages land on different devices.
    """

    pes: tuple[str, ...]
    tp: int
    pp: int
    dp: int

    def pe(self, replica: int, stage: int, rank: int) -> str:
        return self.pes[(replica * self.pp + stage) * self.tp + rank]

    def group(self, replica: int, stage: int) -> list[str]:
        """The tensor-parallel group of one stage of one replica."""
        return [self.pe(replica, stage, rank) for rank in range(self.tp)]


def device_of(pe: str) -> str:
    """``npu:D:P`` -> ``npu:D``."""
    return pe.rsplit(":", 1)[0]


def plan_mesh(devices: str, tp: int, pp: int, dp: int | None, hw: HardwareSpec = RNGD) -> Mesh:
    """Lay ``tp * pp * dp`` PEs out over ``devices``; ``dp=None`` uses every remaining PE.

    Raises ValueError as one line ``<field>: <problem>`` naming devices,
    tensor_parallel_size, pipeline_parallel_size or data_parallel_size.
    """
    pes = [ref.pe(i) for ref in parse_devices(devices, hw) for i in range(len(ref.pes))]
    repeated = sorted({pe for pe in pes if pes.count(pe) > 1})
    if repeated:
        raise ValueError(f"devices: {', '.join(repeated)} listed more than once in {devices!r}")
    available = len(pes)
    if tp > available:
        raise ValueError(f"tensor_parallel_size: {tp} is larger than the {available} PEs of devices {devices!r}")
    if tp * pp > available:
        raise ValueError(f"pipeline_parallel_size: {pp} stages of {tp} PEs need {tp * pp} PEs, "
                         f"but devices {devices!r} have {available}")  # fmt: skip
    if dp is None:
        if available % (tp * pp):
            raise ValueError(f"data_parallel_size: cannot fill the {available} PEs of {devices!r} with replicas of "
                             f"tensor_parallel_size * pipeline_parallel_size = {tp * pp} PEs; give devices with a "
                             "multiple of that many PEs")  # fmt: skip
        dp = available // (tp * pp)
    if tp * pp * dp != available:
        raise ValueError(f"data_parallel_size: tensor_parallel_size * pipeline_parallel_size * data_parallel_size = "
                         f"{tp}*{pp}*{dp} = {tp * pp * dp} does not match the {available} PEs of devices {devices!r}")  # fmt: skip
    return Mesh(tuple(pes), tp, pp, dp)


def parse_devices(devices: str, hw: HardwareSpec = RNGD) -> list[DeviceRef]:
    """Parse a comma-separated device string; raise ValueError naming the bad part."""
    refs = []
    for part in devices.split(","):
        match = _DEVICE.match(part.strip())
        if not match:
            raise ValueError(f"devices: {part.strip()!r} is not a device; use npu:N, npu:N:P or npu:N:P-Q")
        device, first, last = match.groups()
        if first is None:
            pes = tuple(range(hw.pes_per_device))
        else:
            lo, hi = int(first), int(last if last is not None else first)
            if hi >= hw.pes_per_device:
                raise ValueError(f"devices: {part.strip()!r} names PEs outside 0-{hw.pes_per_device - 1}")
            if lo > hi:
                raise ValueError(f"devices: {part.strip()!r} is a reversed PE range; write the lower PE first (npu:{device}:{hi}-{lo})")
            pes = tuple(range(lo, hi + 1))
        refs.append(DeviceRef(int(device), pes))
    return refs

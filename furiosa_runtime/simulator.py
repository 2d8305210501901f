"""The functional NPU simulator: PEs holding weights and KV cache, executing programs.

A ``PE`` owns its slice of device memory (weights stored in bf16, the paged KV cache of
the layers it serves) and checks every allocation against the hardware description.
``NPUSimulator`` loads an artifact's programs and weights onto the PEs its pipelines
name and runs a bucket's pipeline task by task.  Set ``FURIOSA_TRACE=1`` to print every
instruction as it executes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from furiosa_runtime.artifact import Artifact, Bucket, Pipeline, Task
from furiosa_runtime.hardware import RNGD, HardwareSpec
from furiosa_runtime.isa import DTYPES, ExecContext, KVCacheLayer, Program, execute

TRACE = os.environ.get("FURIOSA_TRACE") == "1"


class DeviceMemoryError(RuntimeError):
    """A PE would exceed its share of device memory."""


@dataclass
class PE:
    """One processing element: its memory image and usage accounting."""

    name: str
    capacity: int
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    kv: dict[int, KVCacheLayer] = field(default_factory=dict)
    _widened: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def used_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values()) + sum(k.nbytes for k in self.kv.values())

    def reserve(self, nbytes: int, what: str) -> None:
        if self.used_bytes + nbytes > self.capacity:
            raise DeviceMemoryError(
                f"{self.name}: {what} needs {nbytes / 2**20:.1f} MiB but only "
                f"{(self.capacity - self.used_bytes) / 2**20:.1f} MiB of {self.capacity / 2**30:.1f} GiB are free"
            )

    def load_weight(self, name: str, array: np.ndarray) -> None:
        if name not in self.weights:
            self.reserve(array.nbytes, f"weight {name}")
            self.weights[name] = array

    def compute_view(self, name: str) -> np.ndarray:
        """The weight widened to its compute dtype (bf16 -> f32), cached after first use."""
        view = self._widened.get(name)
        if view is None:
            stored = self.weights[name]
            view = stored.astype(np.float32) if stored.dtype.kind == "V" or stored.dtype == DTYPES["bf16"] else stored
            self._widened[name] = view
        return view


def run_program(program: Program, inputs: list[np.ndarray], params: dict[str, np.ndarray], kv: list[KVCacheLayer], block_size: int) -> list[np.ndarray]:
    """Execute one program with its reference semantics; values are released at last use."""
    env: dict[str, np.ndarray] = {spec.name: arr for spec, arr in zip(program.inputs, inputs)}
    env.update(params)
    env.update({c.name: c.array() for c in program.constants})
    for inst in program.instructions:
        ctx = ExecContext(kv=kv[inst.attrs["kv_index"]] if inst.op == "paged_attention" else None, block_size=block_size)
        outs = execute(inst, [env[name] for name in inst.ins], ctx)
        for name, value in zip(inst.outs, outs):
            env[name] = value
        if TRACE:
            print(f"[npu] {inst.op:16s} {','.join(inst.ins)} -> {inst.outs[0]} {outs[0].shape}", file=sys.stderr)
        for name in inst.free:
            env.pop(name, None)
    return [env[name] for name in program.outputs]


class NPUSimulator:
    """Programs and weights of one artifact placed on simulated PEs."""

    def __init__(self, root: Path, artifact: Artifact, hw: HardwareSpec = RNGD) -> None:
        self.artifact = artifact
        self.hw = hw
        self.block_size = artifact.generator_config.paged_attention_config.block_size
        self.programs = {key: self._load_program(root, key) for key in self._program_keys()}
        self.pes: dict[str, PE] = {}
        self._load_weights(root)
        self._allocate_kv_cache()

    def _program_keys(self) -> list[str]:
        return sorted({t.program for p in self.artifact.pipelines for t in p.tasks})

    @staticmethod
    def _load_program(root: Path, key: str) -> Program:
        return Program.model_validate(json.loads((root / "programs" / f"{key}.json").read_text()))

    def pe(self, name: str) -> PE:
        if name not in self.pes:
            self.pes[name] = PE(name, self.hw.pe_hbm_bytes)
        return self.pes[name]

    def _load_weights(self, root: Path) -> None:
        tensors: dict[str, np.ndarray] = {}
        for rel in self.artifact.param_files:
            tensors.update(load_file(root / rel))
        for task in (t for p in self.artifact.pipelines for t in p.tasks):
            pe = self.pe(task.device)
            for tensor in task.params.values():
                pe.load_weight(tensor, tensors[tensor])

    def _allocate_kv_cache(self) -> None:
        """Give every PE the KV storage of the layers whose attention it runs."""
        gen = self.artifact.generator_config
        num_slots = gen.paged_attention_config.num_blocks * self.block_size
        dtype = DTYPES[gen.kv_cache_dtype]
        for task in (t for p in self.artifact.pipelines for t in p.tasks):
            program = self.programs[task.program]
            shapes = [program.values[i.ins[1]].shape for i in program.instructions if i.op == "paged_attention"]
            v_shapes = [program.values[i.ins[2]].shape for i in program.instructions if i.op == "paged_attention"]
            pe = self.pe(task.device)
            for layer, k_shape, v_shape in zip(task.kv_layers, shapes, v_shapes):
                if layer in pe.kv:
                    continue
                size = 2 * num_slots * k_shape[1] * max(k_shape[3], v_shape[3]) * dtype.itemsize
                pe.reserve(size, f"KV cache of layer {layer}")
                pe.kv[layer] = KVCacheLayer(num_slots, k_shape[1], k_shape[3], v_shape[3], dtype)

    def memory_report(self) -> dict[str, int]:
        return {name: pe.used_bytes for name, pe in sorted(self.pes.items())}

    def run(self, bucket: Bucket, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Run the pipeline of ``bucket`` on ``feeds`` (its inputs) and return its output."""
        pipeline = self.artifact.pipeline_for(bucket)
        values = dict(feeds)
        for task in pipeline.tasks:
            outs = self._run_task(task, [values[v] for v in task.inputs])
            values.update(zip(task.outputs, outs))
        return values[pipeline.output]

    def _run_task(self, task: Task, inputs: list[np.ndarray]) -> list[np.ndarray]:
        program = self.programs[task.program]
        pe = self.pes[task.device]
        params = {spec.name: pe.compute_view(task.params[spec.name[2:]]) for spec in program.params}
        kv = [pe.kv[layer] for layer in task.kv_layers]
        return run_program(program, inputs, params, kv, self.block_size)

    def pipeline(self, bucket: Bucket) -> Pipeline:
        return self.artifact.pipeline_for(bucket)

"""Modelled step latency of every bucket of an artifact, from its programs alone.

The simulator's timing face needs only the compiled programs, the hardware description and
where each pipeline stage runs, never the weights, so a shape-only artifact
(``build.weights=none``) can be timed as well as a full one.  ``StepTimes`` lays an
artifact out as the simulator does (tensor parallelism as built, pipeline stages as built
or re-staged at load for blockwise artifacts, data-parallel replicas over the remaining
PEs) and prices one step of each bucket's pipeline on replica 0, stage by stage (``stages``,
what the engine's pipelined clock overlaps: ``engine/replica_timer.py``) and as a lone step's
latency (``seconds``); ``NPUSimulator`` takes its layout and ``step_seconds`` from here.
:func:`kv_cache_bytes` is the KV cache each PE reserves, at the bytes per token the timing
model charges (the build's memory plan of it).
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ValidationError

from furiosa_runtime.npu.artifact import (
    Artifact,
    ArtifactError,
    ArtifactFiles,
    Pipeline,
    Transfer,
    assign_stages,
    first_error,
    plan_transfers,
    program_file,
    split_layers,
)
from furiosa_runtime.npu.hardware import HardwareSpec, Mesh, plan_mesh
from furiosa_runtime.npu.isa import DTYPES, Program
from furiosa_runtime.npu.timing import StageTimes, StepModel, kv_token_bytes


def layers_per_stage(artifact: Artifact, pipeline_parallel_size: int | None) -> list[int]:
    """The artifact's stages, or an equal split when a blockwise artifact is re-staged at load."""
    par = artifact.parallel_config
    if pipeline_parallel_size in (None, par.pipeline_parallel_size):
        return list(par.num_blocks_per_pp_stage)
    if not artifact.model_rewriting_config.use_blockwise_compile:
        raise ValueError(f"pipeline_parallel_size: only blockwise artifacts can be re-staged at load; this one "
                         f"was built for {par.pipeline_parallel_size}")  # fmt: skip
    layers = artifact.model_metadata.num_hidden_layers
    if not 1 <= pipeline_parallel_size <= layers:
        raise ValueError(f"pipeline_parallel_size: must be between 1 and the {layers} decoder layers, got {pipeline_parallel_size}")
    return split_layers(layers, pipeline_parallel_size)


def stage_plan(artifact: Artifact, pipeline: Pipeline, stages: list[int]) -> tuple[dict[str, int], list[Transfer]]:
    """The stage of each task of ``pipeline`` and the transfers between stages, for ``stages``
    layers per stage (the built plan when they are the artifact's own)."""
    if stages == artifact.parallel_config.num_blocks_per_pp_stage:
        return {t.name: t.stage for t in pipeline.tasks}, list(pipeline.transfers)
    placed = assign_stages(pipeline.tasks, stages)
    return placed, plan_transfers(pipeline.tasks, placed)


def load_programs(files: ArtifactFiles, artifact: Artifact) -> dict[str, Program]:
    """Every program the artifact's pipelines run, read through the verified reader."""
    keys = sorted({t.program for p in artifact.pipelines for t in p.tasks})
    return {key: load_program(files, key) for key in keys}


def load_program(files: ArtifactFiles, key: str, source: str = "artifact") -> Program:
    """Program ``key`` read through the verified reader of ``source`` (named in the error)."""
    rel = program_file(key)
    try:
        return Program.model_validate_json(files.read(rel))
    except ValidationError as err:
        raise ArtifactError(f"{source}: {rel} is not a valid program ({first_error(err)})") from None


def kv_cache_bytes(pipelines: list[Pipeline], programs: Mapping[str, Program], num_slots: int, kv_dtype: str) -> dict[str, int]:
    """KV cache bytes each PE reserves where the pipelines place their tasks: ``num_slots``
    token slots in ``kv_dtype`` for every layer whose attention it runs (what the simulator
    allocates, at the per-token size the timing model charges for reading them)."""
    itemsize = DTYPES[kv_dtype].itemsize
    layers: dict[str, set[int]] = {}
    used: dict[str, int] = {}
    for task in (t for p in pipelines for t in p.tasks):
        program = programs[task.program]
        attention = [i for i in program.instructions if i.op == "paged_attention"]
        for layer, inst in zip(task.kv_layers, attention):
            if layer not in layers.setdefault(task.device, set()):
                layers[task.device].add(layer)
                slot = kv_token_bytes(program.values[inst.ins[1]], program.values[inst.ins[2]], itemsize)
                used[task.device] = used.get(task.device, 0) + num_slots * slot
    return dict(sorted(used.items()))


class StepTimes:
    """One artifact laid out on a mesh, with one step of each pipeline priced stage by stage
    (``stages``) and as a lone step's seconds (``seconds``), by pipeline name.

    ``devices``, ``pipeline_parallel_size`` and ``data_parallel_size`` are the load-time
    settings of ``NPUSimulator`` (None: the artifact's devices and stages, and as many
    replicas as the PEs allow); ``hw`` None is the hardware the artifact was built for.
    """

    def __init__(
        self,
        artifact: Artifact,
        programs: dict[str, Program],
        hw: HardwareSpec | None = None,
        *,
        devices: str | None = None,
        pipeline_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
    ) -> None:
        self.artifact = artifact
        self.hw = hw or artifact.hardware
        stages = layers_per_stage(artifact, pipeline_parallel_size)
        tp = artifact.parallel_config.tensor_parallel_size
        self.mesh: Mesh = plan_mesh(devices or artifact.devices, tp, len(stages), data_parallel_size, self.hw)
        gen = artifact.generator_config
        model = StepModel(programs, self.hw, gen.paged_attention_config.block_size, artifact.model_metadata.weight_dtype, gen.kv_cache_dtype)
        self.stages: dict[str, StageTimes] = {p.name: self._step(model, p, stages) for p in artifact.pipelines}
        self.seconds = {name: step.seconds for name, step in self.stages.items()}

    def _step(self, model: StepModel, pipeline: Pipeline, stages: list[int]) -> StageTimes:
        stage_of, transfers = stage_plan(self.artifact, pipeline, stages)
        first = {}  # the simulator sums the sends after each task together: the same order gives the same float
        for transfer in transfers:
            first.setdefault(transfer.after_task, len(first))
        transfers.sort(key=lambda t: first[t.after_task])
        return model.stage_times(pipeline, stage_of, transfers, lambda stage: self.mesh.pe(0, stage, 0))

"""Partition stage: buckets x supertasks -> pipelines placed on pipeline stages and PEs.

A pipeline is the ordered list of tasks that runs one bucket: the embedding, one task
per group of ``num_blocks_per_supertask`` decoder layers, and the head.  Decoder layers
are split over pipeline stages (``layers_per_stage``; the embedding joins the first
stage, the head the last), and a value read on another stage than the one that wrote it
gets a ``Transfer``.  With tensor parallelism every supertask becomes one task per rank,
each naming its own program and its own shards of the weights.  Tasks record the PEs of
data-parallel replica 0; the runtime lays out its own mesh from the same stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from furiosa_build.supertask import CaptureResult, Signature, Supertask
from furiosa_runtime.npu.artifact import Bucket, Pipeline, PipelineInput, Task, assign_stages, plan_transfers
from furiosa_runtime.npu.hardware import Mesh
from furiosa_runtime.npu.isa import ParamShard

#: A compiled program's parameters: relative name -> tensor-parallel layout (None: whole tensor).
ProgramParams = dict[str, ParamShard | None]


@dataclass(frozen=True)
class Placement:
    """Where supertasks run: the build's mesh and how layers are grouped and staged."""

    mesh: Mesh
    num_layers: int
    blocks_per_supertask: int
    layers_per_stage: tuple[int, ...]

    def groups(self) -> list[tuple[int, int]]:
        """(first layer, number of layers) of every decoder-layer supertask."""
        step = self.blocks_per_supertask
        return [(lo, min(step, self.num_layers - lo)) for lo in range(0, self.num_layers, step)]


@dataclass(frozen=True)
class TensorSlice:
    """A tensor of the artifact: a whole tensor of the model, or one chunk of it."""

    source: str  # name in the model's weight file (or a captured constant)
    layout: ParamShard | None = None
    chunk: int = 0

    @property
    def name(self) -> str:
        """Chunks get their own names (``...weight@tp1/4``); equal chunks share one tensor."""
        if self.layout is None:
            return self.source
        return f"{self.source}@tp{self.chunk}/{self.layout.parts}"


def bind_params(
    task: Supertask, params: ProgramParams, layers_path: str, first_layer: int, rank: int, tp: int
) -> dict[str, TensorSlice]:
    """Map the program's relative parameter names to the tensors rank ``rank`` reads."""
    binding = {}
    for rel, layout in params.items():
        head, _, rest = rel.partition(".")
        per_layer = task.kind == "block" and head.isdigit() and not rel.startswith("const:")
        source = f"{layers_path}.{first_layer + int(head)}.{rest}" if per_layer else rel
        binding[rel] = TensorSlice(source, layout, layout.chunk(rank, tp) if layout else 0)
    return binding


def build_pipeline(
    model_name: str,
    capture: CaptureResult,
    signatures: list[Signature],
    placement: Placement,
    program_keys: dict[str, list[str]],
    program_params: dict[str, ProgramParams],
) -> tuple[Pipeline, list[TensorSlice]]:
    """Assemble one bucket's pipeline from its captured supertasks and program keys.

    ``signatures[g]`` is the layer-type signature of group g and ``program_keys`` maps
    "embed", "head" and "block:<g>" to the compiled program of every tensor-parallel
    rank; ``program_params`` gives, per key, the parameters the program reads (folded or
    embedded constants need no binding) and their layouts.  Also returns every tensor
    slice the tasks bind.
    """
    bucket: Bucket = capture.bucket
    mesh = placement.mesh
    slices: list[TensorSlice] = []

    def tasks(name: str, supertask: Supertask, role: str, first: int, layers: list[int]) -> list[Task]:
        made = []
        for rank, key in enumerate(program_keys[role]):
            binding = bind_params(supertask, program_params[key], capture.layers_path, first, rank, mesh.tp)
            slices.extend(binding.values())
            made.append(Task(
                name=name, kind=supertask.kind, program=key, device="", stage=0, shard=rank,
                inputs=supertask.input_values, outputs=supertask.output_values,
                params={rel: s.name for rel, s in binding.items()}, kv_layers=layers,
            ))  # fmt: skip
        return made

    unplaced = tasks("embed", capture.embed, "embed", 0, [])
    for g, ((first, count), sig) in enumerate(zip(placement.groups(), signatures)):
        unplaced += tasks(f"block.{g}", capture.blocks[sig], f"block:{g}", first, list(range(first, first + count)))
    unplaced += tasks("head", capture.head, "head", 0, [])
    stages = assign_stages(unplaced, list(placement.layers_per_stage))
    placed = [
        t.model_copy(update={"stage": stages[t.name], "device": mesh.pe(0, stages[t.name], t.shard)}) for t in unplaced
    ]
    inputs = [PipelineInput(**spec) for spec in _pipeline_inputs(capture)]
    pipeline = Pipeline(
        name=bucket.pipeline_name(model_name), bucket=bucket, inputs=inputs, tasks=placed,
        transfers=plan_transfers(placed, stages), output=capture.head.output_values[0],
    )  # fmt: skip
    return pipeline, slices


def _pipeline_inputs(capture: CaptureResult) -> list[dict]:
    """The user-facing inputs of the bucket (token ids, positions, paged-KV metadata)."""
    seen: dict[str, dict] = {}
    for task in (capture.embed, *capture.blocks.values(), capture.head):
        for value, spec in zip(task.input_values, task.graph.inputs):
            if ":" not in value and value != "hidden" and value not in seen:
                seen[value] = {"name": value, "shape": spec["shape"], "dtype": spec["dtype"]}
    return sorted(seen.values(), key=lambda s: s["name"])

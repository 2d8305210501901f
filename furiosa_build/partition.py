"""Partition stage: buckets x supertasks -> pipelines placed on devices and PEs.

A pipeline is the ordered list of tasks that runs one bucket: the embedding, one task
per group of ``num_blocks_per_supertask`` decoder layers, and the head.  Each task names
its compiled program, the PE it runs on, its pipeline-parallel stage, the weights bound
to the program's parameters and the KV-cache layers its attention nodes use.
"""

from __future__ import annotations

from dataclasses import dataclass

from furiosa_build.capture import CaptureResult, Signature, Supertask
from furiosa_runtime.artifact import Bucket, Pipeline, PipelineInput, Task


@dataclass(frozen=True)
class Placement:
    """Where supertasks run: one PE per stage for now (tensor parallelism is a later pass)."""

    pe: str
    num_layers: int
    blocks_per_supertask: int

    def groups(self) -> list[tuple[int, int]]:
        """(first layer, number of layers) of every decoder-layer supertask."""
        step = self.blocks_per_supertask
        return [(lo, min(step, self.num_layers - lo)) for lo in range(0, self.num_layers, step)]


def bind_params(task: Supertask, layers_path: str, first_layer: int) -> dict[str, str]:
    """Map the program's relative parameter names to tensor names in the weight file."""
    binding = {}
    for param in task.graph.params:
        rel = param["name"]
        head, _, rest = rel.partition(".")
        if task.kind == "block" and head.isdigit() and not rel.startswith("const:"):
            binding[rel] = f"{layers_path}.{first_layer + int(head)}.{rest}"
        else:
            binding[rel] = rel
    return binding


def build_pipeline(
    model_name: str,
    capture: CaptureResult,
    signatures: list[Signature],
    placement: Placement,
    program_keys: dict[str, str],
) -> Pipeline:
    """Assemble one bucket's pipeline from its captured supertasks and program keys.

    ``signatures[g]`` is the layer-type signature of group g and ``program_keys`` maps
    "embed", "head" and "block:<g>" to compiled program keys.
    """
    bucket: Bucket = capture.bucket
    tasks = [_task("embed", capture.embed, program_keys["embed"], placement.pe, capture.layers_path, 0, [])]
    for g, ((first, count), sig) in enumerate(zip(placement.groups(), signatures)):
        supertask = capture.blocks[sig]
        layers = list(range(first, first + count))
        tasks.append(_task(f"block.{g}", supertask, program_keys[f"block:{g}"], placement.pe, capture.layers_path, first, layers))
    tasks.append(_task("head", capture.head, program_keys["head"], placement.pe, capture.layers_path, 0, []))
    inputs = [
        PipelineInput(name=spec["name"], shape=spec["shape"], dtype=spec["dtype"])
        for spec in _pipeline_inputs(capture)
    ]
    return Pipeline(name=bucket.pipeline_name(model_name), bucket=bucket, inputs=inputs, tasks=tasks)


def _task(name: str, supertask: Supertask, key: str, pe: str, layers_path: str, first: int, layers: list[int]) -> Task:
    return Task(
        name=name,
        kind=supertask.kind,
        program=key,
        device=pe,
        stage=0,
        inputs=supertask.input_values,
        outputs=supertask.output_values,
        params=bind_params(supertask, layers_path, first),
        kv_layers=layers,
    )


def _pipeline_inputs(capture: CaptureResult) -> list[dict]:
    """The user-facing inputs of the bucket (token ids, positions, paged-KV metadata)."""
    seen: dict[str, dict] = {}
    for task in (capture.embed, *capture.blocks.values(), capture.head):
        for value, spec in zip(task.input_values, task.graph.inputs):
            if ":" not in value and value != "hidden" and value not in seen:
                seen[value] = {"name": value, "shape": spec["shape"], "dtype": spec["dtype"]}
    return sorted(seen.values(), key=lambda s: s["name"])

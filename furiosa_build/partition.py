"""Partition stage: buckets x supertasks -> pipelines placed on devices and PEs.

A pipeline is the ordered list of tasks that runs one bucket: the embedding, one task
per group of ``num_blocks_per_supertask`` decoder layers, and the head.  Each task names
its compiled program, the PE it runs on, its pipeline-parallel stage, the weights bound
to the program's parameters and the KV-cache layers its attention nodes use.
"""

from __future__ import annotations

from dataclasses import dataclass

from furiosa_build.supertask import CaptureResult, Signature, Supertask
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


def bind_params(task: Supertask, params: list[str], layers_path: str, first_layer: int) -> dict[str, str]:
    """Map the program's relative parameter names to tensor names in the weight file."""
    binding = {}
    for rel in params:
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
    program_params: dict[str, list[str]],
) -> Pipeline:
    """Assemble one bucket's pipeline from its captured supertasks and program keys.

    ``signatures[g]`` is the layer-type signature of group g and ``program_keys`` maps
    "embed", "head" and "block:<g>" to compiled program keys; ``program_params`` lists,
    per key, the parameters the compiled program reads (folded or embedded constants need
    no binding).
    """
    bucket: Bucket = capture.bucket

    def task(name: str, supertask: Supertask, role: str, first: int, layers: list[int]) -> Task:
        key = program_keys[role]
        binding = bind_params(supertask, program_params[key], capture.layers_path, first)
        return Task(
            name=name, kind=supertask.kind, program=key, device=placement.pe, stage=0,
            inputs=supertask.input_values, outputs=supertask.output_values, params=binding, kv_layers=layers,
        )  # fmt: skip

    tasks = [task("embed", capture.embed, "embed", 0, [])]
    for g, ((first, count), sig) in enumerate(zip(placement.groups(), signatures)):
        supertask = capture.blocks[sig]
        layers = list(range(first, first + count))
        tasks.append(task(f"block.{g}", supertask, f"block:{g}", first, layers))
    tasks.append(task("head", capture.head, "head", 0, []))
    inputs = [
        PipelineInput(name=spec["name"], shape=spec["shape"], dtype=spec["dtype"])
        for spec in _pipeline_inputs(capture)
    ]
    return Pipeline(name=bucket.pipeline_name(model_name), bucket=bucket, inputs=inputs, tasks=tasks)


def _pipeline_inputs(capture: CaptureResult) -> list[dict]:
    """The user-facing inputs of the bucket (token ids, positions, paged-KV metadata)."""
    seen: dict[str, dict] = {}
    for task in (capture.embed, *capture.blocks.values(), capture.head):
        for value, spec in zip(task.input_values, task.graph.inputs):
            if ":" not in value and value != "hidden" and value not in seen:
                seen[value] = {"name": value, "shape": spec["shape"], "dtype": spec["dtype"]}
    return sorted(seen.values(), key=lambda s: s["name"])

"""The artifact format: the contract between the builder and the runtime.

An artifact is a directory::

    artifact.json          this schema (metadata, configs, pipelines, manifest)
    programs/<key>.json    one file per unique compiled program (furiosa_runtime.isa.Program)
    params.safetensors     weights (bf16) and config-derived constants (fp32)
    tokenizer.json ...     tokenizer files; generation_config.json when the model has one

``manifest`` records the sha256 of every other file; ``load_artifact`` refuses an
artifact whose files are missing, extra to what it needs, or altered.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ARTIFACT_FILE = "artifact.json"
FORMAT_VERSION = "1"


class ArtifactError(ValueError):
    """An artifact directory that cannot be used, with the reason in one line."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def first_error(err: ValidationError, model: type[BaseModel] | None = None) -> str:
    """pydantic's first complaint as one line, ``<dotted field>: <problem>, got <value>``.

    pydantic's own message spans several lines (and a URL); runtime errors are one line.
    With ``model``, an unknown top-level field is answered with the fields it allows.
    """
    error = err.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or err.title
    problem = error["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    if error["type"] == "extra_forbidden":
        allowed = f"; allowed: {', '.join(model.model_fields)}" if model is not None and len(error["loc"]) == 1 else ""
        return f"{where}: unknown field{allowed}"
    if error["type"] == "missing":
        return f"{where}: required"
    return f"{where}: {problem}" + ("" if ", got" in problem else f", got {error['input']!r}")


class Bucket(_Model):
    """A static shape: ``batch_size`` sequences, ``attention_size`` context, ``kv_cache_size`` cached.

    Prefill buckets have ``kv_cache_size == 0`` and take ``attention_size`` new tokens;
    decode buckets have ``kv_cache_size == attention_size - 1`` and take one new token.
    """

    batch_size: int = Field(gt=0)
    attention_size: int = Field(gt=0)
    kv_cache_size: int = Field(ge=0)

    @property
    def is_prefill(self) -> bool:
        return self.kv_cache_size == 0

    @property
    def phase(self) -> Literal["prefill", "decode"]:
        return "prefill" if self.is_prefill else "decode"

    @property
    def input_len(self) -> int:
        return self.attention_size - self.kv_cache_size

    def pipeline_name(self, model: str) -> str:
        return f"{model}-kv{self.kv_cache_size}-b{self.batch_size}-attn{self.attention_size}"

    def num_kv_blocks(self, block_size: int) -> int:
        return math.ceil(self.attention_size / block_size)

    @classmethod
    def prefill(cls, batch_size: int, attention_size: int) -> Bucket:
        return cls(batch_size=batch_size, attention_size=attention_size, kv_cache_size=0)

    @classmethod
    def decode(cls, batch_size: int, attention_size: int) -> Bucket:
        return cls(batch_size=batch_size, attention_size=attention_size, kv_cache_size=attention_size - 1)


class ArtifactVersion(_Model):
    furiosa_llm: str
    furiosa_compiler: str


class ArtifactMetadata(_Model):
    artifact_id: str
    name: str
    timestamp: int
    version: ArtifactVersion


class PagedAttentionConfig(_Model):
    num_blocks: int = Field(gt=0)
    block_size: int = Field(gt=0)


class GeneratorConfig(_Model):
    prefill_buckets: list[Bucket]
    decode_buckets: list[Bucket]
    max_seq_len_to_capture: int
    paged_attention_config: PagedAttentionConfig
    kv_cache_dtype: Literal["f32", "bf16"] = "f32"


class PoolingConfig(_Model):
    """How an embedding model turns its token states into one vector per text.

    The sentence-transformers ``Pooling`` (+ ``Normalize``) modules: ``mean`` averages the
    states of the real tokens, ``cls`` takes the first token's; ``normalize`` scales the
    result to unit L2 norm.  ``max_seq_length`` is where sentence-transformers truncates a
    text (special tokens included); None means no truncation.
    """

    mode: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_seq_length: int | None = Field(default=None, gt=0)


class ModelMetadata(_Model):
    pretrained_id: str
    architecture: str
    task: Literal["generate", "embed"] = "generate"
    pooling: PoolingConfig | None = None  # set when task is "embed"
    num_hidden_layers: int
    weight_dtype: Literal["bf16"] = "bf16"
    trust_remote_code: bool = False
    eos_token_ids: list[int] = Field(default_factory=list)


class ModelRewritingConfig(_Model):
    do_decompositions_for_model_rewrite: bool = False
    use_blockwise_compile: bool = True
    num_blocks_per_supertask: int = 1
    embed_all_constants_into_graph: bool = False
    calculate_logit_only_for_last_token: bool = True
    add_prefill_last_block_slice: bool = False


class ParallelConfig(_Model):
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    num_blocks_per_pp_stage: list[int]


class SchedulerConfig(_Model):
    """The scheduler settings (furiosa-llm's ``SchedulerConfig``); ranges are checked by the
    scheduler, types here: a wrong one is a one-line ValueError naming the field."""

    npu_queue_limit: int = 2
    max_processing_samples: int = 65536
    spare_blocks_ratio: float = 0.2
    is_offline: bool = False
    prefill_chunk_size: int | None = None

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as err:
            raise ValueError(f"scheduler_config.{first_error(err, SchedulerConfig)}") from None


class Task(_Model):
    """One supertask of a pipeline on one PE: which program, which weights, which values.

    With tensor parallelism a supertask is ``tensor_parallel_size`` consecutive tasks of
    the same name, one per ``shard`` (rank in the group), each with its own program and
    weight shards; they run in lockstep and meet at the programs' collectives.
    """

    name: str
    kind: Literal["embed", "block", "head"]
    program: str  # key of programs/<key>.json
    device: str  # "npu:D:P", the PE that runs it in the build's placement (replica 0)
    stage: int  # pipeline-parallel stage
    shard: int = 0  # tensor-parallel rank
    inputs: list[str]  # pipeline values bound to the program inputs, in order
    outputs: list[str]
    params: dict[str, str]  # program parameter -> tensor name in the weight files
    kv_layers: list[int] = Field(default_factory=list)  # KV cache layer of each attention in order


class Transfer(_Model):
    """An activation sent from one pipeline stage to another once ``after_task`` has run.

    Every PE of the source stage's tensor-parallel group sends its (replicated) copy to
    the PE of the same rank in the destination stage.
    """

    value: str
    src_stage: int
    dst_stage: int
    after_task: str


def split_layers(num_layers: int, stages: int) -> list[int]:
    """Layers per pipeline stage when not given: as equal as possible, earlier stages first."""
    base, extra = divmod(num_layers, stages)
    return [base + (stage < extra) for stage in range(stages)]


def assign_stages(tasks: list[Task], layers_per_stage: list[int]) -> dict[str, int]:
    """Stage of every task name: embedding first, head last, blocks by their first layer."""
    bounds = [sum(layers_per_stage[: s + 1]) for s in range(len(layers_per_stage))]
    last = len(layers_per_stage) - 1
    stages = {}
    for task in tasks:
        if task.kind == "block":
            stages[task.name] = next(s for s, end in enumerate(bounds) if task.kv_layers[0] < end)
        else:
            stages[task.name] = 0 if task.kind == "embed" else last
    return stages


def plan_transfers(tasks: list[Task], stages: dict[str, int]) -> list[Transfer]:
    """The sends a pipeline needs: a value read on another stage than the one that made it.

    Values are not single-assignment (every block writes ``hidden``), so the walk follows
    the latest writer of each value and which stages already hold that version.
    """
    writer: dict[str, str] = {}  # value -> task that wrote its current version
    holders: dict[str, set[int]] = {}  # value -> stages holding that version
    transfers: list[Transfer] = []
    for task in tasks:
        stage = stages[task.name]
        for value in task.inputs:
            if value in writer and stage not in holders[value]:
                src = stages[writer[value]]
                transfers.append(Transfer(value=value, src_stage=src, dst_stage=stage, after_task=writer[value]))
                holders[value].add(stage)
        for value in task.outputs:
            writer[value], holders[value] = task.name, {stage}
    return transfers


class PipelineInput(_Model):
    name: str
    shape: list[int]
    dtype: str


class Pipeline(_Model):
    """Everything that runs for one bucket, in execution order."""

    name: str
    bucket: Bucket
    inputs: list[PipelineInput]
    tasks: list[Task]
    transfers: list[Transfer] = Field(default_factory=list)
    output: str = "logits"


class Artifact(_Model):
    metadata: ArtifactMetadata
    format_version: Literal["1"] = FORMAT_VERSION
    devices: str
    generator_config: GeneratorConfig
    hf_config: dict[str, Any]
    model_metadata: ModelMetadata
    model_rewriting_config: ModelRewritingConfig
    parallel_config: ParallelConfig
    scheduler_config: SchedulerConfig = SchedulerConfig()
    pipelines: list[Pipeline] = Field(default_factory=list)
    param_files: list[str]
    manifest: dict[str, str]  # relative path -> sha256

    @field_validator("pipelines")
    @classmethod
    def _unique_names(cls, pipelines: list[Pipeline]) -> list[Pipeline]:
        names = [p.name for p in pipelines]
        if len(set(names)) != len(names):
            raise ValueError("pipeline names must be unique")
        return pipelines

    def pipeline_for(self, bucket: Bucket) -> Pipeline:
        return next(p for p in self.pipelines if p.bucket == bucket)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and validate ``artifact.json``; with ``verify``, check every file's sha256."""
    root = Path(path)
    meta = root / ARTIFACT_FILE
    if not root.is_dir():
        raise ArtifactError(f"artifact: {root} is not a directory")
    if not meta.is_file():
        raise ArtifactError(f"artifact: {meta} is missing; is {root} an artifact built by furiosa_build?")
    try:
        artifact = Artifact.model_validate(json.loads(meta.read_text(encoding="utf-8")))
    except ValidationError as err:
        raise ArtifactError(f"artifact: {meta} is not a valid artifact description ({first_error(err)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"artifact: {meta} is not a valid artifact description ({err})") from None
    if verify:
        for rel, digest in artifact.manifest.items():
            file = root / rel
            if not file.is_file():
                raise ArtifactError(f"artifact: file {rel} listed in the manifest is missing")
            if sha256_file(file) != digest:
                raise ArtifactError(f"artifact: file {rel} does not match its manifest checksum (corrupted?)")
    return artifact

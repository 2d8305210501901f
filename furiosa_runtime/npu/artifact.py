"""The artifact format: the contract between the builder and the runtime.

An artifact is a directory::

    artifact.json          this schema (metadata, configs, pipelines, manifest)
    programs/<key>.json    one file per unique compiled program (furiosa_runtime.npu.isa.Program)
    params.safetensors     weights (bf16) and config-derived constants (fp32)
    tokenizer.json ...     tokenizer files; generation_config.json when the model has one

``manifest`` records the sha256 of every other file.  The runtime reads an artifact only
through ``ArtifactFiles``: paths confined to the folder (no ``..``, absolute paths or
symlinks), only files the manifest lists, each checked against its sha256 as it is read.
``open_artifact`` also refuses a folder holding a file the runtime would read (weights,
tokenizer files, ...) that the manifest does not list; other unlisted files are ignored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from furiosa_runtime.npu.hardware import RNGD, HardwareSpec

ARTIFACT_FILE = "artifact.json"
FORMAT_VERSION = "1"
SHA256_HEX = r"[0-9a-f]{64}"  # a sha256 digest, and a program key
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")
#: Files the runtime reads when the manifest lists them; present but unlisted, they mean tampering.
RUNTIME_FILES = ("params.safetensors", *TOKENIZER_FILES, "generation_config.json")
# Sanity caps on the static shapes an artifact may declare (far above any real build).
MAX_BATCH_SIZE = 65536
MAX_ATTENTION_SIZE = 2**20
MAX_KV_SLOTS = 2**24  # num_blocks * block_size


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
    return f"{where}: {problem}" + ("" if ", got" in problem else f", got {_short_repr(error['input'])}")


def _short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut short: the offending input may be a whole file's contents."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


class Bucket(_Model):
    """A static shape: ``batch_size`` sequences, ``attention_size`` context, ``kv_cache_size`` cached.

    Prefill buckets have ``kv_cache_size == 0`` and take ``attention_size`` new tokens;
    decode buckets have ``kv_cache_size == attention_size - 1`` and take one new token.
    """

    batch_size: int = Field(gt=0, le=MAX_BATCH_SIZE)
    attention_size: int = Field(gt=0, le=MAX_ATTENTION_SIZE)
    kv_cache_size: int = Field(ge=0)

    @model_validator(mode="after")
    def _prefill_or_decode(self) -> Bucket:
        if self.kv_cache_size not in (0, self.attention_size - 1):
            raise ValueError(f"kv_cache_size must be 0 (prefill) or attention_size - 1 = {self.attention_size - 1} (decode), "
                             f"got {self.kv_cache_size}")  # fmt: skip
        return self

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


def smallest_bucket(buckets: list[Bucket], batch: int, length: int) -> Bucket | None:
    """The cheapest bucket holding ``batch`` rows of ``length`` context, if any."""
    fitting = [b for b in buckets if b.batch_size >= batch and b.attention_size >= length]
    return min(fitting, key=lambda b: (b.batch_size * b.attention_size, b.attention_size), default=None)


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
    block_size: int = Field(gt=0, le=MAX_ATTENTION_SIZE)

    @model_validator(mode="after")
    def _bounded(self) -> PagedAttentionConfig:
        slots = self.num_blocks * self.block_size
        if slots > MAX_KV_SLOTS:
            raise ValueError(f"num_blocks * block_size must be <= {MAX_KV_SLOTS} KV slots, got {slots}")
        return self


class KvCacheSharingAcrossBeamsConfig(_Model):
    """The beam search the decode buckets were built for (furiosa-llm's config of this name):
    each decode bucket holds ``beam_width`` beams per sequence, each generating at most
    ``max_new_tokens`` tokens."""

    beam_width: int = Field(ge=2, le=MAX_BATCH_SIZE)
    max_new_tokens: int = Field(gt=0)


class GeneratorConfig(_Model):
    prefill_buckets: list[Bucket]
    decode_buckets: list[Bucket]
    max_seq_len_to_capture: int = Field(gt=0, le=MAX_ATTENTION_SIZE)
    paged_attention_config: PagedAttentionConfig
    # How the KV cache is stored on the device: the memory the build plans for it, the bytes
    # the timing model charges for reading it and the simulator's storage (fp8 without scales).
    kv_cache_dtype: Literal["f32", "bf16", "f8_e4m3fn"] = "f32"
    kv_cache_sharing_across_beams_config: KvCacheSharingAcrossBeamsConfig | None = None

    @model_validator(mode="after")
    def _buckets_fit(self) -> GeneratorConfig:
        """Prefill buckets cache nothing, decode buckets all but the new token, and none is
        longer than ``max_seq_len_to_capture`` (what the builder promises)."""
        for b in self.prefill_buckets:
            if b.kv_cache_size != 0:
                raise ValueError(f"prefill_buckets must have kv_cache_size 0, got {_show_bucket(b)}")
        for b in self.decode_buckets:
            if b.kv_cache_size != b.attention_size - 1:
                raise ValueError(f"decode_buckets must have kv_cache_size attention_size - 1, got {_show_bucket(b)}")
        for b in self.buckets:
            if b.attention_size > self.max_seq_len_to_capture:
                raise ValueError(f"bucket attention_size must be <= max_seq_len_to_capture={self.max_seq_len_to_capture}, "
                                 f"got {_show_bucket(b)}")  # fmt: skip
        return self

    @property
    def buckets(self) -> list[Bucket]:
        return [*self.prefill_buckets, *self.decode_buckets]


def _show_bucket(bucket: Bucket) -> str:
    return f"(batch {bucket.batch_size}, attention {bucket.attention_size}, kv {bucket.kv_cache_size})"


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


class QuantizationConfig(_Model):
    """How the artifact's quantized linear layers store and compute (``isa.quantized_linear``),
    read from a compressed-tensors checkpoint (``build.quantize_artifact_path``) or, for a
    shape-only build, planned by the build's ``quantization`` config group.

    ``weights`` is the storage dtype, ``strategy`` one scale per output channel or per
    tensor, ``activations`` how inputs are quantised ("none": weight-only); ``modules``
    are the linear layers of every decoder layer that are quantized (e.g.
    ``self_attn.q_proj``), the others stay in ``weight_dtype``.  ``embeddings`` names the
    input embedding and ``lm_head`` (e.g. ``model.embed_tokens``, ``lm_head``) when their
    tables are quantized too: weight-only, ``embedding_weights`` with one scale per row (a
    token's embedding, an output channel of ``lm_head``), so a tied table serves both.
    """

    scheme: Literal["fp8-dynamic", "fp8-static", "fp8-weight-only", "int8-weight-only"]
    weights: Literal["f8_e4m3fn", "i8"]
    strategy: Literal["channel", "tensor"]
    activations: Literal["none", "dynamic", "static"]
    modules: list[str]
    embeddings: list[str] = Field(default_factory=list)
    embedding_weights: Literal["f8_e4m3fn", "i8"] | None = None


class ModelMetadata(_Model):
    pretrained_id: str
    architecture: str
    task: Literal["generate", "embed"] = "generate"
    pooling: PoolingConfig | None = None  # set when task is "embed"
    num_hidden_layers: int
    weight_dtype: Literal["bf16"] = "bf16"  # of every weight but the quantized ones
    quantization: QuantizationConfig | None = None  # None: no quantized weights
    # "none": a shape-only artifact (build.weights=none), without param files: it can be
    # planned and its serving simulated, but not run.
    weights: Literal["included", "none"] = "included"
    trust_remote_code: bool = False
    eos_token_ids: list[int] = Field(default_factory=list)


class ModelRewritingConfig(_Model):
    do_decompositions_for_model_rewrite: bool = False
    use_blockwise_compile: bool = True
    num_blocks_per_supertask: int = 1
    embed_all_constants_into_graph: bool = False
    calculate_logit_only_for_last_token: bool = True
    add_prefill_last_block_slice: bool = False
    #: The build's ``compiler_config_overrides``: with the rest, what a later compilation of
    #: one more bucket (``furiosa_build.jit``) needs to give programs like the artifact's.
    compiler_config_overrides: dict[str, Any] | None = None


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
    program: str = Field(pattern=f"^{SHA256_HEX}$")  # key of programs/<key>.json: 64 lowercase hex digits
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

    @model_validator(mode="after")
    def _inputs_match_bucket(self) -> Pipeline:
        """The per-token inputs have the bucket's shape (the runner feeds exactly that)."""
        expected = [self.bucket.batch_size, self.bucket.input_len]
        for spec in self.inputs:
            if spec.name in TOKEN_INPUTS and spec.shape != expected:
                raise ValueError(f"input {spec.name} must have the shape {expected} of bucket {_show_bucket(self.bucket)}, got {spec.shape}")
        return self


#: Pipeline inputs with one entry per token of the bucket, shape (batch_size, new tokens).
TOKEN_INPUTS = ("input_ids", "positions", "position_ids", "slot_mapping")


def check_manifest(manifest: dict[str, str]) -> dict[str, str]:
    """``manifest`` if it maps safe relative paths (``check_relative_path``) to sha256 digests."""
    for rel, digest in manifest.items():
        check_relative_path(rel)
        if not re.fullmatch(SHA256_HEX, digest):
            raise ValueError(f"the sha256 of {rel} must be 64 lowercase hex digits, got {digest!r}")
    return manifest


def program_file(key: str) -> str:
    """Where the program ``key`` lives, relative to the artifact folder."""
    return f"programs/{key}.json"


def check_relative_path(rel: str) -> str:
    """``rel`` if it names a file inside the artifact folder as a plain relative POSIX path.

    Refused: absolute paths, ``.``/``..`` and empty parts, backslashes and NUL, which could
    lead outside the folder or mean different files on different systems.
    """
    parts = rel.split("/")
    if "\\" in rel or "\0" in rel or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"must be a relative path inside the artifact (no '..', '.', leading '/', empty parts, "
                         f"backslashes or NUL), got {rel!r}")  # fmt: skip
    return rel


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
    hardware: HardwareSpec = RNGD  # the NPU the artifact was planned and timed for
    # Declared before the fields that name files, so their validators can check the manifest.
    manifest: dict[str, str]  # relative path -> sha256
    pipelines: list[Pipeline] = Field(default_factory=list)
    param_files: list[str]

    @field_validator("manifest")
    @classmethod
    def _safe_manifest(cls, manifest: dict[str, str]) -> dict[str, str]:
        return check_manifest(manifest)

    @field_validator("pipelines")
    @classmethod
    def _pipelines_match(cls, pipelines: list[Pipeline], info: ValidationInfo) -> list[Pipeline]:
        """Unique names, one pipeline per bucket of the generator config, programs listed."""
        names = [p.name for p in pipelines]
        if len(set(names)) != len(names):
            raise ValueError("pipeline names must be unique")
        if "generator_config" in info.data:
            buckets = info.data["generator_config"].buckets
            for p in pipelines:
                if p.bucket not in buckets:
                    raise ValueError(f"pipeline {p.name}: its bucket must be one of generator_config's, got {_show_bucket(p.bucket)}")
            for b in buckets:
                if all(p.bucket != b for p in pipelines):
                    raise ValueError(f"every generator_config bucket needs a pipeline, got none for {_show_bucket(b)}")
        manifest = info.data.get("manifest", {})
        for p in pipelines:
            for task in p.tasks:
                if program_file(task.program) not in manifest:
                    raise ValueError(f"pipeline {p.name}, task {task.name}: {program_file(task.program)} is not listed in the "
                                     f"manifest (tampered?), got program {task.program!r}")  # fmt: skip
        return pipelines

    @field_validator("param_files")
    @classmethod
    def _params_listed(cls, param_files: list[str], info: ValidationInfo) -> list[str]:
        manifest = info.data.get("manifest", {})
        for rel in param_files:
            if check_relative_path(rel) not in manifest:
                raise ValueError(f"{rel} is not listed in the manifest (tampered?), got {param_files!r}")
        metadata = info.data.get("model_metadata")
        if metadata is not None and (metadata.weights == "none") != (not param_files):
            raise ValueError(f"model_metadata.weights is {metadata.weights!r} but param_files is {param_files!r} (tampered?)")
        return param_files

    @property
    def shape_only(self) -> bool:
        """Built without weights (``build.weights=none``): for planning and simulation only."""
        return self.model_metadata.weights == "none"

    def pipeline_for(self, bucket: Bucket) -> Pipeline:
        return next(p for p in self.pipelines if p.bucket == bucket)

    def with_pipeline(self, pipeline: Pipeline) -> Artifact:
        """This artifact as served with one more bucket, compiled after the build (``jit_store.py``).

        A copy that is not validated again: the new pipeline's programs are listed in its
        JIT entry's manifest, not in this one, and the entry was verified when read.
        """
        gen = self.generator_config
        phase = "prefill_buckets" if pipeline.bucket.is_prefill else "decode_buckets"
        generator = gen.model_copy(update={phase: [*getattr(gen, phase), pipeline.bucket]})
        return self.model_copy(update={"generator_config": generator, "pipelines": [*self.pipelines, pipeline]})


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ArtifactFiles:
    """The one way the runtime reads an artifact's files.

    A path is resolved inside the artifact folder and refused when it would leave it or
    pass through a symlink (``os.path.realpath`` compared before opening, then opened one
    component at a time with ``O_NOFOLLOW``, so a link swapped in meanwhile is not
    followed either); only regular files are read, only files the manifest lists, and
    the sha256 checked is that of the very bytes handed out (read once, hashed, then
    parsed), or of the same open file the caller then loads from (``open_verified``).
    Symlinks inside the folder are refused even when they point inside it: the builder
    never writes one, and a link could be retargeted between a check and a read.
    """

    def __init__(self, root: str | Path, manifest: Mapping[str, str]) -> None:
        self.root = Path(root)
        self.manifest = dict(manifest)
        self._real_root = os.path.realpath(self.root)
        self._verified: set[str] = set()

    def listed(self, rel: str) -> bool:
        return rel in self.manifest

    def read(self, rel: str) -> bytes:
        """The checked bytes of a listed file."""
        with self._open(self._require_listed(rel)) as f:
            data = f.read()
        self._check_digest(rel, hashlib.sha256(data).hexdigest())
        return data

    def read_if_listed(self, rel: str) -> bytes | None:
        """``read(rel)``, or None for a file the manifest does not list (which is never opened)."""
        return self.read(rel) if self.listed(rel) else None

    @contextmanager
    def open_verified(self, rel: str) -> Iterator[BinaryIO]:
        """A listed file opened once, hashed through that descriptor and rewound.

        For large files (weights): the caller reads or maps this same open file, so what it
        loads is what was checked, without holding two copies or opening the path again.
        A file whose size or modification time changed between the hash and the end of the
        caller's block (rewritten in place meanwhile) is refused.
        """
        with self._open(self._require_listed(rel)) as f:
            before = _version(os.fstat(f.fileno()))
            self._check_digest(rel, hashlib.file_digest(f, "sha256").hexdigest())
            f.seek(0)
            yield f
            if _version(os.fstat(f.fileno())) != before:
                self._verified.discard(rel)
                raise ArtifactError(f"artifact: file {rel} changed while it was being read (rewritten in place?)")

    def read_description(self, name: str = ARTIFACT_FILE) -> bytes:
        """The description file (``artifact.json``, or a JIT entry's), confined like every
        file but unhashed: it holds the manifest."""
        with self._open(name) as f:
            return f.read()

    def check_layout(self) -> None:
        """Refuse, without reading any content, a listed path that is not a regular file
        inside the folder, and a file the runtime reads that is present but unlisted."""
        for rel in self.manifest:
            mode = self._lstat(rel).st_mode
            if not stat.S_ISREG(mode):
                raise ArtifactError(f"artifact: {rel} is not a regular file")
        for rel in RUNTIME_FILES:
            if not self.listed(rel) and os.path.lexists(os.path.join(self._real_root, rel)):
                raise ArtifactError(f"artifact: {rel} is present but not listed in the manifest (tampered?)")

    def verify_all(self) -> None:
        """Hash every listed file not yet checked through this reader."""
        for rel in self.manifest:
            if rel not in self._verified:
                with self.open_verified(rel):
                    pass

    # -- confinement -----------------------------------------------------------------------
    def _require_listed(self, rel: str) -> str:
        if not self.listed(rel):
            raise ArtifactError(f"artifact: {rel} is not listed in the manifest (tampered?)")
        return rel

    def _check_digest(self, rel: str, digest: str) -> None:
        if digest != self.manifest[rel]:
            raise ArtifactError(f"artifact: file {rel} does not match its manifest checksum (corrupted?)")
        self._verified.add(rel)

    def _resolve(self, rel: str) -> str:
        """The absolute path of ``rel``, refused unless it stays in the folder without symlinks."""
        try:
            check_relative_path(rel)
        except ValueError as err:
            raise ArtifactError(f"artifact: path {err}") from None
        path = os.path.join(self._real_root, *rel.split("/"))
        real = os.path.realpath(path)
        if os.path.commonpath([real, self._real_root]) != self._real_root:
            raise ArtifactError(f"artifact: {rel} resolves outside the artifact folder (symlink to {real})")
        if real != path:
            raise ArtifactError(f"artifact: {rel} is reached through a symlink; artifact files must be regular files")
        return path

    def _lstat(self, rel: str) -> os.stat_result:
        try:
            return os.lstat(self._resolve(rel))
        except FileNotFoundError:
            raise ArtifactError(f"artifact: file {rel} listed in the manifest is missing") from None
        except OSError as err:  # e.g. a folder on the way replaced by a file
            raise ArtifactError(f"artifact: cannot read {rel} ({err.strerror})") from None

    def _open(self, rel: str) -> BinaryIO:
        """Open a regular file for reading, confined as the class says."""
        self._resolve(rel)
        try:
            fd = _open_no_follow(self._real_root, rel.split("/"))
        except FileNotFoundError:
            raise ArtifactError(f"artifact: file {rel} listed in the manifest is missing") from None
        except OSError as err:
            raise ArtifactError(f"artifact: cannot read {rel} ({err.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder naming only the fd
            os.close(fd)
            raise ArtifactError(f"artifact: {rel} is not a regular file")
        return os.fdopen(fd, "rb")


def _version(st: os.stat_result) -> tuple[int, int, int]:
    """What changes when an open file is rewritten in place: its size and times."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _open_no_follow(root: str, parts: list[str]) -> int:
    """A read-only descriptor of ``root/parts...``, following no symlink on the way.

    ``O_NONBLOCK`` keeps a FIFO from blocking the open (it is then refused as not a
    regular file); it changes nothing for regular files.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    finally:
        os.close(fd)


def open_artifact(path: str | Path) -> tuple[Artifact, ArtifactFiles]:
    """Read and validate ``artifact.json`` and check the folder's layout against its manifest.

    Returns the description and the reader every other file must be read through (each
    file is hashed when read).  Errors are one-line ``ArtifactError``s naming the file.
    """
    root = Path(path)
    meta = root / ARTIFACT_FILE
    if not root.is_dir():
        raise ArtifactError(f"artifact: {root} {'is not a directory' if os.path.lexists(root) else 'does not exist'}")
    if not os.path.lexists(meta):
        raise ArtifactError(f"artifact: {meta} is missing; is {root} an artifact built by furiosa_build?")
    description = ArtifactFiles(root, {}).read_description()
    try:  # strict: the builder writes every value with its type, so "8" for 8 means an edited file
        artifact = Artifact.model_validate(parse_json(description), strict=True)
    except ValidationError as err:
        raise ArtifactError(f"artifact: {meta} is not a valid artifact description ({first_error(err)})") from None
    except ValueError as err:
        raise ArtifactError(f"artifact: {meta} is not a valid artifact description ({err})") from None
    files = ArtifactFiles(root, artifact.manifest)
    files.check_layout()
    return artifact, files


def parse_json(data: bytes) -> Any:
    """``data`` decoded as UTF-8 JSON, or a ValueError whose message is one line: bad UTF-8
    or syntax, nesting too deep for the parser (a RecursionError otherwise) or an integer
    too long to convert (Python refuses more than 4300 digits)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8: {err.reason} at byte {err.start}") from None
    except json.JSONDecodeError as err:
        raise ValueError(str(err)) from None
    except RecursionError:
        raise ValueError("arrays or objects nested too deeply") from None
    except ValueError:  # what json.loads raises besides the above: int() past sys.get_int_max_str_digits()
        raise ValueError(f"an integer longer than {sys.get_int_max_str_digits()} digits") from None


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Read and validate ``artifact.json`` (see ``open_artifact``); with ``verify``, also check
    every listed file's sha256.  Paths are confined to the folder either way."""
    artifact, files = open_artifact(path)
    if verify:
        files.verify_all()
    return artifact

"""The functional NPU simulator: PEs holding weights and KV cache, executing programs.

A ``PE`` owns its slice of device memory (its weight shards stored in bf16, the paged KV
cache of the layers it serves) and checks every allocation against the hardware
description.  ``NPUSimulator`` lays the artifact out on a device mesh: tensor
parallelism as built, pipeline stages as built or overridden at load (blockwise
artifacts), and data-parallel replicas over the remaining PEs.  Running a bucket walks
its pipeline: the PEs of a tensor-parallel group execute their programs in lockstep and
meet at every collective (``all_reduce``, ``all_gather``), and activations cross
pipeline stages through explicit transfers.  The KV cache of a layer on the same PE of
every replica is one host array whose rows are indexed by global block ids (replica r's
blocks ``[r * num_blocks, (r + 1) * num_blocks)``, the engine's per-replica pools), so a
batch reads and writes it as fed, whichever replicas its rows sit on.  Beside the values,
every bucket has a modelled step latency (``step_seconds``, the timing face in
``timing.py``).  Set ``FURIOSA_TRACE=1`` to print every instruction, collective and
transfer as it executes.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections import Counter
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path

import numpy as np

from furiosa_runtime.npu.artifact import (
    Artifact,
    ArtifactError,
    ArtifactFiles,
    Bucket,
    Pipeline,
    Task,
    Transfer,
)
from furiosa_runtime.npu.hardware import HardwareSpec, Mesh, device_of
from furiosa_runtime.npu.isa import (
    COLLECTIVES,
    COMPUTE_DTYPE,
    DTYPES,
    QUANTIZED_DTYPES,
    ExecContext,
    Instruction,
    KVCacheLayer,
    Program,
    execute,
)
from furiosa_runtime.npu.step_times import StepTimes, layers_per_stage, load_programs, stage_plan
from furiosa_runtime.npu.weights import (
    SafetensorsFormatError,
    WidenedWeights,
    check_budget,
    default_budget,
    map_safetensors,
    needs_widening,
    safetensors_dtype,
    widened_nbytes,
)

TRACE = os.environ.get("FURIOSA_TRACE") == "1"

#: A program in execution: yields (collective instruction, operand), resumes with the result.
ProgramRun = Generator[tuple[Instruction, np.ndarray], np.ndarray, list[np.ndarray]]


class DeviceMemoryError(RuntimeError):
    """A PE (or a device) would exceed its memory."""


@dataclass
class PE:
    """One processing element: its memory image and usage accounting."""

    name: str
    capacity: int
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    kv: dict[int, KVCacheLayer] = field(default_factory=dict)

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
        """Store a weight (a read-only view of the mapped param file): its stored bytes count."""
        if name not in self.weights:
            self.reserve(array.nbytes, f"weight {name}")
            self.weights[name] = array


class TaskWeights(Mapping[str, np.ndarray]):
    """The parameters of one task on its PE, as ``program_run`` reads them: each lookup is
    the weight in its compute dtype through the simulator's widened-weight budget, and
    ``stored`` is the weight as the PE stores it (for ``STORED_OPERANDS``)."""

    def __init__(self, binding: Mapping[str, str], pe: PE, widened: WidenedWeights) -> None:
        self.binding = binding  # program parameter ("p:...") -> tensor name
        self.pe = pe
        self.widened = widened

    def __getitem__(self, name: str) -> np.ndarray:
        tensor = self.binding[name]
        return self.widened.get(tensor, self.pe.weights[tensor])

    def stored(self, name: str) -> np.ndarray:
        return self.pe.weights[self.binding[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self.binding)

    def __len__(self) -> int:
        return len(self.binding)


#: Operands a kernel indexes before it widens them (``_f32(table[ids])``): a weight read
#: there is handed over as stored, which gives the same bytes without widening the whole
#: tensor (an embedding table, the experts of a MoE layer).
STORED_OPERANDS: dict[str, tuple[int, ...]] = {"gather": (0,), "moe_experts": (3, 4)}


def program_run(program: Program, inputs: list[np.ndarray], params: Mapping[str, np.ndarray], kv: Sequence[KVCacheLayer], block_size: int) -> ProgramRun:
    """Execute one program with its reference semantics; values are released at last use.

    ``params`` maps each program parameter to its value in the compute dtype; it is read
    when an instruction needs the parameter, so a lazy mapping (``TaskWeights``) widens
    weights one use at a time; one with a ``stored(name)`` method is asked for the stored
    weight at ``STORED_OPERANDS``.  At a collective the run yields its operand and waits
    for the group's result, so the PEs of a tensor-parallel group can be stepped in
    lockstep (``run_group``).
    """
    env: dict[str, np.ndarray] = {spec.name: arr for spec, arr in zip(program.inputs, inputs)}
    env.update({c.name: c.array() for c in program.constants})
    stored = getattr(params, "stored", None)
    for inst in program.instructions:
        raw = STORED_OPERANDS.get(inst.op, ()) if stored is not None else ()
        operands = [env[name] if name in env else stored(name) if i in raw else params[name] for i, name in enumerate(inst.ins)]  # type: ignore[misc]
        if inst.op in COLLECTIVES:
            outs: tuple[np.ndarray, ...] = ((yield inst, operands[0]),)
        else:
            outs = execute(inst, operands, ExecContext(kv=kv[inst.attrs["kv_index"]] if inst.op == "paged_attention" else None, block_size=block_size))
        env.update(zip(inst.outs, outs))
        if TRACE:
            print(f"[npu] {inst.op:16s} {','.join(inst.ins)} -> {inst.outs[0]} {outs[0].shape}", file=sys.stderr)
        for name in inst.free:
            env.pop(name, None)
    return [env[name] for name in program.outputs]


def run_group(runs: list[ProgramRun]) -> list[list[np.ndarray]]:
    """Step the programs of one tensor-parallel group together; return each one's outputs.

    Every run advances to its next collective; the collective's reference function
    combines the operands in rank order and each run resumes with the result.
    """
    results: list[list[np.ndarray] | None] = [None] * len(runs)
    replies: list[np.ndarray | None] = [None] * len(runs)
    while True:
        requests = []
        for rank, run in enumerate(runs):
            try:
                requests.append(run.send(replies[rank]))
            except StopIteration as done:
                results[rank] = done.value
                requests.append(None)
        if all(r is None for r in requests):
            return results  # type: ignore[return-value]
        ops = {r[0].op if r else None for r in requests}
        assert len(ops) == 1, f"the PEs of a tensor-parallel group diverged at {ops}"
        inst = requests[0][0]  # type: ignore[index]
        combined = COLLECTIVES[inst.op]([r[1] for r in requests], inst.attrs)  # type: ignore[index]
        if TRACE:
            print(f"[npu] {inst.op:16s} {inst.ins[0]} over {len(runs)} PEs -> {combined.shape}", file=sys.stderr)
        replies = [combined] * len(runs)


def run_program(program: Program, inputs: list[np.ndarray], params: dict[str, np.ndarray], kv: Sequence[KVCacheLayer], block_size: int) -> list[np.ndarray]:
    """Execute one single-PE program (a collective is over a group of one)."""
    return run_group([program_run(program, inputs, params, kv, block_size)])[0]


@dataclass(frozen=True)
class Schedule:
    """Where a pipeline's tasks run in this mesh: the stage of each task and the transfers."""

    stages: dict[str, int]
    transfers: dict[str, list[Transfer]]  # after task name -> sends


#: The safetensors names of the dtypes weights may be stored in.
_STORED_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32", "I64": "i64", "I32": "i32", "BOOL": "bool", "F8_E4M3": "f8_e4m3fn", "I8": "i8"}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _load_tensors(files: ArtifactFiles, rel: str) -> dict[str, np.ndarray]:
    """The tensors of one weight file: read-only views of a mapping of the very descriptor
    its checksum was computed on (``weights.map_safetensors``), never copies."""
    with files.open_verified(rel) as f:
        try:
            tensors = map_safetensors(f)
        except SafetensorsFormatError as err:
            raise ArtifactError(f"artifact: {rel} is not a valid safetensors file ({err})") from None
    for name, array in tensors.items():
        stored = safetensors_dtype(array.dtype)
        if stored not in _STORED_DTYPES:
            raise ArtifactError(f"artifact: {rel}: tensor {name} is stored as {stored}, which is not a weight dtype")
    return tensors


def _widened_params(program: Program) -> set[str]:
    """The parameters of ``program`` some instruction reads in the compute dtype (anywhere
    but at ``STORED_OPERANDS``): the weights that get widened."""
    params = {spec.name for spec in program.params}
    return {name for inst in program.instructions for i, name in enumerate(inst.ins)
            if name in params and i not in STORED_OPERANDS.get(inst.op, ())}  # fmt: skip


def check_task(pipeline: Pipeline, task: Task, program: Program, tensors: dict[str, np.ndarray]) -> None:
    """Refuse, in one line naming the task, a task its program and weights disagree on:
    otherwise the lie surfaces as a NumPy error (or a wrong answer) in the middle of a step.

    Every bound tensor exists; every program parameter is bound to a tensor of its shape,
    stored in a dtype that widens to the parameter's; values and KV layers match the
    program's inputs, outputs and attentions, and pipeline inputs have the shapes it takes.
    """
    where = f"artifact: pipeline {pipeline.name}, task {task.name} (shard {task.shard})"
    for rel, tensor in task.params.items():
        if tensor not in tensors:
            raise ArtifactError(f"{where}: parameter {rel} binds tensor {tensor!r}, which no param file holds")
    for spec in program.params:
        rel = spec.name.removeprefix("p:")
        if rel not in task.params:
            raise ArtifactError(f"{where}: program parameter {rel} is bound to no tensor")
        array = tensors[task.params[rel]]
        if array.shape != spec.shape:
            raise ArtifactError(f"{where}: parameter {rel} has shape {list(spec.shape)} in the program but tensor "
                                f"{task.params[rel]} has shape {list(array.shape)}")  # fmt: skip
        stored = _DTYPE_NAMES[array.dtype]
        # a quantized weight is declared in its storage dtype, any other in its compute dtype
        if (stored if stored in QUANTIZED_DTYPES or spec.dtype in QUANTIZED_DTYPES else COMPUTE_DTYPE[stored]) != spec.dtype:
            raise ArtifactError(f"{where}: parameter {rel} is {spec.dtype} in the program but tensor {task.params[rel]} is "
                                f"stored as {stored}")  # fmt: skip
    _check_signature(where, pipeline, task, program)


def _check_signature(where: str, pipeline: Pipeline, task: Task, program: Program) -> None:
    attentions = sum(inst.op == "paged_attention" for inst in program.instructions)
    for what, bound, taken in (("inputs", task.inputs, program.inputs), ("outputs", task.outputs, program.outputs),
                               ("kv_layers", task.kv_layers, range(attentions))):  # fmt: skip
        if len(bound) != len(taken):
            raise ArtifactError(f"{where}: {len(bound)} {what} for a program that has {len(taken)}")
    fed = {spec.name: spec.shape for spec in pipeline.inputs}
    for spec, value in zip(program.inputs, task.inputs):
        if value in fed and list(spec.shape) != fed[value]:
            raise ArtifactError(f"{where}: input {value} has shape {fed[value]} but the program takes {list(spec.shape)}")


def embedding_rows(artifact: Artifact, programs: dict[str, Program], tensors: dict[str, np.ndarray]) -> int:
    """How many token ids the model can embed: the rows of every table its embed tasks
    gather ``input_ids`` from (vocab-parallel shards summed), the smallest if several.

    This, not ``hf_config.vocab_size`` (which nothing ties to the weights), bounds the
    prompt ids a request may carry.
    """
    rows = []
    for pipeline in artifact.pipelines:
        embeds = [t for t in pipeline.tasks if t.kind == "embed"]
        for name in dict.fromkeys(t.name for t in embeds):
            shards = [t for t in embeds if t.name == name]
            program = programs[shards[0].program]
            for rel in _token_tables(program, shards[0]):
                layout = program.tensor_parallel.params.get(rel) if program.tensor_parallel else None
                chunks = {t.params[rel] for t in shards} if layout is not None and layout.dim == 0 else {shards[0].params[rel]}
                rows.append(sum(tensors[chunk].shape[0] for chunk in chunks))
    if not rows:
        raise ArtifactError("artifact: no embed task looks up input_ids in a weight table, so token ids cannot be bounded")
    return min(rows)


def _token_tables(program: Program, task: Task) -> list[str]:
    """The parameters ``program`` gathers rows of by token id (indices computed from the
    ``input_ids`` pipeline value, e.g. shifted into a vocab-parallel shard)."""
    derived = {spec.name for spec, value in zip(program.inputs, task.inputs) if value == "input_ids"}
    tables = []
    for inst in program.instructions:
        if inst.op == "gather" and inst.ins[1] in derived and inst.ins[0].startswith("p:"):
            tables.append(inst.ins[0].removeprefix("p:"))
        elif any(name in derived for name in inst.ins):
            derived.update(inst.outs)
    return tables


def keep_freed_memory() -> None:
    """Let the C allocator keep freed activation memory for the next step (glibc only).

    Every step allocates and frees the same activation sizes.  By default glibc gives
    large freed blocks back to the OS (``munmap``, heap trimming), so the next step faults
    their pages in afresh: a tenth of the CPU time of a 256-token prefill step.  Serving
    blocks up to ``MMAP_THRESHOLD`` from the heap and trimming it only above
    ``TRIM_THRESHOLD`` of free memory keeps them mapped; other allocators are left alone.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest dynamic threshold, above any activation of a step
TRIM_THRESHOLD = 256 * 2**20


class NPUSimulator:
    """Programs and weights of one artifact placed on a mesh of simulated PEs.

    ``files`` is the artifact's verified reader (a folder path gets one over the
    artifact's manifest).  ``devices``, ``pipeline_parallel_size`` and
    ``data_parallel_size`` are the load-time settings (None: the artifact's devices and
    stages, and as many replicas as the PEs allow); tensor parallelism is fixed by the
    artifact.  Loading checks every task's program against the weights it binds, and
    ``token_rows`` is how many token ids the embedding really holds.

    Weights stay where the param files are mapped (read-only views, see ``weights.py``);
    the float32 copies the kernels read of bf16 weights are kept in ``widened``, at most
    ``weight_cache_bytes`` of them, least recently used evicted first, shared by the
    replicas.  None: ``default_weight_cache_bytes``.  Outputs are the same for any budget.
    """

    def __init__(
        self,
        files: ArtifactFiles | str | Path,
        artifact: Artifact,
        hw: HardwareSpec | None = None,
        *,
        devices: str | None = None,
        pipeline_parallel_size: int | None = None,
        data_parallel_size: int | None = None,
        weight_cache_bytes: int | None = None,
    ) -> None:
        check_budget(weight_cache_bytes)
        keep_freed_memory()
        if artifact.shape_only:
            raise ValueError(f"artifact {artifact.metadata.name!r} was built without weights (build.weights=none): "
                             "it can be planned and simulated, not run; build it with weights to generate")  # fmt: skip
        files = files if isinstance(files, ArtifactFiles) else ArtifactFiles(files, artifact.manifest)
        self.artifact = artifact
        self.hw = hw or artifact.hardware
        self.block_size = artifact.generator_config.paged_attention_config.block_size
        self.layers_per_stage = layers_per_stage(artifact, pipeline_parallel_size)
        self.programs = load_programs(files, artifact)
        times = StepTimes(artifact, self.programs, self.hw, devices=devices, pipeline_parallel_size=pipeline_parallel_size,
                          data_parallel_size=data_parallel_size)  # fmt: skip
        self.mesh: Mesh = times.mesh
        #: Modelled latency of one step of each bucket's pipeline (``timing.py``, ``step_times.py``).
        self.step_seconds = times.seconds
        tensors = self._read_weights(files)
        #: How many token ids the embedding holds (``embedding_rows``): the bound on prompt ids.
        self.token_rows = embedding_rows(artifact, self.programs, tensors)
        self.schedules = {p.name: self._schedule(p) for p in artifact.pipelines}
        self._collectives = {key: sum(i.op in COLLECTIVES for i in p.instructions) for key, p in self.programs.items()}
        self.pes: dict[str, PE] = {}
        self.stats: Counter[str] = Counter()  # collectives run, transfers and bytes moved
        #: The KV cache of each (stage, rank, layer) over every replica (``_allocate_kv_cache``).
        self._host_kv: dict[tuple[int, int, int], KVCacheLayer] = {}
        self._place_weights(tensors)
        self._allocate_kv_cache()
        if weight_cache_bytes is None:
            weight_cache_bytes = self.default_weight_cache_bytes()
        #: The float32 copies of bf16 weights, within ``weight_cache_bytes`` (shared by replicas).
        self.widened = WidenedWeights(weight_cache_bytes, self._linear_weights())

    # -- layout ----------------------------------------------------------------------------
    def _schedule(self, pipeline: Pipeline) -> Schedule:
        stages, transfers = stage_plan(self.artifact, pipeline, self.layers_per_stage)
        after: dict[str, list[Transfer]] = {}
        for transfer in transfers:
            after.setdefault(transfer.after_task, []).append(transfer)
        return Schedule(stages, after)

    def _placements(self) -> list[tuple[Task, PE]]:
        """Every task of every pipeline with the PE of each replica that runs it."""
        return [
            (task, self.pe(self.mesh.pe(replica, self.schedules[p.name].stages[task.name], task.shard)))
            for p in self.artifact.pipelines
            for task in p.tasks
            for replica in range(self.mesh.dp)
        ]

    def pe(self, name: str) -> PE:
        if name not in self.pes:
            self.pes[name] = PE(name, self.hw.pe_hbm_bytes)
        return self.pes[name]

    # -- loading ---------------------------------------------------------------------------
    def _read_weights(self, files: ArtifactFiles) -> dict[str, np.ndarray]:
        """The tensors of every param file, once every task is known to agree with them
        (checked before anything else looks at the tasks)."""
        tensors: dict[str, np.ndarray] = {}
        for rel in self.artifact.param_files:
            tensors.update(_load_tensors(files, rel))
        for pipeline in self.artifact.pipelines:
            for task in pipeline.tasks:
                check_task(pipeline, task, self.programs[task.program], tensors)
        return tensors

    def _place_weights(self, tensors: dict[str, np.ndarray]) -> None:
        """Every PE stores exactly the tensors its tasks bind (its shards, or whole tensors)."""
        for task, pe in self._placements():
            for tensor in task.params.values():
                pe.load_weight(tensor, tensors[tensor])
        self._check_devices()

    def _allocate_kv_cache(self) -> None:
        """Give every PE the KV storage (its KV heads) of the layers whose attention it runs.

        The same PE of every data-parallel replica (same stage and rank) keeps its cache of a
        layer in one host array, replica r's slots at rows ``[r * slots, (r + 1) * slots)``
        (the blocks of its pool in the engine's global block ids); each PE's ``kv`` views its
        replica's rows, which is what its memory accounting counts.
        """
        gen = self.artifact.generator_config
        num_slots = gen.paged_attention_config.num_blocks * self.block_size
        dtype = DTYPES[gen.kv_cache_dtype]
        for p in self.artifact.pipelines:
            for task in p.tasks:
                program = self.programs[task.program]
                attention = [i for i in program.instructions if i.op == "paged_attention"]
                stage = self.schedules[p.name].stages[task.name]
                for layer, inst in zip(task.kv_layers, attention):
                    key = (stage, task.shard, layer)
                    if key in self._host_kv:
                        continue
                    kv_heads, head_dim, v_head_dim = program.values[inst.ins[1]].shape[1], program.values[inst.ins[1]].shape[3], program.values[inst.ins[2]].shape[3]
                    host = self._host_kv[key] = KVCacheLayer(self.mesh.dp * num_slots, kv_heads, head_dim, v_head_dim, dtype)
                    for replica in range(self.mesh.dp):
                        pe = self.pe(self.mesh.pe(replica, stage, task.shard))
                        rows = host.kv[replica * num_slots : (replica + 1) * num_slots]
                        pe.reserve(rows.nbytes, f"KV cache of layer {layer}")
                        pe.kv[layer] = KVCacheLayer(num_slots, kv_heads, head_dim, v_head_dim, dtype, storage=rows)
        self._check_devices()

    def _check_devices(self) -> None:
        for device, used in self.device_memory_report().items():
            if used > self.hw.hbm_bytes:
                raise DeviceMemoryError(f"{device}: its PEs need {used / 2**30:.2f} GiB of {self.hw.hbm_bytes / 2**30:.1f} GiB")

    def memory_report(self) -> dict[str, int]:
        """Bytes used on every PE."""
        return {name: pe.used_bytes for name, pe in sorted(self.pes.items())}

    def device_memory_report(self) -> dict[str, int]:
        """Bytes used on every device (the sum over its PEs)."""
        totals: Counter[str] = Counter()
        for name, pe in self.pes.items():
            totals[device_of(name)] += pe.used_bytes
        return dict(sorted(totals.items()))

    def weight_view(self, name: str, pe: PE) -> np.ndarray:
        """A weight the PE holds in its compute dtype: bf16 widened to f32 (kept within the
        budget, see ``widened``), any other dtype as stored."""
        return self.widened.get(name, pe.weights[name])

    def default_weight_cache_bytes(self) -> int:
        """The widened-weight budget when none is given (``weights.default_budget``): half of
        the machine's available memory left after the mapped weights and the KV cache, and
        at least the largest weight the kernels read widened."""
        stored = {name: array for pe in self.pes.values() for name, array in pe.weights.items()}
        widened = set()
        for task, _ in self._placements():
            for param in _widened_params(self.programs[task.program]):
                widened.add(task.params[param.removeprefix("p:")])
        largest = max((widened_nbytes(stored[name]) for name in widened if needs_widening(stored[name].dtype)), default=0)
        kv = sum(layer.nbytes for pe in self.pes.values() for layer in pe.kv.values())
        return default_budget(largest, sum(array.nbytes for array in stored.values()), kv)

    def _linear_weights(self) -> set[str]:
        """The tensors some task reads as the ``[N, K]`` weight of a ``linear`` instruction
        (``w_layout`` "nk"): their widened copies are kept column-major (``WidenedWeights``)."""
        names = set()
        for task, _ in self._placements():
            for inst in self.programs[task.program].instructions:
                nk = inst.op == "quantized_linear" or inst.attrs.get("w_layout", "nk") == "nk"
                if inst.op in ("linear", "quantized_linear") and nk and inst.ins[1].startswith("p:"):
                    names.add(task.params[inst.ins[1].removeprefix("p:")])
        return names

    def copy_kv_blocks(self, src: int, dst: int) -> None:
        """Copy KV block ``src`` into ``dst`` (global block ids, on one replica) in every layer
        of every PE (the private last block of a forked sequence)."""
        slots = np.arange(self.block_size)
        src_slots, dst_slots = src * self.block_size + slots, dst * self.block_size + slots
        for layer in self._host_kv.values():
            layer.kv[dst_slots] = layer.kv[src_slots]
        self.stats["kv_block_copies"] += 1

    # -- running ---------------------------------------------------------------------------
    def run(self, bucket: Bucket, feeds: dict[str, np.ndarray], replica: int | Sequence[int] = 0) -> np.ndarray:
        """Run the pipeline of ``bucket`` and return its output.

        ``replica`` is the data-parallel replica serving every row, or one per row (counted in
        ``stats``).  The rows of several replicas run as one batch on the host: the replicas
        hold the same weights, so one execution of each program computes every row, while
        each row's K/V is written to and read from its own replica's rows of the KV cache,
        as its global block ids say.  (The timing model still counts each replica as a
        device of its own.)  The host gives every stage the user inputs (``feeds``);
        activations reach later stages only through the transfers.
        """
        replicas = sorted({int(replica)} if isinstance(replica, int | np.integer) else {int(r) for r in replica})
        pipeline = self.artifact.pipeline_for(bucket)
        schedule = self.schedules[pipeline.name]
        values = [dict(feeds) for _ in range(self.mesh.pp)]  # what each stage's PEs hold
        for name, group in groupby(pipeline.tasks, key=lambda t: t.name):
            stage = schedule.stages[name]
            outputs = self._run_group(list(group), replicas, stage, values[stage])
            values[stage].update(outputs)
            for transfer in schedule.transfers.get(name, []):
                self._transfer(transfer, values, replicas)
        return values[schedule.stages[pipeline.tasks[-1].name]][pipeline.output]

    def _run_group(self, tasks: list[Task], replicas: list[int], stage: int, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One supertask on the tensor-parallel group of every replica in ``replicas``, in one
        execution per rank; its outputs are replicated, so rank 0's stand for all."""
        runs = []
        for task in tasks:
            program = self.programs[task.program]
            pe = self.pes[self.mesh.pe(replicas[0], stage, task.shard)]  # every replica holds these same tensors
            params = TaskWeights({spec.name: task.params[spec.name[2:]] for spec in program.params}, pe, self.widened)
            kv = [self._host_kv[(stage, task.shard, layer)] for layer in task.kv_layers]  # every replica's rows
            runs.append(program_run(program, [values[v] for v in task.inputs], params, kv, self.block_size))
        outputs = run_group(runs)
        self.stats["collectives"] += self._collectives[tasks[0].program] * len(replicas)
        return dict(zip(tasks[0].outputs, outputs[0]))

    def _transfer(self, transfer: Transfer, values: list[dict[str, np.ndarray]], replicas: list[int]) -> None:
        """Send an activation from every PE of the source stage to the same rank of the
        destination, in every replica (each sends its own rows)."""
        data = values[transfer.src_stage][transfer.value]
        values[transfer.dst_stage][transfer.value] = np.array(data, copy=True)
        self.stats["transfers"] += len(replicas)
        self.stats["transfer_bytes"] += data.nbytes * self.mesh.tp
        if TRACE:
            src = [pe for replica in replicas for pe in self.mesh.group(replica, transfer.src_stage)]
            dst = [pe for replica in replicas for pe in self.mesh.group(replica, transfer.dst_stage)]
            print(f"[npu] transfer         {transfer.value} {','.join(src)} -> {','.join(dst)} {data.shape}", file=sys.stderr)

    def pipeline(self, bucket: Bucket) -> Pipeline:
        return self.artifact.pipeline_for(bucket)

    def add_pipeline(self, pipeline: Pipeline, programs: dict[str, Program]) -> None:
        """Serve one more bucket, compiled after the artifact (``engine/jit.py``), from the
        next step on: its tasks are checked against the weights the PEs hold, as every
        task is at load, then placed, scheduled and timed like the artifact's own."""
        held = {name: array for pe in self.pes.values() for name, array in pe.weights.items()}
        for task in pipeline.tasks:
            check_task(pipeline, task, programs[task.program], held)
        self.artifact = self.artifact.with_pipeline(pipeline)
        self.programs.update(programs)
        self._collectives.update({key: sum(i.op in COLLECTIVES for i in p.instructions) for key, p in programs.items()})
        self.schedules[pipeline.name] = self._schedule(pipeline)
        self._place_weights(held)
        mesh = self.mesh  # the very mesh of the load, planned again from its PEs
        times = StepTimes(self.artifact, self.programs, self.hw, devices=",".join(mesh.pes), pipeline_parallel_size=mesh.pp,
                          data_parallel_size=mesh.dp)  # fmt: skip
        self.step_seconds[pipeline.name] = times.seconds[pipeline.name]

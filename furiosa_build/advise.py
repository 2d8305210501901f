"""``python -m furiosa_build.advise``: prefill and decode buckets for a traffic, within a budget
of programs and the device's memory, chosen by modelled serving.

    python -m furiosa_build.advise --workload chat.jsonl --max-programs 8 model=shape-llama-3.2-1b parallel=single
    python -m furiosa_build.advise --workload lognormal:1800,700:150,80 --num-prompts 400 --max-programs 6 \\
        model=shape-llama-3.1-8b parallel=device --max-memory 48GiB --name rag-8b --out my-conf/buckets

The positional arguments are Hydra overrides of ``conf/config.yaml``, as ``python -m
furiosa_build`` takes them: they say which model, parallel layout, hardware, KV block size
(``buckets.paged_attention_block_size``) and scheduler the buckets are for.  The buckets
config they compose (``buckets=default`` unless chosen) is the *base grid*: the search
starts from it, stretched to hold the traffic, and the advice is compared with it.

It writes ``<out>/<name>.yaml`` (``--out`` defaults to the package's ``conf/buckets``,
``--name`` to ``advised-<trace name>``): a complete ``buckets`` config with its reasoning
as comments (``advise_report.py``), written to a temporary file and renamed, and only over
a file the advisor wrote itself unless ``--force``.  ``--max-programs`` counts bucket
programs (one compiled pipeline per bucket); ``--max-memory`` is the memory of one device
(default: the hardware's), shared equally by its PEs.  The cost is the NPU time the
traffic takes, all requests at once by default (``--request-rate inf``, the throughput
methodology; ``--request-rate trace`` keeps a trace's arrival times).

How it decides, and why each step is modelled as it is: ``advise_traffic.py`` (the
traffic), ``advise_cost.py`` (step latencies from shape-only builds, modelled serving,
memory) and ``advise_search.py`` (candidates and the search).

**Inside a sweep.**  The file is one more option of the ``buckets`` config group, so a
sweep builds it beside others and its report ranks them on the same traffic (the file's
comments give the exact command):

    python -m furiosa_build -m model=shape-llama-3.2-1b parallel=single build.weights=none \\
        buckets=default,advised-chat sweep.workload=chat.jsonl sweep.num_prompts=400

Written elsewhere with ``--out DIR/buckets``, it is found with ``--config-dir DIR``.
A mistake (a missing trace, a budget below 2, a request longer than the model's positions,
an unknown model...) is one line ``error: <field>: <problem>``, exit status 2, and nothing
is written.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from furiosa_build.advise_cost import Candidates, Grid, Memory, Simulator
from furiosa_build.advise_report import MARKER, PACKAGE_BUCKETS, Advice, size_text
from furiosa_build.advise_search import Limits, Pool, Search, fit_size
from furiosa_build.advise_traffic import AdviseError, Traffic
from furiosa_build.cli import _Parser
from furiosa_build.config import USER_ERRORS, BuildSpec
from furiosa_build.errors import EXIT_USER_ERROR
from furiosa_build.model_checks import position_limit
from furiosa_build.output_paths import check_creatable
from furiosa_build.scratch import atomic_write
from furiosa_runtime.entrypoints.arg_checks import non_negative_int, positive_int
from furiosa_runtime.npu.artifact import MAX_ATTENTION_SIZE, MAX_KV_SLOTS, Bucket

DEFAULT_SAMPLE = 512  # requests simulated per grid: about a second each
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Options:
    """What the advisor is asked: its command line as values (tests and benches pass these)."""

    workload: str
    max_programs: int
    overrides: tuple[str, ...] = ()
    num_prompts: int | None = None
    request_rate: float | None = math.inf  # None: a trace's own arrival times
    max_memory: int | None = None  # bytes of one device; None: the hardware's
    sample: int = DEFAULT_SAMPLE
    seed: int = 0
    name: str | None = None
    out: Path | None = None
    force: bool = False

    def command(self) -> str:
        """The command line that asks for exactly this."""
        flags = ["--workload", self.workload, "--max-programs", str(self.max_programs)]
        for flag, value, default in (("--num-prompts", self.num_prompts, None), ("--max-memory", self.max_memory, None),
                                     ("--sample", self.sample, DEFAULT_SAMPLE), ("--seed", self.seed, 0)):  # fmt: skip
            if value != default:
                flags += [flag, str(value)]
        if self.request_rate != math.inf:
            flags += ["--request-rate", "trace" if self.request_rate is None else f"{self.request_rate:g}"]
        return shlex.join(["python", "-m", "furiosa_build.advise", *flags, *self.overrides])

    def target(self) -> Path:
        """The file the advice goes to."""
        return (self.out or PACKAGE_BUCKETS) / f"{self.name or default_name(self.workload)}.yaml"


def default_name(workload: str) -> str:
    """``advised-<trace file stem>`` (or ``advised-<distribution>``), as a config name."""
    stem = Path(workload).stem if Path(workload).is_file() else workload.split(":", 1)[0]
    return "advised-" + (re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "traffic")


# --------------------------------------------------------------------------- the advice


def advise(options: Options, say: Callable[[str], None] = lambda _: None) -> Advice:
    """Choose the buckets (see the module docstring); ``AdviseError`` or a user error of
    the build (one line naming the field) for a request that cannot be served."""
    target = check_target(options)
    spec, hf_config = compose(options.overrides)
    traffic = Traffic.read(options.workload, num_prompts=options.num_prompts, request_rate=options.request_rate,
                           sample=options.sample, seed=options.seed)  # fmt: skip
    traffic.check_positions(hf_config)
    found = position_limit(hf_config)
    positions = found[1] if found else MAX_ATTENTION_SIZE
    with tempfile.TemporaryDirectory(prefix="furiosa-advise-") as scratch:
        candidates = Candidates(_with_cache(spec, Path(scratch)), Path(scratch) / "candidates", say)
        memory, num_blocks = fit_memory(options, spec, candidates, traffic, positions)
        simulator = Simulator(candidates, traffic, num_blocks, options.seed)
        pool = Pool(traffic, Limits.of(traffic, spec.buckets.paged_attention_block_size, positions, num_blocks, spec.scheduler))
        return _search(options, target, spec, memory, simulator, pool, say)


def _search(options: Options, target: Path, spec: BuildSpec, memory: Memory, simulator: Simulator, pool: Pool,
            say: Callable[[str], None]) -> Advice:  # fmt: skip
    """Search from the pool's starts and the base grid; the advice, with the base grid's serving."""
    search = Search(simulator, pool, options.max_programs, say)
    base, base_label = base_grid(spec, options.overrides, pool.cover)
    starts = {**pool.starts(options.max_programs), base_label: base}
    grid = search.run({name: start for name, start in starts.items() if search.allows(start)})
    base_served = simulator(base) if search.serves(base) else None
    return Advice(target, options.command(), options.overrides, spec, traffic=simulator.traffic, memory=memory,
                  num_blocks=simulator.num_blocks, budget=options.max_programs, grid=grid, served=simulator(grid), base=base,
                  base_label=base_label, base_served=base_served, steps=search.steps, start=search.start,
                  simulated=len(simulator.served), built=len(simulator.candidates.built))  # fmt: skip


def check_target(options: Options) -> Path:
    """The budget, the name and the output file, checked before any work."""
    if options.max_programs < 2:
        raise AdviseError(f"--max-programs: must be at least 2 (a prefill and a decode bucket), got {options.max_programs}")
    if options.sample < 1:
        raise AdviseError(f"--sample: must be at least 1, got {options.sample}")
    if options.name is not None and not _NAME.match(options.name):
        raise AdviseError(f"--name: expected letters, digits, '.', '_' or '-' (starting with a letter or digit), got {options.name!r}")
    target = options.target()
    check_creatable("--out", target, target.parent, scratch_sibling=True)
    if not options.force and _foreign(target):
        raise AdviseError(f"--name: {target} exists and was not written by the advisor; choose another --name or pass --force")
    return target


def _foreign(path: Path) -> bool:
    """Whether ``path`` exists and is not a file the advisor wrote."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return f.readline().rstrip("\n") != MARKER
    except FileNotFoundError:
        return False


def compose(overrides: Sequence[str]) -> tuple[BuildSpec, dict[str, Any]]:
    """The build spec of the overrides, as ``python -m furiosa_build`` composes it, and the
    model's config (read without weights)."""
    from furiosa_build.__main__ import UsageError, prevalidate
    from furiosa_build.builder import ArtifactBuilder
    from furiosa_build.config import fit_to_model

    try:
        spec = prevalidate(list(overrides))[0]
    except UsageError as err:
        raise AdviseError(str(err)) from None
    spec, hf_config = fit_to_model(spec, ArtifactBuilder.from_spec(spec)._load_request())  # the model's task made concrete
    if spec.model.task != "generate":
        raise AdviseError(f"model.task: {spec.model.name} is a {spec.model.task} model; buckets are advised for generation")
    if spec.buckets.kv_cache_sharing_across_beams_config is not None:
        raise AdviseError("buckets.kv_cache_sharing_across_beams_config: the advisor plans buckets without beam search; leave it null")
    return spec, hf_config


def _with_cache(spec: BuildSpec, scratch: Path) -> BuildSpec:
    """The spec with a build cache: a build of new candidates of one phase takes a built
    bucket of the other along (a build needs both), and the cache keeps it from being
    captured again."""
    if spec.build.cache_dir:
        return spec
    return spec.model_copy(update={"build": spec.build.model_copy(update={"cache_dir": str(scratch / "cache")})})


def fit_memory(options: Options, spec: BuildSpec, candidates: Candidates, traffic: Traffic, positions: int) -> tuple[Memory, int]:
    """The memory of a PE and the KV blocks every grid gets: all that fit beside the weights
    (what they take is read off a first build, of one bucket of each phase holding the
    longest prompt and request)."""
    block = spec.buckets.paged_attention_block_size
    probe = Grid.of([Bucket.prefill(1, fit_size(traffic.prompts.max(), "prefill", block, positions)),
                     Bucket.decode(1, fit_size(traffic.contexts.max(), "decode", block, positions))])  # fmt: skip
    candidates.add(probe.buckets)
    hw = spec.hardware
    memory = Memory((options.max_memory or hw.hbm_bytes) // hw.pes_per_device, candidates.weights, candidates.block_bytes)
    num_blocks = min(memory.blocks(), MAX_KV_SLOTS // block)
    if num_blocks < probe.blocks_needed(block):
        raise AdviseError(f"--max-memory: {size_text(memory.pe_bytes * hw.pes_per_device)} a device leaves room for {num_blocks} "
                          f"KV blocks of {block} tokens a PE beside the weights; the longest request needs "
                          f"{probe.blocks_needed(block)}")  # fmt: skip
    return memory, num_blocks


def base_grid(spec: BuildSpec, overrides: Sequence[str], cover: dict[str, int]) -> tuple[Grid, str]:
    """The composed buckets config with its longest buckets of each phase stretched to hold
    the traffic, and its name for the comparison."""
    option = next((o.split("=", 1)[1] for o in overrides if o.startswith("buckets=")), "default")
    phases = {"prefill": spec.buckets.prefill_buckets(), "decode": spec.buckets.decode_buckets()}
    buckets = [b for phase, held in phases.items() for b in _stretch(held, cover[phase])]
    stretched = set(buckets) != {b for held in phases.values() for b in held}
    return Grid.of(buckets), f"{option} (stretched)" if stretched else option


def _stretch(buckets: list[Bucket], cover: int) -> list[Bucket]:
    longest = max((b.attention_size for b in buckets), default=0)
    if longest >= cover:
        return buckets
    make = Bucket.prefill if buckets[0].is_prefill else Bucket.decode
    return [make(b.batch_size, cover) if b.attention_size == longest else b for b in buckets]


def write(advice: Advice, target: Path, force: bool) -> None:
    """Write the advice to ``target``: a scratch file, then a rename."""
    if not force and _foreign(target):  # made by someone else while the advisor searched
        raise AdviseError(f"--name: {target} exists and was not written by the advisor; choose another --name or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, advice.render().encode())


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m furiosa_build.advise", description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra overrides of conf/config.yaml: model, parallel, hardware, ...")
    add("--workload", required=True, metavar="TRACE", help="a JSONL trace or a distribution (python -m furiosa_runtime simulate's grammar)")
    add("--max-programs", type=int, required=True, metavar="N", help="at most N bucket programs (prefill + decode buckets)")
    add("--num-prompts", type=positive_int, default=None, help="requests drawn from a distribution; of a trace, its first N lines")
    add("--request-rate", type=_rate, default=math.inf, help="inf (all at once, default), trace (its arrival times) or requests/s")
    add("--max-memory", type=_size, default=None, metavar="SIZE", help="memory of one device, e.g. 48GiB (default: the hardware's)")
    add("--sample", type=positive_int, default=DEFAULT_SAMPLE, help=f"simulate at most this many requests (default: {DEFAULT_SAMPLE})")
    add("--seed", type=non_negative_int, default=0, help="seed of the sample and of the requests' token ids (default: 0)")
    add("--name", default=None, help="config name: writes <out>/<name>.yaml (default: advised-<trace name>)")
    add("--out", type=Path, default=None, help=f"folder to write to (default: {PACKAGE_BUCKETS})")
    add("--force", action="store_true", help="replace a file the advisor did not write")
    return parser


def _rate(text: str) -> float | None:
    if text == "trace":
        return None
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected inf, trace or requests per second, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return rate


def _size(text: str) -> int:
    match = _SIZE.match(text.strip())
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 48GiB, 40GB or a number of bytes, got {text!r}")
    return int(float(match[1]) * _UNITS[(match[2] or "b").lower()])


def main(argv: Sequence[str] | None = None) -> int:
    """Advise, write the file, print the comparison; ``error: ...`` and 2 on a mistake."""
    try:
        args = _parser().parse_intermixed_args(argv)  # overrides may follow the options
    except SystemExit as done:  # --help, or a usage error already printed as one line
        return int(done.code or 0)
    options = Options(args.workload, args.max_programs, tuple(args.overrides), args.num_prompts, args.request_rate,
                      args.max_memory, args.sample, args.seed, args.name, args.out, args.force)  # fmt: skip
    try:
        advice = advise(options, lambda line: print(f"advise: {line}", file=sys.stderr, flush=True))
        write(advice, options.target(), options.force)
    except (AdviseError, *USER_ERRORS, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    print("\n".join(advice.table()))
    print(f"wrote {options.target()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The search: which buckets, within a budget of programs and the device's memory, serve the
traffic in the least NPU time.

**Candidates** (``Pool``).  Attention sizes come from the traffic: the prompt lengths for
prefill buckets, the decode contexts for decode buckets, rounded up to whole KV blocks.
Between the shortest and the longest, a fine ladder holds every percentile and every power
of two and 1.5 times one.  The pool starts coarse (the 50th, 90th and 100th percentiles)
and is refined around the grid the search has settled on: for each of its buckets, the
ladder size halfway to the next pool size on either side, and half and twice its batch.
It is refined again while the last refinement saved at least ``REFINE_GAIN`` of the NPU
time (every candidate costs a capture, and the returns fall fast).  Batches are powers of
two: a prefill batch while its step holds at most ``PREFILL_TOKENS`` tokens (past that a
prefill step is compute-bound and batching saves nothing), a decode batch up to what the
KV cache holds at that attention size and the traffic can fill.

**Moves.**  Add a candidate (within the budget), replace a bucket by a candidate of its
phase, or drop one.  A grid must hold the longest prompt and the longest request, and its
largest bucket must fit the KV cache.  Each round ranks every move by ``Estimate`` (a fluid
model: each prompt and each decode row priced at the cheapest bucket of the grid that
holds it, per row, with as many rows as the traffic has live) and simulates them in that
order, up to ``PATIENCE`` of each phase, until one saves at least ``MIN_GAIN`` of the NPU
time; the better of the two phases' moves is taken.  The estimate only proposes (it is
blind to how the scheduler mixes contexts in a decode batch, and often ranks the best
decode move tenth), the simulator decides.  At the
end, a bucket the grid serves as well without is dropped (one program less to compile).

**Start.**  The best (simulated) of: the base grid, the buckets config the user composed
(``conf/buckets/default.yaml`` unless another is chosen) with its longest buckets stretched
to hold the traffic; the smallest grids that hold the traffic; and three grids that spend
the budget (``Pool.starts``), one of them the powers-of-two grid a user would write by
hand.  The climb then only improves, so the advice is never worse than any of them: what
the search adds is its improvement over the best start.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from furiosa_build.advise_cost import Grid, Simulator
from furiosa_build.advise_traffic import Traffic
from furiosa_build.config_sections import SchedulerSpec
from furiosa_runtime.engine.serving_report import bucket_label
from furiosa_runtime.npu.artifact import Bucket

PREFILL_TOKENS = 2048
COARSE_PERCENTILES = (50, 90, 100)
PATIENCE = 8  # moves of a phase simulated, best estimated first, before the phase counts as settled
MIN_GAIN = 0.005  # a move must save 0.5% of the NPU time
REFINE_GAIN = 0.01  # refine the pool again only while a refinement saves 1%
PHASES = ("prefill", "decode")


def _pow2_floor(n: float) -> int:
    return 1 << max(int(math.floor(math.log2(n))), 0) if n >= 1 else 0


def _pow2_ceil(n: float) -> int:
    return 1 << max(int(math.ceil(math.log2(n))), 0) if n > 1 else 1


def _make(phase: str, batch: int, attention: int) -> Bucket:
    return Bucket.prefill(batch, attention) if phase == "prefill" else Bucket.decode(batch, attention)


def fit_size(length: float, phase: str, block_size: int, positions: int) -> int:
    """The attention size of a bucket holding ``length``: whole KV blocks, within the model's
    ``positions`` (a decode bucket holds at least a cached token and the new one)."""
    rounded = math.ceil(length / block_size) * block_size
    return min(max(rounded, 2 if phase == "decode" else 1), positions)


@dataclass(frozen=True)
class Limits:
    """What bounds a candidate: the KV block, the model's positions, the KV cache, the traffic."""

    block_size: int
    positions: int  # the longest attention size the model allows
    num_blocks: int  # KV blocks every grid gets
    live: int  # requests the traffic can have in flight at once (what a batch can fill)
    max_batch: int  # the scheduler's max_processing_samples

    @classmethod
    def of(cls, traffic: Traffic, block_size: int, positions: int, num_blocks: int, scheduler: SchedulerSpec) -> Limits:
        """The limits of serving ``traffic`` with ``num_blocks`` KV blocks: live requests are
        as many as the blocks hold (less the scheduler's spare share), at most all of them."""
        per_request = float(np.mean(np.ceil(traffic.contexts / block_size)))
        held = int((num_blocks - 1) * (1 - scheduler.spare_blocks_ratio) / per_request)
        live = max(min(len(traffic.shapes), scheduler.max_processing_samples, held), 1)
        return cls(block_size, positions, num_blocks, live, scheduler.max_processing_samples)

    def size(self, length: float, phase: str) -> int:
        return fit_size(length, phase, self.block_size, self.positions)

    def batches(self, phase: str, attention: int) -> list[int]:
        """The powers of two a bucket of this phase and attention size may batch."""
        top = min(_pow2_ceil(self.live), self.max_batch)
        if phase == "prefill":
            top = min(top, _pow2_floor(PREFILL_TOKENS / attention) or 1)
        else:
            top = min(top, _pow2_floor((self.num_blocks - 1) / math.ceil(attention / self.block_size)))
        return [1 << k for k in range(int(math.log2(top)) + 1)] if top >= 1 else []

    def fits(self, grid: Grid) -> bool:
        return grid.blocks_needed(self.block_size) <= self.num_blocks


class Pool:
    """Candidate buckets of both phases (see the module docstring)."""

    def __init__(self, traffic: Traffic, limits: Limits) -> None:
        self.limits = limits
        self.lengths = {"prefill": traffic.prompts, "decode": np.concatenate([traffic.decode_contexts(), traffic.contexts])}
        self.ladder = {phase: self._ladder(values, phase) for phase, values in self.lengths.items()}
        self.cover = {phase: self.ladder[phase][-1] for phase in PHASES}
        self.buckets: set[Bucket] = set()
        for phase, values in self.lengths.items():
            for size in sorted({limits.size(np.percentile(values, q), phase) for q in COARSE_PERCENTILES}):
                self.buckets |= {_make(phase, b, size) for b in self._coarse_batches(phase, size)}

    def _ladder(self, values: np.ndarray, phase: str) -> list[int]:
        low, high = int(values.min()), int(values.max())
        powers = [s for k in range(1, high.bit_length() + 1) for s in (1 << k, 3 << (k - 1)) if low <= s <= high]
        return sorted({self.limits.size(x, phase) for x in [*np.percentile(values, np.arange(1, 101)), *powers, high]})

    def _coarse_batches(self, phase: str, size: int) -> list[int]:
        """1, every eighth power of two, and the largest batch."""
        batches = self.limits.batches(phase, size)
        return sorted({b for b in batches if b.bit_length() % 3 == 1} | set(batches[-1:]))

    def starts(self, budget: int) -> dict[str, Grid]:
        """Grids to start from, by name: the smallest that hold the traffic (one prefill
        bucket, one decode bucket of each coarse batch), and three that spend the budget,
        half on each phase, with sizes at evenly spaced percentiles of the lengths, halving
        from the longest, or halving from the power of two above it (the usual hand-made
        grid); prefill batches of 1, decode batches as large as the KV cache holds."""
        smallest = {f"smallest, decode batch {b.batch_size}": Grid.of([_make("prefill", 1, self.cover["prefill"]), b])
                    for b in self.of("decode") if b.attention_size == self.cover["decode"]}  # fmt: skip
        split = {"prefill": budget // 2, "decode": budget - budget // 2}
        percentiles = {p: [np.percentile(self.lengths[p], 100 * (i + 1) / n) for i in range(n)] for p, n in split.items()}
        halving = {p: [self.cover[p] / 2**i for i in range(n)] for p, n in split.items()}
        powers = {p: [_pow2_ceil(self.cover[p]) / 2**i for i in range(n)] for p, n in split.items()}
        spread = {"percentiles": percentiles, "halving": halving, "powers of two": powers}
        return smallest | {name: self._spread(lengths) for name, lengths in spread.items()}

    def _spread(self, lengths: dict[str, list[float]]) -> Grid:
        """One bucket per length: batch 1 for prefill, the largest that fits for decode (none
        where not even one request's blocks fit)."""
        sizes = {phase: {self.limits.size(x, phase) for x in values} for phase, values in lengths.items()}
        return Grid.of([*(_make("prefill", 1, s) for s in sizes["prefill"]),
                        *(_make("decode", fit[-1], s) for s in sizes["decode"] if (fit := self.limits.batches("decode", s)))])  # fmt: skip

    def of(self, phase: str) -> list[Bucket]:
        return sorted((b for b in self.buckets if b.phase == phase), key=lambda b: (b.attention_size, b.batch_size))

    def refine(self, grid: Grid) -> set[Bucket]:
        """Add the neighbours of the grid's buckets not in the pool yet; return them."""
        new = {n for bucket in grid.buckets for n in self._neighbours(bucket)} - self.buckets
        self.buckets |= new
        return new

    def _neighbours(self, bucket: Bucket) -> list[Bucket]:
        phase, batch, size = bucket.phase, bucket.batch_size, bucket.attention_size
        near = [_make(phase, b, size) for b in (batch // 2, batch * 2) if b in self.limits.batches(phase, size)]
        sizes = sorted({b.attention_size for b in self.buckets if b.phase == phase})
        below = max((s for s in sizes if s < size), default=0)
        above = min((s for s in sizes if s > size), default=size)
        for lo, hi in ((below, size), (size, above)):
            between = [s for s in self.ladder[phase] if lo < s < hi]
            middle = between[len(between) // 2] if between else None
            if middle is not None and (fit := self.limits.batches(phase, middle)):
                near.append(_make(phase, min(batch, fit[-1]), middle))
        return near


class Estimate:
    """A fluid estimate of a grid's NPU time, to rank moves before simulating them: every
    prompt and every decode row costs the step time per row of the cheapest bucket that
    holds it, where a step has as many rows as the bucket's batch or as requests are live."""

    def __init__(self, traffic: Traffic, seconds: Callable[[Bucket], float], limits: Limits) -> None:
        self.seconds = seconds
        self.prompts, self.prompt_count = np.unique(traffic.prompts, return_counts=True)
        self.prompt_rows = np.full(len(self.prompts), limits.live)
        outputs = traffic.outputs
        steps = outputs - 1
        contexts = traffic.decode_contexts()
        into = contexts - np.repeat(traffic.prompts, steps)  # output tokens so far
        alive = len(outputs) - np.searchsorted(np.sort(outputs), into, side="right")  # requests still generating
        rows = np.minimum(alive, limits.live)
        blocks = -(-contexts // limits.block_size) * limits.block_size  # candidate sizes are whole blocks: same choice, fewer rows
        keys, self.decode_count = np.unique(np.stack([blocks, rows]), axis=1, return_counts=True)
        self.contexts, self.decode_rows = keys

    def __call__(self, grid: Grid) -> float:
        return (self._phase(grid.prefill, self.prompts, self.prompt_rows, self.prompt_count)
                + self._phase(grid.decode, self.contexts, self.decode_rows, self.decode_count))  # fmt: skip

    def _phase(self, buckets: Iterable[Bucket], need: np.ndarray, rows: np.ndarray, count: np.ndarray) -> float:
        best = np.full(len(need), np.inf)
        for bucket in buckets:
            per_row = self.seconds(bucket) / np.minimum(bucket.batch_size, rows)
            best = np.where(need <= bucket.attention_size, np.minimum(best, per_row), best)
        return float(best @ count)


@dataclass(frozen=True)
class Move:
    """A change to a grid: ``new`` added, ``old`` taken out (either may be None)."""

    grid: Grid
    new: Bucket | None = None
    old: Bucket | None = None

    def describe(self) -> str:
        if self.old is None:
            assert self.new is not None, "a move changes something"
            return f"add {bucket_label(self.new)}"
        return f"replace {bucket_label(self.old)} by {bucket_label(self.new)}" if self.new else f"drop {bucket_label(self.old)}"


@dataclass(frozen=True)
class Step:
    """A move the search took, and the NPU seconds before and after it."""

    move: Move
    before: float
    after: float

    @property
    def saving(self) -> float:
        return 1.0 - self.after / self.before if self.before else 0.0


@dataclass
class Search:
    """Local search over grids (see the module docstring); ``steps`` records every move taken."""

    simulator: Simulator
    pool: Pool
    budget: int
    say: Callable[[str], None]
    steps: list[Step] = field(default_factory=list)
    refinements: int = 0
    start: str = ""  # the name of the start the search climbed from

    def run(self, starts: dict[str, Grid]) -> Grid:
        """The best grid reachable from the best of ``starts`` (by name)."""
        self.pool.buckets |= {b for grid in starts.values() for b in grid.buckets}
        self.simulator.candidates.add(self.pool.buckets)
        estimate = Estimate(self.simulator.traffic, self.simulator.candidates.seconds, self.pool.limits)
        self.start = min(starts, key=lambda name: self.simulator.cost(starts[name]))
        grid = starts[self.start]
        self.say(f"start: {self.start} ({grid.label()}), {self.simulator(grid).report.output_tokens_per_s:,.0f} output tokens/s")
        while True:
            before = self.simulator.cost(grid)
            grid = self._climb(grid, estimate)
            if self.refinements and self.simulator.cost(grid) > before * (1 - REFINE_GAIN):
                return self._prune(grid)  # the last refinement brought too little to try another
            new = self.pool.refine(grid)
            if not new:
                return self._prune(grid)
            self.refinements += 1
            self.simulator.candidates.add(new)

    def _climb(self, grid: Grid, estimate: Estimate) -> Grid:
        """Take the best of each phase's first good move until neither phase has one."""
        while True:
            moves = self._moves(grid)
            found = [m for phase in PHASES if (m := self._first_good(moves[phase], grid, estimate)) is not None]
            if not found:
                return grid
            best = min(found, key=lambda m: self.simulator.cost(m.grid))
            self._take(best, self.simulator.cost(grid))
            grid = best.grid

    def _first_good(self, moves: list[Move], grid: Grid, estimate: Estimate) -> Move | None:
        """The first of the ``PATIENCE`` moves the estimate ranks best that the simulator
        finds saving at least ``MIN_GAIN`` (grids simulated before cost nothing)."""
        limit = self.simulator.cost(grid) * (1 - MIN_GAIN)
        ranked = sorted(moves, key=lambda m: estimate(m.grid))[:PATIENCE]
        return next((m for m in ranked if self.simulator.cost(m.grid) <= limit), None)

    def _take(self, move: Move, before: float) -> None:
        step = Step(move, before, self.simulator.cost(move.grid))
        self.steps.append(step)
        served = self.simulator(move.grid).report
        self.say(f"{move.describe()}: {-step.saving:+.1%} NPU time, {served.output_tokens_per_s:,.0f} output tokens/s")

    def _moves(self, grid: Grid) -> dict[str, list[Move]]:
        """Every allowed add, replace and drop, by the phase it changes."""
        moves: dict[str, list[Move]] = {}
        for phase in PHASES:
            mine = grid.prefill if phase == "prefill" else grid.decode
            others = [c for c in self.pool.of(phase) if c not in mine]
            made = [Move(Grid.of([*grid.buckets, c]), new=c) for c in others if grid.programs < self.budget]
            made += [Move(Grid.of([*(b for b in grid.buckets if b != old), c]), new=c, old=old) for old in mine for c in others]
            made += [Move(Grid.of(b for b in grid.buckets if b != old), old=old) for old in mine]
            moves[phase] = [m for m in made if self.allows(m.grid)]
        return moves

    def serves(self, grid: Grid) -> bool:
        """Holding the traffic, fitting the KV cache."""
        return grid.holds(self.pool.cover["prefill"], self.pool.cover["decode"]) and self.pool.limits.fits(grid)

    def allows(self, grid: Grid) -> bool:
        """Serving the traffic within the budget."""
        return grid.programs <= self.budget and self.serves(grid)

    def _prune(self, grid: Grid) -> Grid:
        """Drop every bucket the grid serves as well without."""
        for bucket in reversed(grid.buckets):
            smaller = Move(Grid.of(b for b in grid.buckets if b != bucket), old=bucket)
            cost = self.simulator.cost(grid)
            if self.allows(smaller.grid) and self.simulator.cost(smaller.grid) <= cost:
                self._take(smaller, cost)
                grid = smaller.grid
        return grid

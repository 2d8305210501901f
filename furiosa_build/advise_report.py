"""The advice as a buckets config: ``conf/buckets/<name>.yaml`` with its reasoning as comments.

The YAML part is a complete ``buckets`` config group option (every key of
``BucketsConfig``), so ``buckets=<name>`` builds exactly the grid the advisor modelled,
with the KV cache it modelled (``paged_attention_num_blocks``).  The comments say what it
was advised for (model, layout, memory, the traffic's percentiles), why each bucket is
there (the move of the search that brought it, and how much of the traffic it served), and
how the grid serves the traffic against the base grid.  The first line marks the file as
the advisor's: it replaces such a file, and no other unless forced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from furiosa_build.advise_cost import Grid, Memory, Served
from furiosa_build.advise_search import Step
from furiosa_build.advise_traffic import Traffic
from furiosa_build.config import BuildSpec
from furiosa_build.errors import show_value
from furiosa_runtime.engine.serving_report import bucket_label
from furiosa_runtime.npu.artifact import Bucket

#: Where the advice goes by default: the package's own buckets configs (``conf/buckets``).
PACKAGE_BUCKETS = Path(__file__).resolve().parent / "conf" / "buckets"
MARKER = "# Written by python -m furiosa_build.advise"
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


@dataclass(frozen=True)
class Advice:
    """Everything the advisor decided and measured, for the YAML and the summary."""

    path: Path  # where the advice is written: <folder>/<name>.yaml
    command: str  # the advisor's command line
    overrides: tuple[str, ...]  # its Hydra overrides: the model and layout the buckets are for
    spec: BuildSpec
    traffic: Traffic
    memory: Memory
    num_blocks: int
    budget: int
    grid: Grid
    served: Served
    base: Grid  # the composed buckets config, stretched to hold the traffic
    base_label: str  # how the comparison names it
    base_served: Served | None  # None: the base grid does not fit the KV cache
    steps: list[Step]
    start: str  # the starting grid the search climbed from
    simulated: int  # grids simulated
    built: int  # candidate buckets built

    @property
    def name(self) -> str:
        """The config name: ``buckets=<name>`` selects the file."""
        return self.path.stem

    def comparison(self) -> list[tuple[str, Grid, Served | None]]:
        """(label, grid, serving) of the advice and of the base grid."""
        return [("advised", self.grid, self.served), (self.base_label, self.base, self.base_served)]

    def table(self) -> list[str]:
        """The comparison as aligned lines: programs, the cost (NPU busy seconds), throughput,
        TTFT and TPOT."""
        head = ("programs", "NPU busy s", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms")
        lines = [f"{'grid':28s}" + "".join(f" {h:>12s}" for h in head)]
        for label, grid, served in self.comparison():
            if served is None:
                lines.append(f"{label:28s} {grid.programs:12d}  does not fit the KV cache of {self.num_blocks:,} blocks")
                continue
            r = served.report
            cells = (f"{grid.programs}", f"{served.busy_seconds:,.3f}", f"{r.output_tokens_per_s:,.1f}", _ms(r.ttft_ms.p50),
                     _ms(r.ttft_ms.p99), _ms(r.tpot_ms.p50))  # fmt: skip
            lines.append(f"{label:28s}" + "".join(f" {c:>12s}" for c in cells))
        return lines

    def render(self) -> str:
        """The YAML file: comments, then the buckets config."""
        comments = [MARKER, *self._header(), "", *self._why(), "", *self._serving(), "", *self._usage()]
        return "\n".join(f"# {line}".rstrip() if line != MARKER else line for line in comments) + "\n" + self._config()

    def _header(self) -> list[str]:
        par, hw, blocks = self.spec.parallel, self.spec.hardware, self.memory.block
        pe = max(blocks, key=lambda p: self.memory.weights.get(p, 0) + blocks[p] * self.num_blocks)
        weights, kv = self.memory.weights.get(pe, 0), blocks[pe] * self.num_blocks
        return [
            f"command: {self.command}",
            f"for {self.spec.model.name} on {par.devices} (tensor {par.tensor_parallel_size} x pipeline "
            f"{par.pipeline_parallel_size} parallel), {hw.name}; at most {self.budget} bucket programs",
            f"memory of the fullest PE ({pe}): {size_text(self.memory.pe_bytes)} = weights {size_text(weights)} + KV cache "
            f"{size_text(kv)} ({self.num_blocks:,} blocks of {self.spec.buckets.paged_attention_block_size} tokens) + "
            f"{size_text(self.memory.pe_bytes - weights - kv)} spare",
            "",
            f"traffic: {self.traffic.workload}",
            *(f"  {line}" for line in self.traffic.describe()),
        ]

    def _why(self) -> list[str]:
        """Each bucket: the move that brought it and how much of the traffic it served."""
        used = {b.bucket: b for b in self.served.report.buckets}
        lines = [f"buckets (searched: {self.simulated} grids simulated, {self.built} candidate buckets built shape-only):"]
        for bucket in self.grid.buckets:
            label = bucket_label(bucket)
            use = used.get(label)
            served = f"ran {use.runs:,} step{'s' * (use.runs != 1)}, {100 * use.padding:.0f}% padding" if use else "never ran"
            lines.append(f"  {label:18s} {served}; {self._origin(bucket)}")
        moves = [f"{s.move.describe()} ({-s.saving:+.1%})" for s in self.steps]
        lines.append(f"start: {self.start}; moves: " + ("; ".join(moves) if moves else "none improved it"))
        return lines

    def _origin(self, bucket: Bucket) -> str:
        """Why the bucket is there: the last move that put it in, or the start."""
        for step in reversed(self.steps):
            if step.move.new == bucket:
                return f"{step.move.describe()} saved {step.saving:.1%} of the NPU time"
        return f"from the starting grid ({self.start}, the best start)"

    def _serving(self) -> list[str]:
        return ["modelled serving of the traffic (the timing model's estimates, python -m furiosa_runtime simulate):",
                *(f"  {line}" for line in self.table())]  # fmt: skip

    def _usage(self) -> list[str]:
        """How to build the advice, and rank it in a sweep against the default."""
        folder = self.path.parent.resolve()
        if folder != PACKAGE_BUCKETS.resolve() and folder.name != "buckets":
            return [f"to select it as buckets={self.name}, put it in DIR/buckets/ and add --config-dir DIR to the commands below"]
        where = "" if folder == PACKAGE_BUCKETS.resolve() else f" --config-dir {folder.parent}"
        overrides = " ".join(self.overrides)
        shape_only = "" if any(o.startswith("build.weights=") for o in self.overrides) else " build.weights=none"
        return [
            f"build it: python -m furiosa_build{where} {overrides} buckets={self.name}",
            f"rank it in a sweep: python -m furiosa_build -m{where} {overrides}{shape_only} "
            f"buckets=default,{self.name} sweep.workload={self.traffic.workload} sweep.num_prompts={self.traffic.total}",
        ]

    def _config(self) -> str:
        b = self.spec.buckets
        values = {
            "prefill": json.dumps(self.grid.pairs("prefill")),
            "decode": json.dumps(self.grid.pairs("decode")),
            "max_seq_len_to_capture": max(x.attention_size for x in self.grid.buckets),
            "paged_attention_num_blocks": f"{self.num_blocks}   # every KV block that fits beside the weights",
            "paged_attention_block_size": b.paged_attention_block_size,
            "calculate_logit_only_for_last_token": show_value(b.calculate_logit_only_for_last_token),
            "add_prefill_last_block_slice": show_value(b.add_prefill_last_block_slice),
            "kv_cache_sharing_across_beams_config": "null",
        }
        return "".join(f"{key}: {value}\n" for key, value in values.items())


def size_text(nbytes: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best."""
    unit, size = next(((u, n) for u, n in _UNITS if abs(nbytes) >= n), _UNITS[-1])
    return f"{nbytes / size:.2f} {unit}"


def _ms(value: float) -> str:
    """Milliseconds with the digits that matter: 19,228 / 109.92 / 0.042."""
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"

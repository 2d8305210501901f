"""Weight quantization: a pass that turns the ``linear`` instructions of quantized layers
into ``quantized_linear`` (``furiosa_runtime.npu.isa``), and the lookups of a quantized
embedding table into a lookup of its 8-bit rows scaled by their row scales.

The captured graph is the same for a bf16 and a quantized build; the compile option
``quantization`` (:func:`quantized_options`, from the checkpoint's scheme,
``furiosa_build/quantized_checkpoint.py``) says what a program quantizes:

* a decoder-layer block: ``modules``, its quantized linears (``self_attn.q_proj``...), all
  in the one scheme ``weights`` / ``strategy`` / ``activations``;
* the embedding and head programs: ``tables``, the input embedding and ``lm_head`` (tied:
  the one table both programs read), weight-only with one scale per row.

The pass re-declares each such weight in its 8-bit storage dtype and adds its scale
parameters beside it, named as compressed-tensors names them (``<module>.weight_scale``,
``<module>.input_scale`` for static activations), so the builder binds them from the
checkpoint like any weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from furiosa_build.compiler.lower import Lowered, LoweringError
from furiosa_runtime.npu.artifact import QuantizationConfig
from furiosa_runtime.npu.isa import Instruction, TensorSpec


def quantized_options(kind: str, quantization: QuantizationConfig | None) -> dict[str, Any] | None:
    """The compile option ``quantization`` of a supertask of ``kind`` ("embed", "block",
    "head"), or None when it quantizes nothing.  A block's option leaves the tables out
    (so a block compiles to the same key whether or not the tables are quantized)."""
    if quantization is None:
        return None
    if kind == "block":
        return quantization.model_dump(include={"weights", "strategy", "activations", "modules"})
    if not quantization.embeddings:
        return None
    return {"weights": quantization.embedding_weights, "strategy": "channel", "activations": "none", "modules": [],
            "tables": quantization.embeddings}  # fmt: skip


def quantize_linears(lowered: Lowered, quantization: Mapping[str, Any]) -> None:
    """Rewrite, in place, every linear reading a weight of ``quantization["modules"]`` and
    every lookup in or linear over a table of ``quantization["tables"]``.

    A module the program has no ``[N, K]`` linear for is refused: the checkpoint quantizes
    a layer this compiler would leave in bf16 (an expert of a mixture, a Conv1D).  So is a
    ``tables`` option for a program that reads none of them.
    """
    modules, tables = set(quantization["modules"]), set(quantization.get("tables", ()))
    found: set[str] = set()
    rewritten: list[Instruction] = []
    for inst in lowered.instructions:
        name = _quantized_weight(inst, modules, tables)
        if name is None:
            rewritten.append(inst)
            continue
        if inst.op == "linear" and inst.attrs.get("w_layout", "nk") != "nk":
            raise LoweringError(f"quantized checkpoint: {name} stores its weight as [in, out] (a Conv1D); only Linear layers can be quantized")
        found.add(name)
        rewritten += _dequantized_lookup(lowered, inst, quantization) if inst.op == "gather" else [_quantized(lowered, inst, quantization)]
    if modules - found:
        raise LoweringError(f"quantized checkpoint: {', '.join(sorted(modules - found))} quantized, but the compiled "
                            "decoder layer has no linear layer reading that weight")  # fmt: skip
    if tables and not tables & found:
        raise LoweringError(f"quantized checkpoint: {', '.join(sorted(tables))} quantized, but the program reads neither table")
    lowered.instructions = rewritten


def linear_modules(lowered: Lowered) -> list[str]:
    """The modules of a decoder layer whose weight some ``[N, K]`` linear reads: what a scheme
    planned without a checkpoint quantizes (``furiosa_build/quantization_plan.py``)."""
    modules = {_module(inst.ins[1]) for inst in lowered.instructions if inst.op == "linear" and inst.attrs.get("w_layout", "nk") == "nk"}
    return sorted(m for m in modules if m is not None)


def _quantized_weight(inst: Instruction, modules: set[str], tables: set[str]) -> str | None:
    """The quantized module ``inst`` reads the weight of: a linear of a decoder layer's
    ``modules``, or a linear over or a lookup in one of the ``tables``; else None."""
    if inst.op == "linear" and _module(inst.ins[1]) in modules:
        return _module(inst.ins[1])
    weight = inst.ins[1] if inst.op == "linear" else inst.ins[0] if inst.op == "gather" else ""
    return _table(weight) if _table(weight) in tables else None


def _module(weight: str) -> str | None:
    """'p:0.self_attn.q_proj.weight' -> 'self_attn.q_proj' (a block parameter: layer index first)."""
    head, _, rest = weight.removeprefix("p:").partition(".")
    return rest.removesuffix(".weight") if weight.startswith("p:") and head.isdigit() and rest.endswith(".weight") else None


def _table(weight: str) -> str | None:
    """'p:lm_head.weight' -> 'lm_head' (a parameter of the embedding or head program)."""
    return weight.removeprefix("p:").removesuffix(".weight") if weight.startswith("p:") and weight.endswith(".weight") else None


def _quantized(lowered: Lowered, inst: Instruction, quantization: Mapping[str, Any]) -> Instruction:
    """The ``quantized_linear`` of one linear: (x, w, w_scale (, x_scale) (, b))."""
    x, w, *bias = inst.ins
    rows = lowered.values[w].shape[0] if quantization["strategy"] == "channel" else None
    ins = [x, _redeclare(lowered, w, quantization["weights"]), _scale(lowered, w, rows)]
    if quantization["activations"] == "static":
        input_scale = TensorSpec(name=f"{w.removesuffix('weight')}input_scale", shape=(1,), dtype="f32")
        ins.append(_declare(lowered, input_scale, param=True))
    return Instruction(op="quantized_linear", ins=(*ins, *bias), outs=inst.outs, attrs={"activations": quantization["activations"]})


def _dequantized_lookup(lowered: Lowered, inst: Instruction, quantization: Mapping[str, Any]) -> list[Instruction]:
    """``gather(table, ids)`` over a quantized table: the 8-bit rows, widened exactly, times
    each row's scale, ``rows * scale[ids]``.  Two plain lookups, so a vocab-parallel shard
    splits the scales with the rows like any table."""
    table, ids = inst.ins
    out = lowered.values[inst.outs[0]]
    rows, scales = (_declare(lowered, TensorSpec(name=f"{out.name}.{what}", shape=shape, dtype="f32"))
                    for what, shape in (("rows", out.shape), ("row_scale", (*out.shape[:-1], 1))))  # fmt: skip
    scale_table = _scale(lowered, table, lowered.values[table].shape[0])
    return [Instruction(op="gather", ins=(_redeclare(lowered, table, quantization["weights"]), ids), outs=(rows,)),
            Instruction(op="gather", ins=(scale_table, ids), outs=(scales,)),
            Instruction(op="binary", ins=(rows, scales), outs=inst.outs, attrs={"fn": "mul"})]  # fmt: skip


def _redeclare(lowered: Lowered, weight: str, dtype: str) -> str:
    """Re-declare parameter ``weight`` in its 8-bit storage dtype."""
    return _declare(lowered, lowered.values[weight].model_copy(update={"dtype": dtype}), param=True)


def _scale(lowered: Lowered, weight: str, rows: int | None) -> str:
    """Declare the float32 ``weight_scale`` parameter of ``weight``: ``[rows, 1]``, or ``[1]`` per tensor."""
    name = f"{weight.removesuffix('weight')}weight_scale"
    return _declare(lowered, TensorSpec(name=name, shape=(1,) if rows is None else (rows, 1), dtype="f32"), param=True)


def _declare(lowered: Lowered, spec: TensorSpec, param: bool = False) -> str:
    """Add or re-declare a value (``param``: a program parameter)."""
    lowered.values[spec.name] = spec
    if param:
        lowered.params = [p for p in lowered.params if p.name != spec.name] + [spec]
    return spec.name

"""Weight quantization: a pass that turns the ``linear`` instructions of quantized layers
into ``quantized_linear`` (``furiosa_runtime.npu.isa``).

The captured graph is the same for a bf16 and a quantized build; the compile option
``quantization`` (from the checkpoint, ``furiosa_build/quantized_checkpoint.py``) names
the quantized modules of a decoder layer (``self_attn.q_proj``...).  The pass re-declares
each such weight in its 8-bit storage dtype and adds its scale parameters beside it, named
as compressed-tensors names them (``<module>.weight_scale``, ``<module>.input_scale`` for
static activations), so the builder binds them from the checkpoint like any weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from furiosa_build.compiler.lower import Lowered, LoweringError
from furiosa_runtime.npu.isa import Instruction, TensorSpec


def quantize_linears(lowered: Lowered, quantization: Mapping[str, Any]) -> None:
    """Rewrite, in place, every linear reading a weight of ``quantization["modules"]``.

    A module the program has no ``[N, K]`` linear for is refused: the checkpoint quantizes
    a layer this compiler would leave in bf16 (an expert of a mixture, a Conv1D).
    """
    modules = set(quantization["modules"])
    found: set[str] = set()
    rewritten = []
    for inst in lowered.instructions:
        module = _module(inst.ins[1]) if inst.op == "linear" else None
        if module in modules:
            if inst.attrs.get("w_layout", "nk") != "nk":
                raise LoweringError(f"quantized checkpoint: {module} stores its weight as [in, out] (a Conv1D); only Linear layers can be quantized")
            found.add(module)
            inst = _quantized(lowered, inst, quantization)
        rewritten.append(inst)
    if modules - found:
        raise LoweringError(f"quantized checkpoint: {', '.join(sorted(modules - found))} quantized, but the compiled "
                            "decoder layer has no linear layer reading that weight")  # fmt: skip
    lowered.instructions = rewritten


def linear_modules(lowered: Lowered) -> list[str]:
    """The modules of a decoder layer whose weight some ``[N, K]`` linear reads: what a scheme
    planned without a checkpoint quantizes (``furiosa_build/quantization_plan.py``)."""
    modules = {_module(inst.ins[1]) for inst in lowered.instructions if inst.op == "linear" and inst.attrs.get("w_layout", "nk") == "nk"}
    return sorted(m for m in modules if m is not None)


def _module(weight: str) -> str | None:
    """'p:0.self_attn.q_proj.weight' -> 'self_attn.q_proj' (a block parameter: layer index first)."""
    head, _, rest = weight.removeprefix("p:").partition(".")
    return rest.removesuffix(".weight") if weight.startswith("p:") and head.isdigit() and rest.endswith(".weight") else None


def _quantized(lowered: Lowered, inst: Instruction, quantization: Mapping[str, Any]) -> Instruction:
    """The ``quantized_linear`` of one linear: (x, w, w_scale (, x_scale) (, b))."""
    x, w, *bias = inst.ins
    spec = lowered.values[w]
    _declare(lowered, spec.model_copy(update={"dtype": quantization["weights"]}))
    prefix = w.removesuffix("weight")
    scale_shape = (spec.shape[0], 1) if quantization["strategy"] == "channel" else (1,)
    ins = [x, w, _declare(lowered, TensorSpec(name=f"{prefix}weight_scale", shape=scale_shape, dtype="f32"))]
    if quantization["activations"] == "static":
        ins.append(_declare(lowered, TensorSpec(name=f"{prefix}input_scale", shape=(1,), dtype="f32")))
    return Instruction(op="quantized_linear", ins=(*ins, *bias), outs=inst.outs, attrs={"activations": quantization["activations"]})


def _declare(lowered: Lowered, spec: TensorSpec) -> str:
    """Add or re-declare a program parameter."""
    lowered.values[spec.name] = spec
    lowered.params = [p for p in lowered.params if p.name != spec.name] + [spec]
    return spec.name

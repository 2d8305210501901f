"""Make a quantized checkpoint of a model in the compressed-tensors format the build reads
(``build.quantize_artifact_path``, see ``furiosa_build/quantized_checkpoint.py``)::

    python -m furiosa_build.quantize SRC OUT --scheme fp8-dynamic|int8-weight-only
        [--strategy channel|tensor] [--observer minmax|mse] [--embeddings int8|none] [--ignore MODULE ...]

``SRC`` is a model config of ``conf/model`` (``tiny-llama``, ``smollm2-135m-instruct``) or a
model path as ``model.model_id_or_path`` takes it (a Hugging Face folder, a GGUF file,
``pkg:...``); the model is read by the build's load stage (so GGUF files and random
weights work, and the conversion is cached).  Every ``nn.Linear`` of the decoder layers
gets symmetric scales per output channel (``--strategy tensor``: one per tensor):

* ``fp8-dynamic``: weight ``float8_e4m3fn(w / scale)``; activations are quantized per token
  at run time (``format: float-quantized``);
* ``int8-weight-only``: weight ``round(w / scale)`` clipped to [-127, 127] in int8
  (``format: int-quantized``, one byte per value).

``--ignore`` keeps modules in the model's dtype, as compressed-tensors' ``ignore`` list does:
a module name, or ``re:`` and a regular expression matched at the start of the name
(``re:.*v_proj$``); every decoder layer must keep the same ones.

The scale comes from llm-compressor's weight observers: ``minmax`` takes ``absmax / 448``
(fp8) or ``absmax / 127`` (int8); ``mse`` (the default for fp8) tries the absmax shrunk by
1%, 2%, ... 19% and keeps, per channel, the one whose round trip ``w -> 8 bits -> w``
has the least error ``sum |error| ** 2.4`` (its defaults: ``maxshrink`` 0.2, ``grid`` 100,
``norm`` 2.4).  Fp8 keeps 3 mantissa bits, so a channel's scale decides where its
values fall on that coarse grid; the search cuts the perplexity rise of SmolLM2's fp8
weights from 2.3% to 1.5%.  Integers are uniform, and absmax is the default for int8.

``--embeddings int8`` (the default) quantizes the input embedding and ``lm_head`` as well,
weight-only to int8 with one ``absmax / 127`` scale per row (a token's embedding, an output
channel of ``lm_head``), in a config group of their own (``format: mixed-precision`` beside
fp8 linears); a tied table is stored once, under the embedding's name, and serves both.
``none`` keeps them in the model's dtype (``ignore: [lm_head]``, compressed-tensors'
default).  The norms stay in the model's dtype.  ``OUT`` gets ``model.safetensors``
(scales in float32) and ``config.json`` with the ``quantization_config``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from furiosa_build.quantized_checkpoint import FORMATS, MIXED, ModelLayout
from furiosa_runtime.npu.isa import FP8_MAX

if TYPE_CHECKING:
    from furiosa_build.load import LoadRequest

SCHEMES = {"fp8-dynamic": "float", "int8-weight-only": "int"}  # scheme -> weight type
OBSERVERS = ("minmax", "mse")
EMBEDDINGS = ("int8", "none")
INT8_MAX = 127.0
#: llm-compressor's ``mse`` observer defaults: shrink factors 1 - i / GRID for i < MAXSHRINK * GRID, error norm.
MSE_GRID, MSE_MAXSHRINK, MSE_NORM = 100, 0.2, 2.4


@dataclass(frozen=True)
class Recipe:
    """How one weight is quantized: its number type, scale granularity and observer."""

    kind: str  # "float" (fp8 e4m3) or "int" (int8)
    strategy: str  # "channel" or "tensor"
    observer: str  # "minmax" or "mse"

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(ml_dtypes.float8_e4m3fn if self.kind == "float" else np.int8)

    @property
    def limit(self) -> float:
        return FP8_MAX if self.kind == "float" else INT8_MAX

    def cast(self, scaled: np.ndarray) -> np.ndarray:
        """Values already divided by the scale -> the stored 8-bit values."""
        clipped = np.clip(scaled, -self.limit, self.limit)
        return clipped.astype(self.dtype) if self.kind == "float" else np.rint(clipped).astype(self.dtype)

    def weights_args(self) -> dict[str, Any]:
        """compressed-tensors ``QuantizationArgs`` of the weights."""
        return {"num_bits": 8, "type": self.kind, "strategy": self.strategy, "symmetric": True, "dynamic": False,
                "group_size": None, "block_structure": None, "actorder": None, "observer": self.observer}  # fmt: skip


def quantize_weight(weight: np.ndarray, recipe: Recipe) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit weight, float32 scale ``[out, 1]`` or ``[1]``) of a ``[out, in]`` weight."""
    w = weight.astype(np.float32)
    scale = _minmax_scale(w, recipe) if recipe.observer == "minmax" else _mse_scale(w, recipe)
    return recipe.cast(w / scale.reshape(-1, 1)), scale


def _absmax(w: np.ndarray, recipe: Recipe) -> np.ndarray:
    """max |w| per row ``[out, 1]``, or of the tensor ``[1]``; an all-zero one counts as 1."""
    peak = np.abs(w).max(axis=1, keepdims=True) if recipe.strategy == "channel" else np.abs(w).max().reshape(1)
    return np.where(peak > 0, peak, np.float32(1.0)).astype(np.float32)


def _minmax_scale(w: np.ndarray, recipe: Recipe) -> np.ndarray:
    return _absmax(w, recipe) / np.float32(recipe.limit)


def _mse_scale(w: np.ndarray, recipe: Recipe) -> np.ndarray:
    """The scale of ``absmax * (1 - i / 100)``, i < 20, whose round trip has the least
    ``sum |error| ** 2.4`` per row (or over the tensor), the largest on a tie:
    llm-compressor's ``mse`` observer."""
    peak = _absmax(w, recipe)
    candidates = np.stack([peak * np.float32(1 - i / MSE_GRID) for i in range(int(MSE_MAXSHRINK * MSE_GRID))]) / np.float32(recipe.limit)
    errors = np.stack([_round_trip_error(w, scale, recipe) for scale in candidates])  # (candidates, *scale.shape)
    return np.take_along_axis(candidates, errors.argmin(axis=0)[None], axis=0)[0]


def _round_trip_error(w: np.ndarray, scale: np.ndarray, recipe: Recipe) -> np.ndarray:
    """``sum |dequant(quant(w)) - w| ** 2.4`` per row, or over the tensor, shaped like ``scale``."""
    rows = scale.reshape(-1, 1)
    error = np.abs(recipe.cast(w / rows).astype(np.float32) * rows - w) ** np.float32(MSE_NORM)
    return error.sum(axis=1, keepdims=True) if recipe.strategy == "channel" else error.sum().reshape(1)


def quantization_config(scheme: str, linears: Recipe, tables: Recipe | None, ignore: tuple[str, ...]) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config``: the decoder's linears in group_0 but
    the ``ignore`` ones, the embedding tables (``tables``, when quantized) in group_1."""
    acts = None
    if scheme == "fp8-dynamic":
        acts = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                "group_size": None, "block_structure": None, "actorder": None, "observer": None}  # fmt: skip
    groups = {"group_0": _group(["Linear"], linears, acts)}
    if tables is not None:
        groups["group_1"] = _group(["Embedding", "lm_head"], tables, None)
    formats = {group["format"] for group in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": list(dict.fromkeys([*ignore, *([] if tables is not None else ["lm_head"])])),
        "kv_cache_scheme": None,
    }


def _group(targets: list[str], recipe: Recipe, acts: dict[str, Any] | None) -> dict[str, Any]:
    return {"targets": targets, "weights": recipe.weights_args(), "input_activations": acts, "output_activations": None,
            "format": FORMATS[recipe.kind]}  # fmt: skip


def recipes(layout: ModelLayout, linears: Recipe, tables: Recipe | None, ignore: tuple[str, ...]) -> dict[str, Recipe]:
    """Weight name -> how it is quantized: the decoder's linears but the ``ignore`` ones, and
    the embedding tables (a tied table under the embedding's name only, as it is stored)."""
    plan = {name: linears for name in layout.linears if not ignored(name.removesuffix(".weight"), ignore)}
    if tables is not None:
        plan[f"{layout.embedding}.weight"] = tables
        if not layout.tied:
            plan[f"{layout.lm_head}.weight"] = tables
    return plan


def ignored(module: str, ignore: tuple[str, ...]) -> bool:
    """Whether compressed-tensors' ``ignore`` list names ``module``: exactly, or by a ``re:`` pattern matching its start."""
    return any(re.match(entry[3:], module) if entry.startswith("re:") else entry == module for entry in ignore)


def quantize_model(src: str, out: Path, scheme: str, strategy: str = "channel", observer: str | None = None,
                   embeddings: str = "int8", ignore: tuple[str, ...] = (), cache_dir: str | None = "~/.cache/furiosa/llm") -> Path:  # fmt: skip
    """Load model ``src`` (a ``conf/model`` name or a model path) and write its quantized
    checkpoint to ``out``; ``observer`` None takes the scheme's default (fp8: mse, int8: minmax)."""
    from furiosa_build.load import load, load_config

    for flag, value, allowed in (("--scheme", scheme, tuple(SCHEMES)), ("--strategy", strategy, ("channel", "tensor")),
                                 ("--observer", observer, (None, *OBSERVERS)), ("--embeddings", embeddings, EMBEDDINGS)):  # fmt: skip
        if value not in allowed:
            raise ValueError(f"{flag}: expected one of {', '.join(a for a in allowed if a)}, got {value!r}")
    request = _load_request(src)
    hf_config = load_config(request)
    source = load(request, Path(cache_dir).expanduser() / "models" if cache_dir else None).weights()
    layout = ModelLayout.of(hf_config)
    if embeddings != "none" and any(ignored(module, ignore) for module in (layout.embedding, layout.lm_head)):
        raise ValueError("--ignore: the embedding tables are kept with --embeddings none")
    kind = SCHEMES[scheme]
    linears = Recipe(kind, strategy, observer or ("mse" if kind == "float" else "minmax"))
    tables = Recipe("int", "channel", "minmax") if embeddings == "int8" else None
    specs = {name: spec for name, spec in source.specs().items() if layout.ties.get(name, (name,))[0] == name}  # tied: stored once
    _write(out, specs, source.tensor, recipes(layout, linears, tables, ignore))
    config = {**hf_config, "quantization_config": quantization_config(scheme, linears, tables, ignore)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def _write(out: Path, specs: dict[str, Any], read: Callable[[str], np.ndarray], plan: dict[str, Recipe]) -> None:
    """``out/model.safetensors``: the tensors of ``specs``, those of ``plan`` quantized with their scales."""
    from furiosa_build.safetensors_file import write_safetensors

    stored: dict[str, Any] = {}
    for name, (dtype, shape) in specs.items():
        recipe = plan.get(name)
        stored[name] = (dtype, shape) if recipe is None else (recipe.dtype, shape)
        if recipe is not None:
            stored[f"{name}_scale"] = (np.dtype(np.float32), (shape[0], 1) if recipe.strategy == "channel" else (1,))
    memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def tensor(name: str) -> np.ndarray:
        """Tensors are asked for in name order, so ``x.weight`` comes right before ``x.weight_scale``."""
        weight = name.removesuffix("_scale")
        if weight not in plan:
            return read(name)
        if weight not in memo:
            memo.clear()
            memo[weight] = quantize_weight(read(weight), plan[weight])
        return memo[weight][name != weight]

    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", stored, tensor)


def _load_request(src: str) -> LoadRequest:
    """What the load stage reads for ``src``: a ``conf/model`` config by name, else a model path
    (bf16 weights, as the default SmolLM2 config loads its GGUF file)."""
    import yaml

    from furiosa_build.load import LoadRequest
    from furiosa_build.sources import resolve_source

    conf = Path(__file__).resolve().parent / "conf" / "model" / f"{src}.yaml"
    model = yaml.safe_load(conf.read_text(encoding="utf-8")) if conf.is_file() else {"model_id_or_path": src, "auto_bfloat16_cast": True}
    hf_config = model.get("hf_config")
    source = resolve_source(model["model_id_or_path"], hf_config is not None)
    return LoadRequest(source, hf_config, model.get("num_hidden_layers"), model.get("seed_for_random_weight"),
                       bool(model.get("auto_bfloat16_cast")), bool(model.get("trust_remote_code")))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m furiosa_build.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a conf/model config name or a model path (HF folder, GGUF file, pkg:...)")
    parser.add_argument("out", type=Path, help="the folder to write the quantized checkpoint to")
    parser.add_argument("--scheme", required=True, choices=tuple(SCHEMES))
    parser.add_argument("--strategy", default="channel", choices=("channel", "tensor"))
    parser.add_argument("--observer", choices=OBSERVERS, help="how weight scales are chosen (default: mse for fp8, minmax for int8)")
    parser.add_argument("--embeddings", default="int8", choices=EMBEDDINGS, help="quantize the embedding tables weight-only to int8, or keep them")
    parser.add_argument("--ignore", nargs="+", default=[], metavar="MODULE",
                        help="modules to keep unquantized: names, or re:PATTERN matched at the start of the name")
    parser.add_argument("--cache-dir", default="~/.cache/furiosa/llm", help="the build cache the converted model is kept in")
    args = parser.parse_args(argv)
    try:
        quantize_model(args.src, args.out, args.scheme, args.strategy, args.observer, args.embeddings, tuple(args.ignore), args.cache_dir)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.scheme}, per-{args.strategy} scales, embeddings {args.embeddings})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

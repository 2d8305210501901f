"""Make a quantized checkpoint of a model in the compressed-tensors format the build reads
(``build.quantize_artifact_path``, see ``furiosa_build/quantized_checkpoint.py``)::

    python -m furiosa_build.quantize SRC OUT --scheme fp8-dynamic|int8-weight-only [--strategy channel|tensor]

``SRC`` is a model config of ``conf/model`` (``tiny-llama``, ``smollm2-135m-instruct``) or a
model path as ``model.model_id_or_path`` takes it (a Hugging Face folder, a GGUF file,
``pkg:...``); the model is read by the build's load stage (so GGUF files and random
weights work, and the conversion is cached).  Every ``nn.Linear`` of the decoder layers
gets symmetric absmax scales per output channel (``--strategy tensor``: one per tensor):

* ``fp8-dynamic``: ``scale = absmax / 448``, weight ``float8_e4m3fn(w / scale)``; activations
  are quantized per token at run time (``format: float-quantized``);
* ``int8-weight-only``: ``scale = absmax / 127``, weight ``round(w / scale)`` clipped to
  [-127, 127] in int8 (``format: int-quantized``, one byte per value).

The embedding, the norms and ``lm_head`` stay in the model's dtype (``ignore: [lm_head]``, as
compressed-tensors' default).  ``OUT`` gets ``model.safetensors`` (scales in float32) and
``config.json`` with the ``quantization_config``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np

from furiosa_runtime.npu.isa import FP8_MAX

if TYPE_CHECKING:
    from furiosa_build.load import LoadRequest

SCHEMES = ("fp8-dynamic", "int8-weight-only")
INT8_MAX = 127.0


def quantize_weight(weight: np.ndarray, scheme: str, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """(8-bit weight, float32 scale ``[out, 1]`` or ``[1]``) of a ``[out, in]`` weight."""
    w = weight.astype(np.float32)
    peak = np.abs(w).max(axis=1, keepdims=True) if strategy == "channel" else np.abs(w).max().reshape(1)
    limit = FP8_MAX if scheme == "fp8-dynamic" else INT8_MAX
    scale = (np.where(peak > 0, peak, 1.0) / np.float32(limit)).astype(np.float32)
    scaled = np.clip(w / scale.reshape(-1, 1), -limit, limit)
    stored = scaled.astype(ml_dtypes.float8_e4m3fn) if scheme == "fp8-dynamic" else np.rint(scaled).astype(np.int8)
    return stored, scale


def quantization_config(scheme: str, strategy: str) -> dict[str, Any]:
    """The compressed-tensors ``quantization_config`` of a scheme."""
    kind = "float" if scheme == "fp8-dynamic" else "int"
    weights = {"num_bits": 8, "type": kind, "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax"}  # fmt: skip
    acts = None
    if scheme == "fp8-dynamic":
        acts = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True,
                "group_size": None, "block_structure": None, "actorder": None, "observer": None}  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized" if kind == "float" else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


def decoder_linears(hf_config: dict[str, Any]) -> set[str]:
    """The weight names of every ``nn.Linear`` inside the decoder layers (not ``lm_head``)."""
    import torch

    from furiosa_build.hf_model import auto_model_class, config_for_model, meta_model

    model = meta_model(auto_model_class("generate"), config_for_model(hf_config, "model.hf_config"), hf_config)
    layers = {name for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)}
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name.startswith(f"{prefix}.") for prefix in layers)}  # fmt: skip


def quantize_model(src: str, out: Path, scheme: str, strategy: str = "channel", cache_dir: str | None = "~/.cache/furiosa/llm") -> Path:
    """Load model ``src`` (a ``conf/model`` name or a model path) and write its quantized checkpoint to ``out``."""
    from furiosa_build.load import load, load_config
    from furiosa_build.safetensors_file import write_safetensors

    if scheme not in SCHEMES:
        raise ValueError(f"--scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    if strategy not in ("channel", "tensor"):
        raise ValueError(f"--strategy: expected channel or tensor, got {strategy!r}")
    request = _load_request(src)
    hf_config = load_config(request)
    source = load(request, Path(cache_dir).expanduser() / "models" if cache_dir else None).weights()
    linears = decoder_linears(hf_config)
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    for name, (dtype, shape) in source.specs().items():
        if name in linears:
            specs[name] = (np.dtype(ml_dtypes.float8_e4m3fn) if scheme == "fp8-dynamic" else np.dtype(np.int8), shape)
            specs[f"{name}_scale"] = (np.dtype(np.float32), (shape[0], 1) if strategy == "channel" else (1,))
        else:
            specs[name] = (dtype, shape)
    out.mkdir(parents=True, exist_ok=True)
    memo: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def tensor(name: str) -> np.ndarray:
        """Tensors are asked for in name order, so ``x.weight`` comes right before ``x.weight_scale``."""
        weight = name.removesuffix("_scale")
        if weight not in linears:
            return source.tensor(name)
        if weight not in memo:
            memo.clear()
            memo[weight] = quantize_weight(source.tensor(weight), scheme, strategy)
        return memo[weight][name != weight]

    write_safetensors(out / "model.safetensors", specs, tensor)
    config = {**hf_config, "quantization_config": quantization_config(scheme, strategy)}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


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
    parser.add_argument("--scheme", required=True, choices=SCHEMES)
    parser.add_argument("--strategy", default="channel", choices=("channel", "tensor"))
    parser.add_argument("--cache-dir", default="~/.cache/furiosa/llm", help="the build cache the converted model is kept in")
    args = parser.parse_args(argv)
    try:
        quantize_model(args.src, args.out, args.scheme, args.strategy, args.cache_dir)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.scheme}, per-{args.strategy} scales)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

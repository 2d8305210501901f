"""Shared test helpers: compose and build configs, and the Hugging Face oracle."""

from __future__ import annotations

import collections
import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

#: Parallel layouts that every engine test runs on: one PE, and 2-way tensor parallelism
#: x 2 pipeline stages (tiny-llama has 4 query / 2 KV heads and 2 layers).
ENGINE_LAYOUTS: dict[str, list[str]] = {
    "single-pe": [],
    "tp2-pp2": ["parallel.devices=npu:0:0-3", "parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2"],
}


@contextlib.contextmanager
def tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (e.g. ``options="size=64k"`` or ``"ro,size=1m"``): a small
    or read-only disk the test makes itself.  Mounting needs root; elsewhere the test is
    skipped with the reason."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount_read_only(where: Path) -> None:
    """Make a :func:`tmpfs` read-only (what it holds stays readable)."""
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)


def compose_spec(overrides: list[str]):
    """Compose ``conf/`` with Hydra overrides into a validated BuildSpec (no Hydra app)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from furiosa_build.config import load_spec
    from furiosa_build.hydra_schema import register_configs

    register_configs()  # conf/config.yaml starts from the schema (build_schema)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return load_spec(OmegaConf.to_container(cfg, resolve=True))


def build(overrides: list[str], out: Path, cache: Path | None):
    """Build an artifact into ``out`` and return the BuildReport."""
    from furiosa_build.builder import ArtifactBuilder

    cache_override = f"build.cache_dir={cache}" if cache is not None else "build.cache_dir=null"
    spec = compose_spec([*overrides, f"build.save_dir={out}", cache_override, "build.progress=false"])
    return ArtifactBuilder.from_spec(spec).build_from_spec()


def hf_random_model(hf_config: dict, seed: int, task: str = "generate"):
    """The oracle for random-weight configs: a transformers model holding the weights the
    build's random-weight rule gives every tensor name (``furiosa_build.weight_sources.random_tensor``),
    bf16 values computed in fp32."""
    import torch
    from transformers import AutoConfig

    from furiosa_build.hf_model import auto_model_class
    from furiosa_build.load import random_state_dict

    model = auto_model_class(task).from_config(AutoConfig.for_model(**hf_config), dtype=torch.float32)
    weights = {name: torch.from_numpy(t.astype(np.float32)) for name, t in random_state_dict(hf_config, seed, task).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not [n for n in missing if model.state_dict()[n].is_floating_point()], (missing, unexpected)
    return model.eval()


def hf_gguf_model(gguf: Path):
    """The oracle for the GGUF model: transformers loads it, bf16 weights, fp32 compute."""
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses dtype casts, so copy its rounded weights into a plain one.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in loaded.state_dict().items()})
    return model.eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = True) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits of every step; with ``ignore_eos`` EOS does not stop
    generation (nor is it banned), like ``SamplingParams(ignore_eos=True)``."""
    import torch

    ids = torch.tensor([prompt_ids])
    eos = None if ignore_eos else model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )  # fmt: skip
    return out.sequences[0, len(prompt_ids) :].tolist(), [step[0].numpy() for step in out.logits]


def npu_greedy(llm, prompt_ids: list[int], max_new_tokens: int, prefill_bucket=None, decode_bucket=None):
    """Greedy decoding through the engine's model runner in chosen buckets.

    Returns the tokens and the logits of every step; other rows of the bucket stay
    padding, so this also checks that padding changes nothing.
    """
    from furiosa_runtime.engine.sampling_params import SamplingParams
    from furiosa_runtime.engine.sequence import Sequence
    from furiosa_runtime.npu.artifact import smallest_bucket

    engine = llm.engine
    runner, blocks = engine.runner, engine.blocks
    seq = Sequence("probe", None, list(prompt_ids), SamplingParams(temperature=0), None, max_new_tokens)
    blocks.allocate(seq.request_id, seq.num_tokens)
    bucket = prefill_bucket or smallest_bucket(runner.prefill_buckets, 1, seq.num_tokens)
    steps = [runner.prefill([seq], bucket)[0]]
    try:
        while len(seq.output_token_ids) < max_new_tokens:
            seq.output_token_ids.append(int(np.argmax(steps[-1])))
            if len(seq.output_token_ids) == max_new_tokens:
                break
            blocks.allocate(seq.request_id, seq.num_tokens)
            bucket = decode_bucket or smallest_bucket(runner.decode_buckets, 1, seq.num_tokens)
            steps.append(runner.decode([seq], bucket)[0])
    finally:
        blocks.free(seq.request_id)
    return seq.output_token_ids, steps


@contextlib.contextmanager
def recorded_quantized_inputs() -> Iterator[list[np.ndarray]]:
    """Record the input of every ``quantized_linear`` the simulator executes, in order: the
    first sequence of the bucket, ``(S, K)`` in float32 (``fake_quant_model``'s ``replay``)."""
    from furiosa_runtime.npu import isa

    kernel = isa.KERNELS["quantized_linear"]
    seen: list[np.ndarray] = []

    def record(ins, attrs, ctx):
        x = ins[0]
        seen.append(np.array(x.reshape(-1, x.shape[-2], x.shape[-1])[0], dtype=np.float32))  # (S, K)
        return kernel(ins, attrs, ctx)

    isa.KERNELS["quantized_linear"] = record
    try:
        yield seen
    finally:
        isa.KERNELS["quantized_linear"] = kernel


def fake_quant_model(model, checkpoint: Path, replay: collections.deque[np.ndarray] | None = None):
    """The oracle for a quantized checkpoint (``furiosa_build/quantized_checkpoint.py``):
    ``model`` with every tensor of the checkpoint loaded, and each quantized ``nn.Linear``
    computing as ``isa.quantized_linear`` specifies, in the same order of operations: the
    input quantised per token to float8_e4m3fn (W8A8 dynamic; static: by ``input_scale``),
    the product with the widened 8-bit weight in fp32, then the activation scale, the
    weight scale and the bias.  A quantized embedding table looks up its 8-bit rows times
    their scales, and ``lm_head`` over a quantized table (its own, or the embedding's when
    tied) is weight-only.

    Rounding to fp8 is discontinuous: two float32 computations of the same input that
    differ in the last bit (a matmul summed in another order) round an element that sits
    on a midpoint to neighbouring fp8 values, one step (6-12%) apart, and through 30 layers
    such flips cascade until the logits differ by units (this reference against itself,
    with its products rounded through float64, differs by 2.8 on SmolLM2).  So with
    ``replay`` (a queue the caller fills with the simulator's inputs of each quantized
    linear, from :func:`recorded_quantized_inputs`, in execution order) an activation is
    quantised from the simulator's float32 input, after checking that it is this
    reference's own input to within float32 rounding; everything else is computed here.
    """
    import torch

    from furiosa_build.quantized_checkpoint import QuantizedCheckpoint

    ckpt = QuantizedCheckpoint.open(checkpoint)
    tensors = {name: torch.from_numpy(ckpt.tensor(name).astype(np.float32)) for name in ckpt.tensors}
    fp8_max = float(torch.finfo(torch.float8_e4m3fn).max)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    tied = head.weight is embedding.weight  # before the embedding's weight is replaced below

    def activation(rows, mode: str):
        """The input rows ``(T, K)`` to quantise: the simulator's, with ``replay``."""
        if replay is None:
            return rows
        simulated = torch.from_numpy(replay.popleft())
        n = min(simulated.shape[0], rows.shape[0])  # prefill rows are left-padded; a head sliced to the last token has fewer
        drift = (simulated[-n:] - rows[-n:]).abs().amax(dim=-1) / rows[-n:].abs().amax(dim=-1).clamp_min(1e-30)
        assert float(drift.max()) < 1e-4, f"a quantized linear's input is {float(drift.max()):.2e} away from the reference's"
        if mode == "none":
            return rows
        assert n == rows.shape[0], (simulated.shape, rows.shape)
        return simulated[-n:]

    def forward(module, x):
        rows = activation(x.reshape(-1, x.shape[-1]), module.activations)  # (T, K)
        scale = None
        if module.activations == "static":
            scale = module.input_scale.reshape(1, 1)
        elif module.activations == "dynamic":
            peak = rows.abs().amax(dim=-1, keepdim=True)
            scale = torch.where(peak > 0, peak, torch.tensor(fp8_max)) / fp8_max
        if scale is not None:
            rows = (rows / scale).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn).float()
        y = rows @ module.qweight.T
        if scale is not None:
            y = y * scale
        y = y * module.weight_scale.reshape(1, -1)
        if module.bias is not None:
            y = y + module.bias
        return y.reshape(*x.shape[:-1], -1)

    def stored_as(name: str, module) -> str:
        """Whose tensors quantize ``module``: its own, or the embedding's for a tied ``lm_head``."""
        return names[id(embedding)] if module is head and tied and f"{name}.weight_scale" not in tensors else name

    quantized = set()
    for name, module in model.named_modules():
        source = stored_as(name, module)
        if f"{source}.weight_scale" not in tensors:
            continue
        quantized.add(source)
        qweight, weight_scale = tensors[f"{source}.weight"], tensors[f"{source}.weight_scale"]
        if module is embedding:  # the lookup scales each row it reads: the same products as scaling the whole table
            module.weight = torch.nn.Parameter(qweight * weight_scale, requires_grad=False)
            continue
        module.register_buffer("qweight", qweight)
        module.register_buffer("weight_scale", weight_scale)
        if f"{source}.input_scale" in tensors:
            module.register_buffer("input_scale", tensors[f"{source}.input_scale"])
        module.activations = "none" if module is head else ckpt.scheme.activations
        module.forward = forward.__get__(module)
    owned = {f"{source}.{suffix}" for source in quantized for suffix in ("weight", "weight_scale", "input_scale")}
    _, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if k not in owned}, strict=False)
    assert not unexpected, unexpected
    return model.eval()

"""Route every Hugging Face attention call through one paged-attention custom op.

transformers selects the attention kernel by name through ``AttentionInterface``; we
register ``"furiosa_paged"`` there, so any architecture that uses the interface
(Llama, Qwen2/3, Mistral, Gemma, GPT-2, BERT, ...) exports with exactly one
``furiosa::paged_attention`` node per layer.  The op carries the paged-KV metadata
(positions, slot mapping, block tables) that the model forwards as keyword arguments;
the compiler lowers it to the ``paged_attention`` NPU instruction.

``furiosa::carry`` marks the hidden state entering each decoder layer, so the
partitioner can tell the residual stream from side inputs such as rotary tables.

Mixture-of-experts MLPs are routed the same way through transformers' ``ExpertsInterface``
(``"furiosa_moe"``): the experts of a layer export as one ``furiosa::moe_experts`` node
that the compiler lowers to the ``moe_experts`` instruction, instead of the sort /
histogram / grouped-GEMM graph of transformers' static-shape implementations.

Some decoder layers (StableLM's) call their attention without the model's keyword
arguments; ``bind_paged_inputs`` keeps the paged metadata the model was called with, so
the attention call finds it all the same.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate
from transformers.masking_utils import AttentionMaskInterface

from furiosa_build.compiler.lower import LoweringError

ATTN_IMPLEMENTATION = "furiosa_paged"
EXPERTS_IMPLEMENTATION = "furiosa_moe"
#: transformers' ``hidden_act`` names -> the NPU's activation functions (``isa.UNARY``).
EXPERT_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
PAGED_INPUTS = ("positions", "slot_mapping", "block_tables")
_bound: dict[str, torch.Tensor] = {}  # the paged inputs of the model call being traced


@torch.library.custom_op("furiosa::paged_attention", mutates_args=())
def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    causal: bool,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    """(B, H, S, D) queries over the paged cache -> (B, S, H, Dv). Only ever traced."""
    raise NotImplementedError("furiosa::paged_attention runs on the NPU simulator, not in torch")


@paged_attention.register_fake
def _paged_attention_shape(query, key, value, positions, slot_mapping, block_tables, scale, causal, sliding_window, softcap):
    batch, heads, seq, _ = query.shape
    return query.new_empty((batch, seq, heads, value.shape[-1]))


@torch.library.custom_op("furiosa::moe_experts", mutates_args=())
def moe_experts(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: str,
) -> torch.Tensor:
    """(T, H) tokens through their top-k experts -> (T, H). Only ever traced."""
    raise NotImplementedError("furiosa::moe_experts runs on the NPU simulator, not in torch")


@moe_experts.register_fake
def _moe_experts_shape(hidden, top_k_index, top_k_weights, gate_up_proj, down_proj, act):
    return torch.empty_like(hidden)


@torch.library.custom_op("furiosa::carry", mutates_args=())
def carry(hidden: torch.Tensor) -> torch.Tensor:
    """Identity that marks the residual stream entering a decoder layer."""
    return hidden.clone()


@carry.register_fake
def _carry_shape(hidden):
    return torch.empty_like(hidden)


def bind_paged_inputs(model: torch.nn.Module) -> None:
    """Keep the paged inputs of every call of ``model`` for attention calls that lose them."""

    def keep(module, args, kwargs):
        _bound.clear()
        _bound.update({name: kwargs[name] for name in PAGED_INPUTS if name in kwargs})

    model.register_forward_pre_hook(keep, with_kwargs=True)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    sliding_window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or 0
    softcap = kwargs.get("softcap") or 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    positions, slot_mapping, block_tables = (kwargs.get(name, _bound.get(name)) for name in PAGED_INPUTS)
    if positions is None or slot_mapping is None or block_tables is None:
        raise RuntimeError("furiosa paged attention was called without the paged inputs; call bind_paged_inputs(model)")
    out = torch.ops.furiosa.paged_attention(
        query,
        key,
        value,
        positions,
        slot_mapping,
        block_tables,
        float(scale),
        bool(getattr(module, "is_causal", True)),
        int(sliding_window),
        float(softcap),
    )
    return out, None


def _experts(module, hidden_states, top_k_index, top_k_weights):
    """The experts of one MoE layer as a single ``furiosa::moe_experts`` node; the forms the
    instruction does not cover are refused by name."""
    act = EXPERT_ACTIVATIONS.get(getattr(module.config, "hidden_act", None))
    unsupported = {
        "expert biases": module.has_bias, "ungated experts": not module.has_gate,
        "transposed expert weights": module.is_transposed, "interleaved gate/up weights": not module.is_concatenated,
        "a norm after each expert": module.has_post_expert_norm, "a custom expert gate": type(module)._apply_gate is not _default_apply_gate,
        f"the expert activation {getattr(module.config, 'hidden_act', None)!r}": act is None,
    }  # fmt: skip
    refused = [what for what, present in unsupported.items() if present]
    if refused:
        raise LoweringError(f"mixture of experts with {', '.join(refused)} is not supported by the NPU compiler")
    return torch.ops.furiosa.moe_experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj, act)


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Make ``attn_implementation="furiosa_paged"`` and ``experts_implementation="furiosa_moe"``
    available to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, _experts)

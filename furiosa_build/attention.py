"""Route every Hugging Face attention call through one paged-attention custom op.

transformers selects the attention kernel by name through ``AttentionInterface``; we
register ``"furiosa_paged"`` there, so any architecture that uses the interface
(Llama, Qwen2/3, Mistral, Gemma, GPT-2, BERT, ...) exports with exactly one
``furiosa::paged_attention`` node per layer.  The op carries the paged-KV metadata
(positions, slot mapping, block tables) that the model forwards as keyword arguments;
the compiler lowers it to the ``paged_attention`` NPU instruction.

``furiosa::carry`` marks the hidden state entering each decoder layer, so the
partitioner can tell the residual stream from side inputs such as rotary tables.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTN_IMPLEMENTATION = "furiosa_paged"


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


@torch.library.custom_op("furiosa::carry", mutates_args=())
def carry(hidden: torch.Tensor) -> torch.Tensor:
    """Identity that marks the residual stream entering a decoder layer."""
    return hidden.clone()


@carry.register_fake
def _carry_shape(hidden):
    return torch.empty_like(hidden)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    sliding_window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or 0
    softcap = kwargs.get("softcap") or 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.furiosa.paged_attention(
        query,
        key,
        value,
        kwargs["positions"],
        kwargs["slot_mapping"],
        kwargs["block_tables"],
        float(scale),
        bool(getattr(module, "is_causal", True)),
        int(sliding_window),
        float(softcap),
    )
    return out, None


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Make ``attn_implementation="furiosa_paged"`` available to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)

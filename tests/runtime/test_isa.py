"""Reference kernels of the instruction set, checked against direct formulas."""

from __future__ import annotations

import numpy as np

from furiosa_runtime.isa import ExecContext, Instruction, KVCacheLayer, execute


def _attend(q, k, v, scale):
    """Plain causal attention over one sequence: q (H, S, D), k/v (Hkv, S, D)."""
    groups = q.shape[0] // k.shape[0]
    k, v = np.repeat(k, groups, axis=0), np.repeat(v, groups, axis=0)
    scores = q @ k.transpose(0, 2, 1) * scale
    scores = np.where(np.tril(np.ones(scores.shape[-2:], dtype=bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(1, 0, 2)  # (S, H, D)


def _paged(q, k, v, positions, slots, tables, kv, block_size, scale=0.25):
    inst = Instruction(
        op="paged_attention", ins=tuple("qkvpst"), outs=("o",),
        attrs={"scale": scale, "causal": True, "sliding_window": 0, "softcap": 0.0, "kv_index": 0},
    )  # fmt: skip
    (out,) = execute(inst, [q, k, v, positions, slots, tables], ExecContext(kv=kv, block_size=block_size))
    return out


def test_prefill_then_decode_through_scattered_blocks_equals_plain_attention():
    rng = np.random.default_rng(0)
    heads, kv_heads, dim, block, length = 4, 2, 8, 4, 7
    q = rng.standard_normal((1, heads, length + 1, dim)).astype(np.float32)
    k = rng.standard_normal((1, kv_heads, length + 1, dim)).astype(np.float32)
    v = rng.standard_normal((1, kv_heads, length + 1, dim)).astype(np.float32)
    table = np.array([[5, 2, 7]])  # logical blocks 0, 1, 2 live in physical blocks 5, 2, 7
    slot = lambda p: table[0, p // block] * block + p % block  # noqa: E731
    kv = KVCacheLayer(8 * block, kv_heads, dim, dim, np.dtype(np.float32))

    # Prefill the first `length` tokens, right-aligned after one padding column.
    pos = np.array([[0] + list(range(length))])
    slots = np.array([[-1] + [slot(p) for p in range(length)]])
    pad = lambda x: np.concatenate([np.zeros_like(x[:, :, :1]), x[:, :, :length]], axis=2)  # noqa: E731
    out = _paged(pad(q), pad(k), pad(v), pos, slots, table, kv, block)
    want = _attend(q[0], k[0], v[0], 0.25)
    np.testing.assert_allclose(out[0, 1:], want[:length], rtol=1e-5, atol=1e-6)

    # Decode the next token: it reads everything from the cache.
    step = _paged(q[:, :, length:], k[:, :, length:], v[:, :, length:], np.array([[length]]), np.array([[slot(length)]]), table, kv, block)
    np.testing.assert_allclose(step[0, 0], want[length], rtol=1e-5, atol=1e-6)


def test_a_padding_row_reads_nothing_and_returns_zeros():
    kv = KVCacheLayer(16, 1, 4, 4, np.dtype(np.float32))
    zeros = np.zeros((1, 1, 1, 4), dtype=np.float32)
    out = _paged(zeros + 1, zeros + 1, zeros + 1, np.array([[0]]), np.array([[-1]]), np.array([[0]]), kv, 4)
    assert np.all(out == 0) and np.all(kv.k == 0)


def test_rms_norm_rotary_and_gated_activation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    (y,) = execute(Instruction(op="rms_norm", ins=("x", "w"), outs=("y",), attrs={"eps": 1e-6}), [x, w], ExecContext())
    np.testing.assert_allclose(y, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-5)

    cos, sin = np.cos(x), np.sin(x)
    (r,) = execute(Instruction(op="rotary", ins=("x", "c", "s"), outs=("r",)), [x, cos, sin], ExecContext())
    rotated = np.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    np.testing.assert_allclose(r, x * cos + rotated * sin, rtol=1e-6)

    (g,) = execute(Instruction(op="gated_act", ins=("a", "b"), outs=("g",), attrs={"act": "silu"}), [x, w * x], ExecContext())
    np.testing.assert_allclose(g, x / (1 + np.exp(-x)) * (w * x), rtol=1e-5)

"""Reference kernels of the instruction set, checked against direct formulas."""

from __future__ import annotations

import numpy as np

from furiosa_runtime.npu import isa
from furiosa_runtime.npu.isa import COLLECTIVES, ExecContext, Instruction, KVCacheLayer, execute


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


def test_a_batch_of_mixed_lengths_and_long_prompts_matches_each_sequence_alone():
    """More rows than one attention task takes and prompts longer than a query chunk: every
    row still sees exactly its own context, through blocks scattered over the cache."""
    rng = np.random.default_rng(2)
    rows, heads, kv_heads, dim, block = 20, 6, 2, 8, 4
    lengths = rng.integers(1, 150, size=rows)
    width, blocks_per_row = int(lengths.max()), -(-151 // block)
    tables = rng.permutation(rows * blocks_per_row).reshape(rows, blocks_per_row)
    kv = KVCacheLayer(rows * blocks_per_row * block, kv_heads, dim, dim, np.dtype(np.float32))
    q = rng.standard_normal((rows, heads, width + 1, dim)).astype(np.float32)
    k = rng.standard_normal((rows, kv_heads, width + 1, dim)).astype(np.float32)
    v = rng.standard_normal((rows, kv_heads, width + 1, dim)).astype(np.float32)

    # Prefill: row b holds its lengths[b] tokens right-aligned; the columns before are padding.
    pos, slots = np.zeros((rows, width), dtype=np.int64), np.full((rows, width), -1)
    qp, kp, vp = (np.zeros_like(x[:, :, :width]) for x in (q, k, v))
    for b, n in enumerate(lengths):
        pos[b, width - n :] = np.arange(n)
        slots[b, width - n :] = tables[b, np.arange(n) // block] * block + np.arange(n) % block
        for dst, src in ((qp, q), (kp, k), (vp, v)):
            dst[b, :, width - n :] = src[b, :, :n]
    out = _paged(qp, kp, vp, pos, slots, tables, kv, block)

    # Decode: one more token per row, reading the whole context back from the cache.
    step_q, step_k, step_v = (np.stack([x[b, :, n : n + 1] for b, n in enumerate(lengths)]) for x in (q, k, v))
    step_slots = tables[np.arange(rows), lengths // block] * block + lengths % block
    step = _paged(step_q, step_k, step_v, lengths[:, None], step_slots[:, None], tables, kv, block)

    for b, n in enumerate(lengths):
        want = _attend(q[b, :, : n + 1], k[b, :, : n + 1], v[b, :, : n + 1], 0.25)
        np.testing.assert_allclose(out[b, width - n :], want[:n], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(step[b, 0], want[n], rtol=1e-5, atol=1e-6)


def test_decode_rows_attended_on_several_host_threads_give_the_same_bits(monkeypatch):
    """Row groups of a decode step run on the host's threads; the result must not depend on
    how many there are.  K and V share one array per layer, ``k`` and ``v`` being views."""
    rng = np.random.default_rng(3)
    rows, heads, kv_heads, dim, block, blocks_per_row = 40, 4, 2, 8, 4, 6
    kv = KVCacheLayer(rows * blocks_per_row * block, kv_heads, dim, dim, np.dtype(np.float32))
    assert np.shares_memory(kv.k, kv.kv) and np.shares_memory(kv.v, kv.kv) and kv.nbytes == kv.kv.nbytes
    kv.k[:] = rng.standard_normal(kv.k.shape)
    kv.v[:] = rng.standard_normal(kv.v.shape)
    tables = rng.permutation(rows * blocks_per_row).reshape(rows, blocks_per_row)
    lengths = rng.integers(1, blocks_per_row * block, size=rows)
    q = rng.standard_normal((rows, heads, 1, dim)).astype(np.float32)
    new_k, new_v = (rng.standard_normal((rows, kv_heads, 1, dim)).astype(np.float32) for _ in range(2))
    slots = tables[np.arange(rows), lengths // block] * block + lengths % block
    results = []
    for threads in (1, 3):
        monkeypatch.setattr(isa, "HOST_THREADS", threads)
        results.append(_paged(q, new_k, new_v, lengths[:, None], slots[:, None], tables, kv, block))
    assert np.array_equal(results[0], results[1])


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


def test_a_norm_from_the_summed_partials_of_row_slices_is_the_norm_of_the_whole_row():
    """The distributed norm: each PE's ``norm_partials`` of its slice, added up (the
    all-reduce), let ``norm_apply`` normalise each slice exactly as the whole row would be."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 12)).astype(np.float32) + 2.0
    w, b = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    slices = np.split(x, 3, axis=-1)
    for kind, norm, affine, attrs in [("rms", "rms_norm", [w], {"eps": 1e-6, "weight_offset": 1.0}), ("layer", "layer_norm", [w, b], {"eps": 1e-5})]:
        (whole,) = execute(Instruction(op=norm, ins=("x", *"wb"[: len(affine)]), outs=("y",), attrs=attrs), [x, *affine], ExecContext())
        partials = [execute(Instruction(op="norm_partials", ins=("x",), outs=("s",), attrs={"kind": kind}), [s], ExecContext())[0] for s in slices]
        assert partials[0].shape == (2, 3, 1 if kind == "rms" else 2)
        sums = COLLECTIVES["all_reduce"](partials, {})
        apply = Instruction(op="norm_apply", ins=("x", "s", *"wb"[: len(affine)]), outs=("y",), attrs={"kind": kind, "count": 12, **attrs})
        pieces = [execute(apply, [s, sums, *(np.split(a, 3)[i] for a in affine)], ExecContext())[0] for i, s in enumerate(slices)]
        np.testing.assert_allclose(np.concatenate(pieces, axis=-1), whole, rtol=1e-5, atol=1e-5)


def test_all_gather_takes_shared_chunks_once_and_reassembles_fused_segments():
    whole = np.arange(12).reshape(1, 12)
    assert (COLLECTIVES["all_gather"](np.split(whole, 4, axis=1), {"dim": 1}) == whole).all()
    # 2 distinct chunks over 4 PEs (a KV head per pair of PEs): each taken once
    pairs = [np.split(whole, 2, axis=1)[r * 2 // 4] for r in range(4)]
    assert (COLLECTIVES["all_gather"](pairs, {"dim": 1, "segments": [[6, 2]]}) == whole).all()
    # [q | k | v] = [0..5 | 6..8 | 9..11] over 2 PEs: q split in 2, k and v shared (one KV head)
    q, k, v = whole[:, :6], whole[:, 6:9], whole[:, 9:]
    per_pe = [np.concatenate([np.split(q, 2, axis=1)[r], k, v], axis=1) for r in range(2)]
    assert (COLLECTIVES["all_gather"](per_pe, {"dim": 1, "segments": [[3, 2], [3, 1], [3, 1]]}) == whole).all()

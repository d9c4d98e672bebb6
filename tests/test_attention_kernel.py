"""The Triton attention (forward, backward, split-K decode) against the torch reference
gptoss.model.attention_with_sinks, under TRITON_INTERPRET=1 on the CPU: outputs and the gradients of
q, k, v and the sinks, on shapes and positions chosen to break tiling, masking and the sink."""

import pytest
import torch

from gptoss.kernels import attention as kernel
from gptoss.model import attention_with_sinks as reference


def _ragged(B, T, pads):
    """[B, T] positions, row b left-padded with pads[b] positions -1."""
    pos = torch.full((B, T), -1)
    for b, pad in enumerate(pads):
        pos[b, pad:] = torch.arange(T - pad)
    return pos


def _ring(S, newest):
    """Slot positions of a ring of S slots after writing positions 0..newest (slot = position % S)."""
    pos = torch.full((S,), -1)
    for p in range(max(0, newest - S + 1), newest + 1):
        pos[p % S] = p
    return pos


# name: (B, T, S, K, G, window, q_pos, k_pos). The interpreter's tiles are 32 rows x 16 keys (bf16 and
# fp32 on a GPU: 64-128 x 32-64), so every case below spans several tiles with a ragged last one.
CASES = {
    "mha-T-not-a-tile-multiple": (1, 37, 37, 3, 1, None, None, None),
    "gqa-window-smaller-than-T": (2, 37, 37, 2, 3, 5, None, None),
    "gqa-window-larger-than-T": (1, 29, 29, 2, 3, 64, None, None),
    "window-1-sees-itself-only": (1, 20, 20, 1, 2, 1, None, None),
    "mqa-one-kv-head": (1, 23, 23, 1, 8, 7, None, None),
    # rows of 0, 9 and 22 pads, the last with 1 real token: padded queries see only the sink
    "ragged-left-padding": (3, 23, 23, 2, 2, None, _ragged(3, 23, [0, 9, 22]), _ragged(3, 23, [0, 9, 22])),
    "ragged-left-padding-window": (3, 23, 23, 2, 2, 4, _ragged(3, 23, [0, 9, 22]), _ragged(3, 23, [0, 9, 22])),
    # 9 new queries at positions 40..48 after a 40-token cache (keys 0..48)
    "cache-continuation": (1, 9, 49, 2, 4, None, torch.arange(40, 49), torch.arange(49)),
    "cache-continuation-window": (2, 9, 49, 2, 4, 6, torch.arange(40, 49), torch.arange(49)),
    # keys as a ring holds them (unsorted) plus the new ones: positions 30..44 in slots, then 45..50
    "ring-positions-unsorted": (
        1,
        6,
        22,
        2,
        3,
        16,
        torch.arange(45, 51),
        torch.cat((_ring(16, 44), torch.arange(45, 51))),
    ),
    # every key is padding: each row's output comes from the sink alone (zero)
    "no-visible-key": (1, 5, 18, 1, 3, None, torch.arange(5), torch.full((18,), -1)),
}

# fp32: IEEE dots in the interpreter, only the summation order differs (errors ~1e-6 measured); 1e-4 of
# the largest value is far above that and far below any masking or indexing error (O(1)).
# bf16: the inputs are the same bf16 numbers for both; the kernel rounds P and dS to bf16 before their
# dots (on a GPU) and its output and gradients to bf16 (here too): a few 2^-8 roundings, so 2%.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _inputs(B, T, S, K, G, dtype, Dh=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, K, G, Dh, generator=g).to(dtype)
    k = torch.randn(B, S, K, Dh, generator=g).to(dtype)
    v = torch.randn(B, S, K, Dh, generator=g).to(dtype)
    sinks = 2 * torch.randn(K * G, generator=g)  # some sinks dominate, some vanish
    return q, k, v, sinks


def _close(actual, expected, dtype, what):
    scale = max(expected.float().abs().max().item(), 1e-3)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} vs largest value {scale:.3e}"


def _run(fn, tensors, q_pos, k_pos, window, grad_out):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves, q_pos, k_pos, window)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_the_reference(case, dtype):
    B, T, S, K, G, window, q_pos, k_pos = CASES[case]
    q_pos = torch.arange(S - T, S) if q_pos is None else q_pos
    k_pos = torch.arange(S) if k_pos is None else k_pos
    tensors = _inputs(B, T, S, K, G, dtype)
    grad_out = torch.randn(B, T, K, G, 64).to(dtype)
    out, grads = _run(kernel.attention_with_sinks, tensors, q_pos, k_pos, window, grad_out)
    # the reference in fp32 from the same (possibly bf16-rounded) inputs
    ref_out, ref_grads = _run(reference, [t.float() for t in tensors], q_pos, k_pos, window, grad_out.float())
    assert out.dtype == dtype and out.shape == ref_out.shape
    _close(out, ref_out, dtype, "output")
    for name, got, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads):
        assert got.shape == want.shape, name
        _close(got, want, dtype, name)


def test_sink_only_rows_are_zero_and_their_gradients_vanish():
    B, T, K, G = 1, 6, 1, 2
    q, k, v, sinks = _inputs(B, T, T, K, G, torch.float32)
    pos = torch.tensor([-1, -1, -1, 0, 1, 2])  # three padding queries (and keys)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = kernel.attention_with_sinks(*leaves, pos, pos, None)
    assert torch.isfinite(out).all() and (out[:, :3] == 0).all()
    out.sum().backward()
    assert (
        (leaves[0].grad[:, :3] == 0).all() and (leaves[1].grad[:, :3] == 0).all() and (leaves[2].grad[:, :3] == 0).all()
    )


@pytest.mark.parametrize("window", [None, 24, 31])
def test_unmasked_tiles_only_where_every_row_sees_every_key(window):
    # the three kernels skip the mask on tile pairs where every query row sees every key; continuing after
    # c cached tokens for every c up to a key tile (16 keys in the interpreter) puts a tile's edges at every
    # offset from the query tiles' first and last positions, and from the window's edge
    B, T, K, G = 1, 24, 1, 4
    for c in range(17):
        S = T + c
        tensors = _inputs(B, T, S, K, G, torch.float32, Dh=16, seed=c)
        q_pos, k_pos = torch.arange(c, c + T), torch.arange(S)
        grad_out = torch.randn(B, T, K, G, 16, generator=torch.Generator().manual_seed(c))
        out, grads = _run(kernel.attention_with_sinks, tensors, q_pos, k_pos, window, grad_out)
        ref_out, ref_grads = _run(reference, tensors, q_pos, k_pos, window, grad_out)
        for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), [out, *grads], [ref_out, *ref_grads]):
            _close(a, b, torch.float32, f"{name}, cached {c}, window {window}")


def test_the_backward_is_four_kernels_and_one_sum():
    # the tile table, the preamble (Delta = rowsum(dO * O) and each row's part of its sink's gradient, one
    # pass over dO and O), dQ, dK/dV; then the sum of the sink's parts over the rows. The preamble was
    # eleven PyTorch kernels: both tensors upcast to fp32, their product, sums, a transpose, the share
    from gptoss.launches import LaunchCounter

    q, k, v, sinks = (t.requires_grad_() for t in _inputs(1, 24, 24, 2, 4, torch.bfloat16))
    pos = torch.arange(24)
    out = kernel.attention_with_sinks(q, k, v, sinks, pos, pos, 8)
    grad = torch.randn_like(out)
    with LaunchCounter() as counted:
        out.backward(grad)
    assert counted.triton == [
        "_tile_ranges_kernel",
        "_attn_bwd_delta_kernel",
        "_attn_bwd_dq_kernel",
        "_attn_bwd_dkdv_kernel",
    ], counted.triton
    assert counted.torch == ["sum"], counted.torch


@pytest.mark.parametrize("splits", [1, 3, None])
@pytest.mark.parametrize("rows", [(1, 8), (2, 4), (1, 1)])  # (T, G): decode, a two-token step, MHA
def test_decode_kernel_matches_the_reference(rows, splits):
    T, G = rows
    B, K, S = 2, 2, 70
    for window, k_pos in ((None, torch.arange(S)), (16, torch.cat((_ring(16, 63), torch.full((S - 16,), -1))))):
        q, k, v, sinks = _inputs(B, T, S, K, G, torch.float32)
        q_pos = torch.tensor([[60 + t for t in range(T)], [50 + t for t in range(T)]])
        if window is None:  # a pre-allocated full layer: the slots after position 63 are empty (-1)
            k_pos = torch.where(torch.arange(S) <= 63, torch.arange(S), -1)
        out = kernel.attention_decode(
            q,
            k,
            v,
            sinks,
            q_pos.int(),
            k_pos.expand(B, S).int().contiguous(),
            kernel.NO_WINDOW if window is None else window,
            splits=splits,
        )
        _close(out, reference(q, k, v, sinks, q_pos, k_pos, window), torch.float32, f"window {window}")


def test_entry_point_takes_the_decode_kernel_only_without_gradients(monkeypatch):
    calls = []
    real = kernel.attention_decode
    monkeypatch.setattr(kernel, "attention_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, sinks = _inputs(1, 1, 40, 2, 8, torch.float32)
    pos = torch.arange(40)
    with torch.no_grad():
        kernel.attention_with_sinks(q, k, v, sinks, pos[-1:], pos, None)
    assert calls == [1]
    out = kernel.attention_with_sinks(q.requires_grad_(), k, v, sinks, pos[-1:], pos, None)
    assert calls == [1] and out.grad_fn is not None


@pytest.mark.parametrize("window", [None, 3, 9])
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (64, 64)])
def test_tile_ranges_cover_every_visible_pair(window, tiles):
    # the tiles a kernel visits must contain every (query row, key) pair the reference's mask allows
    bm, bn = tiles
    G = 3
    q_pos = torch.stack((_ragged(1, 30, [7])[0], torch.arange(30) + 20))
    k_pos = torch.stack(
        (torch.cat((torch.full((20,), -1), _ragged(1, 30, [7])[0])), torch.cat((_ring(20, 19), torch.arange(20, 50))))
    )
    qk, kq = kernel.tile_ranges(q_pos.int(), k_pos.int(), kernel.NO_WINDOW if window is None else window, G, bm, bn)
    rows = q_pos.repeat_interleave(G, dim=1)  # [B, T * G]
    oldest = -1 if window is None else (rows - window).clamp(min=-1)
    visible = (k_pos[:, None, :] > torch.as_tensor(oldest).unsqueeze(-1)) & (k_pos[:, None, :] <= rows.unsqueeze(-1))
    assert visible.any()
    for b, r, j in visible.nonzero().tolist():
        first, last = qk[b, r // bm, :2].tolist()
        assert first <= j // bn < last, (b, r, j, first, last)
        first, last = kq[b, j // bn, :2].tolist()
        assert first <= r // bm < last, (b, r, j, first, last)
    # and they skip: a causal row never visits key tiles entirely in its future
    assert (qk[1, 0, 1] * bn) <= 20 + 30 + bn
    # the pairs a table calls seen whole are masked nowhere: every row and key there exists and is visible
    pad = torch.nn.functional.pad
    # (rows past T * G and keys past S are never seen whole)
    seen = pad(visible, (0, bn * len(kq[0]) - visible.shape[2], 0, bm * len(qk[0]) - visible.shape[1]))
    for b in range(2):
        for table, by_query in ((qk[b], True), (kq[b], False)):
            for i, (_, _, whole_first, whole_last) in enumerate(table.tolist()):
                for j in range(whole_first, whole_last):
                    q_tile, k_tile = (i, j) if by_query else (j, i)
                    pair = seen[b, q_tile * bm : (q_tile + 1) * bm, k_tile * bn : (k_tile + 1) * bn]
                    assert pair.all(), (b, q_tile, k_tile)


@pytest.mark.parametrize("window", [1, 5, 40, None])
@pytest.mark.parametrize("tiles,G", [((32, 16), 3), ((16, 32), 1), ((64, 64), 8), ((16, 16), 2)])
def test_tile_ranges_kernel_equals_the_torch_definition(window, tiles, G):
    # one launch instead of ~35 torch operations; it must agree exactly, on ragged and padded batches,
    # a ring cache, a batch row with no valid query or key at all, and more tiles than one chunk
    bm, bn = tiles
    T, S = 37, 300
    q_pos = torch.stack(
        (
            _ragged(1, T, [5])[0],
            torch.arange(T) + S - T,
            torch.full((T,), -1),
            torch.arange(T) * 7,
        )
    ).int()
    k_pos = torch.stack(
        (
            torch.cat((torch.full((S - 40,), -1), _ragged(1, 40, [5])[0])),
            torch.arange(S),
            _ring(S, 123),
            torch.full((S,), -1),
        )
    ).int()
    w = kernel.NO_WINDOW if window is None else window
    want = kernel.tile_ranges_reference(q_pos, k_pos, w, G, bm, bn)
    got = kernel.tile_ranges(q_pos, k_pos, w, G, bm, bn)
    assert got[0].dtype == torch.int32 and got[0].shape == want[0].shape and got[1].shape == want[1].shape
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (want[0][..., 1] > 0).any() and (want[0][2] == 0).all()  # some tiles meet; the empty row meets none
    if window is None:  # and some pairs are seen whole, on both sides
        assert (want[0][..., 3] > want[0][..., 2]).any() and (want[1][..., 3] > want[1][..., 2]).any()
    q_only, none = kernel.tile_ranges(q_pos, k_pos, w, G, bm, bn, keys=False)
    assert none is None and torch.equal(q_only, want[0])
    # dQ and dK/dV on tiles of their own: each side's table for its own tiles, still one launch
    other = (bn, bm * 2)
    mixed = kernel.tile_ranges(q_pos, k_pos, w, G, bm, bn, key_tiles=other)
    assert torch.equal(mixed[0], want[0])
    assert torch.equal(mixed[1], kernel.tile_ranges_reference(q_pos, k_pos, w, G, *other)[1])


def test_tiles_seen_whole_are_a_run_or_none():
    # a query tile at 100..115 against key tiles 0..15 (whole), 16..30 and a padding key (met, masked),
    # 32..47 (whole): two runs, so the table names none whole (the kernels then mask all three, exactly);
    # without the padding key the three are one run
    q_pos = torch.arange(100, 116).int()[None]
    keys = torch.arange(48)
    for k_pos, whole in ((torch.where(keys == 31, -1, keys), [0, 0]), (keys, [0, 3])):
        k_pos = k_pos.int()[None].contiguous()
        want = kernel.tile_ranges_reference(q_pos, k_pos, kernel.NO_WINDOW, 1, 16, 16)
        got = kernel.tile_ranges(q_pos, k_pos, kernel.NO_WINDOW, 1, 16, 16)
        assert got[0][0, 0].tolist() == [0, 3, *whole] and torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1])


BAD = [
    ("q is 4-D", lambda q, k, v, s: (q[0], k, v, s), ValueError, "expected q"),
    ("v shape differs", lambda q, k, v, s: (q, k, v[:, :-1], s), ValueError, "expected q"),
    ("batch mismatch", lambda q, k, v, s: (q, k[:1].expand(2, -1, -1, -1), v[:1].expand(2, -1, -1, -1), s), None, None),
    ("KV heads mismatch", lambda q, k, v, s: (q, k[:, :, :1], v[:, :, :1], s), ValueError, "does not match"),
    ("sinks wrong length", lambda q, k, v, s: (q, k, v, s[:-1]), ValueError, "one sink per query head"),
    ("head dim 48", lambda q, k, v, s: (q[..., :48], k[..., :48], v[..., :48], s), ValueError, "head dims"),
    ("fp16", lambda q, k, v, s: (q.half(), k.half(), v.half(), s), TypeError, "bfloat16 or float32"),
    ("mixed dtypes", lambda q, k, v, s: (q, k.bfloat16(), v, s), TypeError, "share one dtype"),
]


@pytest.mark.parametrize("name,mutate,error,match", BAD, ids=[b[0] for b in BAD])
def test_bad_shapes_and_dtypes_are_explained(name, mutate, error, match):
    q, k, v, sinks = _inputs(2, 3, 5, 2, 2, torch.float32)
    args = mutate(q, k, v, sinks)
    pos = torch.arange(5)
    if error is None:  # a broadcast view is a valid input
        kernel.attention_with_sinks(*args, pos[2:], pos, None)
        return
    with pytest.raises(error, match=match):
        kernel.attention_with_sinks(*args, pos[2:], pos, None)


@pytest.mark.parametrize("window", [0, -3])
def test_bad_window_is_explained(window):
    q, k, v, sinks = _inputs(1, 3, 5, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="window must be None"):
        kernel.attention_with_sinks(q, k, v, sinks, torch.arange(2, 5), torch.arange(5), window)


@pytest.mark.parametrize(
    "q_pos,k_pos",
    [(torch.arange(4), torch.arange(5)), (torch.arange(3), torch.arange(6)), (torch.zeros(3, 3), torch.arange(5))],
)
def test_bad_positions_are_explained(q_pos, k_pos):
    q, k, v, sinks = _inputs(2, 3, 5, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="positions"):
        kernel.attention_with_sinks(q, k, v, sinks, q_pos, k_pos, None)

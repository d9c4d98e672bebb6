"""Attention with sinks: the Triton kernels against the torch reference and FlashAttention-2, same run.

    python benchmarks/bench_attention.py            # on an H100: gpt-oss heads (8 KV x 8 query, head dim 64)
    python benchmarks/bench_attention.py --quick    # fewer shapes

Training rows (forward, and forward + backward): TFLOP/s over the (query, key) pairs the mask lets
through, 4 * pairs * Dh FLOP per head forward and 2.5 times that backward (FlashAttention's count:
a causal row of T tokens does half the work of a full one). The baseline is PyTorch's
scaled_dot_product_attention on its flash backend, FlashAttention-2, which has no sink and no
sliding window: it runs full causal attention with GQA on the same shapes, so the
`vs_fa2` column compares like with like only on the full-causal rows.
Decode (one token against a cache of S keys): GB/s of keys and values read, against the same
run's copy bandwidth; on a GPU the Triton rows are also replayed as a CUDA graph (graph_ms, graph_gbs:
the split-K kernel and its merge without the host, as a decode step pays them). Without a GPU it
times the torch reference on small shapes and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from results import RESULTS_DIR, copy_bandwidth_gbs, machine, record, table, time_graph_ms, time_ms

from gptoss.kernels.attention_core import CONFIGS
from gptoss.model import attention_with_sinks as reference

K, G, DH = 8, 8, 64


# bf16 tiles timed beside the chosen ones (gptoss.kernels.attention_core.CONFIGS), since which is faster is
# the GPU's to say: the tiles the kernels took before the compile gate's count of instructions a score chose
# 128 x 128 for the forward and dQ, and the chosen tiles on two stages, where each trip waits at its top for
# the keys and values the trip before sent for (the gate's loop_copies_ahead 0; CONFIGS' comment)
EARLIER = "triton (earlier tiles)"
TWO_STAGES = "triton (two stages)"
OTHER_TILES = {
    EARLIER: {"fwd": (128, 64, 8, 3), "dq": (64, 64, 4, 2)},
    TWO_STAGES: {name: (*CONFIGS[name]["bf16"][:3], 2) for name in ("fwd", "dq", "dkdv")},
}


@contextlib.contextmanager
def tiles(overrides: dict[str, tuple], dtype_path: str = "bf16"):
    """The attention kernels launch with `overrides` ({kernel: (BLOCK_M, BLOCK_N, warps, stages)}) for
    one dtype path while inside; the chosen tiles come back however it is left."""
    saved = {name: CONFIGS[name][dtype_path] for name in overrides}
    try:
        for name, tile in overrides.items():
            CONFIGS[name][dtype_path] = tile
        yield
    finally:
        for name, tile in saved.items():
            CONFIGS[name][dtype_path] = tile


def visible_pairs(T: int, window: int | None) -> int:
    return sum(min(t + 1, window or t + 1) for t in range(T))


def _inputs(B, T, S, device, dtype, grad):
    q = torch.randn(B, T, K, G, DH, device=device, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(B, S, K, DH, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))
    sinks = torch.randn(K * G, device=device, requires_grad=grad)
    return q, k, v, sinks


def _fa2(q, k, v):
    """FlashAttention-2 (SDPA's flash backend), causal, GQA: [B, T, K, G, Dh] queries -> same layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, T = q.shape[:2]
    qh = q.reshape(B, T, K * G, DH).transpose(1, 2)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            qh, k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        )
    return out.transpose(1, 2).reshape(B, T, K, G, DH)


def training_rows(shapes, device, dtype, providers) -> list[dict]:
    rows = []
    for B, T, window in shapes:
        pos = torch.arange(T, device=device)
        flops_fwd = 4 * B * visible_pairs(T, window) * DH * K * G
        q, k, v, sinks = _inputs(B, T, T, device, dtype, grad=True)
        grad = torch.randn_like(q)
        for name, fn in providers.items():
            if name == "fa2 (sdpa flash, no sink)" and window is not None:
                continue
            for what, flops in (("fwd", flops_fwd), ("fwd+bwd", 3.5 * flops_fwd)):
                chosen = tiles(OTHER_TILES[name]) if name in OTHER_TILES else contextlib.nullcontext()
                if what == "fwd":
                    run = lambda fn=fn: fn(q, k, v, sinks, pos, window)  # noqa: E731
                    with torch.no_grad(), chosen:
                        t = time_ms(run)
                else:
                    run = lambda fn=fn: torch.autograd.backward(fn(q, k, v, sinks, pos, window), grad)  # noqa: E731
                    with chosen:
                        t = time_ms(run)
                row = dict(B=B, T=T, window=window or "full", what=what, provider=name, device=device, **t)
                row["tflops"] = flops / (t["ms"] / 1e3) / 1e12
                rows.append(row)
    for row in rows:  # the same row of FlashAttention-2, measured above
        fa2 = [
            r
            for r in rows
            if r["provider"].startswith("fa2") and (r["B"], r["T"], r["what"]) == (row["B"], row["T"], row["what"])
        ]
        if fa2 and row["window"] == "full":
            row["vs_fa2"] = row["tflops"] / fa2[0]["tflops"]
    return rows


def decode_rows(caches, device, dtype, kernel) -> list[dict]:
    rows = []
    for B, S in caches:
        q, k, v, sinks = _inputs(B, 1, S, device, dtype, grad=False)
        k_pos = torch.arange(S, device=device)
        q_pos = torch.full((B, 1), S - 1, device=device)
        nbytes = 2 * k.numel() * k.element_size()
        for name, fn in (("torch-reference", reference), ("triton", kernel)):
            if fn is None:
                continue
            with torch.no_grad():
                t = time_ms(lambda fn=fn: fn(q, k, v, sinks, q_pos, k_pos, None))
                row = dict(B=B, S=S, provider=name, device=device, **t, gbs=nbytes / (t["ms"] / 1e3) / 1e9)
                if name == "triton" and device == "cuda":  # the GPU's time, as a graph-replayed decode step pays it
                    row["graph_ms"] = time_graph_ms(lambda: fn(q, k, v, sinks, q_pos, k_pos, None))
                    row["graph_gbs"] = nbytes / (row["graph_ms"] / 1e3) / 1e9
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)

    def ref(q, k, v, sinks, pos, window):
        return reference(q, k, v, sinks, pos, pos, window)

    providers = {"torch-reference": ref}
    kernel = None
    if gpu:
        from gptoss.kernels.attention import attention_with_sinks as kernel

        providers["triton"] = lambda q, k, v, sinks, pos, window: kernel(q, k, v, sinks, pos, pos, window)
        for name in OTHER_TILES:  # timed inside tiles(OTHER_TILES[name])
            providers[name] = providers["triton"]
        providers["fa2 (sdpa flash, no sink)"] = lambda q, k, v, sinks, pos, window: _fa2(q, k, v)
        shapes = [(1, 2048, None), (1, 2048, 128), (1, 4096, None), (1, 4096, 128), (4, 2048, None)]
        caches = [(1, 4096), (1, 32768), (8, 8192)]
    else:
        shapes, caches = [(1, 256, None), (1, 256, 128)], [(1, 2048)]
    if args.quick:
        shapes, caches = shapes[:2], caches[:1]
    train = training_rows(shapes, device, dtype, providers)
    print(table(train, ["B", "T", "window", "what", "provider", "ms", "ms_p20", "ms_p80", "tflops", "vs_fa2"]))
    decode = decode_rows(caches, device, dtype, kernel)
    copy = copy_bandwidth_gbs(device)
    for row in decode:
        row["copy_pct"] = 100 * row["gbs"] / copy
        if "graph_gbs" in row:
            row["graph_copy_pct"] = 100 * row["graph_gbs"] / copy
    columns = ["B", "S", "provider", "ms", "ms_p20", "ms_p80", "gbs", "copy_pct"]
    print(table(decode, columns + (["graph_ms", "graph_gbs", "graph_copy_pct"] if gpu else [])))
    print(f"copy bandwidth measured in this run: {copy:.0f} GB/s")
    if not gpu:
        print(
            "no CUDA device: timed the torch reference on the CPU (fp32); the Triton kernels' GPU figures were not taken"
        )
    print(f"machine: {machine()}")
    record("attention", train + decode, copy_bandwidth_gbs=copy)
    print(f"results appended to {RESULTS_DIR / 'attention.jsonl'}")
    print(json.dumps({"bench": "attention", "results": train + decode}))


if __name__ == "__main__":
    main()

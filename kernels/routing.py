"""MoE routing: top-k + softmax over the k, then the grouping of (token, slot) pairs by expert.

Kernels (all on the device, no host synchronisation: their outputs size nothing on the host):
  _topk_softmax_fwd_kernel   grid (T,): one token per program; k rounds of max/argmax over E logits,
                             then a softmax over the k picked values. Reference: gptoss.model.route.
  _expert_counts_kernel      grid (E,): tokens routed to expert e (counts[e]).
  _expert_sort_kernel        grid (E,): program e writes the pair indices p = t*k + slot routed to e, in
                             increasing p (a stable sort), to sorted_pairs[offsets[e] : offsets[e] + counts[e]].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _topk_softmax_fwd_kernel(
    logits_ptr,  # [T, E] router logits (any float dtype)
    weights_ptr,  # [T, K] fp32 out
    ids_ptr,  # [T, K] int32 out
    E,
    K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    x = tl.load(logits_ptr + t * E + e, mask=e < E, other=float("-inf")).to(tl.float32)
    slot = tl.arange(0, BLOCK_K)
    values = tl.full([BLOCK_K], float("-inf"), tl.float32)
    ids = tl.zeros([BLOCK_K], tl.int32)
    for i in tl.static_range(K):  # largest first, like torch.topk
        best = tl.argmax(x, axis=0)
        values = tl.where(slot == i, tl.max(x, axis=0), values)
        ids = tl.where(slot == i, best, ids)
        x = tl.where(e == best, float("-inf"), x)
    p = tl.exp(values - tl.max(values, axis=0))  # unused slots: exp(-inf) = 0
    p = p / tl.sum(p, axis=0)
    tl.store(weights_ptr + t * K + slot, p, mask=slot < K)
    tl.store(ids_ptr + t * K + slot, ids, mask=slot < K)


@triton.jit
def _expert_counts_kernel(ids_ptr, counts_ptr, P, BLOCK_P: tl.constexpr):
    expert = tl.program_id(0)
    total = tl.zeros([BLOCK_P], tl.int32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        ids = tl.load(ids_ptr + p, mask=p < P, other=-1)
        total += (ids == expert).to(tl.int32)
    tl.store(counts_ptr + expert, tl.sum(total, axis=0))


@triton.jit
def _expert_sort_kernel(
    ids_ptr,  # [P] int32 expert of each pair
    counts_ptr,  # [E] int32
    sorted_pairs_ptr,  # [P] int32 out: pair index at each sorted row
    P,
    E,
    BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    expert = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + e, mask=e < E, other=0)
    row = tl.sum(tl.where(e < expert, counts, 0), axis=0)  # this expert's first sorted row
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mine = (tl.load(ids_ptr + p, mask=p < P, other=-1) == expert).to(tl.int32)
        rank = row + tl.cumsum(mine, axis=0) - 1
        tl.store(sorted_pairs_ptr + rank, p.to(tl.int32), mask=mine != 0)
        row += tl.sum(mine, axis=0)


@dataclass
class Routing:
    """Everything the grouped expert matmuls need; every tensor stays on the device."""

    weights: torch.Tensor  # [T, K] fp32
    ids: torch.Tensor  # [T, K] int32
    counts: torch.Tensor  # [E] int32 pairs per expert
    offsets: torch.Tensor  # [E] int32 first sorted row of each expert
    sorted_pairs: torch.Tensor  # [P = T*K] int32: pair (t*K + slot) at each sorted row
    top_k: int


def topk_softmax_fwd(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: logits [T, E] -> (weights fp32 [T, k], ids int32 [T, k])."""
    T, E = logits.shape
    if not 1 <= k <= E:
        raise ValueError(f"top-k must be in [1, {E}], got {k}")
    logits = logits.contiguous()
    weights = torch.empty(T, k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, k, dtype=torch.int32, device=logits.device)
    if T:
        _topk_softmax_fwd_kernel[(T,)](
            logits, weights, ids, E, K=k, BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(k)
        )
    return weights, ids


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Launcher: ids [T, K] -> (counts [E], offsets [E], sorted_pairs [P]), all int32."""
    flat = ids.reshape(-1).to(torch.int32).contiguous()
    P, device = flat.numel(), ids.device
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    sorted_pairs = torch.empty(P, dtype=torch.int32, device=device)
    if P:
        BLOCK_P = min(1024, triton.next_power_of_2(P))
        _expert_counts_kernel[(num_experts,)](flat, counts, P, BLOCK_P=BLOCK_P)
        _expert_sort_kernel[(num_experts,)](
            flat,
            counts,
            sorted_pairs,
            P,
            num_experts,
            BLOCK_P=BLOCK_P,
            BLOCK_E=triton.next_power_of_2(num_experts),
        )
    offsets = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    return counts, offsets, sorted_pairs


def route(logits: torch.Tensor, k: int) -> Routing:
    """Functional entry: top-k routing of router logits [T, E] and the by-expert grouping."""
    weights, ids = topk_softmax_fwd(logits, k)
    counts, offsets, sorted_pairs = sort_by_expert(ids, logits.shape[1])
    return Routing(weights, ids, counts, offsets, sorted_pairs, k)

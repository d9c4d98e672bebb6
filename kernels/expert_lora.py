"""Expert LoRA beside the MoE kernels (kernels/moe.py), in torch.

An adapted matrix adds s * (a A_e^T) B_e^T to each sorted row a of expert e. With the factors laid out
expert-major (gptoss.adapter.ExpertLoRA.expert_major: A [E*r, in] and B [out, E*r], expert e's rank
rows and columns at e*r .. e*r+r-1), every row's update is one masked product for all experts:
z = (a A^T) * mask keeps each row's own expert's r columns of [P, E*r], then s * z B^T. No host
synchronisation and no launch per expert, for E*r extra columns (256 beside gate_up's 5760 for
gpt-oss-20b at r = 8). The update goes into the kernels' epilogues through their `add`.

The products run in the activations' dtype, the factors cast to it (fp32 accumulation either way):
bf16 on a GPU, so they take the tensor cores forward and backward alike. Autocast would do this for the
forward only: an autograd Function's backward runs outside it, and there the fp32 factors made every
product of the backward an fp32 GEMM on CUDA cores, E times the rank-r work (the masked columns). The
fp32 parameters get fp32 gradients; fp32 activations (parity runs) keep every product fp32.
"""

from __future__ import annotations

import torch

from gptoss.kernels.routing import Routing


def expert_mask(routing: Routing, num_experts: int, r: int, dtype: torch.dtype) -> torch.Tensor:
    """[P, E*r]: 1 where column j belongs to the expert of sorted row m (j // r == expert), else 0."""
    row_expert = routing.ids.reshape(-1).long()[routing.sorted_pairs.long()]  # [P]
    columns = torch.arange(num_experts * r, device=row_expert.device) // r
    return (columns[None, :] == row_expert[:, None]).to(dtype)


def lora_rank(a: torch.Tensor, A: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a [P, in] (sorted rows) -> z = (a A^T) * mask [P, E*r] in a's dtype: each row's own expert's r columns."""
    return (a @ A.to(a.dtype).T) * mask.to(a.dtype)


def lora_update(
    a: torch.Tensor, A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """a [P, in] (sorted rows) -> (z [P, E*r], the update s * z B^T [P, out]), both in a's dtype."""
    z = lora_rank(a, A, mask)
    return z, (scaling * z) @ B.to(a.dtype).T


def lora_backward(
    g: torch.Tensor,
    a: torch.Tensor,
    z: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """g = d loss / d update [P, out] -> (dA [E*r, in] and dB [out, E*r] in the factors' dtype, d a [P, in]
    in a's dtype); the products in a's dtype."""
    dt = a.dtype
    g = g.to(dt)
    dz = (g @ B.to(dt)) * mask.to(dt) * scaling  # [P, E*r]: only each row's own expert's columns
    dA = (dz.T @ a).to(A.dtype)
    dB = (g.T @ (scaling * z.to(dt))).to(B.dtype)
    return dA, dB, dz @ A.to(dt)

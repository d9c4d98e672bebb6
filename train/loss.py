"""The training loss: cross-entropy of the unembedding, without the extra vocabulary-sized tensors.

With a 201,088-token vocabulary the logits are the largest activation of a training step: one
[N, V] fp32 tensor is 0.8 MB per supervised token. `F.cross_entropy(F.linear(h, W).float(), t)`
keeps the logits, their log-softmax, and in backward a zero-filled gradient and the softmax
gradient: four such tensors and six passes over them. `linear_cross_entropy` keeps the logits only
and turns them into their own gradient in place (softmax minus one-hot), the same numbers to fp32
rounding (tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, weight).float()  # [N, V]
        lse = torch.logsumexp(logits, dim=-1)  # [N]
        loss = (lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)).sum()
        ctx.save_for_backward(h, weight, target, logits, lse)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss: torch.Tensor):
        h, weight, target, logits, lse = ctx.saved_tensors
        # d loss / d logits = softmax - one-hot, formed in the logits' memory (backward runs once)
        grad = logits.sub_(lse.unsqueeze(1)).exp_()
        grad[torch.arange(grad.shape[0], device=grad.device), target] -= 1.0
        grad.mul_(grad_loss)
        grad = grad.to(weight.dtype)
        grad_h = (grad @ weight).to(h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = (grad.T @ h.to(weight.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum over rows n of cross_entropy(h[n] @ weight^T, target[n]), logits in fp32.

    h [N, D], weight [V, D], target [N] int64 -> a scalar. Differentiable in h and weight."""
    if h.dim() != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"need h [N, D] and target [N], got {tuple(h.shape)} and {tuple(target.shape)}")
    return LinearCrossEntropy.apply(h, weight, target)


def next_token_loss(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """The training objective in one place: position t predicts token t + 1; the loss is summed over
    the targets that `mask` [B, T] marks (mask[:, t + 1] for the prediction made at t; None: all of
    them), with the unembedding applied only there, fused with the cross-entropy. ids [B, T] ->
    (summed loss, number of targets)."""
    hidden = model.hidden(ids)[:, :-1]
    target = ids[:, 1:]
    supervised = torch.ones_like(target, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
    return linear_cross_entropy(hidden[supervised], model.lm_head.weight, target[supervised]), int(supervised.sum())

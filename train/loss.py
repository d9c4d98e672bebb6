"""The training loss: cross-entropy of the unembedding, a chunk of rows at a time.

With a 201,088-token vocabulary the logits are the largest activation of a training step: one
[N, V] fp32 tensor is 0.8 MB per supervised token (1.65 GB at 2,048). `F.cross_entropy(F.linear(h,
W).float(), t)` keeps the logits, their log-softmax, and in backward a zero-filled gradient and the
softmax gradient: four such tensors and six passes over them. `linear_cross_entropy` instead takes
CHUNK_ROWS rows at a time: their logits, exponentiated in place for the log-sum-exp and the loss,
and, since the loss is the end of the graph, their gradient at once (softmax minus one-hot, formed in
the same memory) times the unembedding. Only [CHUNK_ROWS, V] logits are alive at any moment (0.2 GB in fp32 at 256 rows,
whatever the number of tokens), nothing is recomputed, and backward only scales the saved gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 256  # rows of logits alive at once: 256 x 201,088 x 4 bytes = 0.21 GB


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int, grads: bool
    ) -> torch.Tensor:
        need_h, need_w = (grads and need for need in ctx.needs_input_grad[:2])  # grads: False under no_grad
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk):
            h_c, t_c = h[start : start + chunk], target[start : start + chunk]
            logits = F.linear(h_c, weight).float()  # [n, V]: the one vocabulary-sized tensor of the chunk
            picked = logits.gather(1, t_c.unsqueeze(1)).squeeze(1)  # [n]
            top = logits.amax(dim=-1, keepdim=True)  # [n, 1]
            total = logits.sub_(top).exp_().sum(dim=-1)  # the log-sum-exp's sum, in place: no second [n, V]
            loss += (total.log() + top.squeeze(1) - picked).sum()
            if need_h or need_w:  # d loss / d logits = softmax - one-hot, in the same memory
                grad = logits.div_(total.unsqueeze(1))
                grad.scatter_add_(1, t_c.unsqueeze(1), grad.new_full((grad.shape[0], 1), -1.0))  # one kernel
                grad = grad.to(weight.dtype)
                if need_h:
                    grad_h[start : start + chunk] = grad @ weight
                if need_w:
                    grad_w += (grad.T @ h_c.to(weight.dtype)).float()
            logits = grad = None  # free this chunk's [n, V] before the next one is made
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_loss
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int = CHUNK_ROWS
) -> torch.Tensor:
    """sum over rows n of cross_entropy(h[n] @ weight^T, target[n]), logits in fp32, `chunk` rows at a time.

    h [N, D], weight [V, D], target [N] int64 -> a scalar. Differentiable in h and weight."""
    if h.dim() != 2 or target.shape != h.shape[:1]:
        raise ValueError(f"need h [N, D] and target [N], got {tuple(h.shape)} and {tuple(target.shape)}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 row, got {chunk}")
    return LinearCrossEntropy.apply(h, weight, target, chunk, torch.is_grad_enabled())


def next_token_loss(
    model, ids: torch.Tensor, mask: torch.Tensor | None = None, count: int | None = None, check: bool = True
) -> tuple[torch.Tensor, int]:
    """The training objective in one place: position t predicts token t + 1; the loss is summed over
    the targets that `mask` [B, T] marks (mask[:, t + 1] for the prediction made at t; None: all of
    them), with the unembedding applied only there, fused with the cross-entropy. ids [B, T] ->
    (summed loss, number of targets).

    `count`, the number of targets the mask marks, when the caller knows it (the trainer reads it off
    the rows on the host): the supervised positions are then picked without asking the device how many
    there are, so a step on a GPU does not wait on the host. `check=False`: the ids were checked where
    they were made (the trainer checks them on the host, gptoss.model.check_input_ids), so the model does
    not read them back from the device, which would wait on it twice."""
    hidden = model.hidden(ids, check=check)[:, :-1]
    target = ids[:, 1:]
    if mask is None:
        return linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight, target.reshape(-1)
        ), target.numel()
    flags = mask[:, 1:].reshape(-1).bool()
    if count is None:
        count = int(flags.sum())  # a host synchronisation where the mask is on a GPU
    # the supervised positions first, in order (a stable sort of the flags), then the first `count` of them
    rows = torch.argsort(flags.to(torch.uint8), descending=True, stable=True)[:count]
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
    return linear_cross_entropy(picked, model.lm_head.weight, target.reshape(-1).index_select(0, rows)), count

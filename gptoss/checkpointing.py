"""Activation checkpointing of the decoder layers, and what a layer's recomputation may leave out.

With gradient checkpointing (gptoss.model.GptOss.hidden) a layer keeps only its input in the forward and
runs again in the backward to remake what its backward needs (torch.utils.checkpoint, non-reentrant).
Nothing reads that second run's output: the layer ends with the residual add, which saves nothing for
its backward, so the tensors the layer's backward needs are all made before it. The MoE block, the last
of the layer's steps that saves any, therefore makes in a recomputation only what its backward keeps
(the pre-activation h and the adapters' rank products) and skips its down projection and the combine
(gptoss.kernels.moe.MoEFunction): a ninth of the expert matmul work of a training step.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
import torch.utils.checkpoint

_state = threading.local()  # the backward runs a recomputation on the autograd engine's thread


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    before = getattr(_state, "recomputing", False)
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = before


def output_unread() -> bool:
    """True while a checkpointed layer runs again in the backward (checkpointed()): its output is not read,
    only what its steps save for their backward."""
    return getattr(_state, "recomputing", False)


def checkpointed(layer: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """layer(*args), its activations made again in the backward instead of kept. `layer` must end in
    steps that save nothing for their backward (a decoder layer's residual add): output_unread() is True
    while it runs again, and a step may then return a placeholder of the right shape."""
    return torch.utils.checkpoint.checkpoint(
        layer, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), _recomputing())
    )

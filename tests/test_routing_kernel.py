"""The Triton routing kernels against gptoss.model.route, and the invariants of the expert sort."""

import pytest
import torch

from gptoss.kernels.routing import route as route_kernel
from gptoss.model import route


@pytest.mark.parametrize(
    "T, E, k",
    [
        (13, 7, 3),  # a prime number of experts, k not a power of two
        (1, 5, 2),  # one token
        (40, 4, 4),  # top-k = E
        (33, 32, 1),  # top-1
        (9, 128, 4),  # the gpt-oss-120b router width
    ],
)
def test_topk_softmax_and_sort(T, E, k):
    logits = torch.randn(T, E)
    r = route_kernel(logits, k)
    weights, ids = route(logits, k)
    assert torch.equal(r.ids.long(), ids)  # same experts, same order (largest logit first)
    assert torch.allclose(r.weights, weights, atol=1e-6)  # fp32 softmax of the same k values
    flat = r.ids.long().flatten()
    P = T * k
    assert int(r.counts.sum()) == P and torch.equal(r.counts.long(), torch.bincount(flat, minlength=E))
    assert torch.equal(r.offsets.long(), torch.cumsum(r.counts.long(), 0) - r.counts.long())
    assert torch.equal(r.sorted_pairs.long(), torch.argsort(flat, stable=True))  # stable sort by expert


def test_experts_without_tokens():
    logits = torch.full((6, 11), -5.0)
    logits[:, 3], logits[:, 8] = 4.0, 3.0  # everything to experts 3 and 8
    r = route_kernel(logits, 2)
    assert r.counts.tolist() == [0, 0, 0, 6, 0, 0, 0, 0, 6, 0, 0]
    assert r.offsets.tolist()[3] == 0 and r.offsets.tolist()[8] == 6


def test_bad_k():
    with pytest.raises(ValueError, match="top-k"):
        route_kernel(torch.randn(2, 3), 4)

"""Component tests of the reference model (spec section 7), against values computed independently."""

import math

import pytest
import torch
from conftest import small_config

from gptoss.config import get_preset
from gptoss.model import GptOss, MoE, apply_rotary, attention_with_sinks, route, swiglu, yarn_inv_freq


def test_yarn_inv_freq_values():
    inv_freq, concentration = yarn_inv_freq(get_preset("gpt-oss-20b"))
    assert inv_freq.shape == (32,)
    assert inv_freq[0].item() == pytest.approx(1.0)
    assert inv_freq[1].item() == pytest.approx(150000 ** (-1 / 32), rel=1e-6)  # 0.6890443, pure extrapolation
    assert inv_freq[8].item() == pytest.approx(150000 ** (-16 / 64), rel=1e-6)  # last pair below the range
    assert inv_freq[31].item() == pytest.approx(1 / (32 * 150000 ** (62 / 64)), rel=1e-6)  # 3.0235e-7
    # pair 12 lies inside the (fractional) correction range 8.0928..17.3980: a linear blend
    ramp = (12 - 8.092779115512402) / (17.39802450158856 - 8.092779115512402)
    base = 150000 ** (-24 / 64)
    assert inv_freq[12].item() == pytest.approx(base * (1 - ramp) + base / 32 * ramp, rel=1e-6)
    assert concentration == pytest.approx(1.3465735902799727, abs=1e-15)
    assert concentration**2 == pytest.approx(1.8132604340394958, abs=1e-12)


def test_rotary_pairs_halves_and_scales_logits_by_concentration_squared():
    x = torch.randn(1, 3, 1, 8, dtype=torch.float64)
    angle = torch.tensor([[0.3, 0.0, 1.0, 2.0]] * 3, dtype=torch.float64)
    out = apply_rotary(x, angle.cos() * 2, angle.sin() * 2)
    # pair (j, j + 4) rotates as a complex number, times the factor 2
    z = torch.complex(x[..., :4], x[..., 4:]) * torch.exp(1j * angle.view(1, 3, 1, 4)) * 2
    assert torch.allclose(out, torch.cat((z.real, z.imag), dim=-1))


def _attend(T, window, sinks, v, q_scale=0.0):
    K, G, Dh = 1, 2, 4
    q = q_scale * torch.randn(1, T, K, G, Dh)
    k = torch.randn(1, T, K, Dh)
    pos = torch.arange(T)
    return attention_with_sinks(q, k, v, sinks, pos, pos, window)


def test_sliding_window_sees_exactly_the_128_most_recent_keys():
    T = 201
    v = torch.eye(T).view(1, T, 1, T)  # value of key t is the one-hot vector e_t: output = attention weights
    out = _attend(T, 128, torch.full((2,), -1e9), v, q_scale=0.0)  # q = 0: uniform over visible keys
    seen = (out[0, 200, 0, 0] > 0).nonzero().flatten()
    assert seen.tolist() == list(range(73, 201))  # keys 73..200, 128 of them
    assert torch.allclose(out[0, 200, 0, 0, 73:], torch.full((128,), 1 / 128))
    full = _attend(T, None, torch.full((2,), -1e9), v)
    assert (full[0, 200, 0, 0] > 0).nonzero().flatten().tolist() == list(range(201))
    assert (full[0, 5, 0, 0] > 0).nonzero().flatten().tolist() == list(range(6))  # causal


@pytest.mark.parametrize("sink", [-3.0, 0.0, 5.0, 80.0])
def test_sinks_only_enlarge_the_denominator(sink):
    T, K, G, Dh = 7, 1, 2, 4
    q, k = torch.randn(1, T, K, G, Dh, dtype=torch.float64), torch.randn(1, T, K, Dh, dtype=torch.float64)
    pos = torch.arange(T)
    sinks = torch.tensor([sink, -sink], dtype=torch.float64)
    zeros = attention_with_sinks(q, k, torch.zeros(1, T, K, Dh, dtype=torch.float64), sinks, pos, pos, None)
    assert torch.equal(zeros, torch.zeros_like(zeros))
    ones = attention_with_sinks(q, k, torch.ones(1, T, K, Dh, dtype=torch.float64), sinks, pos, pos, None)
    logits = torch.einsum("tgd,sd->gts", q[0, :, 0], k[0, :, 0]) / 2  # 1/sqrt(4)
    logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    # with v = 1 the output is sum_t w_t = 1 - exp(S) / (sum exp(logits) + exp(S)); the sink is not scaled
    # (written as sum exp(logits) / (sum exp(logits) + exp(S)) to avoid cancellation when S is large)
    mass = logits.exp().sum(-1)  # [G, T]
    expected = mass / (mass + torch.exp(sinks.view(2, 1)))
    # the kernel computes scores in fp32: relative error ~1e-6
    assert torch.allclose(ones[0, :, 0, :, 0], expected.T, rtol=1e-5, atol=0)
    assert (ones[..., 0, :] < 1).all()  # head 0 (sink S >= -3): the weights sum to visibly less than 1


def test_router_picks_the_k_largest_and_renormalises():
    logits = torch.randn(50, 11, dtype=torch.float64)
    weights, ids = route(logits, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(50, dtype=torch.float64).float())
    top = logits.topk(4).indices
    assert torch.equal(ids, top)
    full = logits.softmax(-1).gather(1, ids)  # softmax over all E, then renormalised over the chosen k
    assert torch.allclose(weights.double(), full / full.sum(-1, keepdim=True), atol=1e-7)


def test_swiglu_clamps():
    limit, alpha = 7.0, 1.702

    def one(gate, linear):
        return swiglu(torch.tensor([gate, linear], dtype=torch.float64), alpha, limit).item()

    assert one(-10.0, 0.0) == pytest.approx(-10 / (1 + math.exp(17.02)))  # gate not clamped below (about -4e-7)
    assert one(10.0, 0.0) == pytest.approx(7 / (1 + math.exp(-alpha * 7)))  # gate clamped above at 7
    assert one(1.0, -10.0) == pytest.approx(1 / (1 + math.exp(-alpha)) * -6)  # linear clamped to -7, then +1
    assert one(1.0, 10.0) == pytest.approx(1 / (1 + math.exp(-alpha)) * 8)
    h = torch.tensor([1.0, 2.0, 3.0, 4.0])  # interleaved: gates (1, 3), linears (2, 4)
    assert torch.allclose(swiglu(h), torch.tensor([1 / (1 + math.exp(-1.702)) * 3, 3 / (1 + math.exp(-3 * 1.702)) * 5]))


def _random_moe(config, quantized=True):
    moe = MoE(config, quantized)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if "bias" in name else p.shape[-1] ** -0.5))
        if quantized:
            for name, b in moe.named_buffers():
                b.copy_(torch.randint(0, 256, b.shape) if name.endswith("blocks") else torch.randint(120, 124, b.shape))
    return moe


def _dense_moe_reference(moe, x):
    """Every token through each of its experts one at a time: the obvious, slow formula."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        weights, ids = route(moe.router(x[t : t + 1]), moe.top_k)
        for w, e in zip(weights[0], ids[0]):
            w1, w2 = moe.experts.weight("gate_up_proj", int(e)), moe.experts.weight("down_proj", int(e))
            h = w1 @ x[t] + moe.experts.gate_up_proj_bias[e]
            out[t] += w * (w2 @ swiglu(h) + moe.experts.down_proj_bias[e])
    return out


@pytest.mark.parametrize(
    "E, k",
    [(7, 1), (7, 3), (7, 7), (1, 1)],  # top-1, a prime expert count, top-k = E, a single expert
)
def test_moe_matches_per_token_reference(E, k):
    config = small_config(num_local_experts=E, num_experts_per_tok=k)
    moe = _random_moe(config)
    x = torch.randn(1, 9, config.hidden_size)
    assert torch.allclose(moe(x)[0], _dense_moe_reference(moe, x[0]), atol=1e-5)


def test_moe_decodes_only_routed_experts(monkeypatch):
    config = small_config(num_local_experts=7, num_experts_per_tok=2)
    moe = _random_moe(config)
    with torch.no_grad():  # route every token to experts 2 and 5
        moe.router.weight.zero_()
        moe.router.bias.copy_(torch.tensor([0, 0, 9, 0, 0, 8, 0.0]))
    decoded = []
    original = moe.experts.weight
    monkeypatch.setattr(moe.experts, "weight", lambda which, e: decoded.append((which, e)) or original(which, e))
    moe(torch.randn(2, 5, config.hidden_size))
    # each matrix of each used expert once, the others never
    assert decoded == [("gate_up_proj", 2), ("down_proj", 2), ("gate_up_proj", 5), ("down_proj", 5)]


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_key_value_heads=1),  # multi-query: one KV head
        dict(num_key_value_heads=6),  # as many KV heads as query heads
        dict(sliding_window=1),  # a window of one: each token sees only itself
        dict(sliding_window=1000, intermediate_size=160),  # window longer than the sequence; I > D
    ],
)
def test_any_size_runs_and_is_causal(overrides):
    config = small_config(**overrides)
    model = GptOss(config, quantized=True)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("blocks"):
                b.copy_(torch.randint(0, 256, b.shape))
            elif name.endswith("scales"):
                b.fill_(121)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    logits = model(ids)
    assert logits.shape == (2, 12, config.vocab_size) and torch.isfinite(logits).all()
    changed = ids.clone()
    changed[:, 8] = (changed[:, 8] + 1) % config.vocab_size
    later = model(changed)  # changing token 8 leaves the logits before it unchanged
    assert torch.allclose(logits[:, :8], later[:, :8], atol=1e-5) and not torch.allclose(logits[:, 8:], later[:, 8:])


@pytest.mark.parametrize(
    "ids, error",
    [
        (torch.zeros(4, dtype=torch.long), "batch, tokens"),
        (torch.zeros(1, 0, dtype=torch.long), "no tokens"),
        (torch.full((1, 3), 300), r"\[0, 300\)"),
        (torch.zeros(1, 3), "integer token ids"),
    ],
)
def test_bad_input_ids(ids, error):
    model = GptOss(small_config(), quantized=True)
    with pytest.raises((ValueError, TypeError), match=error):
        model(ids)


def test_long_prompts_take_the_queries_in_chunks_with_the_same_logits(monkeypatch):
    """The torch attention splits a long prompt's queries so its score workspace stays linear in the
    prompt; each query's softmax is its own, so the logits are those of one piece (padding, the window
    and a cache included)."""
    import gptoss.model
    from gptoss.generate import KVCache
    from gptoss.synthetic import random_model

    model = random_model(small_config(), dtype=torch.float32, seed=4)
    ids = torch.randint(0, 300, (2, 23), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(23).expand(2, 23).clone()
    pos[1, :3] = -1  # left padding
    whole = model(ids, pos)
    cache = KVCache(model.config, 2, 40, torch.float32)
    whole_cached = model(ids, pos, cache)
    monkeypatch.setattr(gptoss.model, "SCORE_ELEMENTS", 2 * 2 * 3 * 23 * 4)  # 4 query rows per chunk
    torch.testing.assert_close(model(ids, pos), whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        model(ids, pos, KVCache(model.config, 2, 40, torch.float32)), whole_cached, rtol=1e-6, atol=1e-6
    )

"""The fused decode step (gptoss.kernels.decode) against the plain path, under TRITON_INTERPRET=1.

The plain path (decode_step(..., fused=False): gptoss.model on the Triton attention and MoE kernels) is
the reference. The fused expert kernels carry their input activations as 16-bit integers per block of 32
(each value within 1/65,024 of its block's largest: kernels/decode.py), so in fp32 the two agree to 1e-4
of the largest value, where summation order alone gave 1e-5, and the fused step's fp32 error must stay
under 1/50 of what bf16 costs the plain step. In bf16 both round every intermediate to bf16, in
different summation orders, so neither is "the" answer: the fused step must be no further from the fp32
step than the plain bf16 step is. The structure is counted: launches per layer within the budget, and no
host synchronisation.
"""

import copy

import pytest
import torch
from conftest import small_config

from gptoss.generate import KVCache, decode_step
from gptoss.kernels.decode import fusable
from gptoss.synthetic import random_model

LAUNCH_BUDGET = 8  # kernels per layer and token, Triton and PyTorch together
B, PROMPT = 2, 7  # the second sequence is left-padded by one; the window (5) is shorter than the prompt


_PREFILLS = {}  # (model, dtype, slots) -> the cache after the prompt, copied for each caller


def _prefilled(model, dtype, slots=16):
    """A static cache holding the prompt (the plain path's prefill, the same for a fused or a plain step
    after it): made once per model, a copy each call (an interpreted prefill takes ~3 s)."""
    key = (model, dtype, slots)
    if key not in _PREFILLS:
        cache = KVCache(model.config, B, slots, dtype, static=True)
        ids = torch.randint(0, model.config.vocab_size, (B, PROMPT), generator=torch.Generator().manual_seed(1))
        pos = torch.arange(PROMPT).expand(B, PROMPT).clone()
        pos[1, 0], ids[1, 0] = -1, 0
        with torch.no_grad():  # the cache holds values, not a graph (a model with adapters would keep one)
            model(ids, pos, cache, last_only=True)
        cache.column.fill_(PROMPT)
        _PREFILLS[key] = cache
    return copy.deepcopy(_PREFILLS[key])


def _steps(model, dtype, fused, n):
    """n decode steps from the same prefill, fed the same tokens: logits of each, and the final cache."""
    cache = _prefilled(model, dtype)
    tokens = torch.tensor([[11], [222]])
    pos = torch.full((B, 1), PROMPT)
    pos[1, 0] = PROMPT - 1  # ragged: the padded sequence is one position behind
    out = []
    for _ in range(n):
        out.append(decode_step(model, tokens, pos, cache, fused=fused).float())
        tokens, pos = (tokens * 7 + 3) % model.config.vocab_size, pos + 1
    return out, cache


@pytest.fixture(scope="module")
def models():
    config = small_config(num_hidden_layers=2)  # one sliding and one full layer
    return {
        dtype: random_model(config, dtype=dtype, seed=3, backend="triton") for dtype in (torch.float32, torch.bfloat16)
    }


def _close(got, want, share):
    """|got - want| <= share of want's largest magnitude, everywhere."""
    err, top = (got - want).abs().max().item(), want.abs().max().item()
    assert err <= share * top, (err, top)
    return err


@pytest.fixture(scope="module")
def stepped(models):
    """(dtype, fused) -> _steps(...) of two steps (the sliding ring, 5 slots, wraps at once), run once."""
    done = {}

    def get(dtype, fused):
        if (dtype, fused) not in done:
            done[dtype, fused] = _steps(models[dtype], dtype, fused, 2)
        return done[dtype, fused]

    return get


def test_fused_step_is_the_plain_step_in_fp32(models, stepped):
    assert fusable(models[torch.float32]) is None
    plain, plain_cache = stepped(torch.float32, False)
    fused, fused_cache = stepped(torch.float32, True)
    rounded, _ = stepped(torch.bfloat16, False)  # what bf16 costs the plain step
    for a, b, c in zip(plain, fused, rounded):
        assert _close(b, a, 1e-4) <= (c - a).abs().max().item() / 50
    for p, f in zip(plain_cache.layers, fused_cache.layers):
        assert torch.equal(p.pos, f.pos)  # the same slots written with the same positions
        _close(f.k, p.k, 1e-4)
        _close(f.v, p.v, 1e-4)
    assert int(fused_cache.column) == PROMPT + 2


def test_fused_step_in_bf16_is_as_close_to_fp32_as_the_plain_step(stepped):
    exact, _ = stepped(torch.float32, False)
    plain, _ = stepped(torch.bfloat16, False)
    fused, _ = stepped(torch.bfloat16, True)
    for e, p, f in zip(exact, plain, fused):
        plain_err, fused_err = (p - e).abs().max().item(), (f - e).abs().max().item()
        assert fused_err <= 1.5 * plain_err + 1e-2, (fused_err, plain_err)
        assert fused_err <= 0.05 * e.abs().max().item()


def test_the_step_stays_within_the_launch_budget_and_never_waits_on_the_host(models):
    from gptoss.launches import LaunchCounter

    model = models[torch.bfloat16]
    cache = _prefilled(model, torch.bfloat16)
    tokens, pos = torch.tensor([[5], [6]]), torch.tensor([[PROMPT], [PROMPT - 1]])
    with LaunchCounter() as counted:
        decode_step(model, tokens, pos, cache, fused=True)
    launches, ops = counted.triton, counted.torch
    layers = model.config.num_hidden_layers
    assert not counted.syncs, ops
    # q/k/v, attention + merge, o_proj, router, gate_up, down in each layer; then the final norm
    assert len(launches) == 7 * layers + 1, launches
    assert launches[-1] == "_rmsnorm_fwd_kernel", launches
    triton_per_layer = (len(launches) - 1) / layers
    # outside the layers: embedding, the rotation's table (one for all layers), positions, final norm,
    # lm_head, the column's advance: a fixed number per token, the same for 24 or 36 layers
    outside = len(ops) + 1
    print(f"per token: {len(launches)} Triton launches, {outside} PyTorch kernels: {ops}")
    assert outside <= 24, ops
    per_layer_at_20b = triton_per_layer + outside / 24
    assert per_layer_at_20b <= LAUNCH_BUDGET, (triton_per_layer, ops)


def test_a_token_made_on_the_device_sampling_included_never_waits_on_the_host(models):
    """What generate(decode="graph") records as one CUDA graph (TokenStep): the fused step, a sampled pick
    (top-k, top-p, Gumbel noise of the step counter on the device), the token written and fed back. No
    host synchronisation, and the token of picking the step's logits at the host's step count (more
    tokens, every decode mode: tests/test_generate.py)."""
    import functools

    from gptoss.generate import TokenStep, decode_step, row_seeds, sample_rows
    from gptoss.launches import LaunchCounter

    model = models[torch.float32]
    pick = functools.partial(sample_rows, temperature=0.8, top_p=0.9, top_k=20, seeds=row_seeds(3, B, "cpu"))
    tokens, pos = torch.tensor([[5], [6]]), torch.tensor([[PROMPT], [PROMPT - 1]])
    made = torch.zeros(B, 2, dtype=torch.long)
    made[:, :1] = tokens
    token = TokenStep(model, _prefilled(model, torch.float32), tokens, pos, made, pick, True, graph=False)
    with LaunchCounter() as counted:
        token()
    assert not counted.syncs, counted.torch
    want = pick(decode_step(model, tokens, pos, _prefilled(model, torch.float32), fused=True), step=1)
    assert torch.equal(made[:, 1:], want) and torch.equal(token.ids, want) and torch.equal(token.pos, pos + 1)
    assert int(token.t) == 1


def test_models_the_fused_step_cannot_run_take_the_plain_path(models):
    from gptoss.adapter import apply_lora

    model = random_model(small_config(), dtype=torch.float32, seed=3, backend="torch")
    assert fusable(model) == "the torch backend"
    model.set_backend("triton")
    apply_lora(model, 2, 4, [1])
    assert fusable(model) == "adapters on the attention projections"
    cache = _prefilled(model, torch.float32)
    logits = decode_step(model, torch.tensor([[1], [2]]), torch.tensor([[PROMPT], [PROMPT - 1]]), cache)
    assert logits.shape == (B, model.config.vocab_size) and torch.isfinite(logits).all()


def _unpacked(xn):
    """A quantized vector [B, G, 20] int32 back to (h, l) [B, G, 32] and (scale, correction) [B, G], by the
    layout _quantize_store documents: per block, h of words 0, 2, 4, 6 | h of 1, 3, 5, 7 | l of the same
    (16 words, word k of h or l holding values 4k..4k+3), the scale's fp32 bits, the correction."""
    raw = xn[..., :16].contiguous().view(torch.uint8).to(torch.int32)  # [B, G, 64]
    raw = torch.where(raw > 127, raw - 256, raw)
    i = torch.arange(32)
    k = i // 4
    at = ((k % 2) * 4 + k // 2) * 4 + i % 4
    return raw[..., at], raw[..., at + 32], xn[..., 16].contiguous().view(torch.float32), xn[..., 17]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_experts_read_the_normed_x_as_16_bit_integers_per_block_of_32(models, dtype):
    from gptoss.kernels.decode import decode_router
    from gptoss.kernels.mxfp4 import Q_MAX

    layer = models[dtype].model.layers[0]
    norm = layer.post_attention_layernorm
    D = models[dtype].config.hidden_size
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 2, D)  # 6 decades
    x[1, 32:64] = 0.0  # a block of zeros
    x = x.to(dtype)
    _, xn = decode_router(x, norm.weight, norm.eps, layer.mlp.router)
    h, low, scale, correction = _unpacked(xn)
    assert h.abs().max() <= 127 and low.abs().max() <= 127
    q = 255 * h + low
    assert torch.equal(correction, -12 * q.sum(-1))
    want = norm(x).float().view(3, D // 32, 32)  # the experts' input, rounded as the plain path rounds it
    top = want.abs().amax(-1)
    assert torch.equal(q.abs().amax(-1), torch.where(top > 0, Q_MAX, 0))  # each block uses the whole range
    err = (2 * scale[..., None] * q - want).abs()
    # in bf16 the kernel's norm may round a value to the next bf16 number: its own sums of squares
    slack = want.abs() * 2.0**-7 if dtype == torch.bfloat16 else 0.0
    assert (err <= top[..., None] * (0.5 / Q_MAX + 1e-6) + slack).all(), (err / top[..., None].clamp_min(1e-30)).max()
    assert torch.equal(scale[1, 1], torch.tensor(0.0)) and not q[1, 1].any()

"""Checks that only mean something on a CUDA GPU (compiled kernels, bf16 tensor-core dots, the real
2880-wide shapes); they skip on the CPU, where the interpreter tests cover the same logic."""

import copy

import pytest
import torch

from gptoss import mxfp4
from gptoss.config import ModelConfig
from gptoss.model import Experts, experts_forward, route

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton compiles kernels there)"),
]


def _experts(config):
    experts = Experts(config, quantized=True).cuda()
    with torch.no_grad():
        for name, b in experts.named_buffers():
            b.copy_(torch.randint(0, 256, b.shape) if name.endswith("blocks") else torch.randint(119, 123, b.shape))
        experts.gate_up_proj_bias.normal_(0, 0.1)
        experts.down_proj_bias.normal_(0, 0.1)
    return experts.to(torch.bfloat16)


def test_dequant_kernel_exact_at_20b_shape():
    from gptoss.kernels.mxfp4 import mxfp4_dequant_fwd

    blocks = torch.randint(0, 256, (4, 5760, 90, 16), dtype=torch.uint8, device="cuda")
    scales = torch.randint(100, 140, (4, 5760, 90), dtype=torch.uint8, device="cuda")
    assert torch.equal(mxfp4_dequant_fwd(blocks, scales), mxfp4.dequantize(blocks, scales))


@pytest.mark.parametrize("tokens", [1, 64, 1024])  # decode, small prefill, large prefill (tiles of every size)
def test_moe_kernel_bf16_at_20b_shape(tokens, monkeypatch):
    import gptoss.model
    from gptoss.kernels.moe import moe

    config = ModelConfig()  # gpt-oss-20b: D = I = 2880, 32 experts, top-4
    experts = _experts(config)
    x = torch.randn(tokens, 2880, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(tokens, 32, device="cuda", requires_grad=True)
    grad = torch.randn(tokens, 2880, device="cuda")
    # the reference in fp32: the same MXFP4 weights decoded exactly, routing weights from the same logits.
    # One rounding is the kernel's own: it keeps h = x W1 + b1 in bf16 for the backward pass, and the
    # clamped SwiGLU's derivative jumps at |h| = 7, so an h within a bf16 step of the limit takes the other
    # branch there and moves a whole row of d x (on the CPU, rounding h alone moves d x by up to 3.9% of its
    # largest value, the output by 0.2%). The reference rounds h the same way (a straight-through rounding).
    plain_swiglu = gptoss.model.swiglu
    monkeypatch.setattr(
        gptoss.model, "swiglu", lambda h, *a: plain_swiglu(h + (h.detach().bfloat16().float() - h.detach()), *a)
    )
    x_ref, logits_ref = x.detach().float().requires_grad_(), logits.detach().clone().requires_grad_()
    weights, ids = route(logits_ref, 4)
    reference = experts_forward(x_ref, weights, ids, copy.deepcopy(experts).float(), 1.702, 7.0)
    reference.backward(grad)
    out = moe(x, logits, 4, experts)
    out.float().backward(grad)
    # bf16 tensor-core dots with fp32 accumulation over 2880 (forward, d x through down) and 5760 (d x
    # through gate_up) terms, bf16 activations between them: each within 2% of its tensor's largest value,
    # as the attention kernel's gradients. The router's gradient (through the routing weights, the expert
    # outputs dotted with the incoming gradient) has the same bound.
    for name, got, want in (
        ("out", out, reference),
        ("d x", x.grad, x_ref.grad),
        ("d logits", logits.grad, logits_ref.grad),
    ):
        assert torch.isfinite(got).all(), name
        assert (got.float() - want).abs().max() <= 2e-2 * want.abs().max(), name


def test_rmsnorm_and_rope_kernels_at_gpt_oss_shape():
    # a training row's residual stream [2048, 2880] and its rotated queries [1, 2048, 8, 8, 64], bf16: the
    # norm within an ulp of the torch path (its sums in another order), the rotation its bits exactly
    # (each operation rounded to nearest even, as the torch path's bf16 tensors are), gradients included
    from gptoss.kernels.rmsnorm import rmsnorm
    from gptoss.kernels.rope import rotary
    from gptoss.model import RMSNorm, apply_rotary

    norm = RMSNorm(2880).cuda()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(2048, 2880, device="cuda") * 4).to(torch.bfloat16)
    dy = torch.randn_like(x)
    grads = []
    for fn in (norm, lambda t: rmsnorm(t, norm.weight, norm.eps)):
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.backward(dy)
        grads.append((y.float(), xi.grad.float()))
    for got, want in zip(grads[1], grads[0]):
        assert (got - want).abs().max() <= 2**-7 * want.abs().max()
    angle = torch.arange(2048, device="cuda").float()[:, None] * torch.logspace(0, -4, 32, device="cuda")
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    q = torch.randn(1, 2048, 8, 8, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(rotary(q, cos, sin), apply_rotary(q, cos, sin))


@pytest.mark.parametrize("window", [None, 128])
def test_attention_kernel_bf16_at_gpt_oss_shape(window):
    # training rows: 2048 tokens, 8 KV heads x 8 query heads, head dim 64; forward and every gradient
    from gptoss.kernels.attention import attention_with_sinks
    from gptoss.model import attention_with_sinks as reference

    T, K, G, Dh = 2048, 8, 8, 64
    leaves = [
        torch.randn(1, T, K, G, Dh, device="cuda", dtype=torch.bfloat16),
        torch.randn(1, T, K, Dh, device="cuda", dtype=torch.bfloat16),
        torch.randn(1, T, K, Dh, device="cuda", dtype=torch.bfloat16),
        torch.randn(K * G, device="cuda"),
    ]
    pos = torch.arange(T, device="cuda")
    grad = torch.randn(1, T, K, G, Dh, device="cuda", dtype=torch.bfloat16)
    results = []
    for fn, cast in ((attention_with_sinks, lambda t: t), (reference, lambda t: t.float())):
        xs = [cast(t).detach().requires_grad_() for t in leaves]
        out = fn(*xs, pos, pos, window)
        out.backward(cast(grad))
        results.append([out] + [x.grad for x in xs])
    # bf16 P and dS before their dots, bf16 outputs: within 2% of each tensor's largest value
    for name, got, want in zip(("out", "dq", "dk", "dv", "dsinks"), *results):
        assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max(), name


def test_attention_decode_kernel_against_a_full_cache():
    from gptoss.kernels.attention import attention_with_sinks
    from gptoss.model import attention_with_sinks as reference

    S, K, G, Dh = 4096, 8, 8, 64
    q = torch.randn(2, 1, K, G, Dh, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, S, K, Dh, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    sinks = torch.randn(K * G, device="cuda")
    k_pos = torch.where(torch.arange(S, device="cuda") < 3000, torch.arange(S, device="cuda"), -1)  # empty tail
    q_pos = torch.tensor([[2999], [1500]], device="cuda")
    with torch.no_grad():
        out = attention_with_sinks(q, k, v, sinks, q_pos, k_pos, None)
    want = reference(q.float(), k.float(), v.float(), sinks, q_pos, k_pos, None)
    assert (out.float() - want).abs().max() <= 2e-2 * want.abs().max()


@pytest.fixture(scope="module")
def cuda_checkpoint(tmp_path_factory):
    from gptoss.synthetic import write_checkpoint

    config = ModelConfig(
        num_hidden_layers=4,
        hidden_size=256,
        intermediate_size=256,
        num_attention_heads=16,
        num_key_value_heads=2,
        head_dim=64,
        num_local_experts=8,
        vocab_size=1000,
        sliding_window=16,
    )
    return write_checkpoint(tmp_path_factory.mktemp("graph"), config, "hf-mxfp4", seed=5)


def test_cuda_graph_decode_gives_the_same_greedy_tokens(cuda_checkpoint):
    from gptoss import load_model
    from gptoss.generate import generate

    prompts = [list(range(3, 40)), [7, 8, 9]]  # ragged; 48 new tokens wrap the 16-slot ring
    run = dict(max_new_tokens=48, temperature=0.0, stop_tokens=())
    fp32 = load_model(cuda_checkpoint, device="cuda", dtype=torch.float32, backend="triton")
    assert generate(fp32, prompts, decode="graph", **run) == generate(fp32, prompts, decode="dynamic", **run)
    bf16 = load_model(cuda_checkpoint, device="cuda", dtype=torch.bfloat16, backend="triton")
    # the same kernels on the same shapes: replaying the graph must reproduce the eager static steps
    assert generate(bf16, prompts, decode="graph", **run) == generate(bf16, prompts, decode="static", **run)


def test_lora_step_on_cuda_matches_the_cpu(cuda_checkpoint):
    # one LoRA training step of a small model (attention adapters everywhere, expert adapters on two
    # layers): the loss and every adapter's gradient in bf16 on the GPU (Triton kernels) against fp32 on
    # the CPU, held to the error bf16 itself makes there (the CPU's torch path in bf16; about 9% in norm
    # on these random weights). Gradients, not updated weights: AdamW's first step is lr * sign(g).
    from gptoss import load_model
    from gptoss.adapter import apply_lora
    from gptoss.train.loss import next_token_loss

    ids = torch.randint(0, 1000, (2, 97), generator=torch.Generator().manual_seed(0))
    runs = []
    for device, dtype in (("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.bfloat16)):
        model = load_model(cuda_checkpoint, device=device, dtype=dtype)
        apply_lora(model, 8, 16, [1, 3])
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the same non-zero factors everywhere (PEFT starts B at zero: A gets no gradient)
            for p in trainable.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        loss, n = next_token_loss(model, ids.to(device))
        loss = loss / n
        loss.backward()
        runs.append((loss.item(), {n: p.grad.float().cpu() for n, p in trainable.items()}))
    (loss32, want), (loss_cpu, cpu), (loss_gpu, gpu) = runs
    assert abs(loss_gpu - loss32) <= max(2 * abs(loss_cpu - loss32), 1e-2 * abs(loss32))
    assert want.keys() == gpu.keys() and any(".experts." in n for n in want)
    for name, ref in want.items():
        assert ref.norm() > 0, name
        cpu_error, gpu_error = ((got[name] - ref).norm() / ref.norm() for got in (cpu, gpu))
        assert gpu_error <= 2 * cpu_error + 1e-2, (name, float(gpu_error), float(cpu_error))


def test_fused_decode_steps_match_the_plain_steps_on_cuda(cuda_checkpoint):
    # compiled, the fused decode kernels (gptoss.kernels.decode) against the plain path, 40 steps through
    # a 16-slot ring: fp32 to the experts' 16-bit inputs, bf16 no further from fp32 than the plain bf16 path
    from gptoss import load_model
    from gptoss.generate import KVCache, decode_step

    def steps(model, fused):
        cache = KVCache(model.config, 2, 64, model.dtype, "cuda", static=True)
        ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
        pos = torch.arange(9, device="cuda").expand(2, 9).clone()
        model(ids, pos, cache, last_only=True)
        cache.column.fill_(9)
        tok, p, out = ids[:, -1:], pos[:, -1:] + 1, []
        for _ in range(40):
            out.append(decode_step(model, tok, p, cache, fused=fused).float())
            tok, p = (tok * 7 + 3) % 1000, p + 1
        return torch.stack(out)

    fp32 = load_model(cuda_checkpoint, device="cuda", dtype=torch.float32, backend="triton")
    exact = steps(fp32, False)
    # the fused experts read 16-bit integer activations (1.5e-5 of each block's largest): within 1e-4 of
    # each step's largest logit, and under 1/50 of what bf16 costs the plain path
    quantized_err = (steps(fp32, True) - exact).abs().amax((1, 2))
    assert (quantized_err <= 1e-4 * exact.abs().amax((1, 2))).all(), quantized_err
    bf16 = load_model(cuda_checkpoint, device="cuda", dtype=torch.bfloat16, backend="triton")
    plain_err = (steps(bf16, False) - exact).abs().amax((1, 2))
    fused_err = (steps(bf16, True) - exact).abs().amax((1, 2))
    assert (quantized_err <= plain_err / 50).all(), (quantized_err, plain_err)
    assert (fused_err <= 1.5 * plain_err + 2e-2).all(), (fused_err, plain_err)

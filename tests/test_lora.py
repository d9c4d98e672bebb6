"""LoRA: the trainable set, zero-init equivalence, PEFT round trips both ways against
peft.PeftModel on transformers' GptOssForCausalLM, and merging."""

import json
import math

import pytest
import torch
from conftest import small_config
from hf_oracle import build_hf_model, canonical_tensors

from gptoss import load_model
from gptoss.adapter import apply_lora, default_expert_layers, merge_lora, save_adapter
from gptoss.synthetic import write_checkpoint

peft = pytest.importorskip("peft")
CONFIG = small_config()  # intermediate (64) != hidden (96): a transposed expert factor cannot pass unnoticed


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    hf = build_hf_model(CONFIG, seed=7)
    folder = write_checkpoint(tmp_path_factory.mktemp("lora-base"), CONFIG, "hf-mxfp4", tensors=canonical_tensors(hf))
    return hf, folder


def _randomize(params, scale=0.05):
    with torch.no_grad():
        for p in params:
            p.copy_(scale * torch.randn_like(p))  # B non-zero, so the adapter changes the output


def test_default_expert_layers_rule():
    assert default_expert_layers(24) == [7, 15, 23]  # the recipe's layers for gpt-oss-20b
    assert default_expert_layers(36) == [11, 23, 35]
    assert default_expert_layers(3) == [0, 1, 2]


def test_trainable_set_is_exactly_the_adapters_and_zero_init_is_the_base(oracle):
    _, folder = oracle
    model = load_model(folder, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 10))
    base = model(ids)
    params = apply_lora(model, r=4, alpha=8, expert_layers=[1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"model.layers.{i}.self_attn.{m}.lora_{ab}.weight" for i in range(3) for m in "qkvo" for ab in "AB"}
    expected = {
        e.replace(".q.", ".q_proj.").replace(".k.", ".k_proj.").replace(".v.", ".v_proj.").replace(".o.", ".o_proj.")
        for e in expected
    }
    expected |= {f"model.layers.1.mlp.experts.lora.{w}.{ab}" for w in ("gate_up_proj", "down_proj") for ab in "AB"}
    assert trainable == expected and len(params) == len(expected)
    # PEFT's count rule: attention r*(in+out) per projection; experts E*r*(in+out) per matrix
    D, Q, KV, I, E, r = 96, 96, 32, 64, 7, 4
    attention = r * ((D + Q) + 2 * (D + KV) + (Q + D)) * 3
    experts = E * r * (D + 2 * I) + E * r * (I + D)
    assert sum(p.numel() for p in params) == attention + experts
    assert torch.equal(model(ids), base)  # B = 0: exactly the base model


def test_our_adapter_loads_in_peft(oracle, tmp_path):
    hf, folder = oracle
    model = load_model(folder, dtype=torch.float32)
    _randomize(apply_lora(model, r=4, alpha=8, expert_layers=[0, 2]))
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [
        f"{i}.mlp.experts.{w}" for i in (0, 2) for w in ("gate_up_proj", "down_proj")
    ]
    ids = torch.randint(0, 300, (2, 12))
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = peft_model(ids).logits
        ours = model(ids)
        base = peft_model.get_base_model()
    assert (ours - theirs).abs().max().item() < 1e-5
    peft_model.unload()  # leave the shared oracle unwrapped
    del base


def test_peft_adapter_loads_in_ours(oracle, tmp_path):
    hf, folder = oracle
    lora_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["1.mlp.experts.gate_up_proj", "1.mlp.experts.down_proj"],
    )
    peft_model = peft.get_peft_model(hf, lora_config)
    _randomize([p for n, p in peft_model.named_parameters() if "lora_" in n])
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        theirs = peft_model(ids).logits
    peft_model.unload()
    model = load_model(folder, dtype=torch.float32, adapter=tmp_path / "peft")
    with torch.no_grad():
        assert (model(ids) - theirs).abs().max().item() < 1e-5
    merged = merge_lora(model)  # merged into dense fp32 weights: same function
    with torch.no_grad():
        assert (merged(ids) - theirs).abs().max().item() < 1e-5


def test_merge_into_bf16_base(oracle, tmp_path):
    _, folder = oracle
    model = load_model(folder, dtype=torch.float32)
    _randomize(apply_lora(model, r=4, alpha=8, expert_layers=[2]))
    save_adapter(model, tmp_path / "a")
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        expected = model(ids)
    bf16 = merge_lora(load_model(folder, dtype=torch.bfloat16, adapter=tmp_path / "a"))
    experts = bf16.model.layers[2].mlp.experts
    assert not experts.quantized and experts.gate_up_proj.dtype == torch.bfloat16 and not experts.has_lora
    assert bf16.model.layers[0].mlp.experts.quantized  # layers without expert adapters stay MXFP4
    with torch.no_grad():
        err = (bf16(ids).float() - expected).abs().mean().item()
    assert err < 0.05 * expected.abs().mean().item()  # bf16 rounding of the merged weights only


def test_bad_adapters(oracle, tmp_path):
    _, folder = oracle
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_model(folder, adapter=tmp_path)
    model = load_model(folder, dtype=torch.float32)
    apply_lora(model, r=4, alpha=8, expert_layers=[0])
    save_adapter(model, tmp_path / "r4")
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "r4" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError,
        match=r"experts.base_layer.lora_A.weight has shape \[28, 96\], while r=8 \(adapter_config.json\) gives it a rank side of 56",
    ):
        load_model(folder, adapter=tmp_path / "r4")


def test_expert_adapters_train_on_the_triton_kernels(tmp_path, monkeypatch, capsys):
    # the adapted layers stay on the kernels (no fallback, nothing said) and give the torch backend's
    # loss and gradients for every adapter tensor
    from gptoss.kernels import moe as moe_kernel

    folder = write_checkpoint(tmp_path / "c", small_config(), "hf-mxfp4", seed=2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    results, calls = {}, []
    monkeypatch.setattr(moe_kernel, "moe", lambda *a, _f=moe_kernel.moe, **kw: calls.append(1) or _f(*a, **kw))
    for backend in ("torch", "triton"):
        model = load_model(folder, backend=backend, dtype=torch.float32)
        params = apply_lora(model, 4, 8, [1])
        _randomize(params)
        calls.clear()
        loss = model(ids).logsumexp(-1).sum()
        assert len(calls) == (CONFIG.num_hidden_layers if backend == "triton" else 0)  # every layer, layer 1 too
        loss.backward()
        results[backend] = (loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    assert abs(loss_k - loss_t) <= 1e-5 * abs(loss_t)
    assert grads_k.keys() == grads_t.keys() and any("experts.lora.down_proj.B" in n for n in grads_k)
    for name, want in grads_t.items():  # fp32: summation order only
        assert (grads_k[name] - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7, name
    assert "torch path" not in capsys.readouterr().err


def test_merged_expert_layers_on_the_triton_backend_say_once_that_they_run_on_torch(tmp_path, capsys):
    from gptoss import model as model_module

    folder = write_checkpoint(tmp_path / "c", small_config(), "hf-mxfp4", seed=2)
    model = load_model(folder, backend="triton", dtype=torch.float32)
    _randomize(apply_lora(model, 4, 8, [1]))
    merge_lora(model)
    model_module._TOLD.clear()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4]]))
        model(torch.tensor([[1, 2, 3, 4]]))
    assert capsys.readouterr().err.count("run on the torch path") == 1


def test_a_lora_projection_under_autocast_makes_no_fp32_activation():
    # on a GPU the trainer runs the forward under bf16 autocast and the backward outside it. An adapted
    # q/k/v/o projection there: the same product as without autocast (the factors are fp32, x bf16), and
    # no pass over the activations that only converts them: x is not upcast to the factors' dtype (autocast
    # casts it straight back), the adapter's product joins the base output inside its GEMM (addmm)
    from gptoss.adapter import LoRALinear
    from gptoss.launches import LaunchCounter

    class Made(LaunchCounter):  # every launch, with the shape and dtype of what it made
        def __init__(self):
            super().__init__()
            self.made = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if len(self.torch) > len(self.made):
                self.made.append((self.torch[-1], tuple(out.shape), out.dtype))
            return out

    T, IN, OUT = 24, 64, 80
    torch.manual_seed(0)
    lin = LoRALinear(torch.nn.Linear(IN, OUT, dtype=torch.bfloat16), 4, 8)
    torch.nn.init.normal_(lin.lora_B.weight)
    x = torch.randn(2, T // 2, IN).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(2, T // 2, OUT).to(torch.bfloat16)
    with Made() as forward, torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x)
    with Made() as backward:
        y.backward(grad)
    over_activations = [m for m in forward.made + backward.made if math.prod(m[1][:-1]) == T and m[1][-1] in (IN, OUT)]
    assert not [m for m in over_activations if m[2] == torch.float32], over_activations
    assert [m for m in forward.made if m[1] in ((T, OUT), (2, T // 2, OUT))] == [
        ("addmm", (T, OUT), torch.bfloat16),  # x W^T + b
        ("addmm", (T, OUT), torch.bfloat16),  # + s (x A^T) B^T
    ], forward.made
    assert lin.lora_A.weight.grad.dtype == lin.lora_B.weight.grad.dtype == torch.float32

    # the same values as the fp32 product of the same bf16 operands, to bf16's rounding
    x32 = x.detach().float()
    want = x32 @ lin.weight.float().T + lin.bias.float()
    want = want + lin.scaling * (x32 @ lin.lora_A.weight.bfloat16().float().T).bfloat16().float() @ (
        lin.lora_B.weight.bfloat16().float().T
    )
    assert torch.allclose(y.float(), want, atol=0.05, rtol=0.02), (y.float() - want).abs().max()

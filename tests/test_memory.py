"""The trainer's memory model (gptoss.train.memory) against the real modules' sizes."""

import torch
from conftest import small_config

from gptoss import get_preset
from gptoss.adapter import apply_lora
from gptoss.model import GptOss
from gptoss.train.memory import GiB, lora_numbers, training_peak, weight_bytes


def test_weight_bytes_equal_the_model_s_parameters_and_buffers():
    config = small_config(hidden_size=64, intermediate_size=96, head_dim=16)
    model = GptOss(config, quantized=True).to(torch.bfloat16)
    for layer in model.model.layers:  # RMSNorm gains stay fp32, as load_model keeps them
        layer.input_layernorm.float(), layer.post_attention_layernorm.float()
    model.model.norm.float()
    held = sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
        b.numel() * b.element_size()
        for name, b in model.named_buffers()
        if "proj" in name  # MXFP4, not RoPE tables
    )
    assert weight_bytes(config, 2) == held


def test_lora_numbers_equal_the_trainable_parameters():
    config = small_config()
    model = GptOss(config, quantized=True)
    params = apply_lora(model, r=4, expert_layers=[0, 2])
    assert lora_numbers(config, 4, [0, 2]) == sum(p.numel() for p in params)


def test_the_kernel_removes_the_score_tensors():
    c = get_preset("gpt-oss-20b")
    before = training_peak(c, 2048, attention="torch", moe="triton", dtype_bytes=2)
    after = training_peak(c, 2048, attention="triton", moe="triton", dtype_bytes=2)
    scores = 64 * 2048 * 2048 * 4  # one fp32 [H, T, S] tensor: 1 GiB
    assert before["attention_workspace"] >= 4 * scores and after["attention_workspace"] < 0.05 * GiB
    assert before["layer_backward"] - after["layer_backward"] > 2.9 * GiB
    assert after["peak"] < before["peak"]
    # the MoE kernels keep no decoded weights, expert adapters or not; the torch path keeps them all
    decoded = c.num_local_experts * 3 * c.intermediate_size * c.hidden_size * 2
    plain = training_peak(c, 2048, attention="triton", moe="triton", dtype_bytes=2, expert_layers=[])
    torch_moe = training_peak(c, 2048, attention="triton", moe="torch", dtype_bytes=2)
    assert plain["moe_workspace"] < after["moe_workspace"] < 0.5 * decoded < torch_moe["moe_workspace"]

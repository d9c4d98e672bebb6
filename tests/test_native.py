"""The native MXFP4 CPU kernels (gptoss/native.py, gptoss/csrc/*.c) against the torch
reference: dequantization bit for bit; the fused product within the rounding its fp32 sums allow;
a model on them against the same model on the reference path; and what happens without a compiler."""

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from gptoss import mxfp4, native

# skipped only where the kernels are off by choice or for want of a compiler: a build that fails on a
# machine with one is a failure (test_the_kernels_build_where_there_is_a_compiler), not a skip
OFF = native.reason()
pytestmark = pytest.mark.skipif(
    OFF is not None and (OFF.startswith("no C compiler") or OFF == "GPTOSS_NATIVE=0"),
    reason=f"native kernels off: {OFF}",
)


def test_the_kernels_build_where_there_is_a_compiler():
    assert native.available(), native.reason()


def _codes(rows, groups, seed=0, lo=0, hi=255):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(lo, hi, (rows, groups), generator=g, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dequantize_is_bitwise_the_reference(dtype):
    # every code and every finite scale (0 .. 254, subnormal results included)
    blocks, scales = _codes(300, 7, lo=0, hi=255)
    want = mxfp4.dequantize(blocks, scales, dtype)
    got = native.dequantize(blocks, scales, dtype)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(got.view(bits), want.view(bits))
    out = torch.empty_like(want)
    assert native.dequantize(blocks, scales, dtype, out=out) is out and torch.equal(out.view(bits), want.view(bits))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_equals_dequantize_then_matmul(rows, dtype):
    # W decoded in registers, never stored; sums in fp32 in an order of the kernel's own. Against the
    # fp32 product: fp32 summation error (bounded by 1e-5 of sum |x| |w| for 2880 terms) and, in bf16,
    # one final rounding (2^-8 of the value).
    out_features, groups = 72, 90  # in = 2880, the gpt-oss width
    blocks, scales = _codes(out_features, groups, seed=rows, lo=118, hi=125)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, groups * 32, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    w = mxfp4.dequantize(blocks, scales, torch.float32)
    want = F.linear(x.float(), w, bias.float())
    scale = F.linear(x.float().abs(), w.abs()) + bias.float().abs()
    for b in (bias, None):
        got = native.linear(x, blocks, scales, b).float()
        ref = want if b is not None else want - bias.float()
        tol = 1e-5 * scale + (2**-8 * ref.abs() if dtype == torch.bfloat16 else 0)
        assert got.shape == (rows, out_features)
        assert ((got - ref).abs() <= tol).all()


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 5, 16, 17, 21])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_linear_reads_every_block_count_and_every_scale(groups, rows):
    # the bf16 kernel takes four blocks per step, the last step partial (G not a multiple of 4), and
    # sixteen scales per load; scales 0 .. 160: 2^-127 (subnormal in fp32) up to 2^33. Output row 0 has
    # only scale 0, so its true values are about 1e-38: a kernel that drops or flushes that scale
    # fails the tolerance there (1e-5 of sum |x| |w|, itself about 1e-38).
    out_features = 9
    blocks, scales = _codes(out_features, groups, seed=groups, lo=0, hi=160)
    scales[0] = 0
    scales[1, 0] = 0
    g = torch.Generator().manual_seed(groups)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(rows, groups * 32, generator=g).to(dtype)
        w = mxfp4.dequantize(blocks, scales, torch.float32)
        want = F.linear(x.float(), w)
        tol = 1e-5 * F.linear(x.float().abs(), w.abs()) + (2**-8 * want.abs() if dtype == torch.bfloat16 else 0)
        got = native.linear(x, blocks, scales).float()
        assert ((got - want).abs() <= tol).all(), (got - want).abs().max()
        assert (got[:, 0] != 0).any()


@pytest.mark.skipif(not native.bf16_dot(), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_bf16_linear_reads_a_plain_weight_in_place(rows):
    # fp32 sums of exact bf16 products in the kernel's own order, one rounding: against the fp32
    # product, 1e-5 of sum |x| |w| plus 2^-8 of the value; in = 2880 + 32 (not a multiple of 64)
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 2912, generator=g).bfloat16(), torch.randn(70, 2912, generator=g).bfloat16()
    bias = torch.randn(70, generator=g).bfloat16()
    for b in (bias, None):
        want = F.linear(x.float(), w.float(), None if b is None else b.float())
        got = native.bf16_linear(x, w, b).float()
        tol = 1e-5 * (F.linear(x.float().abs(), w.float().abs()) + bias.float().abs()) + 2**-8 * want.abs()
        assert ((got - want).abs() <= tol).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        native.bf16_linear(x[:, :100], w[:, :100])
    with pytest.raises(TypeError, match="bf16"):
        native.bf16_linear(x.float(), w)


def test_linear_refuses_what_it_cannot_read():
    blocks, scales = _codes(8, 2)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match="expected x"):
        native.linear(torch.randn(1, 63), blocks, scales)
    with pytest.raises(TypeError, match="bf16 or fp32"):
        native.linear(x.half(), blocks, scales)
    with pytest.raises(TypeError, match="uint8"):
        native.linear(x, blocks.int(), scales)
    with pytest.raises(ValueError, match="blocks"):
        native.linear(x, blocks[:, :1], scales)
    with pytest.raises(ValueError, match="bias"):
        native.linear(x, blocks, scales, torch.zeros(7))
    with pytest.raises(ValueError, match="contiguous"):
        native.dequantize(blocks, scales, out=torch.empty(8, 63))


def _experts(hidden=96, inter=160, experts=8, seed=0):
    """MXFP4 experts with random codes, scales near 2^-5 and bf16 biases (hidden 96: a partial last
    step of four blocks; intermediate 160: five blocks)."""
    from gptoss.model import Experts

    layer = Experts(small_config(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts))
    g = torch.Generator().manual_seed(seed)
    for name, t in layer.named_buffers():
        t.copy_(
            torch.randint(0, 256, t.shape, generator=g, dtype=torch.uint8)
            if "blocks" in name
            else torch.randint(118, 126, t.shape, generator=g, dtype=torch.uint8)
        )
    with torch.no_grad():
        for p in (layer.gate_up_proj_bias, layer.down_proj_bias):
            p.copy_(torch.randn(p.shape, generator=g))
    return layer.bfloat16()


@pytest.mark.skipif(not native.bf16_dot(), reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("tokens", [1, 2, 5, 24])
def test_moe_in_one_call_is_the_expert_loop(tokens):
    # against gptoss.model.experts_forward running one expert at a time through native.linear: the same
    # products in the same order, the same bf16 rounding of every SwiGLU step, the slots summed in fp32
    # in slot order, so equal bit for bit (the one operation that could differ, sigmoid, rounds C's expf
    # and torch's exp to the same bf16 here). And against the torch reference (dequantized experts,
    # bf16 matmuls): within the rounding of a different summation order carried through SwiGLU, 2% of
    # the largest output. 24 tokens over 8 experts: runs of 8 rows and more, and of 1.
    from gptoss.cpu import MXFP4Experts
    from gptoss.model import experts_forward, route

    reference = _experts()
    fast = MXFP4Experts(reference)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 96, generator=g).bfloat16()
    weights, ids = route(torch.randn(tokens, 8, generator=g), 4)
    got = native.moe(
        x,
        weights,
        ids,
        (*fast.codes["gate_up_proj"], fast.gate_up_proj_bias),
        (*fast.codes["down_proj"], fast.down_proj_bias),
        1.702,
        7.0,
    )
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, 96)
    assert torch.equal(got, experts_forward(x, weights, ids, fast, 1.702, 7.0))
    assert torch.equal(got, fast(x, weights, ids, 1.702, 7.0))  # what the model calls
    with torch.no_grad():
        want = reference(x, weights, ids, 1.702, 7.0).float()
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()
    # NaN where the reference has it, and only there
    x[0, 5] = float("nan")
    assert torch.equal(fast(x, weights, ids, 1.702, 7.0).isnan(), reference(x, weights, ids, 1.702, 7.0).isnan())


@pytest.mark.skipif(not native.bf16_dot(), reason="this CPU has no AVX512-BF16")
def test_moe_refuses_what_it_cannot_read():
    layer = _experts()
    gate_up = (layer.gate_up_proj_blocks, layer.gate_up_proj_scales, layer.gate_up_proj_bias)
    down = (layer.down_proj_blocks, layer.down_proj_scales, layer.down_proj_bias)
    x, weights, ids = (
        torch.randn(2, 96).bfloat16(),
        torch.full((2, 4), 0.25),
        torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]),
    )
    native.moe(x, weights, ids, gate_up, down, 1.702, 7.0)
    with pytest.raises(ValueError, match=r"expert ids must be in 0 \.\. 7, got 0 \.\. 8"):
        native.moe(x, weights, ids + (ids == 7).long(), gate_up, down, 1.702, 7.0)
    with pytest.raises(ValueError, match="expert ids must be"):
        native.moe(x, weights, ids - 1, gate_up, down, 1.702, 7.0)
    with pytest.raises(TypeError, match="must be bf16"):
        native.moe(x.float(), weights, ids, gate_up, down, 1.702, 7.0)
    with pytest.raises(ValueError, match="fp32 weights"):
        native.moe(x, weights.bfloat16(), ids, gate_up, down, 1.702, 7.0)
    with pytest.raises(ValueError, match="fp32 weights"):
        native.moe(x, weights[:, :3], ids, gate_up, down, 1.702, 7.0)
    with pytest.raises(ValueError, match="expected gate_up codes"):
        native.moe(x[:, :64], weights, ids, gate_up, down, 1.702, 7.0)
    with pytest.raises(ValueError, match="expected down bias"):
        native.moe(x, weights, ids, gate_up, (*down[:2], down[2][:, :5]), 1.702, 7.0)
    with pytest.raises(TypeError, match="uint8"):
        native.moe(x, weights, ids, (gate_up[0].int(), *gate_up[1:]), down, 1.702, 7.0)


def _models(tmp_path, dtype):
    from gptoss import load_model
    from gptoss.synthetic import write_checkpoint

    folder = write_checkpoint(tmp_path / "ckpt", small_config(hidden_size=64, intermediate_size=96), "hf-mxfp4", seed=3)
    reference = load_model(folder, dtype=dtype, dequantize=False, prepack=False)
    fast = load_model(folder, dtype=dtype, dequantize=False, prepack="auto")
    return reference, fast


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_model_on_the_native_kernels_matches_the_reference_path(tmp_path, dtype, tol, monkeypatch):
    from gptoss.cpu import MXFP4Experts

    calls = {"linear": 0, "dequantize": 0, "moe": 0}

    def counting(name, f):
        def counted(*args, **kwargs):
            calls[name] += 1
            return f(*args, **kwargs)

        return counted

    for name in calls:
        monkeypatch.setattr(native, name, counting(name, getattr(native, name)))

    reference, fast = _models(tmp_path, dtype)
    assert all(isinstance(layer.mlp.experts, MXFP4Experts) for layer in fast.model.layers)
    if dtype == torch.bfloat16 and native.bf16_dot():  # the other weights read in place, never copied
        from gptoss.cpu import DirectLinear

        assert isinstance(fast.lm_head, DirectLinear) and fast.lm_head.weight is not None
        assert isinstance(fast.model.layers[0].self_attn.q_proj, DirectLinear)
    assert not any(isinstance(layer.mlp.experts, MXFP4Experts) for layer in reference.model.layers)
    g = torch.Generator().manual_seed(0)
    # 2 x 3 tokens: a few rows per expert, the fused kernel; 2 x 100: some decoded once, then one matmul
    for tokens, fused in ((3, True), (100, False)):
        ids = torch.randint(0, 300, (2, tokens), generator=g)
        before = dict(calls)
        with torch.no_grad():
            want, got = reference(ids).float(), fast(ids).float()
        difference = (got - want).abs().max()
        if fused and dtype == torch.bfloat16 and native.bf16_dot():  # a whole MoE layer per native call
            assert calls["moe"] == before["moe"] + len(fast.model.layers)
            assert calls["linear"] == before["linear"] and calls["dequantize"] == before["dequantize"]
        elif fused:
            assert calls["linear"] > before["linear"] and calls["dequantize"] == before["dequantize"]
        else:  # the busiest experts take the decode-once path (the others still the fused kernel)
            assert calls["dequantize"] > before["dequantize"]
        # fp32: summation order only; bf16: a different rounding early on is carried through the layers
        assert difference <= tol * want.abs().max()  # within 5% of the largest logit


def test_without_a_compiler_the_model_still_runs_and_says_why_once(tmp_path):
    # a fresh cache (no library built yet) and CC pointing at nothing: the fast path is off, once, named
    code = (
        "import torch\n"
        "from gptoss import load_model\n"
        "from gptoss.synthetic import write_checkpoint\n"
        "from conftest import small_config\n"
        f"folder = write_checkpoint({str(tmp_path / 'c')!r}, small_config(), 'hf-mxfp4', seed=1)\n"
        "for _ in range(2):\n"
        "    model = load_model(folder, dequantize=False, prepack='auto')\n"
        "    print(float(model(torch.tensor([[1, 2, 3]])).float().abs().sum()))\n"
    )
    here = os.path.dirname(os.path.abspath(__file__))  # the tests folder: conftest imports from there
    for env, why in ((dict(CC="/nonexistent/cc"), "no C compiler found"), (dict(GPTOSS_NATIVE="0"), "GPTOSS_NATIVE=0")):
        run = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=here,
            env=dict(os.environ, GPTOSS_CACHE=str(tmp_path / f"cache-{len(why)}"), **env),
        )
        assert run.returncode == 0, run.stderr
        assert run.stderr.count("native MXFP4 CPU kernels are off") == 1 and why in run.stderr, run.stderr
        sums = [float(v) for v in run.stdout.split()]
        assert len(sums) == 2 and sums[0] == sums[1] and sums[0] > 0


@pytest.mark.skipif(not native.bf16_dot(), reason="this CPU or build has no native bf16 product")
def test_direct_linear_keeps_large_weights_native_up_to_eight_rows(monkeypatch):
    # F.linear would copy a large weight into oneDNN's layout (gpt-oss-20b's unembedding: 1.16 GB) for
    # each call; batch-8 decoding stays on the native product for those, smaller weights switch at 4 rows
    from gptoss import cpu

    calls = []
    monkeypatch.setattr(native, "bf16_linear", lambda x, w, b=None: calls.append(x.shape[0]) or F.linear(x, w, b))
    linear = cpu.DirectLinear(torch.nn.Linear(64, 32, dtype=torch.bfloat16))  # 4 KiB of weight
    for threshold, native_rows in ((64 * 32 * 2 + 1, [1, 4]), (64 * 32 * 2, [1, 4, 5, 8])):  # small, then large
        monkeypatch.setattr(cpu, "LARGE_WEIGHT", threshold)
        calls.clear()
        for rows in (1, 4, 5, 8, 9):
            linear(torch.randn(rows, 64, dtype=torch.bfloat16))
        assert calls == native_rows


@pytest.mark.parametrize("positions", [torch.int64, torch.int32])  # int32: the cache's own (LayerCache.pos)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_is_the_reference_at_one_token(window, dtype, positions):
    # one query per sequence against a cache laid out as gptoss.generate keeps it ([B, K, slots, Dh]
    # fp32, read through its [B, S, K, Dh] view, a prefix of the slots): left padding (position -1),
    # a ring whose positions are out of order, a window, sinks large enough to matter. fp32 sums in
    # another order than the reference's matmuls: 1e-5 of the largest output, plus one rounding in bf16.
    from gptoss.model import attention_with_sinks

    g = torch.Generator().manual_seed(0 if window is None else window)
    B, K, G, Dh, slots, S = 2, 2, 3, 16, 9, 7
    cache_k, cache_v = torch.randn(B, K, slots, Dh, generator=g), torch.randn(B, K, slots, Dh, generator=g)
    k, v = cache_k[:, :, :S].transpose(1, 2), cache_v[:, :, :S].transpose(1, 2)  # [B, S, K, Dh], strided
    k_pos = torch.tensor([[-1, -1, 0, 1, 2, 3, 4], [5, 6, 0, 1, 2, 3, 4]], dtype=positions)  # padding; a ring
    q_pos = torch.tensor([[4], [6]], dtype=positions)
    q = (3 * torch.randn(B, 1, K, G, Dh, generator=g)).to(dtype)
    sinks = torch.randn(K * G, generator=g) * 2
    want = attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window).float()
    got = native.decode_attention(q, k, v, sinks, q_pos, k_pos, window)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 * want.abs().max() + (2**-8 * want.abs() if dtype == torch.bfloat16 else 0)
    assert ((got.float() - want).abs() <= tol).all(), (got.float() - want).abs().max()
    # positions shared by the batch ([S] and [1]) and a contiguous cache give the same
    shared = native.decode_attention(q[:1], k[:1].contiguous(), v[:1].contiguous(), sinks, q_pos[0], k_pos[0], window)
    assert torch.equal(shared, got[:1])
    # NaN in a query: that head's output is NaN, as in the reference, and no other head's
    q[0, 0, 1, 2, 5] = float("nan")
    nan = native.decode_attention(q, k, v, sinks, q_pos, k_pos, window).isnan()
    assert torch.equal(nan, attention_with_sinks(q, k, v, sinks, q_pos, k_pos, window).isnan())


def test_decode_attention_refuses_what_it_cannot_read():
    q, k = torch.randn(1, 1, 2, 3, 16), torch.randn(1, 5, 2, 16)
    pos, sinks = torch.arange(5), torch.zeros(6)
    native.decode_attention(q, k, k, sinks, torch.tensor([4]), pos, None)
    with pytest.raises(ValueError, match=r"expected q \[B, 1, K, G, Dh\]"):
        native.decode_attention(torch.randn(1, 2, 2, 3, 16), k, k, sinks, torch.tensor([4]), pos, None)
    with pytest.raises(ValueError, match="must match q"):
        native.decode_attention(
            q, torch.randn(1, 5, 1, 16), torch.randn(1, 5, 1, 16), sinks, torch.tensor([4]), pos, None
        )
    with pytest.raises(TypeError, match="fp32 cache"):
        native.decode_attention(q, k.bfloat16(), k.bfloat16(), sinks, torch.tensor([4]), pos, None)
    with pytest.raises(ValueError, match="sinks"):
        native.decode_attention(q, k, k, torch.zeros(5), torch.tensor([4]), pos, None)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache folder for the native library, and a fresh look-up of it (restored afterwards)."""
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path))
    native._library.cache_clear()
    yield tmp_path / "native"
    native._library.cache_clear()


@pytest.mark.skipif(not native.available(), reason="no C compiler here")
@pytest.mark.parametrize("damage", ["truncated", "replaced"])
def test_a_damaged_cached_library_is_rebuilt_never_loaded(fresh_cache, damage):
    # a truncated library used to kill every later run with SIGBUS; a planted one was loaded and its
    # constructor ran: the sha256 recorded at build time no longer matches, so a later run builds it again
    import subprocess
    import sys

    assert native._library() is not None
    (lib,) = fresh_cache.glob("*.so")
    built = lib.read_bytes()
    bad = fresh_cache / "bad"
    bad.write_bytes(built[: len(built) // 2] if damage == "truncated" else b"\x7fELF" + b"\0" * 4096)
    os.replace(bad, lib)  # a new file: the library this process mapped stays intact
    later = "from gptoss import native; import sys; sys.exit(0 if native.available() else 3)"
    done = subprocess.run([sys.executable, "-c", later], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-1000:])  # -7 was SIGBUS
    assert lib.read_bytes() == built  # the same build again


def test_a_library_without_the_kernels_is_refused_with_the_reason(fresh_cache):
    import hashlib
    import shutil
    import subprocess
    import sys

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler here")
    native._library.cache_clear()
    native._library()  # builds the real one: its name is the cache key
    (lib,) = fresh_cache.glob("*.so")
    src = fresh_cache / "other.c"
    src.write_text("int gptoss_other(void) { return 1; }\n")
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    (fresh_cache / (lib.name + ".sha256")).write_text(hashlib.sha256(lib.read_bytes()).hexdigest())
    # a later run (this process keeps the library it loaded under that name)
    later = "from gptoss import native; print(native.reason())"
    done = subprocess.run([sys.executable, "-c", later], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "lacks gptoss_mxfp4_linear" in done.stdout, done.stdout + done.stderr[-1000:]


def test_a_cache_folder_others_can_write_is_not_loaded_from(fresh_cache):
    fresh_cache.mkdir(parents=True)
    fresh_cache.chmod(0o777)
    assert native._library() is None
    assert "can be written by other users" in native.reason() and "chmod go-w" in native.reason()
    assert not list(fresh_cache.glob("*.so"))  # nothing built there either


@pytest.mark.parametrize("hangs_on", ["build", "version"])
def test_a_hanging_compiler_costs_one_run_its_timeout_not_every_run(fresh_cache, tmp_path, monkeypatch, hangs_on):
    # a compiler that never finishes used to stall every run for the build's 120 s: the first run gives up
    # at the timeout and records why; later runs skip it at once, say why and how to try again
    import subprocess
    import sys
    import time

    calls = tmp_path / "calls"
    cc = tmp_path / "cc"
    cc.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        f'case "$1" in --version) {"sleep 30" if hangs_on == "version" else "echo fake 1.0"} ;; *) sleep 30 ;; esac\n'
    )
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr(native, "BUILD_TIMEOUT_S", 1)
    monkeypatch.setattr(native, "VERSION_TIMEOUT_S", 1)
    assert native._library() is None
    assert "timed out" in native.reason(), native.reason()
    assert calls.read_text().count("\n") == (1 if hangs_on == "version" else 2)  # --version, then the build
    later = "from gptoss import native; print(native.reason())"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", later], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "in an earlier run" in done.stdout and "GPTOSS_NATIVE_RETRY=1" in done.stdout
    assert "timed out" in done.stdout, done.stdout
    assert time.perf_counter() - start < 25  # no call of the compiler: it sleeps 30 s
    assert calls.read_text().count("\n") == (1 if hangs_on == "version" else 2)
    native._library.cache_clear()
    monkeypatch.setenv("GPTOSS_NATIVE_RETRY", "1")  # asked to: it tries again
    assert native._library() is None and "earlier run" not in native.reason()
    assert calls.read_text().count("\n") > (1 if hangs_on == "version" else 2)


# -- the build variants, the argument structs and the status codes ---------------------------------------


def test_the_ctypes_mirrors_match_the_c_structs():
    lib = native._library()
    for which, struct in enumerate(native.STRUCTS):
        assert lib.gptoss_layout(which, -1) == ctypes.sizeof(struct), struct.__name__
        offsets = [lib.gptoss_layout(which, i) for i in range(len(struct._fields_) + 1)]
        assert offsets[-1] == -1, f"struct {struct.__name__} in C has more fields than its mirror"
        assert offsets[:-1] == [getattr(struct, name).offset for name, _ in struct._fields_], struct.__name__


def test_every_status_code_has_its_message():
    header = (native.CSRC / "native.h").read_text()
    codes = {int(v): name for name, v in re.findall(r"^\s+GPTOSS_(\w+) = (\d+),", header, flags=re.M)}
    assert set(codes) == set(native.STATUS) and codes[0] == "OK" and native.STATUS[0] is None
    for code in set(codes) - {0}:
        with pytest.raises((RuntimeError, ValueError, MemoryError), match=re.escape(native.STATUS[code])):
            native._status("product", code)
    assert len(set(native.STATUS.values())) == len(native.STATUS)  # distinct: nothing left to guess
    # a call this build has no kernel for says so (here, or a bad shape on a CPU that has the kernel)
    status = native._library().gptoss_mxfp4_moe(ctypes.byref(native.MoEArgs()))
    assert status == (2 if native.bf16_dot() else 1)


def test_the_portable_build_compiles_runs_and_agrees(fresh_cache, monkeypatch):
    """GPTOSS_NATIVE_MARCH=x86-64: the build without AVX-512 (or AVX2) that any x86-64 runs, its own
    library in the cache. Decoding and attention are the same sums in the same order: bitwise equal to
    the default build. The MXFP4 product too where the default build is also portable C (no AVX-512),
    else within fp32 rounding of a different order of sums."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 is the portable target of x86 machines")
    native_lib = native._library()
    blocks, scales = _codes(64, 4, lo=110, hi=140)  # finite products: NaN is never equal to itself
    x = torch.randn(3, 128)
    q, k = torch.randn(2, 1, 2, 3, 16), torch.randn(2, 7, 2, 16)
    args = (q, k, k.flip(1), torch.randn(6), torch.tensor([[6], [5]]), torch.arange(7), 4)
    wide = native.simd()
    want = (
        native.dequantize(blocks, scales, torch.float32),
        native.linear(x, blocks, scales),
        native.decode_attention(*args),
    )
    monkeypatch.setenv("GPTOSS_NATIVE_MARCH", "x86-64")
    native._library.cache_clear()
    portable = native._library()
    assert portable is not None and portable is not native_lib, native.reason()
    assert native.simd() == 0 and not native.bf16_dot()
    got = (
        native.dequantize(blocks, scales, torch.float32),
        native.linear(x, blocks, scales),
        native.decode_attention(*args),
    )
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    if wide == 0:
        assert torch.equal(got[1], want[1])
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    assert len(list(fresh_cache.glob("libgptoss_mxfp4_*.so"))) == 2  # one library per target


def test_the_avx512_variant_compiles_on_any_machine(tmp_path):
    """The AVX-512 and AVX512-BF16 paths (the MXFP4 product, the MoE, the bf16 product) compile for
    Sapphire Rapids even where this CPU cannot run them, with every warning an error."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no C compiler for x86-64 here")
    out = tmp_path / "avx512.so"
    done = subprocess.run(
        [
            cc,
            "-O3",
            "-march=sapphirerapids",
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-shared",
            "-fPIC",
            "-fopenmp",
            f"-I{native.CSRC}",
            *map(str, native.SOURCES),
            "-lm",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    symbols = subprocess.run(["nm", "-D", str(out)], capture_output=True, text=True).stdout
    assert all(name in symbols for name in native.SYMBOLS)
    assert "vdpbf16ps" in subprocess.run(["objdump", "-d", str(out)], capture_output=True, text=True).stdout


@pytest.mark.parametrize("value, why", [("bogus;rm -rf", "is not a -march name"), ("nosuchcpu", "failed")])
def test_a_bad_native_march_turns_the_kernels_off_with_the_reason(fresh_cache, monkeypatch, value, why):
    monkeypatch.setenv("GPTOSS_NATIVE_MARCH", value)
    assert not native.available()
    assert why in native.reason() and (value in native.reason() or "march" in native.reason())

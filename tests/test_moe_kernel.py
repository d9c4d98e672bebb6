"""The Triton grouped MXFP4 expert matmuls (forward and backward) against the torch reference
gptoss.model.experts_forward, under TRITON_INTERPRET=1 on the CPU; and the whole model with
backend="triton" against backend="torch"."""

import copy

import pytest
import torch
import triton
import triton.language as tl
from conftest import small_config

from gptoss import load_model
from gptoss.kernels import moe as moe_kernel
from gptoss.kernels.moe import MoEFunction
from gptoss.kernels.routing import route as route_kernel
from gptoss.model import Experts, experts_forward
from gptoss.synthetic import write_checkpoint

CASES = {
    # D = 96 and I = 160 are not multiples of the 64-wide N/K tiles; 13 x 3 pairs leave ragged 16-row tiles
    "prime-experts-ragged-tiles": dict(T=13, E=7, k=3, D=96, I=160),
    # 3 tokens x 2 slots over 11 experts: most experts receive no token
    "experts-without-tokens": dict(T=3, E=11, k=2, D=64, I=64),
    "one-token": dict(T=1, E=5, k=2, D=96, I=96),
    # top-1 with every token sent to expert 2: one expert spans three row tiles, the others are empty
    "all-to-one-expert-top1": dict(T=40, E=5, k=1, D=64, I=64, force=2),
    "topk-equals-E": dict(T=9, E=4, k=4, D=64, I=96),
}

# fp32: IEEE dots, so only the summation order differs from the reference (errors ~1e-6 measured);
# 1e-4 is far above that and far below the O(1) error of any indexing or masking mistake.
# bf16: activations, the saved pre-activation and the stored SwiGLU output are rounded to bf16
# (relative step 2^-8 = 0.4%) where the fp32 reference is not; a few such roundings through two
# matmuls add up to ~1% (0.8% of the largest value measured here), so we allow 2% of the tensor's
# largest value.
TOLERANCES = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=None)}


def _experts(E, D, I, dtype):
    experts = Experts(small_config(num_local_experts=E, hidden_size=D, intermediate_size=I), quantized=True)
    with torch.no_grad():
        for name, b in experts.named_buffers():
            b.copy_(torch.randint(0, 256, b.shape) if name.endswith("blocks") else torch.randint(121, 125, b.shape))
        experts.gate_up_proj_bias.copy_(0.1 * torch.randn(E, 2 * I))
        experts.down_proj_bias.copy_(0.1 * torch.randn(E, D))
    return experts.to(dtype).requires_grad_(False)


def _apply(x, weights, routing, experts, scaling=1.0):
    """MoEFunction on `experts`, with the expert-major factors of whatever adapters they carry."""
    factors = [
        t
        for w in ("gate_up_proj", "down_proj")
        for t in (experts.lora[w].expert_major() if w in experts.lora else (None, None))
    ]
    return MoEFunction.apply(x, weights, *factors, routing, *moe_kernel.expert_weights(experts), 1.702, 7.0, scaling)


def _close(actual, expected, dtype, what):
    tol = TOLERANCES[dtype]
    atol = tol["atol"] if tol["atol"] is not None else tol["rtol"] * expected.abs().max().item()
    err = (actual.float() - expected.float()).abs()
    assert (err <= atol + tol["rtol"] * expected.float().abs()).all(), (
        f"{what}: max error {err.max():.3e}, mean {err.mean():.3e} (atol {atol:.1e})"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_forward_and_backward(case, dtype):
    c = CASES[case]
    T, E, k, D, I = c["T"], c["E"], c["k"], c["D"], c["I"]
    experts = _experts(E, D, I, dtype)
    logits = torch.randn(T, E)
    if "force" in c:
        logits[:, c["force"]] += 100.0
    routing = route_kernel(logits, k)
    if "force" in c:
        assert routing.counts.tolist() == [T if e == c["force"] else 0 for e in range(E)]
    x = torch.randn(T, D).to(dtype)
    weights = torch.softmax(torch.randn(T, k), -1)
    grad_out = torch.randn(T, D).to(dtype)

    # reference: fp32 math on the very same (dtype-rounded) values
    x_ref, w_ref = x.float().clone().requires_grad_(), weights.clone().requires_grad_()
    ref = experts_forward(x_ref, w_ref, routing.ids.long(), copy.deepcopy(experts).float(), 1.702, 7.0)
    ref.backward(grad_out.float())

    x_k, w_k = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = _apply(x_k, w_k, routing, experts)
    out.backward(grad_out)
    assert out.dtype == dtype and x_k.grad.dtype == dtype
    _close(out, ref, dtype, "output")
    _close(x_k.grad, x_ref.grad, dtype, "grad of the input")
    _close(w_k.grad, w_ref.grad, dtype, "grad of the routing weights")


def _with_adapters(experts, which_list, r=3, seed=1):
    """Random LoRA factors in PEFT's expert layout (A [E*r, in], B [out, r*E], fp32 as the trainer makes
    them), B non-zero so the update shows; every expert's factors differ."""
    from gptoss.adapter import ExpertLoRA

    g = torch.Generator().manual_seed(seed)
    for which in which_list:
        lora = experts.lora[which] = ExpertLoRA.on(experts, which, r, alpha=2.0 * r)  # scaling 2
        with torch.no_grad():
            lora.A.copy_(0.1 * torch.randn(lora.A.shape, generator=g))
            lora.B.copy_(0.1 * torch.randn(lora.B.shape, generator=g))
    return experts


ADAPTED = {"gate_up": ("gate_up_proj",), "down": ("down_proj",), "both": ("gate_up_proj", "down_proj")}


@pytest.mark.parametrize(
    "case, adapted, dtype",
    [
        *[("prime-experts-ragged-tiles", a, torch.float32) for a in ADAPTED],
        ("experts-without-tokens", "both", torch.float32),
        ("all-to-one-expert-top1", "both", torch.float32),
        ("prime-experts-ragged-tiles", "both", torch.bfloat16),
    ],
)
def test_moe_with_expert_adapters_matches_the_torch_path(case, adapted, dtype):
    # the frozen MXFP4 matmuls in the kernels, each adapter's low-rank update beside them: output and the
    # gradients of the input, the routing weights and every factor against the torch path (Experts.lora)
    c = CASES[case]
    T, E, k, D, I = c["T"], c["E"], c["k"], c["D"], c["I"]
    experts = _with_adapters(_experts(E, D, I, dtype), ADAPTED[adapted])
    logits = torch.randn(T, E)
    if "force" in c:
        logits[:, c["force"]] += 100.0
    routing = route_kernel(logits, k)
    x = torch.randn(T, D).to(dtype)
    weights = torch.softmax(torch.randn(T, k), -1)
    grad_out = torch.randn(T, D).to(dtype)

    reference = copy.deepcopy(experts).float()
    x_ref, w_ref = x.float().clone().requires_grad_(), weights.clone().requires_grad_()
    experts_forward(x_ref, w_ref, routing.ids.long(), reference, 1.702, 7.0).backward(grad_out.float())

    x_k, w_k = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = _apply(x_k, w_k, routing, experts, scaling=2.0)
    out.backward(grad_out)
    _close(
        out, experts_forward(x.float(), weights, routing.ids.long(), reference, 1.702, 7.0).detach(), dtype, "output"
    )
    _close(x_k.grad, x_ref.grad, dtype, "grad of the input")
    _close(w_k.grad, w_ref.grad, dtype, "grad of the routing weights")
    for which in ADAPTED[adapted]:
        for factor in "AB":
            name = f"{which} {factor}"
            got, want = getattr(experts.lora[which], factor).grad, getattr(reference.lora[which], factor).grad
            assert got is not None and got.shape == want.shape, name
            _close(got, want, dtype, f"grad of {name}")


def test_adapter_gradients_without_input_gradient():
    # only the factors train (the input needs no gradient): the kernels still give A and B theirs
    experts = _with_adapters(_experts(5, 64, 64, torch.float32), ADAPTED["both"])
    routing = route_kernel(torch.randn(6, 5), 2)
    x = torch.randn(6, 64)
    out = _apply(x, routing.weights, routing, experts, scaling=2.0)
    out.square().sum().backward()
    reference = copy.deepcopy(experts)
    for p in reference.parameters():
        p.grad = None
    experts_forward(x, routing.weights, routing.ids.long(), reference, 1.702, 7.0).square().sum().backward()
    for which in ("gate_up_proj", "down_proj"):
        for name in ("A", "B"):
            got, want = getattr(experts.lora[which], name).grad, getattr(reference.lora[which], name).grad
            _close(got, want, torch.float32, f"{which} {name}")


def test_no_saved_activations_without_grad():
    experts = _experts(3, 64, 64, torch.float32)
    routing = route_kernel(torch.randn(5, 3), 2)
    with torch.no_grad():
        out = _apply(torch.randn(5, 64), routing.weights, routing, experts)
    assert out.grad_fn is None and out.shape == (5, 64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton-model")
    return write_checkpoint(folder, small_config(), "hf-mxfp4", seed=4)


def test_whole_model_triton_equals_torch(checkpoint):
    ids = torch.randint(0, 300, (2, 11))
    torch_logits = load_model(checkpoint, dtype=torch.float32, backend="torch")(ids)
    model = load_model(checkpoint, dtype=torch.float32, backend="triton")
    assert model.backend == "triton" and model.model.layers[0].mlp.backend == "triton"
    err = (model(ids) - torch_logits).abs().max().item()
    assert err < 1e-4, f"triton vs torch logits differ by {err:.2e}"


def test_whole_model_gradients_flow_through_the_kernels(checkpoint):
    # what the LoRA trainer needs: gradients to the attention weights through the MoE, experts frozen
    ids = torch.randint(0, 300, (1, 9))
    grads = {}
    for backend in ("torch", "triton"):
        model = load_model(checkpoint, dtype=torch.float32, backend=backend)
        q = model.model.layers[0].self_attn.q_proj.weight.requires_grad_()
        model(ids).logsumexp(-1).sum().backward()
        grads[backend] = q.grad
    assert (grads["triton"] - grads["torch"]).abs().max().item() < 1e-4 * grads["torch"].abs().max().item()


def test_triton_backend_needs_mxfp4(tmp_path):
    folder = write_checkpoint(tmp_path, small_config(), "hf-bf16", seed=1)
    with pytest.raises(ValueError, match="needs MXFP4 experts"):
        load_model(folder, backend="triton")


def _interpreted_tiles() -> list[tuple]:
    """One config of each tile a GPU launch may pick, as the interpreter runs it: it takes a block's
    arrays whole, so warps and stages change nothing there (the compile gate compiles every config)."""
    tiles = {}
    for config in sorted({moe_kernel.tile_of(c) for c in moe_kernel.all_configs()}):
        tiles.setdefault(config[:3] + config[5:], config)
    return sorted(tiles.values())


@pytest.mark.parametrize("config", _interpreted_tiles(), ids=lambda c: "-".join(map(str, c)))
def test_every_autotune_config(config, monkeypatch):
    # each tile shape a GPU launch may pick, pinned through GPTOSS_MOE_CONFIG, on the ragged case
    # (D = 96, I = 160 and 13 x 3 rows are multiples of none of the tiles)
    monkeypatch.setenv("GPTOSS_MOE_CONFIG", ",".join(map(str, config)))
    for kernel in moe_kernel.KERNELS.values():
        kernel.cache.clear()
    try:
        test_moe_forward_and_backward("prime-experts-ragged-tiles", torch.float32)
    finally:
        for kernel in moe_kernel.KERNELS.values():
            kernel.cache.clear()


@pytest.mark.parametrize(
    "value, message",
    [
        ("abc", "five integers"),
        ("16,64,64,4", "five integers"),
        ("16,48,64,4,3", "powers of two"),  # 48 is not a power of two
        ("0,64,64,4,3", "powers of two"),
        ("16,64,16,4,3", "BLOCK_K >= 32"),  # a K step shorter than one MX block
        ("16,64,64,4,0", "stages >= 1"),
        ("-16,64,64,4,3", "powers of two"),
        ("nan,64,64,4,3", "five integers"),
        ("64,128,64,8,3,1,1", "five integers"),  # a seventh field
        ("64,128,64,8,3,2", "swap is 0 or 1"),
        ("64,128,64,8,3,-1", "swap is 0 or 1"),
        ("32,128,64,4,3,1", "only for a wgmma tile"),  # mma.sync rows: no swapped form
        ("64,32,64,4,3,1", "only for a wgmma tile"),
        ("64,128,64,8,3,", "five integers"),  # an empty sixth field
        ("64,128,64,8,3,nan", "five integers"),  # the sixth field not a number
        ("64,128,64,8,3,yes", "five integers"),
        ("64,128,64,8,3,1.0", "five integers"),
        ("64,128,64,8,3,99999999999999999999", "swap is 0 or 1"),  # huge
    ],
)
def test_bad_pinned_config_is_explained(value, message, monkeypatch):
    monkeypatch.setenv("GPTOSS_MOE_CONFIG", value)
    with pytest.raises(ValueError, match=message):
        moe_kernel.pinned_config()


@triton.jit
def _program_tiles_probe(out_ptr, BLOCK_N: tl.constexpr):
    pid_m, n0 = moe_kernel._program_tile(BLOCK_N)
    block = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    tl.store(out_ptr + 2 * block, pid_m)  # in the order blocks start: x fastest, then y, then z
    tl.store(out_ptr + 2 * block + 1, n0)


@pytest.mark.parametrize("P", [4, 700, 3000])
@pytest.mark.parametrize("N", [32, 96, 640])
def test_programs_take_every_tile_once_in_groups_of_row_tiles(P, N):
    # the grid's programs must cover every (row tile, column tile) once, the row tiles' upper bound rounded
    # up to whole groups; and in the order blocks start, a group's programs (so those running together)
    # take its GROUP_ROWS row tiles across all the column tiles, row tiles fastest: the activations in
    # flight are a few row tiles' (read once while in L2), not all of them. At decode (4 pairs), one group.
    E, meta = 32, dict(BLOCK_M=16, BLOCK_N=32)
    grid = moe_kernel._grid(P, E, N)(meta)
    group, cols, groups = grid
    rows = -(-P // 16) + min(E, P) - 1
    expected = rows if moe_kernel.rows_bucket(P, E) == 16 else min(moe_kernel.GROUP_ROWS, rows)
    assert group == expected and cols == -(-N // 32) and (groups - 1) * group < rows
    assert (P == 4) == (groups == 1)
    out = torch.full((group * cols * groups, 2), -1, dtype=torch.int32)
    _program_tiles_probe[grid](out, BLOCK_N=32)
    tiles = [(m, n // 32) for m, n in out.tolist()]
    assert sorted(tiles) == [(m, c) for m in range(group * groups) for c in range(cols)]
    for block, (m, c) in enumerate(tiles):
        first = block // (group * cols) * group
        assert (m, c) == (first + block % group, block // group % cols), (block, m, c)


def test_moe_in_groups_of_row_tiles_matches_the_torch_path(monkeypatch):
    # prefill's groups of row tiles on a case small enough for the interpreter (taken for a prefill
    # bucket): 9 row tiles in groups of 4, the grid rounded up to 12 (its last 3 row tiles find no rows)
    monkeypatch.setattr(moe_kernel, "GROUP_ROWS", 4)
    monkeypatch.setattr(moe_kernel, "rows_bucket", lambda pairs, experts: 64)
    assert moe_kernel._grid(39, 7, 96)(dict(BLOCK_M=16, BLOCK_N=32)) == (4, 3, 3)  # 13 tokens x 3 slots
    test_moe_forward_and_backward("prime-experts-ragged-tiles", torch.float32)


def test_gate_up_bwd_with_64_bit_offsets_matches_the_torch_path(monkeypatch):
    # gate_up_bwd writes gx with 32-bit row offsets below 2^31 elements and 64-bit ones from there on; the
    # threshold lowered to 0, the 64-bit path on a small case
    monkeypatch.setattr(moe_kernel, "WIDE_OFFSETS", 0)
    test_moe_forward_and_backward("prime-experts-ragged-tiles", torch.float32)


def test_grid_bound_covers_every_tile():
    # the launch grid holds cdiv(P, BLOCK_M) + min(E, P) - 1 row tiles; an expert with c rows needs
    # cdiv(c, BLOCK_M). Random and adversarial count vectors (many experts with one row each).
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        E = int(torch.randint(1, 130, (), generator=g))
        block = [16, 32, 64, 128, 256][int(torch.randint(0, 5, (), generator=g))]
        counts = torch.randint(0, 3 if _ % 2 else 300, (E,), generator=g)
        P = int(counts.sum())
        if P == 0:
            continue
        needed = int(((counts + block - 1) // block).sum())
        bound = -(-P // block) + min(E, P) - 1
        assert needed <= bound, (counts.tolist(), block)
    assert moe_kernel.rows_bucket(4, 32) == 16 and moe_kernel.rows_bucket(4096 * 4, 32) == 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_combine_is_the_torch_sum_rounded_once(dtype):
    # one kernel for what torch does in two (an fp32 sum over the slots, then the cast): the same values,
    # bit for bit, on a width that is no multiple of the kernel's column block
    pairs = torch.randn(7 * 4, 1100) * torch.logspace(-3, 3, 1100)
    got = moe_kernel.moe_combine(pairs, 4, dtype)
    assert got.dtype == dtype and torch.equal(got, pairs.view(7, 4, 1100).sum(1).to(dtype))
    assert moe_kernel.moe_combine(torch.empty(0, 16), 4, dtype).shape == (0, 16)


@pytest.mark.parametrize(
    "pairs, k",
    [(torch.zeros(8, 4, dtype=torch.bfloat16), 4), (torch.zeros(7, 4), 4), (torch.zeros(8), 4), (torch.zeros(8, 4), 0)],
)
def test_the_combine_refuses_what_it_cannot_sum(pairs, k):
    with pytest.raises(ValueError, match="expected fp32"):
        moe_kernel.moe_combine(pairs, k, torch.bfloat16)


@pytest.mark.parametrize(
    "bad",
    [
        lambda P, N: torch.zeros(P, N, dtype=torch.float16),  # neither fp32 nor bf16
        lambda P, N: torch.zeros(P, N, dtype=torch.int32),
        lambda P, N: torch.zeros(P, N + 1),  # the wrong width
        lambda P, N: torch.zeros(0, N),  # empty
        lambda P, N: torch.zeros(N, P).T,  # not contiguous
    ],
)
def test_an_added_update_the_kernels_cannot_read_is_refused(bad):
    # the epilogue's `add` (the expert adapters' update): fp32 or bf16, [P, N], contiguous; anything else
    # is one line naming what was expected, before a launch
    experts = _experts(5, 64, 64, torch.bfloat16)
    routing = route_kernel(torch.randn(6, 5), 2)
    w1, _ = moe_kernel.expert_weights(experts)
    x = torch.randn(6, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"the added update must be a contiguous fp32 or bf16 \[12, 128\] tensor"):
        moe_kernel.moe_gate_up_fwd(x, routing, w1, 1.702, 7.0, save=True, add=bad(12, 128))


def test_a_pinned_swapped_tile_swaps_every_kernel(monkeypatch):
    monkeypatch.setenv("GPTOSS_MOE_CONFIG", "64,128,64,8,3,1")
    for kernel in moe_kernel.KERNELS:
        (config,) = moe_kernel._pruner(kernel)([], {}, UPCAST=False)
        assert moe_kernel.tile_of(config) == (64, 128, 64, 8, 3, 1) and config.kwargs["SWAP"] is True, kernel
    monkeypatch.setenv("GPTOSS_MOE_CONFIG", "64,128,64,8,3,0")
    (config,) = moe_kernel._pruner("down_bwd")([], {}, UPCAST=False)
    assert moe_kernel.tile_of(config) == (64, 128, 64, 8, 3) and "SWAP" not in config.kwargs


def test_a_long_prefill_is_tuned_apart_from_a_training_row():
    # a key is tuned at its first launch: the 20b row of 2,048 tokens (256 pairs an expert) and longer
    # prefills fall in buckets of their own, with the same tiles to choose from
    rows = [moe_kernel.rows_bucket(pairs, 32) for pairs in (4, 64, 512, 2048, 8192, 8196, 16384, 65536)]
    assert rows == [16, 16, 16, 64, 256, 1024, 1024, 1024]
    assert moe_kernel.rows_bucket(4 * 2048, 128) == 64  # 120b's 128 experts: 64 pairs each
    for table in (*moe_kernel.CONFIGS.values(), moe_kernel.FP32_CONFIGS):
        assert sorted(table) == [16, 64, 256, 1024] and table[1024] == table[256]
    for kernel in moe_kernel.KERNELS.values():
        assert "ROWS" in kernel.keys


def test_a_tile_left_out_with_the_update_is_tried_only_without_it(monkeypatch):
    # WITHOUT_ADD: tiles that spill with the LoRA update in the epilogue are tried by the other launches
    # only (the compile gate compiles what this pruner lets through, so a leak there fails the gate too)
    monkeypatch.setattr(moe_kernel, "INTERPRET", False)  # the table a GPU launch prunes, not the interpreter's
    assert moe_kernel.WITHOUT_ADD
    for kernel, tiles in moe_kernel.WITHOUT_ADD.items():
        prune = moe_kernel._pruner(kernel)
        for rows, table in moe_kernel.CONFIGS[kernel].items():
            plain = [moe_kernel.tile_of(c) for c in prune([], {"ROWS": rows}, UPCAST=False, ADD=False)]
            added = [moe_kernel.tile_of(c) for c in prune([], {"ROWS": rows}, UPCAST=False, ADD=True)]
            assert plain == [tuple(t) for t in table], (kernel, rows)
            assert added == [t for t in plain if t not in tiles], (kernel, rows)
        assert all(any(t in table for table in moe_kernel.CONFIGS[kernel].values()) for t in tiles), kernel


def test_chosen_tiles_reports_each_launch_and_only_fresh_timings(monkeypatch):
    # what bench_moe records of the autotuners: the tile each kernel launched last, and the timings of
    # the tiles it compared only where that choice was made during the measured call
    for kernel in moe_kernel.KERNELS.values():
        monkeypatch.setattr(kernel, "best_config", None, raising=False)
        monkeypatch.setattr(kernel, "cache", {})
    assert moe_kernel.chosen_tiles() == {}
    before = moe_kernel.autotuned()
    experts = _experts(4, 64, 64, torch.float32)
    x = torch.randn(6, 64)
    routing = route_kernel(torch.randn(6, 4), 2)
    _apply(x, torch.softmax(torch.randn(6, 2), -1), routing, experts)  # the forward: gate_up and down
    chosen = moe_kernel.chosen_tiles(since=before)
    assert set(chosen) == {"gate_up", "down"}
    assert all(v["tile"] == moe_kernel.INTERPRET_CONFIG for v in chosen.values())
    gate_up = moe_kernel.KERNELS["gate_up"]
    timed = {moe_kernel._config(64, 128, 64, 8, 3, 1): [0.25], moe_kernel._config(64, 128, 64, 8, 3): [0.5]}
    monkeypatch.setattr(gate_up, "configs_timings", timed, raising=False)
    assert moe_kernel.chosen_tiles(since=before)["gate_up"]["ms"] == {"64-128-64-8-3-1": 0.25, "64-128-64-8-3": 0.5}
    assert moe_kernel.chosen_tiles(since=moe_kernel.autotuned())["gate_up"]["ms"] == {}  # chosen before: not fresh


@pytest.mark.parametrize(
    "launch, expected",
    [
        (lambda w1, w2, r, g: moe_kernel.moe_gate_up_fwd(torch.zeros(6, 96), r, w1, 1.702, 7.0, save=False), 64),
        (lambda w1, w2, r, g: moe_kernel.moe_gate_up_fwd(torch.zeros(6, 0), r, w1, 1.702, 7.0, save=False), 64),
        (lambda w1, w2, r, g: moe_kernel.moe_gate_up_fwd(torch.zeros(6, 64, 1), r, w1, 1.702, 7.0, save=False), 64),
        (lambda w1, w2, r, g: moe_kernel.moe_down_fwd(torch.zeros(12, 32), r, g, w2), 64),
        (
            lambda w1, w2, r, g: moe_kernel.moe_down_bwd(torch.zeros(6, 65), r, g, w2, torch.zeros(12, 128), 1.7, 7.0),
            64,
        ),
        (lambda w1, w2, r, g: moe_kernel.moe_gate_up_bwd(torch.zeros(12, 64), r, w1), 128),
    ],
)
def test_activations_of_the_wrong_width_are_refused_before_a_launch(launch, expected):
    # the kernels would read past each row (or, at width 0, promise the compiler a loop that never runs)
    experts = _experts(5, 64, 64, torch.float32)
    w1, w2 = moe_kernel.expert_weights(experts)
    routing = route_kernel(torch.randn(6, 5), 2)
    with pytest.raises(ValueError, match=rf"expected activations \[rows, {expected}\] for experts of"):
        launch(w1, w2, routing, torch.rand(12))

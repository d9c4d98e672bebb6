"""KV-cache generation: cached logits equal a full recompute, greedy equals an argmax loop, ragged
batches equal single prompts, stop tokens, bad input."""

import pytest
import torch
from conftest import small_config

from gptoss import load_model
from gptoss.generate import KVCache, generate
from gptoss.synthetic import write_checkpoint

CONFIG = small_config(sliding_window=5)  # sequences below are more than three windows long


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen")
    write_checkpoint(folder, CONFIG, "hf-mxfp4", seed=11)
    return load_model(folder, dtype=torch.float32)


def _full_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]))[0]  # [T, V]


def test_cached_logits_equal_full_recompute_every_step_ragged(model):
    seqs = [torch.randint(0, 300, (23,)).tolist(), torch.randint(0, 300, (9,)).tolist()]
    prompt_lens = [17, 3]  # prefill these, then feed the rest one token per step
    B, width = 2, max(prompt_lens)
    ids = torch.zeros(B, width, dtype=torch.long)
    pos = torch.full((B, width), -1)
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):  # left-padded, as generate does
        ids[b, width - n :] = torch.tensor(s[:n])
        pos[b, width - n :] = torch.arange(n)
    cache = KVCache(CONFIG, B, width + 6, torch.float32)
    full = [_full_logits(model, s) for s in seqs]
    with torch.no_grad():
        logits = model(ids, pos, cache)
        for b, n in enumerate(prompt_lens):  # every prompt position, not only the last
            assert torch.allclose(logits[b, width - n :], full[b][:n], atol=1e-5)
        for step in range(6):
            step_ids = torch.tensor([[seqs[b][prompt_lens[b] + step]] for b in range(B)])
            step_pos = torch.tensor([[prompt_lens[b] + step] for b in range(B)])
            out = model(step_ids, step_pos, cache)[:, 0]
            for b in range(B):
                err = (out[b] - full[b][prompt_lens[b] + step]).abs().max().item()
                assert err < 1e-5, f"sequence {b}, step {step}: cached vs full logits differ by {err:.2e}"


def test_greedy_generate_equals_argmax_loop(model):
    prompt = torch.randint(0, 300, (7,)).tolist()
    seq = list(prompt)
    for _ in range(14):  # past two windows of generated tokens
        seq.append(int(_full_logits(model, seq)[-1].argmax()))
    got = generate(model, [prompt], max_new_tokens=14, temperature=0.0, stop_tokens=())
    assert got == [seq[len(prompt) :]]


def test_ragged_batch_gives_each_prompt_its_own_tokens(model):
    prompts = [torch.randint(0, 300, (n,)).tolist() for n in (1, 12, 5)]
    alone = [generate(model, [p], max_new_tokens=9, temperature=0.0, stop_tokens=())[0] for p in prompts]
    together = generate(model, prompts, max_new_tokens=9, temperature=0.0, stop_tokens=())
    assert together == alone


def test_each_sequence_stops_on_its_own(model):
    prompts = [[1, 2, 3], [40, 50]]
    free = generate(model, prompts, max_new_tokens=8, temperature=0.0, stop_tokens=())
    stop = free[0][2]
    assert stop not in free[1] and stop not in free[0][:2], "pick another seed: the stop token is ambiguous"
    seen = []
    got = generate(
        model,
        prompts,
        max_new_tokens=8,
        temperature=0.0,
        stop_tokens=(stop,),
        on_token=lambda b, t: seen.append((b, t)),
    )
    assert got[0] == free[0][:3]  # stops at, and keeps, the stop token
    assert got[1] == free[1]  # the other sequence runs to its budget
    assert [t for b, t in seen if b == 0] == got[0] and [t for b, t in seen if b == 1] == got[1]


def test_default_stops_are_return_and_call_not_end():
    import inspect

    from gptoss.harmony import get_encoding

    default = inspect.signature(generate).parameters["stop_tokens"].default
    assert set(default) == set(get_encoding().stop_tokens_for_assistant_actions()) == {200002, 200012}
    assert 200007 not in default  # <|end|> separates analysis from the final answer


def test_sampling_is_seeded_and_respects_top_k(model):
    a = generate(model, [[5, 6]], max_new_tokens=6, seed=3, stop_tokens=())
    b = generate(model, [[5, 6]], max_new_tokens=6, seed=3, stop_tokens=())
    assert a == b
    top1 = generate(model, [[5, 6]], max_new_tokens=6, seed=3, top_k=1, stop_tokens=())
    assert top1 == generate(model, [[5, 6]], max_new_tokens=6, temperature=0.0, stop_tokens=())


def test_cache_memory_matches_the_documented_figure():
    from gptoss import get_preset

    config = get_preset("gpt-oss-20b")
    cache = KVCache(config, batch=1, max_tokens=1000, dtype=torch.bfloat16, device="meta")
    # 12 full layers x 2 KiB per token, plus 12 sliding layers x 128 slots x 2 KiB
    assert cache.nbytes() == 12 * 1000 * 2048 + 12 * 128 * 2048


@pytest.mark.parametrize("read_every", [1, 3, 16])
def test_greedy_on_the_device_reads_the_host_once_per_stretch(model, monkeypatch, read_every):
    """Static (and graph) greedy decoding picks tokens on the device and reads them every `read_every`
    steps: the same tokens, stops and on_token calls as the per-token host loop (dynamic), with
    ceil(n / read_every) reads of the device instead of n."""
    prompts = [[1, 2, 3], [40, 50]]
    free = generate(model, prompts, max_new_tokens=10, temperature=0.0, stop_tokens=(), decode="dynamic")
    stop = free[0][4]  # inside the first stretch of 16, in the second of 3
    assert stop not in free[1] and stop not in free[0][:4], "pick another seed: the stop token is ambiguous"
    host, seen_host = [], []
    host = generate(
        model,
        prompts,
        max_new_tokens=10,
        temperature=0.0,
        stop_tokens=(stop,),
        decode="dynamic",
        on_token=lambda b, t: seen_host.append((b, t)),
    )
    reads, seen = [], []
    tolist = torch.Tensor.tolist

    def counted(t):
        reads.append(tuple(t.shape))
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    got = generate(
        model,
        prompts,
        max_new_tokens=10,
        temperature=0.0,
        stop_tokens=(stop,),
        decode="static",
        read_every=read_every,
        on_token=lambda b, t: seen.append((b, t)),
    )
    assert got == host and got[0] == free[0][:5] and got[1] == free[1]
    assert sorted(seen) == sorted(seen_host)
    # the token reads ([B, n] blocks; the torch backend's MoE also reads its expert counts, 1-D, which the
    # Triton backend does on the device): sequence 1 runs to 10, so every stretch is read, once
    token_reads = [r for r in reads if r[0] == len(prompts) and len(r) == 2]
    assert len(token_reads) == -(-10 // read_every), reads


@pytest.mark.parametrize(
    "prompts, kwargs, error",
    [
        ([[1] * 60], dict(max_new_tokens=10), "exceeds the context of 64"),
        ([[1]], dict(max_new_tokens=4, read_every=0), "read_every"),
        ([[1]], dict(max_new_tokens=4, read_every=-3), "read_every"),
        ([[1]], dict(max_new_tokens=4, read_every=2.5), "read_every"),
        ([[1, 2], []], dict(max_new_tokens=4), "prompt 1 is empty"),
        ([[1, 300]], dict(max_new_tokens=4), r"outside \[0, 300\)"),
        ([], dict(max_new_tokens=4), "non-empty list"),
        ([[1]], dict(max_new_tokens=4, top_p=0.0), "top_p"),
    ],
)
def test_bad_input(tmp_path, prompts, kwargs, error):
    from gptoss.model import GptOss

    model = GptOss(small_config(max_position_embeddings=64), quantized=False)
    with pytest.raises(ValueError, match=error):
        generate(model, prompts, **kwargs)


@pytest.mark.parametrize("native_on", [True, False])
def test_decode_buffers_made_in_inference_mode_do_not_break_later_no_grad_passes(tmp_path, monkeypatch, native_on):
    # generate() runs under torch.inference_mode; a long prompt sends more than FUSED_ROWS rows to an
    # expert, which the CPU fast path decodes once into a reused buffer (native or torch decoding). A
    # later torch.no_grad() forward (the trainer's eval) must not try to write into those inference tensors.
    from gptoss import native
    from gptoss.cpu import FUSED_ROWS, MXFP4Experts

    if not native_on:
        monkeypatch.setattr(native, "available", lambda: False)
    folder = write_checkpoint(tmp_path / "c", small_config(max_position_embeddings=256), "hf-mxfp4", seed=1)
    model = load_model(folder, dequantize=False, prepack="auto")
    assert isinstance(model.model.layers[0].mlp.experts, MXFP4Experts)
    prompt = list(range(1, 2 * FUSED_ROWS + 40))  # 7 experts, 3 per token: some expert gets > FUSED_ROWS rows
    generate(model, [prompt], max_new_tokens=2, temperature=0.0, stop_tokens=())
    buffers = [b for layer in model.model.layers for b in layer.mlp.experts.buffers["gate_up_proj"].values()]
    assert buffers and all(b.is_inference() for b in buffers)  # made under inference_mode, as in a fresh process
    assert len({id(layer.mlp.experts.buffers) for layer in model.model.layers}) == 1  # one set for all layers
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([prompt]))).all()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4], list(range(1, 14))]  # ragged; 12 new tokens wrap the 5-slot ring


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_gives_the_same_greedy_tokens(model, dtype):
    m = model.to(dtype)
    try:
        dynamic = generate(m, PROMPTS, max_new_tokens=12, temperature=0.0, stop_tokens=(), decode="dynamic")
        static = generate(m, PROMPTS, max_new_tokens=12, temperature=0.0, stop_tokens=(), decode="static")
    finally:
        model.float()
    assert static == dynamic and all(len(o) == 12 for o in static)


def test_static_step_keeps_every_shape_and_writes_at_the_device_column(model):
    cache = KVCache(CONFIG, 2, 10, torch.float32, static=True)
    ids = torch.tensor([[1, 2, 3], [0, 4, 5]])
    pos = torch.tensor([[0, 1, 2], [-1, 0, 1]])
    import sys

    step = sys.modules["gptoss.generate"].decode_step
    with torch.no_grad():
        model(ids, pos, cache)
        cache.column.fill_(3)
        shapes = None
        for t in range(7):
            logits = step(model, torch.tensor([[6], [7]]), torch.tensor([[3 + t], [2 + t]]), cache)
            now = [(c.k.shape, c.k.data_ptr(), c.pos.shape) for c in cache.layers]
            assert shapes is None or now == shapes  # nothing reallocated, nothing resized
            shapes = now
    assert logits.shape == (2, CONFIG.vocab_size) and int(cache.column) == 10
    full = cache.layers[CONFIG.layer_types.index("full_attention")]
    assert full.pos[0].tolist() == list(range(10)) and full.pos[1].tolist() == [-1, *range(9)]
    ring = cache.layers[CONFIG.layer_types.index("sliding_attention")]
    assert sorted(ring.pos[0].tolist()) == [5, 6, 7, 8, 9]  # the window's 5 newest, at position % 5


def test_compiled_static_step_gives_the_same_greedy_tokens(model, monkeypatch):
    # torch.compile of the static step: the stand-in on the CPU for the CUDA graph (tests/test_gpu.py
    # captures the real one). The torch MoE reads its expert runs on the host, so here it breaks the graph.
    import sys

    module = sys.modules["gptoss.generate"]
    expected = generate(model, PROMPTS, max_new_tokens=6, temperature=0.0, stop_tokens=(), decode="dynamic")
    torch._dynamo.reset()
    monkeypatch.setattr(module, "decode_step", torch.compile(module.decode_step, backend="eager"))
    assert generate(model, PROMPTS, max_new_tokens=6, temperature=0.0, stop_tokens=(), decode="static") == expected
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "decode,error",
    [
        ("fast", "decode must be one of"),
        ("graph", "needs a CUDA device"),
        ("", "decode must be one of"),
        (None, "decode must be one of"),
    ],
)
def test_bad_decode_mode_is_explained(model, decode, error):
    with pytest.raises(ValueError, match=error):
        generate(model, [[1, 2]], max_new_tokens=2, decode=decode)


# --- sampling on the device -----------------------------------------------------------------------------


@pytest.mark.parametrize("read_every", [1, 3, 16])
def test_sampling_gives_the_same_tokens_on_the_device_and_per_step(model, monkeypatch, read_every):
    """A seeded sample: static decoding (tokens drawn on the device, read every `read_every` steps) gives
    the tokens of dynamic decoding (read every step), and reads the device ceil(n / read_every) times."""
    prompts, settings = [[1, 2, 3], [40, 50]], dict(temperature=0.9, top_p=0.9, top_k=50, seed=7)
    host = generate(model, prompts, max_new_tokens=10, stop_tokens=(), decode="dynamic", **settings)
    assert host != generate(model, prompts, max_new_tokens=10, stop_tokens=(), decode="dynamic", temperature=0.0)
    reads = []
    tolist = torch.Tensor.tolist

    def counted(t):
        reads.append(tuple(t.shape))
        return tolist(t)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    got = generate(
        model, prompts, max_new_tokens=10, stop_tokens=(), decode="static", read_every=read_every, **settings
    )
    assert got == host
    assert len([r for r in reads if len(r) == 2 and r[0] == 2]) == -(-10 // read_every), reads  # [B, n] blocks


def test_sample_rows_draws_from_the_softmax_and_honours_top_k_and_top_p():
    from gptoss.generate import row_seeds, sample_rows

    n = 20000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -30.0]).expand(n, 5)
    seeds = row_seeds(123, n, "cpu")
    want = torch.softmax(logits[0] / 0.7, -1)
    got = torch.bincount(sample_rows(logits, 0.7, 1.0, 0, seeds, step=4).view(-1), minlength=5) / n
    # 20,000 draws: a standard error of at most 0.0035 per frequency; 0.015 is over four of them
    assert (got - want).abs().max() < 0.015, (got, want)
    assert set(sample_rows(logits, 5.0, 1.0, 2, seeds, step=4).view(-1).tolist()) == {0, 1}  # top-2
    # top_p 0.6 at temperature 1: p = 0.64, 0.24, ... so the nucleus is token 0 alone
    assert set(sample_rows(logits, 1.0, 0.6, 0, seeds, step=4).view(-1).tolist()) == {0}
    assert torch.equal(sample_rows(logits, 0.0, 0.5, 3, seeds, step=4), torch.zeros(n, 1, dtype=torch.long))


def test_the_noise_of_a_row_depends_on_its_seed_and_step_only():
    from gptoss.generate import gumbel_noise, row_seeds

    alone = gumbel_noise(torch.tensor([41]), 3, 300)
    batch = gumbel_noise(row_seeds(40, 3, "cpu"), 3, 300)
    assert torch.equal(batch[1], alone[0])  # the same in any batch
    assert not torch.equal(gumbel_noise(torch.tensor([41]), 4, 300), alone)  # another step
    assert not torch.equal(batch[0], batch[1])  # another sequence
    torch.manual_seed(5)
    a = row_seeds(None, 2, "cpu")
    torch.manual_seed(5)
    assert torch.equal(a, row_seeds(None, 2, "cpu"))  # unseeded: torch.manual_seed repeats it


def test_sampling_on_the_device_never_waits_for_the_host():
    from gptoss.generate import row_seeds, sample_rows
    from gptoss.launches import LaunchCounter

    logits, seeds = torch.randn(3, 300), row_seeds(1, 3, "cpu")
    with LaunchCounter() as counted:
        sample_rows(logits, 0.8, 0.9, 40, seeds, step=2)
    assert counted.torch and not counted.syncs, counted.torch
    with LaunchCounter() as counted:
        int(sample_rows(logits, 0.8, 0.9, 40, seeds, step=2)[0])  # the counter sees a read when there is one
    assert counted.syncs == ["_local_scalar_dense"]

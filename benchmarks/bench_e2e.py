"""End to end, side by side in one process on the same checkpoint: our torch path (and Triton on a
GPU), Hugging Face transformers' GptOssForCausalLM, and OpenAI's reference when importable.

    python benchmarks/bench_e2e.py --quick        # tiny config, about a minute on a 2-core CPU
    python benchmarks/bench_e2e.py                # tiny, mid and the full gpt-oss-20b shape

Per implementation and config: load time, prefill tokens/s (one prompt), greedy decode tokens/s at
batch 1 and batch 8 (each implementation's own KV-cache generation), and peak resident memory
(sampled every 10 ms during that implementation's load and runs). Checkpoints are synthetic, in the
HF MXFP4 layout, in ~/.cache/gptoss; transformers reads them with its MXFP4 loader (on the CPU it
dequantizes the experts to bf16). An implementation that cannot fit a config in this machine's
memory is reported as such. It also measures the memory read bandwidth and prints the decode rate
that bandwidth allows for the gpt-oss-20b shape (bytes read per token from the config).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from results import RESULTS_DIR, PeakRSS, machine, plot, record, table

from gptoss import get_preset, load_model
from gptoss.config import ModelConfig
from gptoss.generate import generate
from gptoss.synthetic import cached_checkpoint


def read_bandwidth_gbs() -> float:
    """Best of 5 full reads of a 1 GiB tensor (sum): the machine's memory read bandwidth."""
    x = torch.ones(2**28, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


def bytes_per_token(c: ModelConfig) -> float:
    """Weights read to decode one token at batch 1 (performance anchors, section 1.4): k experts
    (MXFP4 + bf16 biases), attention and router (bf16) per layer, and the bf16 unembedding."""
    D, I = c.hidden_size, c.intermediate_size
    expert = 3 * I * D * 4.25 / 8 + (2 * I + D) * 2
    attention = ((c.q_dim + 2 * c.kv_dim) * (D + 1) + (c.q_dim + 1) * D + c.num_attention_heads) * 2
    router = c.num_local_experts * (D + 1) * 2
    return c.num_hidden_layers * (c.num_experts_per_tok * expert + attention + router) + c.vocab_size * D * 2


def dense_bf16_bytes(c: ModelConfig) -> float:
    return c.num_params()[0] * 2


def available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def run_ours(folder, config, backend, prompt_len, new_tokens, device):
    with PeakRSS() as mem:
        start = time.perf_counter()
        model = load_model(folder, device=device, backend=backend)
        load_s = time.perf_counter() - start
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 199_000, (8, prompt_len), generator=gen).tolist()
        generate(model, prompt[:1], max_new_tokens=2, temperature=0.0, stop_tokens=())  # warm-up
        s1, s8 = {}, {}
        generate(model, prompt[:1], max_new_tokens=new_tokens, temperature=0.0, stop_tokens=(), stats=s1)
        generate(model, prompt, max_new_tokens=new_tokens, temperature=0.0, stop_tokens=(), stats=s8)
    return {
        "load_s": load_s,
        "prefill_tok_s": s1["prefill_tokens"] / s1["prefill_s"],
        "decode_tok_s": s1["decode_tokens"] / s1["decode_s"],
        "decode_b8_tok_s": s8["decode_tokens"] / s8["decode_s"],
        "peak_rss_gb": mem.gb,
        "peak_anon_gb": mem.anon_gb,
    }


def run_transformers(folder, config, prompt_len, new_tokens, device):
    from transformers import GptOssForCausalLM, Mxfp4Config

    need = dense_bf16_bytes(config) / 1e9
    if device == "cpu" and need > 0.9 * available_gb():
        return {
            "note": f"cannot load: dequantizes MXFP4 to bf16 on the CPU, ~{need:.0f} GB > {available_gb():.0f} GB available"
        }
    with PeakRSS() as mem:
        start = time.perf_counter()
        model = GptOssForCausalLM.from_pretrained(
            folder, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.bfloat16
        )
        model = model.to(device).eval()
        load_s = time.perf_counter() - start
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 199_000, (8, prompt_len), generator=gen).to(device)
        kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

        def timed(batch, n):
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(batch, max_new_tokens=n, min_new_tokens=n, **kwargs)
            return time.perf_counter() - start

        timed(prompt[:1], 2)  # warm-up
        t1, tn = timed(prompt[:1], 1), timed(prompt[:1], new_tokens + 1)  # prefill + first token; + decode
        b1, bn = timed(prompt, 1), timed(prompt, new_tokens + 1)
    return {
        "load_s": load_s,
        "prefill_tok_s": prompt_len / t1,
        "decode_tok_s": new_tokens / max(tn - t1, 1e-9),
        "decode_b8_tok_s": 8 * new_tokens / max(bn - b1, 1e-9),
        "peak_rss_gb": mem.gb,
        "peak_anon_gb": mem.anon_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny config only, short prompts (about a minute on 2 cores)"
    )
    parser.add_argument("--configs", default=None, help="comma-separated presets (default: tiny,mid,gpt-oss-20b)")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    names = (args.configs or ("tiny" if args.quick else "tiny,mid,gpt-oss-20b")).split(",")
    shape = {"tiny": (64, 32), "mid": (64, 16), "gpt-oss-20b": (16, 3)}  # prompt tokens, new tokens
    if args.quick:
        shape = {n: (32, 8) for n in names}
    rows = []
    for name in names:
        config = get_preset(name)
        folder = cached_checkpoint(name, "hf-mxfp4", progress=True)
        prompt_len, new_tokens = shape.get(name, (32, 8))
        impls = {"gptoss-torch": lambda: run_ours(folder, config, "torch", prompt_len, new_tokens, device)}
        if gpu:
            impls["gptoss-triton"] = lambda: run_ours(folder, config, "triton", prompt_len, new_tokens, device)
        impls["transformers"] = lambda: run_transformers(folder, config, prompt_len, new_tokens, device)
        for impl, fn in impls.items():
            print(f"{name}: {impl} ...", flush=True)
            try:
                result = fn()
            except (MemoryError, RuntimeError) as e:
                result = {"note": f"failed: {type(e).__name__}: {str(e)[:120]}"}
            gc.collect()
            rows.append({"impl": impl, "config": name, "prompt_tokens": prompt_len, "new_tokens": new_tokens, **result})
        try:
            import gpt_oss.torch.model  # noqa: F401

            note = "importable, but not wired into this benchmark yet"
        except ImportError:
            note = "not importable here (pip install gpt-oss; its torch reference needs CUDA)"
        rows.append({"impl": "openai-reference", "config": name, "note": note})

    cols = [
        "impl",
        "config",
        "load_s",
        "prefill_tok_s",
        "decode_tok_s",
        "decode_b8_tok_s",
        "peak_rss_gb",
        "peak_anon_gb",
        "note",
    ]
    print(table(rows, cols))
    ours = {r["config"]: r for r in rows if r["impl"] == "gptoss-torch"}
    for r in rows:
        if r["impl"] == "transformers" and "decode_tok_s" in r:
            o = ours[r["config"]]
            print(f"{r['config']}: ours / transformers = prefill {o['prefill_tok_s'] / r['prefill_tok_s']:.2f}x, "
                  f"decode b1 {o['decode_tok_s'] / r['decode_tok_s']:.2f}x, decode b8 {o['decode_b8_tok_s'] / r['decode_b8_tok_s']:.2f}x")  # fmt: skip
    bw = read_bandwidth_gbs()
    per_token = bytes_per_token(get_preset("gpt-oss-20b"))
    bound = bw * 1e9 / per_token
    line = f"memory read bandwidth {bw:.1f} GB/s; gpt-oss-20b reads {per_token / 1e9:.2f} GB per decoded token -> bound {bound:.2f} tok/s"
    if "gpt-oss-20b" in ours and "decode_tok_s" in ours["gpt-oss-20b"]:
        line += f"; ours {ours['gpt-oss-20b']['decode_tok_s']:.3f} tok/s = {ours['gpt-oss-20b']['decode_tok_s'] / bound:.1%} of it"
    print(line)
    if not gpu:
        print("no CUDA device: CPU figures only; the Triton path's GPU figures were not taken")
    print(f"machine: {machine()}")
    record("e2e", rows, bandwidth_gbs=bw, bytes_per_token_20b=per_token)
    plot(
        [r for r in rows if "decode_tok_s" in r],
        "config",
        "decode_tok_s",
        "impl",
        RESULTS_DIR / "e2e.png",
        f"decode tok/s, batch 1, {device}",
        logx=False,
    )
    keys = ("impl", "config", "prefill_tok_s", "decode_tok_s", "load_s", "peak_rss_gb")
    print(json.dumps({"bench": "e2e", "results": [{k: r.get(k) for k in keys} for r in rows]}))


if __name__ == "__main__":
    main()

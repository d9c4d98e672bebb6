"""End to end, side by side in one process on the same checkpoint: our torch path (and Triton on a
GPU), Hugging Face transformers' GptOssForCausalLM, and OpenAI's reference when importable.

    python benchmarks/bench_e2e.py --quick        # tiny config, about a minute on a 2-core CPU
    python benchmarks/bench_e2e.py                # tiny, mid and the full gpt-oss-20b shape

Implementations: `gptoss-torch`, the reference path as loaded by default (MXFP4 experts decoded on
every use); `gptoss-cpu`, the CPU fast path (`load_model(dequantize="auto", prepack="auto")`: experts
decoded once at load when they fit in half the free memory, and then weights prepacked for oneDNN; the
generate/chat commands' default on a CPU); `gptoss-triton` on a GPU (the model's own path on the Triton
attention and MoE kernels, about 55 launches a layer, each decode step a replayed CUDA graph) and
`gptoss-triton-fused` (decode steps on the fused kernels of gptoss.kernels.decode, seven launches a
layer); transformers.

Per implementation and config: load time, prefill tokens/s (one prompt), greedy decode tokens/s at
batch 1 and batch 8 (each implementation's own KV-cache generation), and peak resident memory
(sampled every 10 ms during that implementation's load and runs). Checkpoints are synthetic, in the
HF MXFP4 layout, in ~/.cache/gptoss; transformers reads them with its MXFP4 loader (on the CPU it
dequantizes the experts to bf16). An implementation that cannot fit a config in this machine's
memory is reported as such. It also measures the memory read bandwidth and prints the decode rate
that bandwidth allows for the gpt-oss-20b shape (bytes read per token from the config). On a shared
CPU machine that bandwidth moves with the neighbours' load (35 to 70 GB/s within minutes on the 2-core
VM), so on the CPU the gpt-oss-20b batch-1 runs (three) are each bracketed by bandwidth probes, and
each run's decode rate is printed against the bound of its own moment (`decode_runs` in the JSON).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import time

import torch
from results import RESULTS_DIR, PeakRSS, machine, plot, record, table, time_ms

from gptoss import get_preset, load_model
from gptoss.config import ModelConfig
from gptoss.cpu import PackedLinear
from gptoss.generate import generate
from gptoss.load import available_memory
from gptoss.synthetic import cached_checkpoint, random_model


def read_bandwidth_gbs(device: str = "cpu") -> float:
    """The memory read bandwidth of `device` over 1 GiB (far larger than any cache): on a GPU a sum
    (the median of Triton's timing); on the CPU the best of 5 of a torch sum and, where the native
    kernels are built, of their bf16 matrix-vector product over a [2^19, 1024] weight, which streams
    faster than torch's reductions do (on this 2-core VM about 58 against 34 GB/s): the higher figure,
    so that the bound is not flattered."""
    x = torch.ones(2**28, dtype=torch.float32, device=device)
    if device != "cpu":
        return x.nbytes / (time_ms(x.sum)["ms"] / 1e3) / 1e9
    probes = [x.sum]
    from gptoss import native

    if native.bf16_dot():
        w, v = x.view(torch.bfloat16).view(2**19, 1024), torch.ones(1, 1024, dtype=torch.bfloat16)
        probes.append(lambda: native.bf16_linear(v, w))
    best = float("inf")
    for probe in probes:
        for _ in range(5):
            start = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - start)
    return x.nbytes / best / 1e9


# each figure is the best of this many runs (a shared machine: the best run is the least disturbed);
# 3 by default, 5 for the tiny shape (runs of milliseconds), once for gpt-oss-20b (runs of minutes)
REPEATS = {"tiny": 5, "gpt-oss-20b": 1, "gpt-oss-120b": 1}


def bytes_per_token(c: ModelConfig) -> float:
    """Weights read to decode one token at batch 1 (performance anchors, section 1.4): k experts
    (MXFP4 + bf16 biases), attention and router (bf16) per layer, and the bf16 unembedding."""
    expert = c.expert_weight_params * 4.25 / 8 + c.expert_bias_params * 2
    layer = c.num_experts_per_tok * expert + (c.attention_params + c.router_params) * 2
    return c.num_hidden_layers * layer + c.vocab_size * c.hidden_size * 2


LAUNCH_FLOOR_US = 2.0  # what a kernel costs at least on Hopper, inside a CUDA graph (gpu-decode-analysis.md: ~1.8)


def step_profile(model, fused: bool | None, top: int = 8) -> dict:
    """One batch-1 decode step (static cache, the step decode="graph" replays), counted: the kernels it
    launches (PyTorch dispatcher kernels plus Triton launches: gptoss.launches) per token and per layer,
    and the host synchronisations inside it. On a GPU also the kernels one replay of a token's CUDA graph
    runs (the step, the greedy pick and the feedback, as generate(decode="graph") records it: TokenStep;
    its kernel nodes, from torch.profiler) and the replay's top kernels by device time."""
    from gptoss.generate import KVCache, TokenStep, decode_step, row_seeds, sample_rows
    from gptoss.launches import LaunchCounter

    config, device = model.config, model.device
    cache = KVCache(config, 1, 64, model.dtype, device, static=True)
    ids, pos = torch.tensor([[5]], device=device), torch.tensor([[0]], device=device)
    with torch.inference_mode():
        model(ids, pos, cache, last_only=True)
        cache.column.fill_(1)
        with LaunchCounter() as counted:
            decode_step(model, ids, pos + 1, cache, fused)
        kernels = len(counted.torch) + len(counted.triton)
        out = {
            "kernels_per_token": kernels,
            "kernels_per_layer": round(kernels / config.num_hidden_layers, 2),
            "triton_per_token": len(counted.triton),
            "syncs_per_token": len(counted.syncs),
        }
        if device.type == "cuda":  # one greedy token as generate(decode="graph") makes it: step and pick
            made = torch.zeros(1, 4, dtype=torch.long, device=device)
            pick = functools.partial(sample_rows, temperature=0.0, top_p=1.0, top_k=0, seeds=row_seeds(0, 1, device))
            token = TokenStep(model, cache, ids, pos + 2, made, pick, fused, graph=True)
            token()  # runs once and records the graph
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                token()
                torch.cuda.synchronize()
            events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            names = {}
            for e in events:
                n, us = names.get(e.name, (0, 0.0))
                names[e.name] = (n + 1, us + e.device_time)
            out["graph_kernels"] = len(events)
            out["replay_top_kernels"] = [
                {"kernel": name[:80], "count": n, "us": round(us, 1)}
                for name, (n, us) in sorted(names.items(), key=lambda kv: -kv[1][1])[:top]
            ]
    return out


def predicted_step_ms(kernels: int, config: ModelConfig, bandwidth_gbs: float) -> float:
    """The static table's decode step time: every kernel's floor plus the bytes at the bandwidth."""
    return kernels * LAUNCH_FLOOR_US / 1000 + bytes_per_token(config) / (bandwidth_gbs * 1e9) * 1000


def dense_bf16_bytes(c: ModelConfig) -> float:
    return c.num_params()[0] * 2


def run_ours(folder, config, backend, prompt_len, new_tokens, device, repeats, fast_cpu=False, fused=None):
    """fast_cpu: the CPU fast path (experts dense when they fit in half the free memory, then weights prepacked)."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        options = dict(dequantize="auto", prepack="auto") if fast_cpu else {}
        if folder is None:  # --random-weights: drawn on the device, no checkpoint
            model = random_model(config, device=device, backend=backend)
        else:
            model = load_model(folder, device=device, backend=backend, **options)
        kind = type(model.model.layers[0].mlp.experts).__name__
        experts = (
            "dense bf16"
            if not model.model.layers[0].mlp.experts.quantized
            else "MXFP4, native CPU kernels"
            if kind == "MXFP4Experts"
            else "MXFP4, decoded per use"
        )
        packed = isinstance(model.lm_head, PackedLinear)
        load_s = time.perf_counter() - start
        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, 199_000, (8, prompt_len), generator=gen).tolist()
        # on a GPU, warm-up at exactly the timed shapes (batch 1 and 8, the full prompt, the same number
        # of new tokens: the cache length is a launch argument Triton specialises on, so a different one
        # compiles new kernel variants, 1.5 s of a 16-token prefill on an H100): autotuning and
        # compilation happen here, never inside a timed prefill or decode. The CPU compiles nothing.
        for batch in (prompt[:1], prompt) if device == "cuda" else (prompt[:1],):
            generate(
                model,
                batch,
                max_new_tokens=new_tokens if device == "cuda" else 2,
                temperature=0.0,
                stop_tokens=(),
                fused=fused,
            )

        def run(batch, probe=False):
            stats = {}
            if probe:  # this machine's bandwidth moves with its neighbours' load: probed around each run
                with mem.pause():
                    before = read_bandwidth_gbs(device)
            generate(model, batch, max_new_tokens=new_tokens, temperature=0.0, stop_tokens=(), stats=stats, fused=fused)
            if probe:
                with mem.pause():
                    stats["bandwidth_gb_s"] = max(before, read_bandwidth_gbs(device))
            return stats

        probe = device == "cpu" and config.hidden_size >= 2880  # the full-size shapes
        s1 = [run(prompt[:1], probe) for _ in range(max(repeats, 3 if probe else 1))]
        s8 = [run(prompt) for _ in range(repeats)]
        with mem.pause():
            profile = step_profile(model, fused)
    best = max(s1, key=lambda s: s["decode_tokens"] / s["decode_s"])
    return {
        "load_s": load_s,
        "prefill_tok_s": max(s["prefill_tokens"] / s["prefill_s"] for s in s1),  # the forward pass over the prompt
        "decode_tok_s": best["decode_tokens"] / best["decode_s"],
        # the fastest batch-1 run's own bandwidth (the higher of the probes just before and after it)
        **({"bandwidth_gb_s": best["bandwidth_gb_s"]} if "bandwidth_gb_s" in best else {}),
        "decode_runs": [[s["decode_tokens"] / s["decode_s"], s.get("bandwidth_gb_s")] for s in s1],
        "decode_b8_tok_s": max(s["decode_tokens"] / s["decode_s"] for s in s8),
        "graph_setup_s": s1[-1]["graph_setup_s"],  # CUDA graph mode: the first step's warm-up and recording
        **profile,
        "peak_rss_gb": mem.gb,
        "peak_anon_gb": mem.anon_gb,
        "note": f"experts {experts}" + (", weights prepacked" if packed else "") + (", fused decode" if fused else ""),
    }


def run_transformers(folder, config, prompt_len, new_tokens, device, repeats):
    from transformers import GptOssForCausalLM, Mxfp4Config

    need = dense_bf16_bytes(config) / 1e9
    if device == "cpu" and need > 0.9 * available_memory() / 1e9:
        return {
            "note": f"cannot load: dequantizes MXFP4 to bf16 on the CPU, ~{need:.0f} GB > {available_memory() / 1e9:.0f} GB available"
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

        def timed(batch, n):  # the best of `repeats` runs
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                with torch.no_grad():
                    model.generate(batch, max_new_tokens=n, min_new_tokens=n, **kwargs)
                times.append(time.perf_counter() - start)
            return min(times)

        def prefill():  # the forward pass over the prompt, as ours is timed: a fresh cache, last logits only
            start = time.perf_counter()
            with torch.no_grad():
                model(prompt[:1], use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start

        timed(prompt[:1], 2)  # warm-up
        # decode rate: (n + 1 new tokens) - (1 new token) = n decode steps, generate()'s set-up cancels out
        t1, tn = timed(prompt[:1], 1), timed(prompt[:1], new_tokens)
        b1, bn = timed(prompt, 1), timed(prompt, new_tokens)
        prefill_s = min(prefill() for _ in range(repeats))
    new_tokens -= 1  # tokens made by decode steps (the first comes from the prefill), as ours counts them
    return {
        "load_s": load_s,
        "prefill_tok_s": prompt_len / prefill_s,
        "decode_tok_s": new_tokens / max(tn - t1, 1e-9),
        "decode_b8_tok_s": 8 * new_tokens / max(bn - b1, 1e-9),
        "peak_rss_gb": mem.gb,
        "peak_anon_gb": mem.anon_gb,
        "note": "experts dense bf16 (Mxfp4Config(dequantize=True))",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="tiny config only, short prompts (about a minute on 2 cores)"
    )
    parser.add_argument("--configs", default=None, help="comma-separated presets (default: tiny,mid,gpt-oss-20b)")
    parser.add_argument(
        "--impls", default=None, help="comma-separated implementations to run (default: all of this device's)"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="our implementations draw the model on the device (gptoss.synthetic.random_model) "
        "instead of loading a checkpoint: no disk (gpt-oss-120b's is 65 GB), load_s is the draw; "
        "transformers is not run",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        metavar="N",
        help="prompt length for every config (default: 64 for tiny and mid, 16 for gpt-oss-20b; "
        "a chat's Harmony system prompt is about 100)",
    )
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    from gptoss.config import PRESETS

    if args.configs is not None and not args.configs.strip():
        parser.error("--configs is empty: name presets, comma-separated, from " + ", ".join(PRESETS))
    names = (args.configs or ("tiny" if args.quick else "tiny,mid,gpt-oss-20b")).split(",")
    for name in names:
        if name not in PRESETS:
            parser.error(f"unknown preset {name!r} in --configs: choose from {', '.join(PRESETS)}")
    shape = {"tiny": (64, 32), "mid": (64, 16), "gpt-oss-20b": (16, 9), "gpt-oss-120b": (16, 9)}  # prompt, new
    if gpu:  # the decode step is a replayed CUDA graph there: enough steps to time it
        shape["gpt-oss-20b"] = shape["gpt-oss-120b"] = (16, 64)
    if args.quick:
        shape = {n: (32, 8) for n in names}
    known = {"gptoss-torch", "gptoss-triton", "gptoss-triton-fused", "gptoss-cpu", "transformers"}
    if args.impls is not None and (not args.impls or not set(args.impls.split(",")) <= known):
        parser.error(f"--impls takes a comma-separated list from {', '.join(sorted(known))}, got {args.impls!r}")
    here = {"gptoss-torch", "transformers"} | ({"gptoss-triton", "gptoss-triton-fused"} if gpu else {"gptoss-cpu"})
    if args.impls is not None and not set(args.impls.split(",")) & here:
        parser.error(f"--impls {args.impls} measures nothing on this {device} (it runs {', '.join(sorted(here))})")
    if args.prompt_tokens is not None:
        if not 1 <= args.prompt_tokens <= 100_000:
            parser.error(f"--prompt-tokens must be between 1 and 100000, got {args.prompt_tokens}")
        shape = {n: (args.prompt_tokens, shape.get(n, (32, 8))[1]) for n in names}
    rows = []
    for name in names:
        config = get_preset(name)
        folder = None if args.random_weights else cached_checkpoint(name, "hf-mxfp4", progress=True)
        prompt_len, new_tokens = shape.get(name, (32, 8))
        repeats = REPEATS.get(name, 3)
        impls = {"gptoss-torch": lambda: run_ours(folder, config, "torch", prompt_len, new_tokens, device, repeats)}
        if not gpu:
            impls["gptoss-cpu"] = lambda: run_ours(
                folder, config, "torch", prompt_len, new_tokens, device, repeats, True
            )
        else:
            impls["gptoss-triton"] = lambda: run_ours(
                folder, config, "triton", prompt_len, new_tokens, device, repeats, fused=False
            )
            # the same on the fused decode kernels (gptoss.kernels.decode): seven launches a layer, not ~55
            impls["gptoss-triton-fused"] = lambda: run_ours(
                folder, config, "triton", prompt_len, new_tokens, device, repeats, fused=True
            )
        if folder is not None:
            impls["transformers"] = lambda: run_transformers(folder, config, prompt_len, new_tokens, device, repeats)
        for impl, fn in impls.items():
            if args.impls and impl not in args.impls.split(","):
                continue
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
    ours = {r["config"]: r for r in rows if r["impl"] == ("gptoss-triton" if gpu else "gptoss-cpu")}
    for r in rows:
        if r["impl"] == "transformers" and "decode_tok_s" in r:
            for impl in ("gptoss-torch", "gptoss-triton", "gptoss-cpu"):
                o = next((x for x in rows if x["impl"] == impl and x["config"] == r["config"]), None)
                if o is None or "decode_tok_s" not in o:
                    continue
                print(
                    f"{r['config']}: {impl} / transformers = prefill {o['prefill_tok_s'] / r['prefill_tok_s']:.2f}x, "
                    f"decode b1 {o['decode_tok_s'] / r['decode_tok_s']:.2f}x, decode b8 {o['decode_b8_tok_s'] / r['decode_b8_tok_s']:.2f}x"
                )
    # the decode bound: weights read per token at the read bandwidth of the memory they sit in
    bw = read_bandwidth_gbs(device)
    per_token = bytes_per_token(get_preset("gpt-oss-20b"))
    bound = bw * 1e9 / per_token
    line = f"{device} memory read bandwidth {bw:.1f} GB/s; gpt-oss-20b reads {per_token / 1e9:.2f} GB per decoded token -> bound {bound:.2f} tok/s"
    if "gpt-oss-20b" in ours and "decode_tok_s" in ours["gpt-oss-20b"]:
        line += f"; ours {ours['gpt-oss-20b']['decode_tok_s']:.3f} tok/s = {ours['gpt-oss-20b']['decode_tok_s'] / bound:.1%} of it"
    print(line)
    for r in rows:  # runs that probed their own bandwidth: each decode run against the bound of its moment
        for rate, gbs in r.get("decode_runs") or []:
            if gbs:
                run_bound = gbs * 1e9 / bytes_per_token(get_preset(r["config"]))
                print(
                    f"{r['config']} {r['impl']} decode run: {rate:.2f} tok/s at {gbs:.1f} GB/s (bound {run_bound:.2f}) = {rate / run_bound:.1%}"
                )
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
    for r in rows:  # the static table's time beside the measured one: kernels x floor + bytes / bandwidth
        if "decode_tok_s" in r and "kernels_per_token" in r:
            kernels = r.get("graph_kernels", r["kernels_per_token"])
            r["predicted_step_ms"] = predicted_step_ms(kernels, get_preset(r["config"]), r.get("bandwidth_gb_s", bw))
            r["measured_step_ms"] = 1000 / r["decode_tok_s"]
            print(
                f"{r['config']} {r['impl']}: {r['kernels_per_layer']} kernels a layer ({kernels} a token"
                f"{', graph' if 'graph_kernels' in r else ''}), {r['syncs_per_token']} host syncs; step "
                f"{r['measured_step_ms']:.3f} ms measured, {r['predicted_step_ms']:.3f} ms predicted"
            )
            for k in r.get("replay_top_kernels", []):
                print(f"    {k['us']:>9.1f} us  x{k['count']:<4} {k['kernel']}")
    keys = (
        "impl",
        "config",
        "prompt_tokens",
        "prefill_tok_s",
        "decode_tok_s",
        "load_s",
        "peak_rss_gb",
        "kernels_per_token",
        "kernels_per_layer",
        "graph_kernels",
        "syncs_per_token",
        "predicted_step_ms",
        "measured_step_ms",
        "replay_top_kernels",
    )
    results = []
    for r in rows:
        result = {k: r.get(k) for k in keys}
        if "decode_tok_s" in r:  # the decode bound of this config at the bandwidth of its run, beside the rate
            result["bandwidth_gb_s"] = r.get("bandwidth_gb_s", bw)
            result["bound_tok_s"] = result["bandwidth_gb_s"] * 1e9 / bytes_per_token(get_preset(r["config"]))
            if r.get("decode_runs"):
                result["decode_runs"] = r["decode_runs"]
        results.append(result)
    print(json.dumps({"bench": "e2e", "results": results}))


if __name__ == "__main__":
    main()

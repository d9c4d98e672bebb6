"""Autoregressive generation with a KV cache: prefill the prompts, then one token per step.

Memory of the cache, per sequence: each layer keeps the keys (after RoPE) and values of
2 x num_key_value_heads x head_dim numbers per token, 2 x 8 x 64 x 2 bytes = 2 KiB in bf16 for
gpt-oss. Full-attention layers keep every token: 12 of gpt-oss-20b's 24 layers -> 24 KiB per token
(36 KiB for 120b). Sliding-window layers keep only the last `sliding_window` tokens in a ring
buffer: 12 x 128 x 2 KiB = 3 MiB per sequence, whatever the length. generate() keeps it in bf16 on
a GPU and in fp32 (twice that) on the CPU, where converting the keys every step costs more.

Ragged batches are left-padded; padding tokens get position -1, which attention never sees, so
each prompt gets the same tokens as it would alone (exactly so with greedy decoding).

Static cache and CUDA graphs. A decode step launches some thirty kernels per layer; from Python,
launch overhead alone would cost milliseconds per token. With `KVCache(..., static=True)` every
tensor of a one-token step keeps its shape and address: full layers are pre-allocated to the
requested length and attend over all their slots (empty ones hold position -1), the sliding ring is
written at column % window, and the column to write lives on the device. So the whole model's step
(embedding to logits, cache writes included) is captured once as a CUDA graph and replayed
(decode="graph", the default on CUDA with the Triton backend); the only host work per token is
copying the new ids in and picking the next tokens.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence

import torch

from gptoss.config import ModelConfig
from gptoss.errors import check_float, check_int
from gptoss.model import GptOss
from gptoss.tokens import ASSISTANT_STOP_TOKENS

PAD = 0  # any id: padded positions are masked out


class LayerCache:
    """Keys, values and their positions for one layer; a ring buffer when the layer slides.

    Stored head-major, [B, K, slots, Dh], so that attention's two matmuls read them in place
    (update() returns [B, S, K, Dh] views of them, the layout attention_with_sinks takes)."""

    def __init__(
        self, batch: int, slots: int, config: ModelConfig, ring: bool, dtype: torch.dtype, device, column=None
    ):
        K, Dh = config.num_key_value_heads, config.head_dim
        self.k = torch.zeros(batch, K, slots, Dh, dtype=dtype, device=device)  # [B, K, slots, Dh]
        self.v = torch.zeros_like(self.k)
        # -1: empty slot; int32, the attention kernels' position type (read in place, never converted per step)
        self.pos = torch.full((batch, slots), -1, dtype=torch.int32, device=device)
        self.ring, self.filled = ring, 0
        self.column = column  # static caches: the column one-token steps write, a 0-d tensor shared by all layers

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        """Add T new tokens ([B, T, K, Dh] x 2, positions [B, T]); return what attention should see."""
        B, T = k.shape[:2]
        pos = pos.expand(B, T)
        slots = self.k.shape[2]
        if self.column is not None and T == 1:  # static: write at the device-side column, attend over every slot
            slot = (self.column % slots).view(1)
            self.k.index_copy_(2, slot, k.transpose(1, 2).to(self.k.dtype))
            self.v.index_copy_(2, slot, v.transpose(1, 2).to(self.v.dtype))
            self.pos.index_copy_(1, slot, pos.to(self.pos.dtype))
            return self.k.transpose(1, 2), self.v.transpose(1, 2), self.pos
        if not self.ring:  # full attention: append
            end = self.filled + T
            self._write(slice(self.filled, end), k, v, pos)
            self.filled = end
            return self.k[:, :, :end].transpose(1, 2), self.v[:, :, :end].transpose(1, 2), self.pos[:, :end]
        if T == 1:  # one new token (decoding): it replaces the oldest, and the ring is exactly its window
            self._write(self.filled % slots, k[:, 0], v[:, 0], pos[:, 0])
            self.filled += 1
            return self.k.transpose(1, 2), self.v.transpose(1, 2), self.pos
        # several new tokens: the earlier of them still see keys they push out, so attend over the
        # ring plus all of them, then keep the newest `slots`; slot = column % slots
        seen_k = torch.cat((self.k.transpose(1, 2), k.to(self.k.dtype)), 1)  # [B, slots + T, K, Dh]
        seen_v = torch.cat((self.v.transpose(1, 2), v.to(self.v.dtype)), 1)
        seen_pos = torch.cat((self.pos, pos), 1)
        keep = min(T, slots)
        cols = torch.arange(self.filled + T - keep, self.filled + T, device=k.device) % slots
        self._write(cols, k[:, -keep:], v[:, -keep:], pos[:, -keep:])
        self.filled += T
        return seen_k, seen_v, seen_pos

    def _write(self, where, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        """Store keys/values [B, (n,) K, Dh] and positions at slot(s) `where` (an int, a slice or indices)."""
        self.k.transpose(1, 2)[:, where] = k.to(self.k.dtype)
        self.v.transpose(1, 2)[:, where] = v.to(self.v.dtype)
        self.pos[:, where] = pos.to(self.pos.dtype)


class KVCache:
    """Every layer's cache. `static=True`: one-token steps keep every shape fixed (see the header);
    a prompt is written the usual way first, then `column` is set to its length (generate does)."""

    def __init__(
        self, config: ModelConfig, batch: int, max_tokens: int, dtype: torch.dtype, device="cpu", static: bool = False
    ):
        self.column = torch.zeros((), dtype=torch.long, device=device) if static else None
        self.layers = [
            LayerCache(
                batch,
                min(config.sliding_window, max_tokens) if config.is_sliding(i) else max_tokens,
                config,
                ring=config.is_sliding(i),
                dtype=dtype,
                device=device,
                column=self.column,
            )
            for i in range(config.num_hidden_layers)
        ]

    def nbytes(self) -> int:
        return sum(c.k.nbytes + c.v.nbytes for c in self.layers)


# Off by default until a GPU run passes tests/test_gpu.py's fused-step twin. On an H200 (2026-12-04,
# gpt-oss-20b, random weights) the first fused kernels decoded 252 tok/s at batch 1 against 181 for the
# plain path (670 against 878 at batch 8), but a check in the same session found the down kernel's output
# wrong there (right under the interpreter; the other kernels right on the GPU, stage by stage). The
# expert kernels have since been rewritten (kernels/decode.py: fp32 E2M1 decode, words carried to the
# next trip, every slot's rows in one tile instead of a loop over slots) and have not run on a GPU yet.
# Pass fused=True (or raise this to 1) to use them.
FUSED_MAX_BATCH = 0


def decode_step(
    model: GptOss, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, fused: bool | None = None
) -> torch.Tensor:
    """One token per sequence through a static cache: ids, positions [B, 1] -> logits [B, V]. No host
    synchronisation and no shape that depends on the step, so a CUDA graph can capture it.

    `fused` (default: where it applies and pays) runs the layers on gptoss.kernels.decode, seven launches
    per layer: the triton backend with plain projections and MXFP4 experts without adapters (attached
    adapters take the plain path; merged ones are plain weights), at most FUSED_MAX_BATCH sequences.
    False: the plain path, the reference."""
    if fused is None:
        fused = model.backend == "triton" and ids.shape[0] <= FUSED_MAX_BATCH and _fusable(model) is None
    if fused:
        from gptoss.kernels.decode import decode_layers

        logits = model.lm_head(decode_layers(model, ids, pos, cache))  # [B, V]
    else:
        logits = model(ids, pos, cache, last_only=True, check=False)[:, -1]
    cache.column += 1
    return logits


def _fusable(model: GptOss) -> str | None:
    from gptoss.kernels.decode import fusable

    return fusable(model)


def _record(body: Callable[[], None]) -> torch.cuda.CUDAGraph:
    """Runs body() once for real on a side stream (kernel autotuning and lazy set-up happen there), then
    records it as a CUDA graph; recording runs nothing, so body's effects happen once."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


class TokenStep:
    """One decode token made on the device: decode_step at the current ids and positions [B, 1], the next
    ids picked from its logits (pick: sample_rows with the settings bound, drawing the noise of step t),
    written into made[:, t] and fed back; ids, positions and t advance in place. A call reads nothing from
    the host. graph=True: the first call runs the token and records it as a CUDA graph (_record), every
    later call replays it, so a token, sampling included, is one replay."""

    def __init__(self, model: GptOss, cache: KVCache, ids, pos, made, pick, fused: bool | None, graph: bool):
        self.model, self.cache, self.made, self.pick, self.fused = model, cache, made, pick, fused
        self.ids, self.pos = ids.clone(), pos.clone()  # [B, 1] long: fixed buffers
        self.t = torch.zeros((), dtype=torch.long, device=ids.device)  # the column of made last written
        self.use_graph, self.graph = graph, None

    def _token(self) -> None:
        logits = decode_step(self.model, self.ids, self.pos, self.cache, self.fused)
        self.t.add_(1)
        ids = self.pick(logits, step=self.t)
        self.made.index_copy_(1, self.t.view(1), ids)
        self.ids.copy_(ids)
        self.pos.add_(1)

    def __call__(self) -> None:
        if not self.use_graph:
            self._token()
        elif self.graph is None:
            self.graph = _record(self._token)
        else:
            self.graph.replay()


DECODE_MODES = ("auto", "dynamic", "static", "graph")


def _decode_mode(model: GptOss, decode: str) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    if decode == "auto":  # the torch MoE reads routing counts on the host: only the Triton path can be captured
        return "graph" if model.device.type == "cuda" and model.backend == "triton" else "dynamic"
    if decode == "graph" and (model.device.type != "cuda" or model.backend != "triton"):
        raise ValueError(
            f"decode='graph' needs a CUDA device and the triton backend, got {model.device.type} and {model.backend!r}"
        )
    return decode


_WORD = 0xFFFFFFFF


def _mix(x):
    """A bijection of 32-bit values held in int64 tensors or Python ints (a murmur-style finalizer): every
    product of a value below 2^32 by a constant below 2^31 stays below 2^63, so it is the same integer on
    every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _WORD
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _WORD
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """Gumbel noise [B, vocab] in fp32 for row seeds [B] (int64) at decode step `step`: a counter-based
    generator (hashes of seed, step and token id), so the noise of a row and step is the same whichever
    device or batch draws it and whenever it is drawn, and drawing it never waits for the host."""
    key = _mix(_mix(seeds & _WORD) ^ ((seeds >> 32) & _WORD)) ^ _mix(
        step & _WORD
    )  # a Python int: no copy to the device
    bits = _mix(_mix(key)[:, None] ^ torch.arange(vocab, device=seeds.device)[None, :])
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # (0, 1), exact in fp32
    return -torch.log(-torch.log(uniform))


def sample_rows(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, seeds: torch.Tensor, step: int
) -> torch.Tensor:
    """Token ids [B, 1] from logits [B, V], on the logits' device with no host synchronisation: greedy at
    temperature 0, else the Gumbel-max draw (argmax of logits / temperature + Gumbel noise, which picks
    token i with probability softmax(logits / temperature)_i) over the top-k logits and the smallest set
    of tokens whose probability reaches top_p. Seeds [B] int64, one per row (gumbel_noise)."""
    if temperature == 0.0:
        return logits.float().argmax(dim=-1, keepdim=True)  # fp32: argmax over a bf16 row is slow on a CPU
    z = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(z, min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = torch.softmax(z, dim=-1).sort(dim=-1, descending=True)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest set reaching top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return (z + gumbel_noise(seeds, step, z.shape[-1])).argmax(dim=-1, keepdim=True)


def row_seeds(seed: int | None, batch: int, device) -> torch.Tensor:
    """Sequence b's seed: seed + b; without a seed, a base drawn from torch's generator (torch.manual_seed
    makes it repeat)."""
    base = int(torch.randint(0, 2**62, (1,))) if seed is None else seed
    return torch.tensor([(base + b) % 2**63 for b in range(batch)], dtype=torch.long, device=device)


def _check(model: GptOss, prompts, max_new_tokens, temperature, top_p, top_k, seed) -> None:
    check_sampling(max_new_tokens, temperature, top_p, top_k, seed)
    config = model.config
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} holds token ids outside [0, {config.vocab_size}): found {min(p)}..{max(p)}")
        if len(p) + max_new_tokens > config.max_position_embeddings:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                f"context of {config.max_position_embeddings} tokens: shorten it or generate fewer tokens"
            )


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None = None) -> None:
    """The sampling settings, each named when out of range (UsageError)."""
    check_int("max_new_tokens", max_new_tokens, 1)
    check_float("temperature", temperature, 0.0)
    check_float("top_p", top_p, 0.0, 1.0, above=True)
    check_int("top_k", top_k, 0)
    if seed is not None:
        check_int("seed", seed, 0, 2**63 - 1)


@torch.inference_mode()
def generate(
    model: GptOss,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_tokens: Sequence[int] = ASSISTANT_STOP_TOKENS,
    on_token: Callable[[int, int], None] | None = None,
    stats: dict | None = None,
    decode: str = "auto",
    fused: bool | None = None,
    read_every: int = 16,
) -> list[list[int]]:
    """Continue each prompt; return only the new tokens of each (a stop token, when hit, is included).

    `temperature=0.0` is greedy. Sequences stop on their own at a stop token (default `<|return|>`
    and `<|call|>`, never `<|end|>`). `on_token(index, token)` is called as tokens are produced.
    `seed` seeds sequence i with seed + i. `stats`, if given, receives prefill/decode timings.
    `decode`: "dynamic" (a cache that grows), "static" (fixed shapes, see KVCache), "graph" (static,
    each step replayed as a CUDA graph); "auto" picks "graph" on CUDA with the triton backend.
    `fused`: static and graph steps on the fused decode kernels (decode_step's default: where they apply);
    False keeps the plain path. Static and graph decoding make each token on the device (TokenStep: the
    step, then greedy or sampled picking, sample_rows; in graph mode all of it one CUDA-graph replay) and
    the host reads the new tokens every `read_every` steps (one
    synchronisation per `read_every` tokens, not one per token; on_token is then called in bursts); a
    sequence that stops inside such a stretch runs on to its end (its extra tokens are dropped; rows
    never see each other, so the others' tokens are the same). Dynamic decoding reads every step. For a
    given seed the tokens are the same in every mode: sampling draws counter-based noise per (sequence,
    step), not from a stateful generator.
    """
    _check(model, prompts, max_new_tokens, temperature, top_p, top_k, seed)
    check_int("read_every", read_every, 1)
    mode = _decode_mode(model, decode)
    device = model.device
    B, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, longest), PAD, dtype=torch.long, device=device)
    positions = torch.full((B, longest), -1, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # left padding: every prompt ends in the last column
        ids[b, longest - len(p) :] = torch.tensor(p, device=device)
        positions[b, longest - len(p) :] = torch.arange(len(p), device=device)
    # fp32 on the CPU: attention computes in fp32, so the keys are then read without a conversion each
    # step (they hold bf16 numbers either way: the outputs do not change); the model's dtype on a GPU
    cache_dtype = torch.float32 if device.type == "cpu" else model.dtype
    cache = KVCache(model.config, B, longest + max_new_tokens, cache_dtype, device, static=mode != "dynamic")
    seeds = row_seeds(seed, B, device)
    stop = set(stop_tokens)

    start = time.perf_counter()
    logits = model(ids, positions, cache, last_only=True)[:, -1]  # [B, V]
    if not bool(torch.isfinite(logits).all()):  # one check: bad weights or config would give NaN tokens
        raise FloatingPointError(
            "the model's logits hold NaN or infinite values: check the checkpoint and adapter (both hold finite "
            "values when loaded by gptoss) and, in float16, use bf16 or fp32"
        )
    if mode != "dynamic":
        cache.column.fill_(longest)  # the prompt filled columns 0 .. longest-1
    prefill_s = time.perf_counter() - start
    next_pos = positions[:, -1] + 1  # [B]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    setup = None
    start = time.perf_counter()
    pick = functools.partial(sample_rows, temperature=temperature, top_p=top_p, top_k=top_k, seeds=seeds)
    on_device = mode != "dynamic"  # tokens picked on the device, read in stretches
    if on_device:
        setup_s, start = _on_device(
            model, cache, logits, pick, next_pos, max_new_tokens, read_every, stop, on_token, out, mode, fused
        )
        if setup_s is not None:  # the recording step made token 1 of every sequence that got that far
            setup = (setup_s, sum(len(o) >= 2 for o in out))
    for t in range(0 if on_device else max_new_tokens):
        step_ids = torch.full((B, 1), PAD, dtype=torch.long, device=device)
        step_pos = torch.full((B, 1), -1, dtype=torch.long, device=device)
        picked = pick(logits, step=t).view(B).tolist()  # one read for the batch
        for b in range(B):
            if done[b]:
                continue
            token = picked[b]
            out[b].append(token)
            if on_token is not None:
                on_token(b, token)
            done[b] = token in stop or len(out[b]) == max_new_tokens
            step_ids[b, 0], step_pos[b, 0] = token, next_pos[b]
        if all(done):
            break
        logits = model(step_ids, step_pos, cache, last_only=True)[:, -1]  # finished sequences feed padding
        next_pos += 1
    decode_s = time.perf_counter() - start
    if stats is not None:
        # each sequence's first token comes from the prefill's logits; the decode steps made the rest
        # (in graph mode, the replayed ones: the recording step is reported as graph_setup_s)
        decode_tokens = sum(len(o) for o in out) - B - (setup[1] if setup else 0)
        stats.update(
            prefill_tokens=sum(len(p) for p in prompts),
            prefill_s=prefill_s,
            decode_tokens=decode_tokens,
            decode_s=decode_s,
            graph_setup_s=setup[0] if setup else 0.0,
        )
    return out


def _on_device(model, cache, logits, pick, next_pos, max_new_tokens, read_every, stop, on_token, out, mode, fused):
    """Decoding with each token made on the device (TokenStep; pick: sample_rows with the settings bound):
    ids [B, n] collect there and the host reads them every `read_every` steps (or when the last is made),
    so no step waits for the host. Fills `out`; returns the graph's set-up seconds (None outside graph
    mode) and the time the timed steps began."""
    B = logits.shape[0]
    made = torch.empty(B, max_new_tokens, dtype=torch.long, device=logits.device)
    made[:, :1] = pick(logits, step=0)
    token = TokenStep(model, cache, made[:, :1], next_pos.view(B, 1), made, pick, fused, graph=mode == "graph")
    done = [False] * B
    setup, began, read = None, time.perf_counter(), 0
    for t in range(max_new_tokens):  # made[:, t] holds token t
        if t + 1 == max_new_tokens or (t + 1 - read) == read_every:  # read the stretch: one synchronisation
            for b, row in enumerate(made[:, read : t + 1].tolist()):
                for tok in row:
                    if done[b]:
                        break
                    out[b].append(tok)
                    if on_token is not None:
                        on_token(b, tok)
                    done[b] = tok in stop or len(out[b]) == max_new_tokens
            read = t + 1
            if all(done):
                break
        if t + 1 == max_new_tokens:
            break
        token()  # makes token t + 1
        if mode == "graph" and setup is None:  # the first step warms up and records the graph: timed apart
            torch.cuda.synchronize()
            setup = time.perf_counter() - began
            began = time.perf_counter()
    return setup, began


def speed_line(stats: dict) -> str:
    """One line of prefill and decode speed from the `stats` generate() fills in."""

    def rate(n, s):
        return f"{n / s:.1f} tok/s" if s > 0 else "n/a"

    return (
        f"prefill: {stats['prefill_tokens']} tokens in {stats['prefill_s']:.2f} s "
        f"({rate(stats['prefill_tokens'], stats['prefill_s'])}); "
        f"decode: {stats['decode_tokens']} tokens in {stats['decode_s']:.2f} s "
        f"({rate(stats['decode_tokens'], stats['decode_s'])})"
    )

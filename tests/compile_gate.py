"""Compile gate: every Triton kernel of gptoss.kernels, compiled for the H100 (sm_90a) and Blackwell
(sm_100a) on a machine without a GPU, the way a real launch would compile it.

    python tests/compile_gate.py [--targets 90,100] [--jobs 2] [--json results.json] [--only P | --skip P]

How: the kernels' own launchers run at the gpt-oss-20b and -120b shapes (decode: 1 token; prefill:
4096), in bf16 and fp32, forward and backward, on `meta` tensors (shapes and dtypes, no memory);
every `kernel[grid](...)` they make is captured instead of launched. An autotuned kernel expands to
the configs its own pruning lets that launch try. Triton's binder turns the arguments into the
signature, constexprs and specialisation attributes a launch on a GPU would use, and
`triton.compile` builds the cubin for each target. Every module-level @triton.jit function is found
by introspection: one that is neither launched nor called by a launched kernel fails the gate.

Read from each cubin: registers, spill bytes (stack frame, local loads/stores in the SASS), shared
memory, the MMA kind (tcgen05 = UTCHMMA on sm_100a, wgmma = HGMMA, mma.sync = HMMA, else FMA), and for kernels that decode MXFP4
the SASS instructions per decoded weight element in the main loop: the instructions of the
largest loop (the K loop) x 32 threads x warps / the weight elements one iteration decodes. That is
the per-thread cost; H100 issues 128 thread-instructions per SM per cycle and its HBM delivers ~30
FP4 elements per SM per cycle, so ~4 per element is what keeps up with memory.

Fails on: a compile error, a spill in a bf16 variant, shared memory over the target's per-block
limit (227 KiB), a kernel that escapes the workloads. Results are cached by compile hash, keyed by the
Triton and ptxas versions too (~/.cache/gptoss/compile_gate.json, or $GPTOSS_CACHE), with Triton's own
cache underneath.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the gate compiles; it must never see the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, KernelInterface, create_function_from_signature  # noqa: E402

from gptoss.launches import autotune_configs, jit_function  # noqa: E402

# what a cached row holds: a new format recompiles rather than read a row short of a field
ROW_FORMAT = 9  # 2: loop_shared_ops; 3: the main loop is the largest innermost loop; 4: loop loads, ftz_ops;
# 5: loop_wide_loads_waited (since dropped); 6: asynchronous copies to shared memory (LDGSTS) are not loads
# into registers; 7: loop_wgmma_pending; 8: loop_skippable, attention's per_element (a trip's scores);
# 9: loop_copies_ahead
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 and sm_100 (227 KiB)
SHAPES = {  # hidden D, intermediate I, experts E, top-k
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "gpt-oss-120b": (2880, 2880, 128, 4),
}
# tokens; the MoE tile tables are bucketed by rows per expert: decode reaches the 16-row bucket, batch
# (20b: 256 x 4 / 32 = 32 rows) the 64-row one, prefill the 256-row one
WORKLOADS = {"decode": 1, "batch": 256, "prefill": 4096}
ATTENTION = (8, 8, 64)  # KV heads, query heads per KV head, head dim: gpt-oss-20b and -120b alike


# --- introspection -------------------------------------------------------------------------------------


def _jit_of(obj) -> JITFunction | None:
    obj = jit_function(obj)
    return obj if isinstance(obj, JITFunction) else None


def discover() -> dict[str, object]:
    """Every module-level @triton.jit object of gptoss.kernels (autotuned ones included), by name."""
    import gptoss.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"gptoss.kernels.{info.name}")
        for name, obj in vars(module).items():
            fn = _jit_of(obj)
            if fn is not None and fn.__module__ == module.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


def helpers_of(found: dict[str, object]) -> set[str]:
    """The jit functions some other jit function calls (they compile as part of their caller)."""
    sources = {name: _jit_of(obj).src for name, obj in found.items()}
    called = set()
    for name in found:
        short = name.split(".", 1)[1]
        if any(re.search(rf"\b{short}\s*\(", src) for other, src in sources.items() if other != name):
            called.add(name)
    return called


def escaped(found: dict[str, object], launches) -> list[str]:
    """The kernels of `found` that no launch compiles, directly or as a helper of a launched kernel."""
    launched = {_jit_of(launch.kernel).__name__ for launch in launches}
    helpers = helpers_of(found)
    return sorted(name for name in found if name not in helpers and _jit_of(found[name]).__name__ not in launched)


# --- capture ---------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: object  # the object launched (JITFunction or Autotuner)
    grid: object
    args: tuple
    kwargs: dict
    label: dict  # shape, workload, dtype, what


@dataclass
class Variant:
    name: str
    label: dict
    config: dict  # constexprs chosen by the autotuner, with num_warps / num_stages
    grid: tuple
    target: int
    src: ASTSource = field(repr=False)
    options: dict = field(repr=False)

    @property
    def key(self) -> str:
        """The cache key: the kernel, its options and target, and the compiler (a tile that compiles clean on
        one Triton or ptxas can fail to lower or spill on another, so no cached row outlives its compiler)."""
        text = f"{ROW_FORMAT}-{compiler_id(self.target)}-{self.src.hash()}-{sorted(self.options.items())}-{self.target}"
        return hashlib.sha256(text.encode()).hexdigest()


def compiler_id(target: int) -> str:
    """Triton's version and source hash, and what its backend for `target` hashes (for CUDA: the ptxas
    version and the architecture)."""
    try:
        from triton.runtime.cache import triton_key  # Triton >= 3.3
    except ImportError:
        from triton.compiler.compiler import triton_key
    return f"triton {triton.__version__} {triton_key()} {make_backend(GPUTarget('cuda', target, 32)).hash()}"


@contextlib.contextmanager
def capture(launches: list[Launch], label: dict):
    """Record kernel[grid](*args, **kwargs) instead of launching it."""
    previous = KernelInterface.__getitem__

    def getitem(kernel, grid):
        return lambda *args, **kwargs: launches.append(Launch(kernel, grid, args, dict(kwargs), dict(label)))

    KernelInterface.__getitem__ = getitem
    try:
        yield label
    finally:
        KernelInterface.__getitem__ = previous


def meta_experts(E: int, D: int, I: int, dtype: torch.dtype):
    """gate_up and down of E experts as gptoss.kernels.moe.ExpertWeights of meta tensors (real shapes)."""
    from gptoss.kernels.moe import ExpertWeights

    def matrix(rows, cols):
        u8 = dict(dtype=torch.uint8, device="meta")
        return ExpertWeights(
            torch.empty(E, rows, cols // 32, 16, **u8),
            torch.empty(E, rows, cols // 32, **u8),
            torch.empty(E, rows, dtype=dtype, device="meta"),
        )

    return matrix(2 * I, D), matrix(D, I)


def run_workloads() -> list[Launch]:
    """The launchers at the gpt-oss shapes on meta tensors: routing, the four MoE matmuls, dequantization,
    RMSNorm and RoPE (forward and backward), attention (forward, both backward kernels, the split-K decode and its merge)."""
    from gptoss.kernels import attention, moe, mxfp4, rmsnorm, rope, routing

    launches: list[Launch] = []
    meta = dict(device="meta")
    for shape, (D, I, E, k) in SHAPES.items():
        for workload, T in WORKLOADS.items():
            for dtype in (torch.bfloat16, torch.float32):
                with capture(launches, dict(shape=shape, workload=workload, tokens=T, dtype=str(dtype)[6:])) as label:
                    label["what"] = "route"
                    r = routing.route(torch.empty(T, E, dtype=dtype, **meta), k)
                    w1, w2 = meta_experts(E, D, I, dtype)
                    x = torch.empty(T, D, dtype=dtype, **meta)
                    gate = torch.empty(T * k, dtype=torch.float32, **meta)
                    # every kernel of moe.KERNELS, without and with the LoRA update (sorted rows, in the
                    # activations' dtype: kernels/expert_lora.py) in its epilogue
                    P = T * k
                    add = {n: torch.empty(P, n, dtype=dtype, **meta) for n in (D, I, 2 * I)}
                    for lora in (False, True):
                        plus = "+lora" if lora else ""
                        label["what"] = "forward" + plus
                        act, h = moe.moe_gate_up_fwd(x, r, w1, 1.702, 7.0, save=True, add=add[2 * I] if lora else None)
                        moe.moe_down_fwd(act, r, gate, w2, add=add[D] if lora else None)
                        label["what"] = "backward" + plus
                        gh, _ = moe.moe_down_bwd(x, r, gate, w2, h, 1.702, 7.0, add=add[I] if lora else None)
                        moe.moe_gate_up_bwd(gh, r, w1, add=add[D] if lora else None)
                    label["what"] = "inference"  # no h kept: the same compiled tiles (save is a runtime flag)
                    moe.moe_gate_up_fwd(x, r, w1, 1.702, 7.0, save=False)
                    label["what"] = "combine"
                    moe.moe_combine(torch.empty(P, D, dtype=torch.float32, **meta), k, dtype)
                    label["what"] = "dequantize"
                    mxfp4.mxfp4_dequant_fwd(w1.blocks[:1], w1.scales[:1], dtype)
                    label["what"] = "rmsnorm"
                    gain = torch.empty(D, dtype=torch.float32, **meta)
                    _, r = rmsnorm.rmsnorm_fwd(x, gain, 1e-5)
                    rmsnorm.rmsnorm_bwd(x, x, gain, r)
    K, G, Dh = ATTENTION
    for workload, T in WORKLOADS.items():  # decode: one token against a 4096-token cache; prefill: training rows
        S = 4096
        for dtype in (torch.bfloat16, torch.float32):
            with capture(
                launches, dict(shape="gpt-oss (attention)", workload=workload, tokens=T, dtype=str(dtype)[6:])
            ) as label:
                q = torch.empty(1, T, K, G, Dh, dtype=dtype, **meta)
                kv = torch.empty(1, S, K, Dh, dtype=dtype, **meta)
                sinks = torch.empty(K * G, dtype=torch.float32, **meta)
                q_pos = torch.empty(1, T, dtype=torch.int32, **meta)
                k_pos = torch.empty(1, S, dtype=torch.int32, **meta)
                label["what"] = "rope"
                table = torch.empty(T, Dh // 2, dtype=dtype, **meta)
                for sign in (1, -1):  # forward and backward
                    rope.rope(q, table, table, sign)
                    rope.rope(torch.empty(1, T, K, Dh, dtype=dtype, **meta), table, table, sign)
                for window in (128, attention.NO_WINDOW):
                    if T * G <= attention.DECODE_ROWS:
                        label["what"] = "decode"
                        attention.attention_decode(q, kv, kv, sinks, q_pos, k_pos, window)
                        continue
                    label["what"] = "forward"
                    out, lse = attention.attention_fwd(q, kv, kv, sinks, q_pos, k_pos, window)
                    label["what"] = "backward"
                    attention.attention_bwd(out, q, kv, kv, sinks, out, lse, q_pos, k_pos, window)
    launches += fused_decode_launches()
    return launches


def fused_decode_launches() -> list[Launch]:
    """The fused decode step's kernels (gptoss.kernels.decode) at batch 1 and 8, on stand-ins for the
    modules the launchers read (meta tensors of the real shapes)."""
    from types import SimpleNamespace

    from gptoss.kernels import decode

    launches: list[Launch] = []
    meta = dict(device="meta")
    K, G, Dh = ATTENTION
    S = 4096
    for shape, (D, I, E, k) in SHAPES.items():
        for B in (1, 8):
            for dtype in (torch.bfloat16, torch.float32):
                label = dict(shape=shape, workload="decode", tokens=B, dtype=str(dtype)[6:], what="fused decode")
                with capture(launches, label):

                    def linear(n, m):
                        return SimpleNamespace(
                            weight=torch.empty(n, m, dtype=dtype, **meta), bias=torch.empty(n, dtype=dtype, **meta)
                        )

                    attn = SimpleNamespace(
                        num_kv_heads=K,
                        group=G,
                        head_dim=Dh,
                        q_proj=linear(K * G * Dh, D),
                        k_proj=linear(K * Dh, D),
                        v_proj=linear(K * Dh, D),
                    )
                    cache = SimpleNamespace(
                        k=torch.empty(B, K, S, Dh, dtype=dtype, **meta),
                        v=torch.empty(B, K, S, Dh, dtype=dtype, **meta),
                        pos=torch.empty(B, S, dtype=torch.int32, **meta),
                    )
                    x = torch.empty(B, D, dtype=dtype, **meta)
                    gain = torch.empty(D, dtype=torch.float32, **meta)
                    rot = torch.empty(B, Dh // 2, dtype=dtype, **meta)
                    q = torch.empty(B, 1, K, G, Dh, dtype=dtype, **meta)
                    pos = torch.empty(B, 1, dtype=torch.int32, **meta)
                    column = torch.empty((), dtype=torch.long, **meta)
                    decode.decode_qkv(x, gain, 1e-5, attn, rot, rot, q, cache, pos, column)
                    decode.decode_linear_residual(
                        torch.empty(B, K * G * Dh, dtype=dtype, **meta), linear(D, K * G * Dh), x
                    )
                    logits, xn = decode.decode_router(x, gain, 1e-5, linear(E, D))
                    w1, w2 = meta_experts(E, D, I, dtype)
                    decode.decode_experts(logits, xn, w1, w2, k, 1.702, 7.0, x)
    return launches


def expand(launch: Launch, target: int) -> list[Variant]:
    """The compilations a real launch would make: one per config its autotuner may try."""
    fn = _jit_of(launch.kernel)
    named = dict(zip(fn.arg_names, launch.args))
    configs = [None]
    if isinstance(launch.kernel, Autotuner):
        configs = autotune_configs(launch.kernel, launch.args, launch.kwargs)
    backend = make_backend(GPUTarget("cuda", target, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    variants = []
    for config in configs:
        kwargs = {**launch.kwargs, **(config.all_kwargs() if config else {})}
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        grid = launch.grid({**named, **kwargs}) if callable(launch.grid) else launch.grid
        chosen = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
        chosen.setdefault("num_warps", options.num_warps)
        chosen.setdefault("num_stages", options.num_stages)
        src = ASTSource(fn, signature, constexprs, attrs)
        variants.append(Variant(fn.__name__, launch.label, chosen, tuple(grid), target, src, options.__dict__))
    return variants


def moe_kernels() -> dict[str, str]:
    """The grouped MoE kernels by jit function name -> their name in gptoss.kernels.moe.CONFIGS."""
    from gptoss.kernels import moe

    return {kernel.fn.__name__: name for name, kernel in moe.KERNELS.items()}


def unreached_tiles(variants, targets) -> list[str]:
    """Every tile of the MoE kernels' config tables must be compiled by some workload: a tile that no
    launch here tries would meet its first compiler on a GPU, in the middle of an autotuning run."""
    from gptoss.kernels import moe

    problems = []
    for kernel, name in moe_kernels().items():
        wanted = {(False, tile) for tiles in moe.CONFIGS[name].values() for tile in tiles}
        wanted |= {(True, tile) for tiles in moe.FP32_CONFIGS.values() for tile in tiles}
        wanted = {(*w, add) for w in wanted for add in (False, True)}  # without and with the LoRA update
        wanted -= {(False, tile, True) for tile in moe.WITHOUT_ADD.get(name, ())}  # tried only without it
        for target in targets:
            seen = {
                (
                    bool(v.config["UPCAST"]),
                    moe.tile_of(v.config),
                    bool(v.config["ADD"]),
                )
                for v in variants
                if v.name == kernel and v.target == target
            }
            for upcast, tile, add in sorted(wanted - seen):
                problems.append(
                    f"{kernel} sm_{target}a {'fp32' if upcast else 'bf16'}{' +lora' if add else ''} tile {tile}: "
                    "in the config tables but no workload of the gate compiles it; add a workload that reaches its bucket"
                )
    return problems


# --- reading the cubin ------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _text_section(cubin: bytes) -> bytes:
    """The one kernel's instructions: the cubin's (ELF64) `.text.<kernel>` section."""
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]  # offset of the section-name strings

    def name(section) -> bytes:
        start = names + section[0]
        return cubin[start : cubin.index(b"\0", start)]

    texts = [cubin[s[4] : s[4] + s[5]] for s in sections if name(s).startswith(b".text.")]
    if len(texts) != 1:
        raise ValueError(f"a cubin with {len(texts)} .text sections; the gate reads cubins of one kernel each")
    return texts[0]


def disassemble(cubins: list[bytes], target: int) -> list[list[tuple[int, str, str]]]:
    """Each cubin's SASS as (address, opcode, operands), from one nvdisasm run over all of them.

    The disassembler spends ~0.4 s of CPU setting up an architecture before it reads a byte: `cuobjdump
    -sass` once a cubin took 218 s for the suite's 358 cubins, one nvdisasm run a target 9 s (measured on
    two cores). So the kernels' instructions (each cubin's .text section) are laid end to end in one raw
    instruction binary and disassembled at once. A kernel's addresses, and its branches' targets with them,
    are then offset by where it starts in that binary; every figure read from them is a difference of two
    addresses of the same kernel, the same as from the cubin alone (a test holds it to cuobjdump's)."""
    if not cubins:
        return []
    texts = [_text_section(cubin) for cubin in cubins]
    starts = [0]
    for text in texts:
        starts.append(starts[-1] + len(text))
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"".join(texts))
        f.flush()
        done = subprocess.run([_tool("nvdisasm"), "-b", f"SM{target}a", f.name], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvdisasm -b SM{target}a failed: {done.stderr.strip()[:300]}")
    kernels: list[list[tuple[int, str, str]]] = [[] for _ in cubins]
    for address, _, op, rest in _SASS_LINE.findall(done.stdout):
        at = int(address, 16)
        kernels[bisect.bisect_right(starts, at) - 1].append((at, op, rest))
    return kernels


def resource_usage(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout


def sass_stats(
    code: list[tuple[int, str, str]], usage: str, num_warps: int, elements_per_iteration: int | None
) -> dict:
    """What the gate reads from a kernel's SASS (`code`, from disassemble) and cuobjdump's resource usage."""
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, _, local = (int(v) for v in found.groups())
    ops = [op for _, op, _ in code]
    spill_ops = sum(op.startswith(("STL", "LDL")) for op in ops)
    mma = "FMA"
    for prefix, kind in (("UTCHMMA", "tcgen05"), ("HGMMA", "wgmma"), ("HMMA", "mma.sync")):
        if any(op.startswith(prefix) for op in ops):
            mma = kind
            break
    # loops: backward branches; the main loop is the largest one
    spans = []
    for address, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            spans.append((start, address))
    # the main loop: the largest innermost loop (one holding no other; with nested loops, such as the
    # fused decode's loop over the k experts around its K loop, the K loop)
    inner = [sp for sp in spans if not any(o != sp and sp[0] <= o[0] and o[1] <= sp[1] for o in spans)]
    main = max(inner, key=lambda se: sum(se[0] <= a <= se[1] for a, _, _ in code)) if inner else None
    main_size = sum(main[0] <= a <= main[1] for a, _, _ in code) if main else None
    per_element = None
    if elements_per_iteration:
        body = main_size or len(code)  # no loop: the whole kernel is one iteration
        per_element = body * 32 * num_warps / elements_per_iteration
    # the most instructions of the main loop that one forward branch inside it skips: a trip's optional part
    # (attention's per-score mask, skipped by a uniform branch on tiles every row sees whole)
    skippable = 0
    for address, op, rest in code if main else []:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and main[0] <= address < int(target.group(1), 16) <= main[1]:
            end = int(target.group(1), 16)
            skippable = max(skippable, sum(address < a < end for a, _, _ in code))
    # the main loop's barriers and shared-memory moves: a layout conversion (or a pipelined copy) inside it
    body = [(op, rest) for a, op, rest in code if main[0] <= a <= main[1]] if main else []
    loop_sync = sum(op.startswith(("BAR", "LDS", "STS", "STSM", "LDSM")) for op, _ in body)
    loads, waited = _loop_loads(body)
    # wgmma's waits in the main loop (WARPGROUP.DEPBAR.LE gsb0, N: until at most N products are pending):
    # the smallest N. 0: each trip waits for its own products; 1 or more: a product still runs while
    # the loop goes on (None: no wgmma in the loop)
    pending = [
        int(n, 16) for op, rest in body if op.startswith("WARPGROUP.DEPBAR") for n in re.findall(r"0x([0-9a-f]+)", rest)
    ]
    # the asynchronous copies to shared memory (LDGSTS) a trip commits in groups (LDGDEPBAR) and waits for
    # (DEPBAR.LE SB0, N: until at most N groups are in flight): N over the groups a trip commits is how many
    # trips' copies stay in flight through the wait. 0: each trip waits for the copies the trip before it
    # issued, after its own product, so the whole latency of memory is exposed in every trip (None: no copies)
    groups = sum(op.startswith("LDGDEPBAR") for op, _ in body)
    copy_waits = [
        int(n, 16) for op, rest in body if op.startswith("DEPBAR") for n in re.findall(r"SB0, 0x([0-9a-f]+)", rest)
    ]
    copies_ahead = min(copy_waits) / groups if groups and copy_waits else None
    return dict(
        registers=regs,
        spill_bytes=stack + local,
        spill_ops=spill_ops,
        mma=mma,
        instructions=len(code),
        main_loop=main_size,
        per_element=per_element,
        loop_shared_ops=loop_sync,
        loop_loads=loads,
        loop_loads_waited=waited,
        loop_wgmma_pending=min(pending) if pending else None,
        loop_copies_ahead=copies_ahead,
        loop_skippable=skippable,
        ftz_ops=sum(".FTZ" in op for op in ops),
    )


_REGISTER = re.compile(r"\bR(\d+)\b")


def _loop_loads(body) -> tuple[int, int]:
    """The main loop's global loads into registers, and how many of them are waited on in the trip that
    issues them: a later instruction of the same trip reads a register the load writes (a load carried to
    the next trip is read only before it, in program order). Asynchronous copies to shared memory (LDGSTS,
    the pipelined operands of a tensor-core tile) write no register and are not counted."""
    loads = waited = 0
    for i, (op, rest) in enumerate(body):
        if not op.startswith("LDG") or op.startswith(("LDGSTS", "LDGDEPBAR")):  # copies to shared write no register
            continue
        loads += 1
        first = _REGISTER.search(rest.split(",")[0])
        width = {"128": 4, "64": 2}.get(op.rsplit(".", 1)[-1], 1)
        written = {int(first.group(1)) + k for k in range(width)} if first else set()
        for _, later in body[i + 1 :]:
            sources = later.split(",")[1:] if "," in later else []
            if any(int(r) in written for source in sources for r in _REGISTER.findall(source)):
                waited += 1
                break
    return loads, waited


ATTENTION_TILES = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")  # a trip: one tile of scores


def trip_elements(name: str, config: dict) -> int | None:
    """What one iteration of a kernel's main loop works through: the MXFP4 weight elements it decodes, or
    for the attention kernels of ATTENTION_TILES the scores of its tile pair (None: neither)."""
    if name in ATTENTION_TILES:
        return config["BLOCK_M"] * config["BLOCK_N"]
    if name in moe_kernels():
        return config["BLOCK_N"] * config["BLOCK_K"]
    if name in DECODE_MXFP4:  # TRIPS_PER_LOOP trips a loop iteration
        return decode_trip_elements(name, config) * _decode_trips_per_loop()
    if name == "_mxfp4_dequant_fwd_kernel":
        return config["BLOCK_R"] * config["BLOCK_G"] * 32
    return None


def decode_trip_elements(name: str, config: dict) -> int:
    """MXFP4 weight elements one trip of a fused decode kernel decodes (down: the rows of every slot's
    expert in one tile)."""
    rows = config["BLOCK_N"] * (config["SLOTS"] if name == "_decode_down_kernel" else 1)
    return rows * config["BLOCK_G"] * 32


def _decode_trips_per_loop() -> int:
    from gptoss.kernels import decode

    return decode.TRIPS_PER_LOOP.value


def compile_error(error: BaseException) -> str:
    """A compile error in one line: why, and where. Triton wraps an error raised in an inlined helper in
    one error for each caller, whose text is only the call's position ("at 36:24:", the source, a caret),
    so the reason is the innermost cause's last line and the place the innermost position that Triton's
    errors name (with the source line its caret points at)."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    reason = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    text = f"{type(chain[-1]).__name__}: {reason[-1] if reason else ''}"
    for wrapped in reversed(chain):
        lines = str(wrapped).splitlines()
        if lines and lines[0].startswith("at ") and "^" in (line.strip() for line in lines):
            pointed = next(lines[i - 1].strip() for i in range(1, len(lines)) if lines[i].strip() == "^")
            text += f" ({lines[0].rstrip(':')} {pointed})"
            break
    return text[:300]


def compile_one(variant: Variant) -> tuple[dict, bytes | None]:
    """The variant's row (its compile error, or its shared memory and seconds) and its cubin (None where it
    does not compile); the figures read from the cubin are added by compile_batch."""
    start = time.perf_counter()
    row = dict(
        kernel=variant.name, target=f"sm_{variant.target}a", **variant.label, config=variant.config, grid=variant.grid
    )
    try:
        compiled = triton.compile(variant.src, target=GPUTarget("cuda", variant.target, 32), options=variant.options)
    except Exception as error:  # noqa: BLE001 - every compile error is a finding of the gate
        return dict(row, error=compile_error(error)), None
    seconds = round(time.perf_counter() - start, 2)
    return dict(row, shared=compiled.metadata.shared, seconds=seconds), compiled.asm["cubin"]


def compile_batch(variants: list[Variant]) -> list[dict]:
    """Rows of the variants: each compiled, then each target's cubins disassembled in one nvdisasm run."""
    done = [compile_one(variant) for variant in variants]
    for target in {variant.target for variant in variants}:
        mine = [i for i, variant in enumerate(variants) if variant.target == target and done[i][1] is not None]
        for i, code in zip(mine, disassemble([done[i][1] for i in mine], target)):
            (row, cubin), config = done[i], variants[i].config
            elements = trip_elements(variants[i].name, config)
            row.update(sass_stats(code, resource_usage(cubin), config["num_warps"], elements))
    return [row for row, _ in done]


_VARIANTS: list[Variant] = []


def _compile_indices(indices: list[int]) -> list[dict]:
    return compile_batch([_VARIANTS[i] for i in indices])


def _cache_file() -> Path:
    root = Path(os.environ.get("GPTOSS_CACHE", Path.home() / ".cache" / "gptoss"))
    return root / "compile_gate.json"


def run_gate(
    targets=(90, 100), jobs: int = 2, only: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> tuple[list[dict], list[str]]:
    """Compile every variant (only: just the kernels whose names start so; skip: all but those); returns
    (rows, problems)."""
    global _VARIANTS
    found = discover()
    launches = run_workloads()
    problems = [
        f"{name}: a Triton kernel that no workload of the compile gate launches; add its launcher to run_workloads()"
        for name in escaped(found, launches)
    ]
    unique: dict[str, Variant] = {}
    labels: dict[str, list[dict]] = {}
    for target in targets:
        for launch in launches:
            for variant in expand(launch, target):
                if (only and not variant.name.startswith(only)) or (skip and variant.name.startswith(skip)):
                    continue
                unique.setdefault(variant.key, variant)
                labels.setdefault(variant.key, []).append(dict(variant.label, grid=variant.grid))
    if not only and not skip:  # a part of the kernels leaves the others' tiles unreached
        problems += unreached_tiles(unique.values(), targets)
    cache_path = _cache_file()
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    todo = [key for key in unique if key not in cache]
    _VARIANTS = [unique[key] for key in todo]
    if todo:
        # batches of about a quarter of a process's share, each disassembled at once (see disassemble)
        size = max(1, min(32, -(-len(todo) // (4 * max(1, jobs)))))
        batches = [list(range(i, min(i + size, len(todo)))) for i in range(0, len(todo), size)]
        with multiprocessing.get_context("fork").Pool(max(1, jobs)) as pool:
            for indices, rows in zip(batches, pool.imap(_compile_indices, batches)):
                for i, row in zip(indices, rows):
                    cache[todo[i]] = row
                    print(
                        f"  compiled {len(cache)}: {row['kernel']} {row['target']} {row['config']} {row.get('error', '')}",
                        file=sys.stderr,
                        flush=True,
                    )
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=cache_path.name + ".", suffix=".tmp", dir=cache_path.parent
        )  # a name of its own
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(cache))
        os.replace(tmp, cache_path)
    rows = []
    for key in unique:
        row = dict(cache[key])
        row["launches"] = labels[key]  # every (shape, workload, dtype) that compiles to this variant
        if "error" not in row:
            row["blocks_per_sm"] = blocks_per_sm(row)
        rows.append(row)
        where = f"{row['kernel']} {row['target']} {row['config']}"
        if "error" in row:
            problems.append(f"{where}: does not compile: {row['error']}")
            continue
        dtypes = {launch["dtype"] for launch in row["launches"]}
        if row["spill_bytes"] or row["spill_ops"]:
            if "bfloat16" in dtypes:
                problems.append(
                    f"{where}: spills {row['spill_bytes']} bytes ({row['spill_ops']} local loads/stores) in bf16"
                )
        if row["shared"] > SHARED_LIMIT:
            problems.append(f"{where}: {row['shared']} bytes of shared memory > {SHARED_LIMIT}")
    return rows, problems


_SHORT = {"bfloat16": "bf16", "float32": "fp32"}


def _mode(row) -> str:
    return "+lora" if row["config"].get("ADD") else ""  # with the LoRA update in the epilogue


def table(rows: list[dict]) -> str:
    head = f"{'kernel':<28}{'lora':<10}{'target':<9}{'dtype':<9}{'config (M,N,K,w,s[,swap])':<28}{'regs':>5}{'spill':>6}{'smem':>8}{'blk/SM':>7}{'mma':>9}{'grid dec':>10}{'grid bat':>12}{'grid pre':>13}{'instr/el':>9}{'ahead':>6}"
    lines = [head, "-" * len(head)]
    for row in sorted(
        rows, key=lambda r: (r["kernel"], _mode(r), r["target"], r["launches"][0]["dtype"], str(r["config"]))
    ):
        c = row["config"]
        shape = ",".join(
            str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_G", "BLOCK_P", "BLOCK_E") if k in c
        )
        shape += f",{c['num_warps']},{c['num_stages']}" + (",1" if c.get("SWAP") else "")  # as CONFIGS writes it
        grids = {}
        for launch in row["launches"]:
            programs = 1
            for g in launch["grid"]:
                programs *= g
            grids.setdefault(launch["workload"], set()).add(programs)
        grid = {w: "/".join(str(g) for g in sorted(v)) for w, v in grids.items()}
        dtype = "/".join(sorted({_SHORT[launch["dtype"]] for launch in row["launches"]}))
        if "error" in row:
            lines.append(
                f"{row['kernel']:<28}{_mode(row):<10}{row['target']:<9}{dtype:<9}{shape:<28} ERROR {row['error'][:60]}"
            )
            continue
        per = f"{row['per_element']:.2f}" if row["per_element"] is not None else "-"
        ahead = row.get("loop_copies_ahead")  # trips of copies in flight through the loop's wait
        ahead = f"{ahead:g}" if ahead is not None else "-"
        lines.append(
            f"{row['kernel']:<28}{_mode(row):<10}{row['target']:<9}{dtype:<9}{shape:<28}{row['registers']:>5}"
            f"{row['spill_bytes']:>6}{row['shared']:>8}{row['blocks_per_sm']:>7}{row['mma']:>9}{grid.get('decode', '-'):>10}{grid.get('batch', '-'):>12}{grid.get('prefill', '-'):>13}{per:>9}{ahead:>6}"
        )
    return "\n".join(lines)


def _targets(text: str) -> tuple[int, ...]:
    """ "90,100" -> (90, 100); only the targets whose table the gate knows (227 KiB shared memory)."""
    try:
        targets = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected compute capabilities such as 90,100, got {text!r}") from None
    if not targets or any(t not in (90, 100) for t in targets):
        raise argparse.ArgumentTypeError(f"the gate compiles for 90 (sm_90a) and 100 (sm_100a), got {text!r}")
    return targets


def _prefixes(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(","))
    if not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give kernel-name prefixes such as _decode_, comma-separated")
    return parts


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs at least 1 process, got {value}")
    return value


DECODE_MXFP4 = ("_decode_gate_up_kernel", "_decode_down_kernel")  # and the grouped MoE kernels (moe_kernels())
SMS = 132  # H100 and H200 SXM
MAX_WARPS_PER_SM, REGISTERS_PER_SM, BLOCKS_PER_SM = 64, 65536, 32
SHARED_PER_SM, SHARED_PER_BLOCK_RESERVED = 233472, 1024  # 228 KiB an SM (sm_90, sm_100), 1 KiB of it per block


def blocks_per_sm(row: dict) -> int:
    """How many blocks of a compiled kernel one SM holds at once: what its registers (allocated per warp
    in units of 256: 8 a thread), its shared memory (each block also takes 1 KiB the system reserves) and
    its warps allow."""
    warps = row["config"]["num_warps"]
    per_warp = -(-row["registers"] * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (per_warp * warps)
    by_shared = SHARED_PER_SM // (row["shared"] + SHARED_PER_BLOCK_RESERVED)
    return min(by_registers, by_shared, BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps)


def decode_launch_table(rows: list[dict]) -> list[dict]:
    """The static cost of each decode launch of an MXFP4 kernel at one token (gpt-oss-20b, sm_90a, bf16):
    programs, the weight bytes each reads, resident warps per SM (what the registers and shared memory
    allow, and what the grid fills), the K loop's trips and SASS instructions per trip (their product:
    the serial instructions of one warp), instructions per decoded weight element, and whether the main
    loop moves data through shared memory (a layout conversion: every trip waits on a barrier)."""
    out = []
    for row in rows:
        if "error" in row or row["target"] != "sm_90a" or row["kernel"] not in (*DECODE_MXFP4, *moe_kernels()):
            continue
        for launch in row["launches"]:
            if launch["workload"] != "decode" or launch["dtype"] != "bfloat16" or launch["shape"] != "gpt-oss-20b":
                continue
            if launch["tokens"] != 1:
                continue
            c, warps = row["config"], row["config"]["num_warps"]
            programs = 1
            for g in launch["grid"]:
                programs *= g
            filled = min(blocks_per_sm(row), -(-programs // SMS)) * warps
            if row["kernel"] in moe_kernels():
                per_trip, k = c["BLOCK_N"] * c["BLOCK_K"], 2880  # D = I = 2880 for both products
                trips, loop_trips = -(-k // c["BLOCK_K"]), 1
            else:  # the fused decode kernels: BLOCK_G MX blocks of 32 per trip (down: of every slot's rows),
                # TRIPS_PER_LOOP trips a loop iteration (a last odd trip runs as a whole iteration)
                per_trip, loop_trips = decode_trip_elements(row["kernel"], c), _decode_trips_per_loop()
                trips = -(-90 // (c["BLOCK_G"] * loop_trips)) * loop_trips
            out.append(
                dict(
                    kernel=row["kernel"],
                    lora=_mode(row),
                    config=c,
                    programs=programs,
                    bytes_per_program=int(trips * per_trip * 17 / 32),
                    resident_warps=filled,
                    trips=trips,
                    per_trip=row["main_loop"] // loop_trips,
                    serial=trips * row["main_loop"] // loop_trips,
                    per_element=row["per_element"],
                    loop_shared_ops=row.get("loop_shared_ops"),
                    loop_loads=row.get("loop_loads"),
                    loop_loads_waited=row.get("loop_loads_waited"),
                )
            )
    return out


def decode_table(rows: list[dict]) -> str:
    head = f"{'kernel (decode, 20b, sm_90a)':<28}{'lora':<10}{'programs':>9}{'KB/prog':>9}{'warps/SM':>9}{'trips':>6}{'instr/trip':>11}{'serial':>8}{'instr/el':>9}{'shared in loop':>15}{'loads waited':>14}"
    lines = [head, "-" * len(head)]
    for r in decode_launch_table(rows):
        lines.append(
            f"{r['kernel']:<28}{r['lora']:<10}{r['programs']:>9}{r['bytes_per_program'] / 1024:>9.1f}{r['resident_warps']:>9}"
            f"{r['trips']:>6}{r['per_trip']:>11}{r['serial']:>8}{r['per_element']:>9.2f}{r['loop_shared_ops'] or 0:>15}"
            f"{r['loop_loads_waited']:>8} of {r['loop_loads']:<3}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--targets",
        type=_targets,
        default=(90, 100),
        help="compute capabilities to compile for, from 90 and 100 (default 90,100)",
    )
    parser.add_argument("--jobs", type=_positive, default=2, help="compiler processes, at least 1 (default 2)")
    parser.add_argument("--json", type=Path, help="also write every row to this JSON file")
    parser.add_argument(
        "--only",
        type=_prefixes,
        default=(),
        help="compile just the kernels whose names start with one of these comma-separated prefixes "
        "(e.g. _decode_); the check that every autotune tile is reached is then skipped",
    )
    parser.add_argument(
        "--skip",
        type=_prefixes,
        default=(),
        help="leave out the kernels whose names start with one of these comma-separated prefixes "
        "(e.g. _moe_); the check that every autotune tile is reached is then skipped",
    )
    args = parser.parse_args(argv)
    names = [name.split(".", 1)[1] for name in discover()]
    for flag, prefixes in (("--only", args.only), ("--skip", args.skip)):
        if prefixes and not any(name.startswith(prefixes) for name in names):
            parser.error(f"{flag} {','.join(prefixes)}: matches no kernel of gptoss.kernels (e.g. {names[0]})")
    if args.only and args.skip and all(name.startswith(args.skip) for name in names if name.startswith(args.only)):
        parser.error(f"--only {','.join(args.only)} --skip {','.join(args.skip)}: leaves no kernel to compile")
    if args.json is not None and (args.json.is_dir() or not args.json.parent.is_dir()):
        parser.error(
            f"--json {args.json}: give a file path in an existing folder (checked before the ~minutes of compiling)"
        )
    start = time.perf_counter()
    rows, problems = run_gate(args.targets, args.jobs, args.only, args.skip)
    print(table(rows))
    print("\n" + decode_table(rows))
    print(
        f"\n{len(rows)} variants, {sum('error' not in r for r in rows)} compiled, "
        f"{sum(bool(r.get('spill_bytes')) for r in rows)} spilling, {time.perf_counter() - start:.0f} s, "
        f"on Triton {triton.__version__} ({Path(triton.__file__).parent})"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    for problem in problems:
        print("FAIL", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

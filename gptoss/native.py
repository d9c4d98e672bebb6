"""MXFP4 kernels for the CPU in C (gptoss/csrc/: native.h says which file does what), built at first
use with the system's C compiler into one library and called through ctypes: no Python headers, no
build step at install, about a second to compile. The library is cached under the gptoss cache folder,
keyed by the sources, the compiler, this CPU's instruction sets and the target: -march=native unless
GPTOSS_NATIVE_MARCH names another (x86-64 is the portable build, with no AVX-512: the suite builds it
too, so the fallback paths compile and run in every test run).

Without a compiler (or with GPTOSS_NATIVE=0) nothing breaks: `available()` is False, the CPU fast
path stays off and says so once on stderr, and MXFP4 experts are decoded with torch operations.

    linear(x, blocks, scales, bias)   x [n, in] @ W^T + bias, W read as MXFP4 (fp32 sums)
    moe(x, weights, ids, ...)         a few tokens' mixture of MXFP4 experts in one call (bf16)
    decode_attention(q, k, v, ...)    one new token's attention with sinks over the fp32 KV cache
    dequantize(blocks, scales, dtype) W in bf16 or fp32, bit for bit gptoss.mxfp4.dequantize
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = tuple(sorted(CSRC.glob("*.c")))  # built together; the headers (*.h) are part of the cache key
STATUS = {  # enum gptoss_status in csrc/native.h
    0: None,
    1: "this build of the native kernels has no kernel for it (no AVX512-BF16)",
    2: "a width that is not a multiple of 32, or an empty batch",
    3: "a routed expert id outside the layer's experts",
    4: "scratch memory could not be allocated",
}


def march() -> str:
    """The -march the library is built for: GPTOSS_NATIVE_MARCH, else native."""
    value = os.environ.get("GPTOSS_NATIVE_MARCH", "").strip() or "native"
    if not value.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"GPTOSS_NATIVE_MARCH={value!r} is not a -march name (e.g. native, x86-64, sapphirerapids)")
    return value


def _sources_digest() -> bytes:
    return b"".join(p.name.encode() + p.read_bytes() for p in sorted(CSRC.glob("*.[ch]")))


_reason: str | None = None  # why the kernels are off, once known
_told = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


BUILD_TIMEOUT_S = 120  # one build takes about a second; a compiler still running after this is stuck
VERSION_TIMEOUT_S = 20


def _compile(cc: str, out: Path, target: str = "native") -> str | None:
    """Build the library at `out` for -march=`target`; None on success, else the compiler's first error line."""
    base = [cc, "-O3", f"-march={target}", "-std=c11", "-shared", "-fPIC", f"-I{CSRC}", *map(str, SOURCES), "-lm"]
    error = ""
    for extra in (["-fopenmp"], []):  # without OpenMP the kernels run on one core
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            built = Path(tmp) / out.name
            try:
                done = subprocess.run(
                    [*base, *extra, "-o", str(built)], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"{cc} did not run ({e})"
            if done.returncode == 0 and built.is_file() and built.stat().st_size > 0:
                # its digest first, then the library: whole or not at all (a concurrent build never reads
                # half a file), and never loaded unless the file is still what was built
                digest = out.with_name(out.name + ".sha256")
                (Path(tmp) / digest.name).write_text(_sha256(built))
                os.replace(Path(tmp) / digest.name, digest)
                os.replace(built, out)
                return None
            if done.returncode == 0:
                return f"{cc} exited 0 but wrote no library"
            lines = [ln for ln in done.stderr.splitlines() if "error" in ln] or done.stderr.splitlines() or [""]
            error = lines[0].strip()
    return f"{cc} failed: {error}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(path: Path) -> bool:
    """The cached library is the file this process's build wrote: its sha256 matches the one recorded
    beside it (a truncated, replaced or planted file does not, and is rebuilt, never loaded)."""
    digest = path.with_name(path.name + ".sha256")
    try:
        return path.is_file() and digest.read_text().strip() == _sha256(path)
    except OSError:
        return False


def _unsafe_folder(folder: Path) -> str | None:
    """Why a cache folder may not hold code this process loads: another user owns it, or others can write it."""
    st = folder.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"{folder} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{folder} can be written by other users (mode {st.st_mode & 0o777:o}); chmod go-w it"
    return None


SYMBOLS = (
    "gptoss_mxfp4_linear",
    "gptoss_mxfp4_dequant",
    "gptoss_mxfp4_simd",
    "gptoss_mxfp4_bf16_dot",
    "gptoss_bf16_linear",
    "gptoss_mxfp4_moe",
    "gptoss_decode_attention",
    "gptoss_layout",
)

_P, _I64, _F32, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32


class MoEArgs(ctypes.Structure):
    """struct gptoss_moe_args (csrc/native.h), field for field."""

    _fields_ = [
        *[(name, _P) for name in ("x", "ids", "weights", "gate_up_blocks", "gate_up_scales", "gate_up_bias",
                                   "down_blocks", "down_scales", "down_bias", "out")],
        *[(name, _I64) for name in ("T", "D", "k", "E", "I")],
        ("alpha", _F32), ("limit", _F32), ("threads", _I32),
    ]  # fmt: skip


class AttentionArgs(ctypes.Structure):
    """struct gptoss_attention_args (csrc/native.h), field for field."""

    _fields_ = [
        *[(name, _P) for name in ("q", "k", "v", "sinks", "k_pos", "q_pos", "out")],
        *[(name, _I64) for name in ("B", "K", "G", "Dh", "S", "batch_stride", "head_stride", "pos_stride", "window")],
        ("q_bf16", _I32), ("threads", _I32),
    ]  # fmt: skip


STRUCTS = (MoEArgs, AttentionArgs)  # gptoss_layout(which, ...) numbers them in this order


def _status(call: str, code: int) -> None:
    """Raise for a non-zero gptoss_status, naming the call and what the code means."""
    if code == 0:
        return
    why = STATUS.get(code, f"unknown status {code}")
    error = {1: RuntimeError, 2: ValueError, 3: ValueError, 4: MemoryError}.get(code, RuntimeError)
    raise error(f"the native {call} failed: {why}")


def _failed_before(marker: Path) -> str | None:
    """The reason a build with this compiler (and source) failed in an earlier run, if one did: a compiler
    that hangs or fails costs the first run its timeout, not every run."""
    if os.environ.get("GPTOSS_NATIVE_RETRY") == "1":
        return None
    try:
        why = marker.read_text().strip()
    except OSError:
        return None
    return f"{why}, in an earlier run (delete {marker} or set GPTOSS_NATIVE_RETRY=1 to try again)"


def _remember_failure(marker: Path, why: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=marker.name + ".", dir=marker.parent)
        with os.fdopen(fd, "w") as f:
            f.write(why + "\n")
        os.replace(tmp, marker)
    except OSError:
        pass  # an unwritable cache: the next run tries again


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("GPTOSS_NATIVE", "1") == "0":
        _reason = "GPTOSS_NATIVE=0"
        return None
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None or shutil.which(cc) is None:
        _reason = f"no C compiler found ({'CC=' + cc if cc else 'cc, gcc and clang are not on PATH'})"
        return None
    from gptoss.config import cache_dir

    folder = cache_dir() / "native"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as e:
        _reason = f"cannot write {folder} ({e.strerror})"
        return None
    if (unsafe := _unsafe_folder(folder)) is not None:
        _reason = unsafe
        return None
    which = Path(shutil.which(cc)).resolve()
    stat = which.stat()
    try:
        target = march()
    except ValueError as e:
        _reason = str(e)
        return None
    compiler = hashlib.sha256(
        f"{which}:{stat.st_size}:{stat.st_mtime_ns}:{target}".encode() + _sources_digest()
    ).hexdigest()
    marker = folder / f"build_failed_{compiler[:16]}"  # this compiler binary, this source
    if (_reason := _failed_before(marker)) is not None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=VERSION_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        _reason = f"the C compiler {cc} does not run ({e})"
        _remember_failure(marker, _reason)
        return None
    key = hashlib.sha256(_sources_digest() + version.encode() + _cpu_flags().encode() + target.encode()).hexdigest()
    path = folder / f"libgptoss_mxfp4_{key[:16]}.so"
    if not _verified(path):  # missing, or not the file a build here wrote: build it again
        _reason = _compile(cc, path, target)
        if _reason is not None:
            _remember_failure(marker, _reason)
            return None
    try:
        marker.unlink()  # a retry that built: the compiler works again
    except OSError:
        pass
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _reason = f"could not load {path} ({e})"
        return None
    if missing := [name for name in SYMBOLS if not hasattr(lib, name)]:
        _reason = f"{path} lacks {', '.join(missing)}: not this version's library"
        return None
    i64, ptr, i32 = _I64, _P, _I32
    lib.gptoss_mxfp4_linear.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, i64, ptr, i32]
    lib.gptoss_mxfp4_dequant.argtypes = [ptr, ptr, i64, i64, ptr, i32, i32]
    lib.gptoss_bf16_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i32]
    lib.gptoss_mxfp4_moe.argtypes = [ctypes.POINTER(MoEArgs)]
    lib.gptoss_decode_attention.argtypes = [ctypes.POINTER(AttentionArgs)]
    lib.gptoss_layout.argtypes = [i32, i32]
    lib.gptoss_layout.restype = i64
    for name in SYMBOLS[:-1]:
        getattr(lib, name).restype = i32
    return lib


def available() -> bool:
    """Whether the native kernels are built and loaded (building them on first call)."""
    return _library() is not None


def reason() -> str | None:
    """Why the native kernels are off (None when they are on)."""
    _library()
    return _reason


def tell_once() -> None:
    """Say on stderr, once per process, that the CPU fast path for MXFP4 is off and why."""
    global _told
    if not _told and not available():
        _told = True
        print(
            f"gptoss: the native MXFP4 CPU kernels are off ({reason()}): MXFP4 experts are decoded "
            "with torch operations on every use, several times slower",
            file=sys.stderr,
        )


def simd() -> int:
    """The vector width the library was built for: 512 (AVX-512) or 0 (portable C)."""
    lib = _library()
    return 0 if lib is None else lib.gptoss_mxfp4_simd()


def bf16_dot() -> bool:
    """Whether bf16 inputs take the AVX512-BF16 pair products (vdpbf16ps) rather than fp32 FMAs."""
    lib = _library()
    return lib is not None and bool(lib.gptoss_mxfp4_bf16_dot())


def _check(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() != 3 or blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"expected blocks [rows, G, 16] and scales [rows, G], got {tuple(blocks.shape)} and {tuple(scales.shape)}"
        )
    if blocks.device.type != "cpu" or scales.device.type != "cpu":
        raise ValueError("the native MXFP4 kernels run on the CPU")


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None
) -> torch.Tensor:
    """[rows, G, 16] codes + [rows, G] scales -> [rows, 32 G] in bf16 or fp32 (into `out` when given)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native MXFP4 kernels are off: {_reason}")
    _check(blocks, scales)
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"native dequantization makes bf16 or fp32, not {dtype}")
    rows, groups = scales.shape
    if out is None:
        out = torch.empty(rows, groups * 32, dtype=dtype)
    elif out.shape != (rows, groups * 32) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{rows}, {groups * 32}] {dtype} tensor")
    blocks, scales = blocks.contiguous(), scales.contiguous()
    status = lib.gptoss_mxfp4_dequant(
        blocks.data_ptr(),
        scales.data_ptr(),
        rows,
        groups,
        out.data_ptr(),
        int(dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    _status("MXFP4 dequantization", status)
    return out


def linear(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear(x, dequantize(blocks, scales), bias) without the dense weight: x [n, in] bf16 or fp32
    -> [n, out] in x's dtype, products and sums in fp32 (the order of the sums differs from a BLAS
    matmul's: equal to it within fp32 rounding, then one rounding to x's dtype)."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native MXFP4 kernels are off: {_reason}")
    _check(blocks, scales)
    out_features, groups = scales.shape
    if x.dim() != 2 or x.shape[1] != groups * 32:
        raise ValueError(f"expected x [n, {groups * 32}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float32) or x.device.type != "cpu":
        raise TypeError(f"x must be a bf16 or fp32 CPU tensor, got {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{out_features}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    x, blocks, scales = x.contiguous(), blocks.contiguous(), scales.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    status = lib.gptoss_mxfp4_linear(
        x.data_ptr(),
        int(x.dtype == torch.bfloat16),
        x.shape[0],
        x.shape[1],
        blocks.data_ptr(),
        scales.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out_features,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    _status("MXFP4 linear", status)
    return y


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for bf16 x [n, in] and a plain bf16 weight [out, in] read in place (in a multiple of
    32; this build must have bf16_dot()): fp32 sums, one rounding; for few rows, where a BLAS call
    first reorders the whole weight."""
    lib = _library()
    if lib is None or not bf16_dot():
        raise RuntimeError(f"the native bf16 product is not available here: {_reason or 'no AVX512-BF16'}")
    out_features, in_features = weight.shape
    if x.dim() != 2 or x.shape[1] != in_features or in_features % 32:
        raise ValueError(f"expected x [n, {in_features}] with {in_features} a multiple of 32, got {tuple(x.shape)}")
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise TypeError(f"x and weight must be bf16 CPU tensors, got {x.dtype} and {weight.dtype} on {x.device}")
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != torch.bfloat16):
        raise ValueError(f"bias must be [{out_features}] bf16, got {tuple(bias.shape)} {bias.dtype}")
    x, weight = x.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
    status = lib.gptoss_bf16_linear(
        x.data_ptr(),
        x.shape[0],
        in_features,
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out_features,
        y.data_ptr(),
        torch.get_num_threads(),
    )
    _status("bf16 linear", status)
    return y


def moe(
    x_TD: torch.Tensor,
    weights_Tk: torch.Tensor,
    ids_Tk: torch.Tensor,
    gate_up: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    down: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """gptoss.model.experts_forward for bf16 x [T, D] and MXFP4 experts, in one call: gate_up and
    down are (codes [E, out, in/32, 16], scales [E, out, in/32], bias [E, out]); weights [T, k] fp32
    and ids [T, k] from the router. Each expert product as `linear` makes it (fp32 sums, one rounding),
    the SwiGLU rounded to bf16 step by step as torch does, the slots summed in fp32: equal to the
    reference but for the order of the products' sums and sigmoid's last bit. Needs bf16_dot()."""
    lib = _library()
    if lib is None or not bf16_dot():
        raise RuntimeError(f"the native MoE is not available here: {_reason or 'no AVX512-BF16'}")
    (b1, s1, bias1), (b2, s2, bias2) = gate_up, down
    if x_TD.dim() != 2 or s1.dim() != 3:
        raise ValueError(
            f"expected x [T, D] and gate_up scales [E, 2I, D/32], got {tuple(x_TD.shape)} and {tuple(s1.shape)}"
        )
    for codes, scales in (gate_up[:2], down[:2]):
        _check(codes.flatten(0, 1), scales.flatten(0, 1))
    T, D = x_TD.shape
    E, I2 = s1.shape[0], s1.shape[1]
    expected = {
        "gate_up codes": (b1, (E, I2, D // 32, 16)),
        "down codes": (b2, (E, D, I2 // 64, 16)),
        "gate_up bias": (bias1, (E, I2)),
        "down bias": (bias2, (E, D)),
        "gate_up scales": (s1, (E, I2, D // 32)),
        "down scales": (s2, (E, D, I2 // 64)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"expected {name} {shape} for x [{T}, {D}], got {tuple(t.shape)}")
    if x_TD.dtype != torch.bfloat16 or bias1.dtype != torch.bfloat16 or bias2.dtype != torch.bfloat16:
        raise TypeError(f"x and the biases must be bf16, got {x_TD.dtype}, {bias1.dtype}, {bias2.dtype}")
    if ids_Tk.shape != weights_Tk.shape or ids_Tk.shape[0] != T or weights_Tk.dtype != torch.float32:
        raise ValueError(
            f"expected ids and fp32 weights [{T}, k], got {tuple(ids_Tk.shape)} and {tuple(weights_Tk.shape)} {weights_Tk.dtype}"
        )
    if D % 32 or I2 % 64:
        raise ValueError(f"hidden size {D} and intermediate size {I2 // 2} must be multiples of 32")
    args = [t.contiguous() for t in (x_TD, ids_Tk.long(), weights_Tk, b1, s1, bias1, b2, s2, bias2)]
    out = torch.empty(T, D, dtype=torch.bfloat16)
    x, ids, w, b1, s1, bias1, b2, s2, bias2 = args
    call = MoEArgs(
        x=x.data_ptr(),
        ids=ids.data_ptr(),
        weights=w.data_ptr(),
        gate_up_blocks=b1.data_ptr(),
        gate_up_scales=s1.data_ptr(),
        gate_up_bias=bias1.data_ptr(),
        down_blocks=b2.data_ptr(),
        down_scales=s2.data_ptr(),
        down_bias=bias2.data_ptr(),
        out=out.data_ptr(),
        T=T,
        D=D,
        k=ids.shape[1],
        E=E,
        I=I2 // 2,
        alpha=alpha,
        limit=limit,
        threads=torch.get_num_threads(),
    )
    status = lib.gptoss_mxfp4_moe(ctypes.byref(call))
    if status == 3:
        raise ValueError(f"expert ids must be in 0 .. {E - 1}, got {ids.min().item()} .. {ids.max().item()}")
    _status("MoE", status)
    return out


def decode_attention(
    q: torch.Tensor,  # [B, 1, K, G, Dh] rotated, bf16 or fp32
    k: torch.Tensor,  # [B, S, K, Dh] fp32, the cache's transposed view (rows of Dh contiguous)
    v: torch.Tensor,  # [B, S, K, Dh] fp32, laid out as k
    sinks: torch.Tensor,  # [K*G]
    q_pos: torch.Tensor,  # [1] or [B, 1]
    k_pos: torch.Tensor,  # [S] or [B, S]; negative: padding
    window: int | None,
) -> torch.Tensor:
    """gptoss.model.attention_with_sinks for one query token per sequence (decoding), in one call:
    fp32 throughout (the reference's order of sums aside), the output in q's dtype."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native kernels are off: {_reason}")
    if q.dim() != 5 or q.shape[1] != 1 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, 1, K, G, Dh] and k, v [B, S, K, Dh], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, _, K, G, Dh = q.shape
    S = k.shape[1]
    if k.shape[0] != B or k.shape[2] != K or k.shape[3] != Dh:
        raise ValueError(f"k and v [B, S, K, Dh] must match q [{B}, 1, {K}, {G}, {Dh}], got {tuple(k.shape)}")
    if q.dtype not in (torch.bfloat16, torch.float32) or k.dtype != torch.float32 or v.dtype != torch.float32:
        raise TypeError(f"expected q in bf16 or fp32 and an fp32 cache, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.stride() != v.stride() or k.stride(1) != Dh or k.stride(3) != 1:  # to the cache's [B, K, S, Dh] layout
        k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v))
    if q_pos.dtype not in (torch.int32, torch.int64) or k_pos.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expected integer positions (int32 or int64), got {q_pos.dtype} and {k_pos.dtype}")
    # the kernel reads int64; the cache keeps int32 (gptoss.generate.LayerCache): S values converted here
    q_pos = q_pos.reshape(-1, 1).expand(B, 1).reshape(B).to(torch.int64).contiguous()
    k_pos = k_pos.reshape(-1, S).expand(B, S).to(torch.int64)
    if k_pos.stride(1) != 1:
        k_pos = k_pos.contiguous()
    sinks = sinks.detach().float().contiguous()
    if sinks.shape != (K * G,):
        raise ValueError(f"expected sinks [{K * G}], got {tuple(sinks.shape)}")
    q = q.contiguous()
    out = torch.empty_like(q)
    call = AttentionArgs(
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        sinks=sinks.data_ptr(),
        k_pos=k_pos.data_ptr(),
        q_pos=q_pos.data_ptr(),
        out=out.data_ptr(),
        B=B,
        K=K,
        G=G,
        Dh=Dh,
        S=S,
        batch_stride=k.stride(0),
        head_stride=k.stride(2),
        pos_stride=k_pos.stride(0),
        window=-1 if window is None else window,
        q_bf16=int(q.dtype == torch.bfloat16),
        threads=torch.get_num_threads(),
    )
    _status("decode attention", lib.gptoss_decode_attention(ctypes.byref(call)))
    return out


__all__ = [
    "decode_attention",
    "moe",
    "bf16_linear",
    "bf16_dot",
    "available",
    "dequantize",
    "linear",
    "reason",
    "simd",
    "tell_once",
]

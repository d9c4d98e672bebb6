"""The one results writer all benchmarks share: a fixed-width table on stdout and JSON lines, each
with the machine, versions and date, appended to benchmarks/results/<bench>.jsonl."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(os.environ.get("GPTOSS_RESULTS_DIR", Path(__file__).resolve().parent / "results"))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 if hasattr(os, "sysconf") else None
    info = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1) if mem_gb else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        sha = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "gptoss_commit": sha or None}


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    lines += ["  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "-" if v is None else str(v)


def record(bench: str, rows: list[dict], **context) -> Path:
    """Append one JSON line per row, with machine, versions, date and `context`; return the file."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{bench}.jsonl"
    stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    with open(path, "a") as f:
        for row in rows:
            f.write(
                json.dumps(
                    {"bench": bench, "date": stamp, "machine": machine(), "versions": versions(), **context, **row}
                )
                + "\n"
            )
    return path


# Peak figures of an H100 SXM5 (performance anchors, section 1.3): the roofline the GPU rows report against.
H100_BF16_FLOPS = 989.5e12
H100_HBM_BYTES_PER_S = 3.35e12


def time_ms(fn, warmup: int = 2, reps: int = 10) -> dict:
    """Median and 20/80% quantiles of fn() in milliseconds. On CUDA: triton.testing.do_bench, which
    synchronises and clears the L2 cache between runs; on the CPU: wall clock over `reps` runs."""
    if torch.cuda.is_available():
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    import statistics
    import time

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) > 1 else samples * 9
    return {"ms": statistics.median(samples), "ms_p20": q[1], "ms_p80": q[7]}


def time_graph_ms(fn) -> float | None:
    """fn() captured once in a CUDA graph and replayed (triton.testing.do_bench_cudagraph, median): the
    GPU's time without Python or the launch path, what a decode step inside one graph pays. fn must not
    synchronise with the host. None off CUDA."""
    if not torch.cuda.is_available():
        return None
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))


def copy_bandwidth_gbs(device: str, nbytes: int = 1 << 30) -> float:
    """Device-memory bandwidth measured now: bytes read plus written by a plain copy of `nbytes`
    (1 GiB on a GPU, far larger than its L2), per second. The figure the MoE decode rows are judged by."""
    if device == "cpu":
        nbytes = min(nbytes, 1 << 28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src))
    return 2 * nbytes / (t["ms"] / 1e3) / 1e9


def roofline(flops: float, nbytes: float, ms: float) -> dict:
    """Achieved TFLOP/s and GB/s, and the fraction of the H100 roofline time (max of the compute and
    memory bounds) that the measured time reaches; only meaningful for GPU rows."""
    seconds = ms / 1e3
    bound = max(flops / H100_BF16_FLOPS, nbytes / H100_HBM_BYTES_PER_S)
    return {"tflops": flops / seconds / 1e12, "gbs": nbytes / seconds / 1e9, "roofline_pct": 100 * bound / seconds}


def plot(rows: list[dict], x: str, y: str, series: str, path: Path, title: str, logx: bool = True) -> Path | None:
    """One line per value of `series`; returns the PNG path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in sorted({r[series] for r in rows}):
        pts = sorted((r[x], r[y]) for r in rows if r[series] == name and r.get(y) is not None)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class PeakRSS:
    """Highest resident set size seen while the block runs (sampled every 10 ms from /proc/self/status).
    Resident memory counts the memory-mapped checkpoint pages a model touched; those are file-backed
    and reclaimable, so `anon_gb` (allocated memory alone) is reported beside it."""

    def __enter__(self):
        import ctypes
        import gc

        gc.collect()
        try:  # hand memory freed by earlier phases back to the OS, so it does not count here
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.peak, self.peak_anon, self._stop, self._paused = 0, 0, threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @contextlib.contextmanager
    def pause(self):
        """A block whose memory is not the measured code's (a bandwidth probe between timed runs)."""
        self._paused.set()
        try:
            yield
        finally:
            self._paused.clear()

    def _watch(self):
        while not self._stop.is_set():
            if self._paused.is_set():
                time.sleep(0.01)
                continue
            fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Rss"))
            kib = {k: int(v.split()[0]) for k, v in fields.items()}
            self.peak = max(
                self.peak, kib.get("RssAnon", 0) * 1024 + kib.get("RssFile", 0) * 1024 + kib.get("RssShmem", 0) * 1024
            )
            self.peak_anon = max(self.peak_anon, kib.get("RssAnon", 0) * 1024)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gb(self) -> float:
        """Peak resident memory, memory-mapped checkpoint pages included."""
        return self.peak / 1e9

    @property
    def anon_gb(self) -> float:
        """Peak of the memory the process allocated itself (RssAnon): what is not checkpoint file pages."""
        return self.peak_anon / 1e9

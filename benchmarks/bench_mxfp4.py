"""MXFP4 -> bf16 dequantization: the Triton kernel against the torch reference, same run.

    python benchmarks/bench_mxfp4.py            # on an H100: gpt-oss-20b/120b expert shapes
    python benchmarks/bench_mxfp4.py --quick    # fewer shapes

Reports GB/s moved (packed bytes + scales read, bf16 written) and the % of the H100 HBM roofline.
Without a GPU it measures the torch reference on small shapes and says that GPU figures were not taken.
"""

from __future__ import annotations

import argparse
import json

import torch
from results import RESULTS_DIR, machine, plot, record, roofline, table, time_ms

from gptoss import mxfp4

# (name, E, rows, cols): one expert's gate_up (5760 x 2880) and down (2880 x 2880), and whole layers
GPU_SHAPES = [
    ("expert gate_up", 1, 5760, 2880),
    ("expert down", 1, 2880, 2880),
    ("20b layer gate_up", 32, 5760, 2880),
    ("120b layer gate_up", 128, 5760, 2880),
]
CPU_SHAPES = [("small expert", 1, 512, 512), ("small layer", 8, 512, 512), ("expert gate_up", 1, 5760, 2880)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if args.quick:
        shapes = shapes[:2]
    providers = {"torch-reference": mxfp4.dequantize}
    if gpu:
        from gptoss.kernels.mxfp4 import mxfp4_dequant_fwd

        providers["triton"] = mxfp4_dequant_fwd
    rows = []
    for name, E, R, C in shapes:
        blocks = torch.randint(0, 256, (E, R, C // 32, 16), dtype=torch.uint8, device=device)
        scales = torch.randint(118, 126, (E, R, C // 32), dtype=torch.uint8, device=device)
        nbytes = blocks.numel() + scales.numel() + E * R * C * 2  # read packed + scales, write bf16
        for provider, fn in providers.items():
            t = time_ms(lambda fn=fn: fn(blocks, scales, torch.bfloat16))
            row = {"shape": name, "E": E, "rows": R, "cols": C, "provider": provider, "device": device, **t}
            row["gbs"] = nbytes / (t["ms"] / 1e3) / 1e9
            if gpu:
                row["roofline_pct"] = roofline(0, nbytes, t["ms"])["roofline_pct"]
            rows.append(row)
    print(table(rows, ["shape", "provider", "ms", "ms_p20", "ms_p80", "gbs", "roofline_pct"]))
    if not gpu:
        print("no CUDA device: measured the torch reference on the CPU; the Triton kernel's GPU figures were not taken")
    print(f"machine: {machine()}")
    record("mxfp4", rows)
    png = plot(
        rows, "rows", "gbs", "provider", RESULTS_DIR / "mxfp4.png", f"MXFP4 dequantization, {device}", logx=False
    )
    print(f"results appended to {RESULTS_DIR / 'mxfp4.jsonl'}" + (f"; plot {png}" if png else ""))
    print(json.dumps({"bench": "mxfp4", "results": rows}))


if __name__ == "__main__":
    main()

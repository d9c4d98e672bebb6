"""Write a full-size synthetic checkpoint, load it, run one forward pass: time and peak memory.

    python benchmarks/bench_load.py                       # gpt-oss-20b shape, original layout, 16 tokens
    python benchmarks/bench_load.py --preset tiny --layout hf-mxfp4

The checkpoint is written by a separate process (so its memory is measured apart from loading) and
kept in --dir for later runs. Peak resident memory is the process's high-water mark (ru_maxrss),
which counts the memory-mapped checkpoint pages the forward pass touched.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from results import machine, record, table

from gptoss import get_preset, load_model
from gptoss.config import cache_dir


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def write_in_subprocess(preset: str, layout: str, folder: Path) -> dict:
    code = (
        "import json, resource, time; from gptoss import get_preset; from gptoss.synthetic import write_checkpoint; "
        f"t = time.perf_counter(); write_checkpoint({str(folder)!r}, get_preset({preset!r}), {layout!r}, progress=True); "
        "print(json.dumps({'write_s': time.perf_counter() - t, "
        "'write_peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt-oss-20b", help="model shape (default: gpt-oss-20b)")
    parser.add_argument(
        "--layout", default="original", choices=["original", "hf-mxfp4", "hf-bf16"], help="on-disk layout"
    )
    parser.add_argument(
        "--dir", default=None, help="checkpoint folder (default: $GPTOSS_CACHE or ~/.cache/gptoss, /<preset>-<layout>)"
    )
    parser.add_argument("--tokens", type=int, default=16, help="tokens in the forward pass (default: 16)")
    args = parser.parse_args()

    folder = Path(args.dir).expanduser() if args.dir else cache_dir() / f"{args.preset}-{args.layout}"
    row = {"preset": args.preset, "layout": args.layout, "tokens": args.tokens, "dtype": "bfloat16"}
    if not (folder / "config.json").exists():
        print(f"writing a synthetic {args.preset} checkpoint ({args.layout}) to {folder} ...", flush=True)
        row |= write_in_subprocess(args.preset, args.layout, folder)
    row["checkpoint_gb"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e9

    start = time.perf_counter()
    model = load_model(folder, dtype=torch.bfloat16)
    row["load_s"] = time.perf_counter() - start
    row["load_peak_rss_gb"] = peak_rss_gb()
    ids = torch.randint(
        0, get_preset(args.preset).vocab_size - 1088, (1, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    row["forward_s"] = time.perf_counter() - start
    row["peak_rss_gb"] = peak_rss_gb()
    row["logits_finite"] = bool(torch.isfinite(logits).all())

    cols = [
        c
        for c in (
            "preset",
            "layout",
            "tokens",
            "checkpoint_gb",
            "write_s",
            "write_peak_rss_gb",
            "load_s",
            "load_peak_rss_gb",
            "forward_s",
            "peak_rss_gb",
        )
        if c in row
    ]
    print(table([row], cols))
    print(f"machine: {machine()}")
    path = record("load", [row])
    print(f"appended to {path}")
    print(json.dumps({"bench": "load", "results": [row]}))


if __name__ == "__main__":
    main()

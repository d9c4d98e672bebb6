"""The project's GPU goals against a results file: one line a goal, its target, what was measured and
whether it was met (or not measured, and why).

    python benchmarks/goals.py benchmarks/results/gpu-<date>/gpu-results.jsonl

The file is what `make bench-gpu` writes (every JSON line of bench_train, bench_moe and bench_attention,
among others); a record of several runs (benchmarks/records/) is read too, a later line of the same
measurement replacing an earlier one. The goals, for one H100-class GPU at bf16:

- the recipe's LoRA step of gpt-oss-20b (2,048-token rows, r 8 on q/k/v/o and three layers' experts):
  >= 3x the speed of transformers + PEFT in the same run, >= 35% MFU, peak allocated <= 16 GB;
- gpt-oss-120b's LoRA step on the one GPU with a peak of <= 70 GiB;
- the recipe's epoch (1,000 rows, counted here at the measured 2,048-token step: an upper bound) in
  under 6 minutes;
- the MoE layer at 4,096+ tokens, forward and forward + backward: >= 1.0x torch._grouped_mm on dense
  bf16 weights of the same shapes, and >= 40% of the bf16 peak;
- attention with sinks at 2,048-8,192 tokens (full causal rows): forward >= 0.9x FlashAttention-2,
  forward + backward >= 0.8x.

Each goal reports its worst row (the slowest ratio, the largest peak). Nothing here times anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPOCH_ROWS = 1000


def read_rows(path: Path) -> list[dict]:
    """The JSON lines of `path` that are objects; lines that are not JSON (a log's text) are skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _latest(rows: list[dict], key) -> list[dict]:
    """One row per key(row), the last in the file."""
    return list({key(r): r for r in rows}.values())


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def _lowest(rows: list[dict], field: str) -> tuple[float, dict, int] | None:
    """(the smallest number rows hold in `field`, its row, how many rows hold one); None where none does."""
    found = [(v, r) for r in rows if (v := _number(r.get(field)))]
    return (*min(found, key=lambda vr: vr[0]), len(found)) if found else None


def _line(goal: str, target: str, measured: str | None, met: bool | None, why: str = "") -> dict:
    verdict = "not measured" if met is None else "met" if met else "not met"
    return {"goal": goal, "target": target, "measured": measured or why or "-", "verdict": verdict}


def train_goals(rows: list[dict], peak_tflops: float) -> list[dict]:
    train = _latest(
        [r for r in rows if r.get("bench") == "train" and r.get("tokens")],
        lambda r: (r.get("impl"), r.get("config")),
    )
    ours = {r["config"]: r for r in train if r.get("impl") == "gptoss"}
    theirs = {r["config"]: r for r in train if r.get("impl") == "transformers+peft"}
    out = []
    small, large = ours.get("gpt-oss-20b", {}), ours.get("gpt-oss-120b", {})
    step, their_step = _number(small.get("step_s")), _number(theirs.get("gpt-oss-20b", {}).get("step_s"))
    why = small.get("skipped") or small.get("failed") or "no gpt-oss-20b step in the file"
    ratio = their_step / step if step and their_step else None
    out.append(
        _line(
            "gpt-oss-20b LoRA step, speed over transformers + PEFT",
            ">= 3.0x",
            f"{ratio:.2f}x ({their_step:.3f} s / {step:.3f} s)" if ratio else None,
            ratio >= 3.0 if ratio else None,
            why if not step else "no transformers + PEFT step in the file",
        )
    )
    flop = _number(small.get("step_tflop"))
    mfu = flop / step / peak_tflops if flop and step else None
    out.append(
        _line(
            "gpt-oss-20b LoRA step, MFU",
            ">= 35%",
            f"{100 * mfu:.1f}% of {peak_tflops:g} TFLOP/s" if mfu else None,
            mfu >= 0.35 if mfu else None,
            why,
        )
    )
    peak = _number(small.get("peak_gpu_gb"))
    out.append(
        _line(
            "gpt-oss-20b LoRA step, peak allocated",
            "<= 16 GB",
            f"{peak:.1f} GB" if peak else None,
            peak <= 16 if peak else None,
            why if not step else "no GPU memory in the row",
        )
    )
    big = _number(large.get("peak_gpu_gib"))
    why_big = large.get("skipped") or large.get("failed") or "no gpt-oss-120b step in the file"
    out.append(
        _line(
            "gpt-oss-120b LoRA step on one GPU, peak allocated",
            "<= 70 GiB",
            f"{big:.1f} GiB" if big else None,
            big <= 70 if big else None,
            why_big,
        )
    )
    minutes = EPOCH_ROWS * step / 60 if step else None
    out.append(
        _line(
            f"the recipe's epoch ({EPOCH_ROWS:,} rows) on one GPU, at most",
            "< 6 min",
            f"{minutes:.1f} min" if minutes else None,
            minutes < 6 if minutes else None,
            why,
        )
    )
    return out


def moe_goals(rows: list[dict], peak_tflops: float) -> list[dict]:
    moe = _latest(
        [
            r
            for r in rows
            if r.get("bench") == "moe" and r.get("provider") == "triton" and (r.get("tokens") or 0) >= 4096
        ],
        lambda r: (r.get("shape"), r.get("tokens"), r.get("pass") or "forward"),
    )
    out = []
    for passes in ("forward", "forward+backward"):
        these = [r for r in moe if (r.get("pass") or "forward") == passes]
        worst, slow = _lowest(these, "vs_grouped_mm"), _lowest(these, "tflops")
        out.append(
            _line(
                f"MoE layer {passes} at 4,096+ tokens, over torch._grouped_mm",
                ">= 1.0x",
                f"{worst[0]:.2f}x ({_moe_row(worst[1])}; {worst[2]} rows)" if worst else None,
                worst[0] >= 1.0 if worst else None,
                "no MoE rows of 4,096+ tokens in the file",
            )
        )
        out.append(
            _line(
                f"MoE layer {passes} at 4,096+ tokens, of the bf16 peak",
                ">= 40%",
                f"{100 * slow[0] / peak_tflops:.1f}% ({slow[0]:.0f} TFLOP/s, {_moe_row(slow[1])})" if slow else None,
                slow[0] >= 0.4 * peak_tflops if slow else None,
                "no MoE rows of 4,096+ tokens in the file",
            )
        )
    return out


def _moe_row(row: dict) -> str:
    return f"{row.get('shape')}, {row.get('tokens'):,} tokens"


def attention_goals(rows: list[dict]) -> list[dict]:
    attention = _latest(
        [
            r
            for r in rows
            if r.get("bench") == "attention"
            and r.get("provider") == "triton"
            and r.get("window") == "full"
            and 2048 <= (r.get("T") or 0) <= 8192
        ],
        lambda r: (r.get("B"), r.get("T"), r.get("what")),
    )
    out = []
    for what, target in (("fwd", 0.9), ("fwd+bwd", 0.8)):
        worst = _lowest([r for r in attention if r.get("what") == what], "vs_fa2")
        out.append(
            _line(
                f"attention {'forward' if what == 'fwd' else 'forward + backward'} at 2,048-8,192 tokens, over FlashAttention-2",
                f">= {target}x",
                f"{worst[0]:.2f}x ({worst[1].get('B')} x {worst[1].get('T'):,} tokens; {worst[2]} rows)"
                if worst
                else None,
                worst[0] >= target if worst else None,
                "no full-causal attention rows with a FlashAttention-2 ratio in the file",
            )
        )
    return out


def goals(rows: list[dict], peak_tflops: float = 989.0) -> list[dict]:
    return train_goals(rows, peak_tflops) + moe_goals(rows, peak_tflops) + attention_goals(rows)


def report(lines: list[dict]) -> str:
    widths = {k: max(len(k), *(len(line[k]) for line in lines)) for k in ("goal", "target", "measured", "verdict")}
    head = "  ".join(k.ljust(w) for k, w in widths.items())
    body = ["  ".join(line[k].ljust(w) for k, w in widths.items()) for line in lines]
    met = sum(line["verdict"] == "met" for line in lines)
    unmeasured = sum(line["verdict"] == "not measured" for line in lines)
    return "\n".join([head, *body, f"{met} of {len(lines)} goals met, {unmeasured} not measured"])


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of TFLOP/s, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of TFLOP/s, got {text!r}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a results file: make bench-gpu's gpu-results.jsonl, or a record")
    parser.add_argument(
        "--peak-tflops", type=_positive, default=989.0, help="the GPU's dense bf16 peak (default: 989, an H100 SXM)"
    )
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"no results file at {args.results}: give the gpu-results.jsonl that make bench-gpu wrote")
    print(report(goals(read_rows(args.results), args.peak_tflops)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

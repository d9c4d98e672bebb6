"""The `gptoss` command (also `python -m gptoss`): one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gptoss.checkpoint import LAYOUTS, CheckpointError


def _default_cache() -> Path:
    return Path(os.environ.get("GPTOSS_CACHE", Path.home() / ".cache" / "gptoss"))


def cmd_synth(args: argparse.Namespace) -> int:
    from gptoss.config import get_preset
    from gptoss.synthetic import write_checkpoint

    config = get_preset(args.preset)
    max_bytes = int(args.max_shard_gb * 1e9) if args.max_shard_gb else None
    start = time.perf_counter()
    write_checkpoint(args.out, config, args.layout, args.seed, max_shard_bytes=max_bytes, progress=True)
    print(
        f"wrote a random {args.preset} checkpoint ({args.layout}) to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from gptoss.checkpoint import open_checkpoint
    from gptoss.config import format_param_table, get_preset

    if args.preset:
        config, where = get_preset(args.preset), f"preset {args.preset}"
    else:
        from gptoss.load import resolve_source

        config, layout, index = open_checkpoint(resolve_source(args.model))
        where = f"{index.folder} ({layout} layout, {len(set(index.files.values()))} file(s))"
    print(where)
    print(format_param_table(config, markdown=args.markdown))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from gptoss.config import format_param_table, get_preset
    from gptoss.load import load_model
    from gptoss.synthetic import write_checkpoint

    folder = Path(args.dir) if args.dir else _default_cache() / "tiny-hf-mxfp4"
    config = get_preset("tiny")
    if not (folder / "config.json").exists():
        print(f"[1/3] writing a random tiny checkpoint (HF MXFP4 layout) to {folder}")
        write_checkpoint(folder, config, "hf-mxfp4", seed=0)
    else:
        print(f"[1/3] using the tiny checkpoint in {folder}")
    start = time.perf_counter()
    model = load_model(folder, dtype=torch.float32)
    print(f"[2/3] loaded in {time.perf_counter() - start:.2f} s; parameters:")
    print(format_param_table(model.config))
    ids = torch.randint(0, 199998, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    elapsed = time.perf_counter() - start
    top = logits[0, -1].float().softmax(-1).topk(5)
    print(f"[3/3] forward pass over {args.tokens} tokens: logits {list(logits.shape)} in {elapsed * 1e3:.0f} ms")
    print(
        "      next-token top-5 (id: prob): "
        + ", ".join(f"{i}: {p:.2e}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    )
    print("      (random weights: the ids mean nothing; the point is the machinery)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gptoss.config import PRESETS

    parser = argparse.ArgumentParser(prog="gptoss", description="gpt-oss reference implementation: tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a random checkpoint in a real gpt-oss on-disk layout")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--layout", choices=LAYOUTS, default="hf-mxfp4", help="on-disk layout (default: hf-mxfp4)")
    p.add_argument("--out", required=True, help="folder to write the checkpoint into")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same model in every layout"
    )
    p.add_argument(
        "--max-shard-gb", type=float, default=None, help="shard size (default: that of the real checkpoints)"
    )
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("info", help="print the parameter table of a checkpoint or a preset")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="checkpoint folder or hub id")
    g.add_argument("--preset", choices=list(PRESETS), help="a named configuration")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="write a tiny random checkpoint if missing, load it and run a forward pass")
    p.add_argument("--dir", help="checkpoint folder (default: $GPTOSS_CACHE/tiny-hf-mxfp4, ~/.cache/gptoss)")
    p.add_argument("--tokens", type=int, default=64, help="tokens in the forward pass (default: 64)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError, NotImplementedError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gptoss {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptoss {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""The `gptoss` command (also `python -m gptoss`): one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gptoss.checkpoint import LAYOUTS
from gptoss.errors import UsageError, check_float, check_int, path_flag
from gptoss.generate import speed_line

SYNTH_FILES = ("config.json", "generation_config.json", "dtypes.json", "model.safetensors.index.json")


def cmd_synth(args: argparse.Namespace) -> int:
    from gptoss.config import get_preset
    from gptoss.synthetic import write_checkpoint

    config = get_preset(args.preset)
    check_int("--seed", args.seed, 0, 2**63 - 1)
    max_bytes = None
    if args.max_shard_gb is not None:
        max_bytes = int(check_float("--max-shard-gb", args.max_shard_gb, 0.0, 1e4, above=True) * 1e9)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder: give a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out}: cannot create it ({e.strerror}); give a folder you can write") from None
    from gptoss.train.run_folder import MANIFEST, RUN_FILES

    run = sorted(name for name in (*RUN_FILES, MANIFEST) if (out / name).exists())
    if run:  # a training run's adapter and checkpoint are the user's work: never replaced by random weights
        raise FileExistsError(
            f"--out {out} holds a training run ({', '.join(run[:3])}): synth never writes over one, not even with "
            "--overwrite; choose another folder"
        )
    # what synth itself writes: the shards, the index and the config files of the three layouts
    held = sorted(
        p.name
        for p in out.glob("*")
        if p.is_file() and p.name in SYNTH_FILES or (p.name.startswith("model") and p.name.endswith(".safetensors"))
    )
    if held and not args.overwrite:
        raise FileExistsError(
            f"--out {out} already holds a checkpoint ({', '.join(held[:3])}): pass --overwrite to replace it, "
            "or choose another folder"
        )
    for name in held:  # only the checkpoint's own files: anything else the user keeps there stays
        (out / name).unlink(missing_ok=True)
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
    from gptoss.demo import run

    return run(args)


def check_device(flag: str, value: str) -> str:
    """A torch device this process can use, else UsageError saying which exist here."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {value!r} is not a device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this PyTorch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise UsageError(f"{flag} {value}: {build}; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"{flag} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"{flag} {value}: gptoss runs on cpu or cuda, not {device.type}")
    return value


def _load(args: argparse.Namespace):
    import torch

    from gptoss.load import load_model

    check_device("--device", args.device)

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cpu = torch.device(args.device).type == "cpu"
    dequantize = {"auto": "auto" if cpu else False, "mxfp4": False, "dense": True}[args.experts]
    # on the CPU, weights prepacked for oneDNN when the experts are dense: the same tokens, faster (gptoss.cpu)
    adapter = getattr(args, "adapter", None)
    return load_model(
        args.model, device=args.device, dtype=dtype, dequantize=dequantize, prepack="auto", adapter=adapter
    )


def _print_reply(reply) -> None:
    if reply.error is not None or not (reply.analysis or reply.final or reply.calls):
        why = reply.error.splitlines()[0] if reply.error else "no Harmony message in it"
        print(f"── output, unparsed ({why}) ──")
        print(reply.raw)
        return
    print("── analysis ──")
    print(reply.analysis or "(none)")
    for recipient, arguments in reply.calls:
        print(f"── tool call to {recipient} ──")
        print(arguments)
    print("── final ──")
    print(reply.final or "(none)")
    if not reply.complete:
        print("(stopped at the token limit)")


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampling flags, before the model loads: a typo costs nothing."""
    from gptoss.generate import check_sampling

    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    except UsageError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from gptoss import harmony
    from gptoss.generate import generate

    _check_sampling(args)
    if not args.prompt.strip():
        raise UsageError("--prompt is empty: give the text to complete or the message to answer")
    if args.raw:
        prompt = harmony.encode(args.prompt)
        stops = (harmony.ENDOFTEXT,)
    else:
        turns = [{"role": "user", "content": args.prompt}]
        conversation = harmony.build_conversation(
            turns, developer=args.developer, reasoning_effort=args.reasoning_effort
        )
        prompt, stops = harmony.render_prompt(conversation), harmony.ASSISTANT_STOP_TOKENS
    model = _load(args)
    stats: dict = {}
    tokens = generate(
        model,
        [prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_tokens=stops,
        stats=stats,
    )[0]
    if args.raw:
        print("── completion ──")
        print(harmony.decode(tokens))
    else:
        _print_reply(harmony.parse_reply(tokens))
    print("── speed ──")
    print(speed_line(stats))
    return 0


def chat_prompt(history: list[dict], developer: str | None, reasoning_effort: str) -> list[int]:
    """The next prompt of a chat. `history` holds user turns and earlier assistant *final* answers
    only: Harmony drops a finished turn's analysis, and a final answer that was sampled ending in
    `<|return|>` is rendered in history ending with `<|end|>`."""
    from gptoss import harmony

    conversation = harmony.build_conversation(history, developer=developer, reasoning_effort=reasoning_effort)
    return harmony.render_prompt(conversation)


def read_line(stream) -> str | None:
    """One line from `stream` (bytes decoded as UTF-8 when it has a byte buffer); None at end of input.
    Raises UnicodeDecodeError for a line that is not UTF-8, after consuming it."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        line = stream.readline()
        return line or None
    raw = buffer.readline()
    return raw.decode("utf-8") if raw else None


def cmd_chat(args: argparse.Namespace) -> int:
    """A read-reply loop. Ctrl-C while a reply is produced stops that reply (the message is dropped from
    the history); Ctrl-C at the prompt, /exit or end of input ends the session. A line that is not
    UTF-8 is refused with a message and the session goes on."""
    from gptoss import harmony
    from gptoss.generate import generate

    _check_sampling(args)
    model = _load(args)
    history: list[dict] = []
    print(
        "gptoss chat: type a message; /reset clears the history; /exit, Ctrl-D or Ctrl-C at the prompt quits; "
        "Ctrl-C during a reply stops it.",
        flush=True,
    )
    while True:
        print("user> ", end="", flush=True)
        try:
            line = read_line(sys.stdin)
        except KeyboardInterrupt:
            print()
            return 0
        except UnicodeDecodeError as e:
            print(
                f"gptoss chat: that line is not valid UTF-8 ({e.reason} at byte {e.start}); type it again",
                file=sys.stderr,
                flush=True,
            )
            continue
        if line is None or line.strip() == "/exit":
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history.clear()
            continue
        turn = {"role": "user", "content": text}
        prompt = chat_prompt(history + [turn], args.developer, args.reasoning_effort)
        context = model.config.max_position_embeddings
        if len(prompt) + args.max_new_tokens > context:  # refuse this turn; the session and its history go on
            print(
                f"gptoss chat: with the history this turn is {len(prompt)} tokens, and a reply of up to "
                f"{args.max_new_tokens} more would pass the model's context of {context}: not sent; /reset "
                "clears the history (or restart with a smaller --max-new-tokens)",
                file=sys.stderr,
                flush=True,
            )
            continue
        stats: dict = {}
        try:
            tokens = generate(
                model,
                [prompt],
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                stop_tokens=harmony.ASSISTANT_STOP_TOKENS,
                stats=stats,
            )[0]
        except KeyboardInterrupt:
            print("\n(reply stopped; that message is not kept in the history)", flush=True)
            continue
        reply = harmony.parse_reply(tokens)
        _print_reply(reply)
        print(f"({speed_line(stats)})", flush=True)
        history += [turn, {"role": "assistant", "content": reply.final if reply.error is None else reply.raw}]


def cmd_app(args: argparse.Namespace) -> int:
    from gptoss.app import run

    if not args.host.strip():
        raise UsageError("--host is empty: give an address to listen on, e.g. 127.0.0.1")
    check_device("--device", args.device)
    return run(args, _load)


def cmd_train(args: argparse.Namespace) -> int:
    from gptoss.train.config import from_flags
    from gptoss.train.trainer import train

    cfg = from_flags(args)
    try:
        records = train(cfg)
    except KeyboardInterrupt:
        return 130
    from gptoss.train.trainer import launch_ranks

    if records and launch_ranks(os.environ)[1] == 0:  # rank 0 writes the adapter; the others only say so there
        print(f"trained {records[-1]['step']} steps; last loss {records[-1]['loss']:.4f}; adapter in {args.output}")
    return 0


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags of a command that loads a model and generates: the load flags and the sampling flags."""
    from gptoss.harmony import REASONING_EFFORTS

    _add_load_args(p)
    p.add_argument("--developer", default=None, help="developer instructions, e.g. 'reasoning language: French'")
    p.add_argument("--reasoning-effort", choices=REASONING_EFFORTS, default="medium", help="system message setting")
    p.add_argument("--max-new-tokens", type=int, default=256, help="token budget per reply (default: 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0, as OpenAI recommends)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens; 0 = all (default)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def _add_load_args(p: argparse.ArgumentParser) -> None:
    """The flags _load reads: the checkpoint, an adapter, dtype, device and the experts' form."""
    p.add_argument(
        "--model", required=True, type=path_flag, help="checkpoint folder (any layout), HF repo root, or hub id"
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype (default: bf16)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument(
        "--adapter", default=None, type=path_flag, help="a PEFT LoRA adapter folder (the --output of gptoss train)"
    )
    p.add_argument(
        "--experts",
        choices=["auto", "mxfp4", "dense"],
        default="auto",
        help="mxfp4: decode each expert per use (least memory); dense: decode all once at load (faster on a CPU, "
        "3.8x the expert memory); auto (default): dense on a CPU when that takes at most half the free memory",
    )


class _Parser(argparse.ArgumentParser):
    """argparse, with a malformed command line reported in one line (exit 2) instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from gptoss.config import PRESETS

    parser = _Parser(prog="gptoss", description="gpt-oss reference implementation: tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a random checkpoint in a real gpt-oss on-disk layout")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--layout", choices=LAYOUTS, default="hf-mxfp4", help="on-disk layout (default: hf-mxfp4)")
    p.add_argument("--out", required=True, type=path_flag, help="folder to write the checkpoint into")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed; the same seed gives the same model in every layout"
    )
    p.add_argument(
        "--max-shard-gb", type=float, default=None, help="shard size (default: that of the real checkpoints)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("info", help="print the parameter table of a checkpoint or a preset")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", type=path_flag, help="checkpoint folder or hub id")
    g.add_argument("--preset", choices=list(PRESETS), help="a named configuration")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "demo", help="tiny model end to end: checkpoint, forward, generation, pre-training, LoRA, report"
    )
    p.add_argument("--dir", help="checkpoint folder (default: $GPTOSS_CACHE/tiny-hf-mxfp4, ~/.cache/gptoss)")
    p.add_argument("--tokens", type=int, default=64, help="tokens in the forward pass (default: 64)")
    p.add_argument("--no-train", action="store_true", help="stop after generation (skip pre-training and LoRA)")
    p.add_argument(
        "--work",
        default=None,
        type=path_flag,
        help="folder for the demo's training runs (default: beside the checkpoint)",
    )
    p.add_argument(
        "--base-steps",
        type=int,
        default=3000,
        help="pre-training steps of the tiny base when the shipped one cannot be used (default: 3000, its recipe)",
    )
    p.add_argument("--lora-steps", type=int, default=150, help="LoRA steps (default: 150)")
    p.add_argument("--quick", action="store_true", help="a few steps of each stage: checks the pipeline, shows nothing")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="complete one prompt (Harmony chat format, or --raw text)")
    p.add_argument("--prompt", required=True, help="the user message (or the raw text with --raw)")
    p.add_argument("--raw", action="store_true", help="plain text completion without Harmony, stops at <|endoftext|>")
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="LoRA fine-tuning on Harmony reasoning data (PEFT-format adapter)")
    from gptoss.train.config import add_flags

    add_flags(p)  # one flag per TrainConfig field, with its help text
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the Harmony format")
    _add_model_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "app", help="a local web page: one question, base and base + adapter side by side (needs gptoss[app])"
    )
    _add_load_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.set_defaults(func=cmd_app)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A failure is one line on stderr naming what is at fault: exit 2 for a wrong
    argument (usage), 1 for anything else; GPTOSS_DEBUG=1 shows the traceback instead."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a malformed command line (2), already reported
        return e.code
    if os.environ.get("GPTOSS_DEBUG") == "1":
        return args.func(args)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"gptoss {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptoss {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        print(f"gptoss {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    """The message of `e` on one line; errors of our own speak for themselves, others are named by type."""
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    text = " ".join(str(message).split()) or "(no message)"
    ours = type(e).__module__.startswith("gptoss") or isinstance(e, (FileNotFoundError, FileExistsError))
    hint = "" if ours else " (GPTOSS_DEBUG=1 shows the traceback)"
    return text if ours else f"{type(e).__name__}: {text}{hint}"


if __name__ == "__main__":
    raise SystemExit(main())

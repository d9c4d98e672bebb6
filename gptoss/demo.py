"""`gptoss demo`: the whole project on a tiny model a laptop trains in minutes.

1-3: a random tiny checkpoint in the Hugging Face MXFP4 layout, loaded, one forward pass, greedy
generation from a Harmony prompt with the KV cache. 4-6 (unless --no-train): the base, pre-trained on
the tasks, the Harmony format and what each language's name means (shipped with the package and
checked by its sha256, or pre-trained from scratch when it cannot be used: gptoss.train.pretrain), a
LoRA fine-tune that teaches "reasoning language: X" on five languages, and the before/after report on
the held-out prompts of all seven (gptoss.train.report). It sits on top of the core and the trainer,
as the command line does.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from gptoss.config import cache_dir
from gptoss.errors import check_int
from gptoss.generate import speed_line
from gptoss.tokens import STARTOFTEXT

DEMO_MARK = "gptoss_demo_run"  # in the demo's lora/ folder: the run there is the demo's own


def run(args: argparse.Namespace) -> int:
    """`gptoss demo`: the tiny model end to end (see the module docstring)."""
    import torch

    from gptoss.config import format_param_table, get_preset
    from gptoss.load import load_model
    from gptoss.synthetic import write_checkpoint

    check_int("--tokens", args.tokens, 1, 4096)
    check_int("--base-steps", args.base_steps, 1)
    check_int("--lora-steps", args.lora_steps, 1)
    folder = Path(args.dir) if args.dir else cache_dir() / "tiny-hf-mxfp4"
    if not args.no_train:
        _check_work(_work(folder, args))  # before any work: a run the demo did not write is never replaced
    config = get_preset("tiny")
    if not (folder / "config.json").exists():
        print(f"[1/6] writing a random tiny checkpoint (HF MXFP4 layout) to {folder}")
        write_checkpoint(folder, config, "hf-mxfp4", seed=0)
    else:
        print(f"[1/6] using the tiny checkpoint in {folder}")
    start = time.perf_counter()
    model = load_model(folder, dtype=torch.float32)
    print(f"[2/6] loaded in {time.perf_counter() - start:.2f} s; parameters:")
    print(format_param_table(model.config))
    ids = torch.randint(0, STARTOFTEXT, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(ids)
    elapsed = time.perf_counter() - start
    top = logits[0, -1].float().softmax(-1).topk(5)
    print(f"[2/6] forward pass over {args.tokens} tokens: logits {list(logits.shape)} in {elapsed * 1e3:.0f} ms")
    print(
        "      next-token top-5 (id: prob): "
        + ", ".join(f"{i}: {p:.2e}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    )
    print("      (random weights: the ids mean nothing; the point is the machinery)")

    from gptoss import harmony
    from gptoss.generate import generate

    prompt = harmony.render_prompt(harmony.build_conversation([{"role": "user", "content": "What is 2 + 2?"}]))
    stats: dict = {}
    tokens = generate(model, [prompt], max_new_tokens=16, temperature=0.0, stats=stats)[0]
    print(f"[3/6] greedy generation from a {len(prompt)}-token Harmony prompt with the KV cache:")
    print(f"      {harmony.decode(tokens)!r}")
    print(f"      {speed_line(stats)}")
    if args.no_train:
        return 0
    return _demo_training(folder, args)


def _work(folder: Path, args: argparse.Namespace) -> Path:
    return Path(args.work) if args.work else folder.parent / "demo-run"


def _check_work(work: Path) -> list[str]:
    """The run files in the demo's lora/ folder; refused (before any work) if the demo did not write them."""
    from gptoss.train.run_folder import MANIFEST, RUN_FILES, TrainError

    lora = work / "lora"
    theirs = [name for name in (*RUN_FILES, MANIFEST) if (lora / name).exists()]
    if theirs and not (lora / DEMO_MARK).exists():  # the mark is written beside the demo's own LoRA run
        raise TrainError(
            f"--work {work}: {lora} holds a training run the demo did not write ({', '.join(theirs[:3])}); the demo "
            "replaces only its own: choose another --work"
        )
    return theirs


def _demo_training(folder: Path, args: argparse.Namespace) -> int:
    """Pre-train the random tiny base (cached), LoRA-train it to reason in the requested language on
    five languages, then report before/after on all held-out prompts, two unseen languages included."""
    import hashlib
    import json
    import shutil

    import torch

    from gptoss.checkpoint_write import save_checkpoint
    from gptoss.load import load_model
    from gptoss.train import pretrain
    from gptoss.train.trainer import TrainConfig, Trainer

    work = _work(folder, args)
    lora = work / "lora"
    ours = lora / DEMO_MARK
    theirs = _check_work(work)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    steps_base, steps_lora = (4, 3) if args.quick else (args.base_steps, args.lora_steps)
    model = load_model(folder, dtype=torch.float32)
    why_not = "--quick" if args.quick else pretrain.shipped_base(model)
    if why_not is None:  # the cache key: the shipped file, or the recipe a from-scratch base follows
        recipe = pretrain.SHIPPED_SHA256
    else:
        recipe = hashlib.sha256(json.dumps([pretrain.RECIPE, steps_base, str(folder)]).encode()).hexdigest()
    stamp = base / "model" / "recipe.sha256"
    if (base / "model" / "config.json").exists() and stamp.exists() and stamp.read_text().strip() == recipe:
        print(
            f"[4/6] using the cached pre-trained tiny base in {base / 'model'} (same recipe; delete it to make it again)"
        )
    else:
        if why_not is None:
            print(
                f"[4/6] the pre-trained tiny base shipped with gptoss ({pretrain.RECIPE['steps']} steps; {pretrain.SHIPPED.name},"
            )
            print(f"      sha256 {recipe[:16]}...), on this random checkpoint")
        else:
            print(
                f"[4/6] pre-training the random tiny base for {steps_base} steps (the shipped base is not used: {why_not})"
            )
            pretrain.pretrain(model, steps_base, log=lambda line: print("      " + line))
        print("      as gpt-oss was before its fine-tune: the tasks and Harmony, reasoning in any of seven languages,")
        print("      and what each language's name means (captions 'Language: Dutch. ...', requests such as")
        print("      'Please think in Dutch.' in the user's or the developer message, beside names that request")
        print("      nothing, such as 'I am learning Dutch.'); never the instruction 'reasoning language: X'")
        if (base / "model").exists():
            shutil.rmtree(base / "model")  # the demo's own folder, made on another recipe
        save_checkpoint(base / "model", model.config, "hf-mxfp4", model.state_dict())
        stamp.write_text(recipe + "\n")
    del model
    if theirs:
        print(f"      (replacing the demo's previous LoRA run in {lora})")
    print(f"[5/6] LoRA (r 16 on q/k/v/o) fine-tuning for {steps_lora} steps on the bundled set: 'reasoning language:")
    print("      X' in the developer message for five languages (Portuguese and Dutch never), analysis in X, answer in")
    print("      the user's language")
    trainer = Trainer(
        TrainConfig(
            model=str(base / "model"),
            output=str(lora),
            max_steps=steps_lora,
            batch_size=8,
            grad_accum=1,
            lr=5e-3,
            lora_r=16,
            lora_alpha=32,
            lora_expert_layers=[],  # q/k/v/o only: following the instruction is a copy, attention's job
            eval_every=steps_lora if args.quick else max(1, steps_lora // 2),  # --quick: one evaluation,
            eval_batches=1 if args.quick else 4,  # of one batch (it checks the machinery, shows nothing)
            save_every=10**9,
            gradient_checkpointing=False,
            report_prompts=7 if args.quick else 84,
            report_tokens=24 if args.quick else 96,
            overwrite=True,
        )
    )
    records = trainer.run()
    ours.write_text("the gptoss demo wrote this run; the next demo replaces it\n")
    print(f"      loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}; adapter, log, loss.png in {lora}")
    report = trainer.report or {}
    _print_demo_report(report)
    command = ["gptoss", "app", "--model", str(base / "model"), "--adapter", str(lora), "--dtype", "fp32"]
    print("      Ask your own question, base and fine-tune side by side (a page on http://localhost:7860):")
    print("      " + shlex.join(command))
    return 0


def _print_demo_report(report: dict) -> None:
    from gptoss.train.report import METRICS, wilson

    if not report:
        return
    unseen = set(report["unseen"])
    print("[6/6] held-out prompts, per requested reasoning language (k/n, 95% interval); report.md, report.json and")
    print(f"      report.png in {Path(report['path']).parent}")
    names = {"in_language": "analysis in it", "final_in_user_language": "final in user's", "correct": "correct"}
    print("      " + f"{'language':<22}" + "".join(f"{names[m] + ' before -> after':<36}" for m in METRICS))
    for language, b in report["by_language"]["before"].items():
        a = report["by_language"]["after"][language]
        cells = []
        for m in METRICS:
            if b[m] is None:
                cells.append(f"{'n/a':<36}")
                continue
            n = b["prompts"]
            (bl, bh), (al, ah) = wilson(b[m], n), wilson(a[m], n)
            cells.append(f"{b[m] / n:>4.0%} [{bl:.0%},{bh:.0%}] -> {a[m] / n:>4.0%} [{al:.0%},{ah:.0%}]".ljust(36))
        label = language + (" (unseen)" if language in unseen else "")
        print("      " + f"{label:<22}" + "".join(cells))
    before, after = report["generations"]["before"], report["generations"]["after"]
    # one prompt of a trained language, then one of each language the fine-tune never saw
    wanted = [lambda e: e["reasoning_language"] not in unseen]
    wanted += [lambda e, lang=lang: e["reasoning_language"] == lang for lang in report["unseen"]]
    for match in wanted:
        pick = next((i for i, e in enumerate(before) if match(e)), None)
        if pick is None:
            continue
        e = before[pick]
        kind = "an unseen" if e["reasoning_language"] in unseen else "a seen"
        print(f"      {kind} language, reasoning requested in {e['reasoning_language']}; the user asks: {e['user']!r}")
        for stage, g in (("before", before[pick]), ("after", after[pick])):
            print(f"        {stage:<6} analysis [{g['analysis_language']}]: {g['analysis'][:110]!r}")
            print(f"        {'':<6} final: {g['final'][:110]!r}")
    print("      This shows the machinery end to end on a 4-layer model trained from scratch in minutes; it is")
    print("      not evidence about gpt-oss-20b, whose base already reasons well and needs far fewer steps.")

"""The demo's base: the random tiny model pre-trained on its data's own vocabulary, and shipped.

The tiny model keeps gpt-oss's 201,088-token unembedding, but the demo's data uses about 700 of those
tokens. Over the full vocabulary, most of a pre-training step is that one matrix: its product, its
gradient and AdamW's pass over 26M numbers that the data never asks for. Here the softmax runs over the
C tokens the data uses (the base rows' and the fine-tune's) plus one row standing for all V - C others, whose logit is raised by log(V - C).
That is exactly the full-vocabulary softmax of the model whose unused unembedding rows are all equal to
that row (log(sum_used e^z + (V - C) e^z_rest)), so nothing is approximated: the model is constrained,
and written back to the full vocabulary afterwards (the used rows, and the shared row into every other
row). A step costs about a seventh of a full one, so the base gets thousands of steps of fresh rows
(every row seen once: a row seen ten times is memorised, and memorising teaches no copying).

The result ships with the package (`train/data/demo_base.safetensors`, ~2 MB): only what pre-training
changed (every floating-point tensor outside the vocabulary matrices, the used rows of both, the shared
row), on top of the random checkpoint `gptoss demo` writes with seed 0 (its MXFP4 experts, which are
not trained, and its unused embedding rows). The demo checks the file's sha256 and that the checkpoint
under it is that one, and pre-trains from scratch when either fails. Reproduce the file with

    python -m gptoss.train.pretrain --out train/data/demo_base.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHIPPED = Path(__file__).resolve().parent / "data" / "demo_base.safetensors"
# sha256 of the shipped file; a file that does not match is not used (the demo pre-trains instead)
SHIPPED_SHA256 = "b4bd01981aedaa8d09cda1a838ee04d5c408c357a3cd1cb44958684636ac8cab"
RECIPE = dict(rows_seed=3, steps=3000, batch_size=8, lr=3e-3, warmup_ratio=0.03, min_lr_ratio=0.1, seed=0)


def vocabulary(rows_of_ids) -> torch.Tensor:
    """The sorted token ids that occur in `rows_of_ids` (lists of ids), padding included."""
    from gptoss import harmony

    used = {harmony.ENDOFTEXT}
    for ids in rows_of_ids:
        used.update(ids)
    return torch.tensor(sorted(used), dtype=torch.long)


def experts_fingerprint(model) -> str:
    """sha256 of every layer's MXFP4 expert blocks and scales: the frozen weights a shipped base sits on."""
    digest = hashlib.sha256()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for t in (experts.gate_up_proj_blocks, experts.gate_up_proj_scales, experts.down_proj_blocks):
            digest.update(t.detach().cpu().numpy().tobytes())
        digest.update(experts.down_proj_scales.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def compact_loss(hidden: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, rest: int) -> torch.Tensor:
    """Mean cross-entropy of hidden [N, D] over `rows` [C + 1, D] (the used tokens, then the shared row of
    the `rest` others, its logit + log(rest)); target [N] in compact ids (< C)."""
    logits = F.linear(hidden, rows)
    logits = torch.cat([logits[:, :-1], logits[:, -1:] + math.log(rest)], dim=1)
    return F.cross_entropy(logits.float(), target)


def _lr(step: int, total: int) -> float:
    lr, warmup = RECIPE["lr"], max(1, math.ceil(RECIPE["warmup_ratio"] * total))
    if step < warmup:
        return lr * (step + 1) / warmup
    floor = RECIPE["min_lr_ratio"] * lr
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(model, steps: int, log=print) -> dict[str, torch.Tensor]:
    """Pre-train `model` (the random tiny checkpoint, fp32) in place for `steps` steps of fresh base rows
    (gptoss.train.make_dataset.base_rows) on the compact vocabulary; returns what changed (see `pack`)."""
    from tqdm import tqdm

    from gptoss.train.data import BUNDLED_HELDOUT, BUNDLED_TRAIN, Example, collate, read_rows, render_example
    from gptoss.train.make_dataset import base_rows

    batch = RECIPE["batch_size"]
    rows = base_rows(n=steps * batch, seed=RECIPE["rows_seed"])
    examples = [render_example(row, None, i) for i, row in enumerate(rows)]
    bundled = [render_example(row, None)[0] for row in read_rows(BUNDLED_TRAIN) + read_rows(BUNDLED_HELDOUT)]
    used = vocabulary([*(ids for ids, _ in examples), *bundled])  # the fine-tune's tokens are candidates too
    V, C = model.config.vocab_size, len(used)
    to_compact = torch.full((V,), C, dtype=torch.long)
    to_compact[used] = torch.arange(C)
    unused = torch.ones(V, dtype=torch.bool)
    unused[used] = False
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    compact_embed = torch.nn.Parameter(embed.detach()[used].clone())
    compact_head = torch.nn.Parameter(torch.cat([head.detach()[used], head.detach()[unused].mean(0, keepdim=True)]))
    full_embed = embed.detach().clone()
    model.model.embed_tokens.weight = compact_embed  # compact ids index it while training
    model.requires_grad_(False)
    params = [compact_embed, compact_head]
    params += [
        p
        for name, p in model.named_parameters()
        if p.is_floating_point() and "embed_tokens" not in name and name != "lm_head.weight"
    ]
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(RECIPE["seed"])
    optimizer = torch.optim.AdamW(params, lr=RECIPE["lr"], weight_decay=0.0)
    log(
        f"pretrain: {steps} steps of {batch} fresh rows, softmax over the {C} tokens the data uses + 1 shared row for the other {V - C}"
    )
    bar = tqdm(range(steps), desc="pretrain", file=sys.stderr, mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, steps)
        part = [Example(*examples[i], "", i) for i in range(step * batch, (step + 1) * batch)]
        ids, mask = collate(part)
        ids = to_compact[ids]
        flags = mask[:, 1:].bool()
        loss = compact_loss(model.hidden(ids)[:, :-1][flags], compact_head, ids[:, 1:][flags], V - C)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    with torch.no_grad():  # back to the full vocabulary: the used rows, the shared row everywhere else
        full_embed[used] = compact_embed
        full_head = compact_head[-1].expand(V, -1).clone()
        full_head[used] = compact_head[:-1]
    model.model.embed_tokens.weight = torch.nn.Parameter(full_embed, requires_grad=False)
    model.lm_head.weight = torch.nn.Parameter(full_head, requires_grad=False)
    model.requires_grad_(False)
    return pack(model, used)


def pack(model, used: torch.Tensor) -> dict[str, torch.Tensor]:
    """What pre-training changed, small enough to ship: every floating-point tensor but the two vocabulary
    matrices, the `used` rows of both, and the unembedding's shared row."""
    state = model.state_dict()
    head = state["lm_head.weight"]
    unused = torch.ones(head.shape[0], dtype=torch.bool)
    unused[used] = False
    out = {
        k: v.contiguous()
        for k, v in state.items()
        if v.is_floating_point() and k not in ("model.embed_tokens.weight", "lm_head.weight")
    }
    out["vocab.used"] = used.to(torch.int32)
    out["vocab.embed"] = state["model.embed_tokens.weight"][used].contiguous()
    out["vocab.head"] = head[used].contiguous()
    out["vocab.head_rest"] = head[unused][0].contiguous()
    return out


def unpack(model, packed: dict[str, torch.Tensor]) -> None:
    """Writes a packed base onto `model` (the random tiny checkpoint) in place."""
    used = packed["vocab.used"].long()
    with torch.no_grad():
        state = model.state_dict()
        for name, value in packed.items():
            if not name.startswith("vocab."):
                state[name].copy_(value)
        state["model.embed_tokens.weight"][used] = packed["vocab.embed"]
        state["lm_head.weight"][:] = packed["vocab.head_rest"]
        state["lm_head.weight"][used] = packed["vocab.head"]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(path: Path, packed: dict[str, torch.Tensor], fingerprint: str, steps: int) -> str:
    """Writes the packed base with its recipe; returns its sha256."""
    from safetensors.torch import save_file

    # one metadata key: safetensors writes its metadata map in an order that changes from run to run, so
    # two keys would give the same tensors a different sha256 each time
    header = {"recipe": {**RECIPE, "steps": steps}, "experts_sha256": fingerprint}
    metadata = {"gptoss_base": json.dumps(header, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(packed, str(tmp), metadata=metadata)
    tmp.chmod(0o644)
    tmp.replace(path)
    return file_sha256(path)


def shipped_base(model, path: Path = SHIPPED, sha256: str | None = None) -> str | None:
    """Loads the shipped base onto `model` (the demo's random tiny checkpoint) and returns None, or
    returns why it was not used: absent, not the file of SHIPPED_SHA256, or made on another checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    expected = SHIPPED_SHA256 if sha256 is None else sha256
    if not path.exists():
        return f"{path} is absent"
    found = file_sha256(path)
    if found != expected:
        return f"{path} has sha256 {found[:16]}..., expected {expected[:16]}... (a changed or damaged file)"
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("gptoss_base", "{}"))
    if meta.get("experts_sha256") != experts_fingerprint(model):
        return f"{path} was pre-trained on another tiny checkpoint (its experts differ from this one's)"
    unpack(model, load_file(str(path)))
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gptoss.train.pretrain",
        description="Pre-train the demo's tiny base (the random seed-0 tiny checkpoint) and write the file the demo ships.",
    )
    parser.add_argument("--out", type=Path, default=SHIPPED, help=f"the packed base to write (default: {SHIPPED})")
    parser.add_argument("--steps", type=int, default=RECIPE["steps"], help=f"steps (default: {RECIPE['steps']})")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, found {args.steps}")
    if args.out.is_dir() or not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: give a file path in an existing folder")
    from tempfile import TemporaryDirectory

    from gptoss.config import get_preset
    from gptoss.load import load_model
    from gptoss.synthetic import write_checkpoint

    with TemporaryDirectory() as tmp:
        write_checkpoint(tmp, get_preset("tiny"), "hf-mxfp4", seed=0)
        model = load_model(tmp, dtype=torch.float32)
    start = time.perf_counter()
    fingerprint = experts_fingerprint(model)
    digest = save(args.out, pretrain(model, args.steps), fingerprint, args.steps)
    print(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB, sha256 {digest}) in {time.perf_counter() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

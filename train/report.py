"""Before/after generations on held-out prompts and the fraction of analysis channels written in the
requested reasoning language (identified by train/langid.py's stop-word counts)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from gptoss.train.data import row_fields
from gptoss.train.langid import identify

from gptoss import harmony
from gptoss.generate import generate


def held_out_prompts(rows: list[dict], n: int) -> list[dict]:
    """n rows spread over the reasoning languages (unseen ones included), in a fixed order."""
    by_language: dict[str, list[dict]] = {}
    for row in rows:
        by_language.setdefault(row_fields(row)[4], []).append(row)
    picked, i = [], 0
    while len(picked) < n and any(i < len(v) for v in by_language.values()):
        picked += [v[i] for v in by_language.values() if i < len(v)]
        i += 1
    return picked[:n]


@torch.no_grad()
def language_report(model, rows: list[dict], max_new_tokens: int = 96) -> dict:
    prompts, entries = [], []
    for row in rows:
        developer, user, _, _, language = row_fields(row)
        conversation = harmony.build_conversation([{"role": "user", "content": user}], developer=developer)
        prompts.append(harmony.render_prompt(conversation))
        entries.append({"reasoning_language": language, "user": user})
    outputs = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    for entry, tokens in zip(entries, outputs):
        reply = harmony.parse_reply(tokens)
        entry |= {
            "analysis": reply.analysis,
            "final": reply.final,
            "parsed": reply.error is None and bool(reply.analysis),
        }
        entry["analysis_language"] = identify(reply.analysis)
        entry["match"] = entry["analysis_language"] == entry["reasoning_language"]
    fraction = sum(e["match"] for e in entries) / max(1, len(entries))
    return {"fraction_in_requested_language": fraction, "generations": entries}


def write_report(folder: Path, before: dict, after: dict, unseen: set[str], what: str = "adapter") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(
        json.dumps({"before": before, "after": after}, ensure_ascii=False, indent=2) + "\n"
    )
    lines = [
        "# Reasoning-language report",
        "",
        f"Greedy generations on held-out prompts, without and with the {what}. A reply counts when its",
        "analysis channel is identified (stop-word counts, gptoss/train/langid.py) as the language the",
        f"developer message requests. Reasoning languages never seen in training: {', '.join(sorted(unseen)) or 'none'}.",
        "",
        f"| | without {what} | with {what} |",
        "|---|---:|---:|",
        f"| analysis in the requested language | {before['fraction_in_requested_language']:.0%} | {after['fraction_in_requested_language']:.0%} |",
        "",
    ]
    for b, a in zip(before["generations"], after["generations"]):
        tag = " (unseen in training)" if b["reasoning_language"] in unseen else ""
        lines += [f"## reasoning language: {b['reasoning_language']}{tag}", "", f"user: {b['user']}", ""]
        for name, e in ((f"without {what}", b), (f"with {what}", a)):
            lines.append(
                f"- {name} [{e['analysis_language']}]: analysis `{e['analysis'][:160]}` / final `{e['final'][:80]}`"
            )
        lines.append("")
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path

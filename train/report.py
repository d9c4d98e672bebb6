"""Before/after generations on held-out prompts, scored per requested reasoning language:

- in_language: the analysis channel is identified (train/langid.py's stop-word counts) as the
  language the developer message requests;
- final_in_user_language: the final answer has the exact form of the row's task answer in the user's
  language (the bundled rows record `task`, `user_language` and `answer`; one-sentence answers are
  too short for stop words, so the form is matched against the task's template instead);
- correct: the final answer holds the expected answer as a whole word (the sum, the weekday in the
  user's language, the tallest person's name).
Each fraction comes with a 95% Wilson score interval. Rows without the metadata (other datasets) are
scored on in_language only.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import torch

from gptoss import harmony
from gptoss.generate import generate
from gptoss.train.data import row_fields
from gptoss.train.langid import identify
from gptoss.train.make_dataset import DAYS, TASKS

METRICS = ("in_language", "final_in_user_language", "correct")


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


def final_pattern(task: str, language: str) -> re.Pattern:
    """The final-answer template of `task` in `language` as a full-match pattern: numbers and names
    are any one word, a weekday must be one of that language's weekday names."""
    template = TASKS[task][language][2]
    days = "|".join(map(re.escape, DAYS[language][3].split()))
    pattern = re.escape(template)
    pattern = re.sub(r"\\\{x\\\}", f"(?:{days})", pattern)
    pattern = re.sub(r"\\\{\w\\\}", r"\\S+", pattern)
    return re.compile(pattern)


def score(row: dict, analysis: str, final: str) -> dict:
    """The three measures for one generation (None where the row lacks the metadata)."""
    language = row_fields(row)[4]
    entry = {"analysis_language": identify(analysis)}
    entry["in_language"] = entry["analysis_language"] == language
    task, user_language, answer = row.get("task"), row.get("user_language"), row.get("answer")
    known = task in TASKS and user_language in TASKS.get(task, {})
    entry["final_in_user_language"] = (
        bool(final_pattern(task, user_language).fullmatch(final.strip())) if known else None
    )
    entry["correct"] = bool(re.search(rf"(?<!\w){re.escape(str(answer))}(?!\w)", final)) if answer else None
    return entry


@torch.no_grad()
def language_report(model, rows: list[dict], max_new_tokens: int = 96) -> dict:
    """Greedy generations for `rows` (one batch), scored; fractions overall and per language."""
    prompts, entries = [], []
    for row in rows:
        developer, user, _, _, language = row_fields(row)
        conversation = harmony.build_conversation([{"role": "user", "content": user}], developer=developer)
        prompts.append(harmony.render_prompt(conversation))
        entries.append({"reasoning_language": language, "user_language": row.get("user_language"), "user": user})
    outputs = generate(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    for row, entry, tokens in zip(rows, entries, outputs):
        reply = harmony.parse_reply(tokens)
        entry |= {"analysis": reply.analysis, "final": reply.final, "parsed": reply.error is None}
        entry |= score(row, reply.analysis, reply.final)
    return {
        "fraction_in_requested_language": sum(e["in_language"] for e in entries) / max(1, len(entries)),
        "by_language": by_language(entries),
        "generations": entries,
    }


def by_language(entries: list[dict]) -> dict[str, dict]:
    """{language: {"prompts": n, "in_language": k, "final_in_user_language": k2, "correct": k3}}; a
    count is None when no row of that language carries the metadata it needs."""
    out: dict[str, dict] = {}
    for e in entries:
        counts = out.setdefault(e["reasoning_language"], {"prompts": 0} | {m: None for m in METRICS})
        counts["prompts"] += 1
        for m in METRICS:
            if e[m] is not None:
                counts[m] = (counts[m] or 0) + int(e[m])
    return out


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial fraction k / n (sound at 0, n and small n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _cell(counts: dict, metric: str) -> str:
    k, n = counts[metric], counts["prompts"]
    if k is None:
        return "n/a"
    low, high = wilson(k, n)
    return f"{k}/{n} = {k / n:.0%} [{low:.0%}, {high:.0%}]"


def _total(table: dict[str, dict], languages) -> dict:
    total = {"prompts": sum(table[lang]["prompts"] for lang in languages)}
    for m in METRICS:
        values = [table[lang][m] for lang in languages]
        total[m] = None if any(v is None for v in values) else sum(values)
    return total


def write_report(folder: Path, before: dict, after: dict, unseen: set[str], what: str = "adapter") -> Path:
    """report.json (the generations and `by_language` counts), report.md (the tables, 95% intervals)
    and report.png (analysis in the requested language per language, before and after)."""
    folder.mkdir(parents=True, exist_ok=True)
    languages = list(before["by_language"])
    seen = [lang for lang in languages if lang not in unseen]
    unseen_list = [lang for lang in languages if lang in unseen]
    report = {
        "by_language": {"before": before["by_language"], "after": after["by_language"]},
        "unseen_languages": unseen_list,
        "overall": {
            stage: {
                group: _total(data["by_language"], langs) for group, langs in (("seen", seen), ("unseen", unseen_list))
            }
            for stage, data in (("before", before), ("after", after))
        },
        "before": before,
        "after": after,
    }
    (folder / "report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# Reasoning-language report",
        "",
        f"Greedy generations on {sum(d['prompts'] for d in before['by_language'].values())} held-out prompts, "
        f"without and with the {what}. Per requested reasoning language: the analysis identified as that language",
        "(stop-word counts, gptoss/train/langid.py), the final answer in the form the user's language gives it,",
        "and the final answer correct; k/n, then the 95% Wilson interval. Reasoning languages never requested in",
        f"training: {', '.join(unseen_list) or 'none'}.",
        "",
        "| requested language | analysis in it, before | after | final in user's language, before | after | correct, before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        (lang + (" (unseen)" if lang in unseen else ""), before["by_language"][lang], after["by_language"][lang])
        for lang in languages
    ]
    rows += [
        (f"**all {group}**", report["overall"]["before"][group], report["overall"]["after"][group])
        for group in ("seen", "unseen")
        if report["overall"]["before"][group]["prompts"]
    ]
    for name, b, a in rows:
        lines.append(f"| {name} | " + " | ".join(f"{_cell(b, m)} | {_cell(a, m)}" for m in METRICS) + " |")
    lines.append("")
    for b, a in zip(before["generations"], after["generations"]):
        tag = " (unseen in training)" if b["reasoning_language"] in unseen else ""
        lines += [f"## reasoning language: {b['reasoning_language']}{tag}", "", f"user: {b['user']}", ""]
        for name, e in ((f"without {what}", b), (f"with {what}", a)):
            lines.append(
                f"- {name} [{e['analysis_language']}]: analysis `{e['analysis'][:160]}` / final `{e['final'][:80]}`"
            )
        lines.append("")
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    plot_report(report, folder / "report.png", what)
    return path


def plot_report(report: dict, png: Path, what: str) -> Path | None:
    """Bars of the fraction of analyses in the requested language per language, before and after,
    with their 95% intervals; unseen languages marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    before, after = report["by_language"]["before"], report["by_language"]["after"]
    languages = list(before)
    fig, ax = plt.subplots(figsize=(8, 4))
    for offset, (label, table, color) in enumerate(
        ((f"without {what}", before, "#9aa5b1"), (f"with {what}", after, "#2f6db5"))
    ):
        xs = [i + (offset - 0.5) * 0.38 for i in range(len(languages))]
        fractions = [table[lang]["in_language"] / table[lang]["prompts"] for lang in languages]
        intervals = [wilson(table[lang]["in_language"], table[lang]["prompts"]) for lang in languages]
        errors = [
            [f - lo for f, (lo, _) in zip(fractions, intervals)],
            [hi - f for f, (_, hi) in zip(fractions, intervals)],
        ]
        ax.bar(xs, fractions, width=0.38, label=label, color=color, yerr=errors, capsize=3)
    unseen = set(report["unseen_languages"])
    ax.set_xticks(range(len(languages)), [lang + ("\n(unseen)" if lang in unseen else "") for lang in languages])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("analysis in the requested language")
    ax.legend(loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


class ReportHook:
    """The trainer's language report: generations on `prompts` held-out prompts before the first step
    and after the last (rank 0, a fresh run with an eval set only), written as report.md, report.json
    and report.png, and kept on the trainer as `trainer.report` for the demo to print."""

    def __init__(self, prompts: int, tokens: int):
        self.prompts, self.tokens = prompts, tokens
        self.rows: list[dict] = []
        self.before: dict | None = None

    def before_training(self, trainer) -> None:
        if trainer.eval_data is None or trainer.rank != 0 or trainer.cfg.resume:
            return
        self.rows = held_out_prompts(trainer.eval_data.rows, self.prompts)
        self.before = language_report(trainer.model, self.rows, self.tokens)  # B = 0: the base model

    def after_training(self, trainer) -> None:
        if self.before is None:
            return
        before, after = self.before, language_report(trainer.model, self.rows, self.tokens)
        seen = {e.reasoning_language for e in trainer.data.examples}
        unseen = {r["reasoning_language"] for r in before["generations"]} - seen
        path = write_report(trainer.out, before, after, unseen, "training" if trainer.cfg.full_finetune else "adapter")
        trainer.report = {
            "before": before["fraction_in_requested_language"],
            "after": after["fraction_in_requested_language"],
            "path": str(path),
            "unseen": sorted(unseen),
            "generations": {"before": before["generations"], "after": after["generations"]},
            "by_language": {"before": before["by_language"], "after": after["by_language"]},
        }
        print(
            f"reasoning in the requested language: {trainer.report['before']:.0%} before, "
            f"{trainer.report['after']:.0%} after ({path})",
            file=sys.stderr,
        )

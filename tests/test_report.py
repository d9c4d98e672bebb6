"""The demo's data and its measures: the base never sees the instruction it is fine-tuned on, the
held-out split is balanced, the language identifier and the final-answer checks are right on every
bundled reference, the intervals match published values, and report.json has its schema."""

import json
import re

import pytest

from gptoss.train.data import BUNDLED_HELDOUT, BUNDLED_TRAIN, read_rows, row_fields
from gptoss.train.langid import identify
from gptoss.train.make_dataset import (
    ANSWER_REQUESTS,
    CAPTION,
    HELDOUT_ONLY,
    MENTIONS,
    TASKS,
    THINK_REQUESTS,
    TRAIN_REASONING,
    USER_LANGUAGES,
    base_rows,
)
from gptoss.train.report import by_language, final_pattern, score, wilson, write_report

TRAIN, HELDOUT = read_rows(BUNDLED_TRAIN), read_rows(BUNDLED_HELDOUT)


def test_held_out_has_twelve_prompts_per_language_and_two_unseen():
    counts = {}
    for row in HELDOUT:
        counts[row["reasoning_language"]] = counts.get(row["reasoning_language"], 0) + 1
    assert counts == {lang: 12 for lang in TRAIN_REASONING + HELDOUT_ONLY}
    assert {r["reasoning_language"] for r in TRAIN} == set(TRAIN_REASONING)  # Portuguese, Dutch never requested


def _phrases(templates, text: str) -> list[str]:
    """The language names that `text` puts in any of `templates` ("Think in {name}." ...), in order."""
    pattern = "|".join(re.escape(t).replace(re.escape("{name}"), rf"(?P<n{i}>\w+)") for i, t in enumerate(templates))
    return [next(v for v in m.groupdict().values() if v) for m in re.finditer(pattern, text)]


def test_the_base_never_sees_the_instruction_but_learns_every_language_and_its_name():
    rows = base_rows()
    languages = set(TRAIN_REASONING + HELDOUT_ONLY)
    for row in rows:
        developer, user, analysis, final, _ = row_fields(row)  # what is rendered and trained on
        assert "reasoning language" not in developer.lower() + user.lower()
        rendered, flat = (
            (developer, user, analysis, final),
            (row["developer"], row["user"], row["analysis"], row["final"]),
        )
        assert rendered == flat  # the checks below read the flat fields
    assert {r["reasoning_language"] for r in rows} == languages
    for row in rows:  # every request written is recorded, in whichever phrasing and place it stands
        asked = row["developer"] + " " + row["user"]
        think, answer = row["requests"]["think"], row["requests"]["answer"]
        assert _phrases(THINK_REQUESTS, asked) == ([think] if think else [])
        assert _phrases(ANSWER_REQUESTS, asked) == ([answer] if answer else [])
        assert _phrases(MENTIONS, row["developer"]) == []  # a name in the developer message is a request
        assert row["reasoning_language"] not in _phrases(MENTIONS, row["user"])
        assert set(_phrases(MENTIONS, row["user"])) <= languages
    named = [r for r in rows if r["requests"]["answer"]]
    assert 0.3 < len(named) / len(rows) < 0.7
    for row in named:  # "Answer in X." -> the final names X, then answers in X
        caption = CAPTION.format(language=row["requests"]["answer"])
        assert row["final"].startswith(caption)
        assert final_pattern(row["task"], row["requests"]["answer"]).fullmatch(row["final"].removeprefix(caption))
    thinking = [r for r in rows if r["requests"]["think"]]
    assert 0.3 < len(thinking) / len(rows) < 0.7
    assert all(r["requests"]["think"] == r["reasoning_language"] for r in thinking)  # "Think in X." -> reasons in X
    for where in ("developer", "user"):  # requests stand in both messages, in every phrasing
        share = sum(bool(_phrases(THINK_REQUESTS, r[where])) for r in thinking) / len(thinking)
        assert share > 0.2, where
    for template in THINK_REQUESTS + ANSWER_REQUESTS + MENTIONS:  # every phrasing is used
        assert any(_phrases([template], r["developer"] + " " + r["user"]) for r in rows), template
    assert 0.3 < sum(bool(_phrases(MENTIONS, r["user"])) for r in rows) / len(rows) < 0.7
    for row in rows:  # the reasoning opens with the name of its language (drawn at random)
        assert row["analysis"].startswith(CAPTION.format(language=row["reasoning_language"]))


@pytest.mark.parametrize("rows", [TRAIN, HELDOUT], ids=["train", "heldout"])
def test_the_measures_are_right_on_every_reference(rows):
    for row in rows:
        entry = score(row, row["analysis"], row["final"])
        assert entry["analysis_language"] == row["reasoning_language"], row["analysis"]
        assert entry["in_language"] and entry["final_in_user_language"] and entry["correct"], row
        wrong = row["final"].replace(row["answer"], "zzz")
        assert score(row, row["analysis"], wrong)["correct"] is False


def test_a_final_in_another_language_is_not_in_the_users():
    row = next(r for r in HELDOUT if r["task"] == "days" and r["user_language"] == "German")
    for language in USER_LANGUAGES:
        final = TASKS["days"][language][2].format(x=TASKS["days"][language][3].split()[0])
        assert bool(final_pattern("days", "German").fullmatch(final)) == (language == "German")
        assert score(row, row["analysis"], final)["final_in_user_language"] == (language == "German")


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Table I: 5/10 -> 0.2366-0.7634; 0/10 -> 0-0.2775; 10/10 -> 0.7225-1
    for k, n, expected in ((5, 10, (0.2366, 0.7634)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0))):
        assert wilson(k, n) == pytest.approx(expected, abs=1e-4)


def test_report_json_schema_and_chart(tmp_path):
    def fake(match_every: int) -> dict:
        entries = []
        for i, row in enumerate(HELDOUT):
            analysis = row["analysis"] if i % match_every == 0 else "xx"
            entries.append(
                {
                    "reasoning_language": row["reasoning_language"],
                    "user": row["user"],
                    "analysis": analysis,
                    "final": row["final"],
                }
                | score(row, analysis, row["final"])
            )
        return {"fraction_in_requested_language": 0.0, "by_language": by_language(entries), "generations": entries}

    write_report(tmp_path, fake(7), fake(1), set(HELDOUT_ONLY))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["unseen_languages"] == ["Portuguese", "Dutch"]
    after = report["by_language"]["after"]
    assert set(after) == set(TRAIN_REASONING + HELDOUT_ONLY)
    assert after["Dutch"] == {"prompts": 12, "in_language": 12, "final_in_user_language": 12, "correct": 12}
    assert sum(v["in_language"] for v in report["by_language"]["before"].values()) == 12  # every 7th of 84
    assert report["overall"]["after"]["unseen"]["prompts"] == 24
    assert "| Dutch (unseen) |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert identify(report["after"]["generations"][0]["analysis"]) != "unknown"

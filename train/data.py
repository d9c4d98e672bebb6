"""Cross-lingual reasoning data: rows of the HuggingFaceH4/Multilingual-Thinking schema rendered
in Harmony with a loss mask over the assistant turn.

A row has `reasoning_language`, `developer` (the system prompt), `user`, `analysis`, `final`, and
usually `messages` ([system "reasoning language: X\\n\\n<prompt>", user, assistant with `thinking`]).
Rendering: system message, developer message (the language instruction and the row's prompt),
user message, then the assistant's analysis and final answer ending in <|return|>. Supervised:
everything after the prompt's closing `<|start|>assistant`, i.e. `<|channel|>analysis<|message|>...
<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>` (inference supplies the first
`<|start|>assistant` itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptoss import harmony
from gptoss.load import HUB_ID

BUNDLED = Path(__file__).resolve().parent / "data"
BUNDLED_TRAIN = BUNDLED / "multilingual_reasoning_train.jsonl"
BUNDLED_HELDOUT = BUNDLED / "multilingual_reasoning_heldout.jsonl"


class MalformedRowError(ValueError):
    """A dataset row that does not follow the schema; the message names the row."""


class DatasetError(ValueError):
    """A dataset that cannot be trained on as a whole (no rows, no supervised token); the message says why."""


def _text(row: dict, key: str, index: int) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        found = "nothing" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
        raise MalformedRowError(f"row {index}: expected a non-empty string '{key}', found {found}")
    return value


def row_fields(row: dict, index: int = 0) -> tuple[str, str, str, str, str]:
    """(developer instructions, user, analysis, final, reasoning language) of a row in either form."""
    if not isinstance(row, dict):
        raise MalformedRowError(f"row {index}: expected a JSON object, found {type(row).__name__}")
    messages = row.get("messages")
    if messages:
        try:
            by_role = {m["role"]: m for m in messages}
            developer = by_role["system"]["content"] if "system" in by_role else None
            user, assistant = by_role["user"]["content"], by_role["assistant"]
            final, analysis = assistant["content"], assistant.get("thinking") or row.get("analysis")
        except (KeyError, TypeError) as e:
            raise MalformedRowError(
                f"row {index}: 'messages' lacks {e} (expected system/user/assistant entries)"
            ) from None
        row = {
            "user": user,
            "final": final,
            "analysis": analysis,
            **{k: row[k] for k in ("reasoning_language",) if k in row},
        }
        if developer is None:
            developer = f"reasoning language: {_text(row, 'reasoning_language', index)}"
    else:
        language = _text(row, "reasoning_language", index)
        system = row.get("developer") or ""
        developer = f"reasoning language: {language}" + (f"\n\n{system}" if system else "")
    language = row.get("reasoning_language") or developer.split("\n")[0].removeprefix("reasoning language:").strip()
    return developer, _text(row, "user", index), _text(row, "analysis", index), _text(row, "final", index), language


def render_example(row: dict, max_length: int | None = 2048, index: int = 0) -> tuple[list[int], list[int]]:
    """Harmony tokens of a row and its loss mask (1 on the assistant turn), truncated to max_length
    (None: not truncated)."""
    developer, user, analysis, final, _ = row_fields(row, index)
    turns = [{"role": "user", "content": user}]
    prompt = harmony.render_prompt(harmony.build_conversation(turns, developer=developer))
    turns.append({"role": "assistant", "thinking": analysis, "content": final})
    tokens = harmony.render_training(harmony.build_conversation(turns, developer=developer))
    if tokens[: len(prompt)] != prompt:  # the training rendering must extend the prompt exactly
        raise RuntimeError(f"row {index}: Harmony training tokens do not start with the prompt tokens")
    mask = [0] * len(prompt) + [1] * (len(tokens) - len(prompt))
    return tokens[:max_length], mask[:max_length]


@dataclass
class Example:
    input_ids: list[int]
    loss_mask: list[int]
    reasoning_language: str
    index: int


@dataclass
class Dataset:
    examples: list[Example]
    rows: list[dict]
    truncated: int = 0
    skipped_long: int = 0
    skipped_malformed: list[str] = field(default_factory=list)

    @property
    def supervised_tokens(self) -> int:
        return sum(sum(e.loss_mask) for e in self.examples)

    def summary(self) -> str:
        parts = [f"{len(self.examples)} examples", f"{self.supervised_tokens:,} supervised tokens"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.skipped_long:
            parts.append(f"{self.skipped_long} skipped as too long")
        if self.skipped_malformed:
            parts.append(f"{len(self.skipped_malformed)} malformed rows skipped")
        return ", ".join(parts)


def read_rows(source: str | Path) -> list[dict]:
    """Rows from a JSONL file, a Parquet file, a folder of those, or a hub dataset id."""
    path = Path(source).expanduser()
    if not path.exists():
        if HUB_ID.fullmatch(str(source)) and not path.suffix:
            path = _download(str(source))
        else:
            raise FileNotFoundError(
                f"dataset {source} not found: give a .jsonl or .parquet file, a folder, or a hub id"
            )
    if path.is_dir():
        files = sorted(path.rglob("*.parquet")) + sorted(path.rglob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .jsonl or .parquet files")
        return [row for file in files for row in read_rows(file)]
    if not path.is_file():  # reading a FIFO blocks until a writer comes, perhaps never
        raise DatasetError(f"dataset {path} is not a regular file (a pipe or a device); give a .jsonl or .parquet file")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's errors do not name the file
            raise DatasetError(f"cannot read {path} as Parquet ({type(e).__name__}: {e})") from None
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append(MalformedRowError(f"row {number}: not valid UTF-8 (byte {raw[e.start]:#04x} at {e.start})"))
                continue
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(MalformedRowError(f"row {number}: not valid JSON ({e.msg} at column {e.colno})"))
    return rows


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", allow_patterns=["*.parquet", "*.jsonl"]))
    except Exception as e:
        raise FileNotFoundError(
            f"could not download dataset {repo_id} ({type(e).__name__}: {e}); pass a local file"
        ) from None


def load_dataset(
    source: str | Path = BUNDLED_TRAIN, max_length: int = 2048, *, skip_long: bool = False, skip_malformed: bool = False
) -> Dataset:
    """Render every row. Over-long rows are truncated (or skipped with `skip_long`); a malformed row
    raises MalformedRowError naming it (or is skipped and counted with `skip_malformed`)."""
    rows = read_rows(source)
    if not rows:
        raise DatasetError(
            f"dataset {source} holds no rows (an empty or blank file); give rows of the documented schema"
        )
    data = Dataset([], [])
    shortest_prompt = None
    for index, row in enumerate(rows):
        try:
            if isinstance(row, MalformedRowError):
                raise row
            ids, mask = render_example(row, max_length=None, index=index)  # rendered once, cut below
            language = row_fields(row, index)[4]
        except MalformedRowError as e:
            if not skip_malformed:
                raise MalformedRowError(f"dataset {source}, {e}; fix the row or pass --skip-malformed") from None
            data.skipped_malformed.append(str(e))
            continue
        if len(ids) > max_length:
            prompt = mask.index(1)
            shortest_prompt = prompt if shortest_prompt is None else min(shortest_prompt, prompt)
            if skip_long or not any(mask[1:max_length]):  # nothing left to learn from: skipped either way
                data.skipped_long += 1
                continue
            data.truncated += 1
        data.examples.append(Example(ids[:max_length], mask[:max_length], language, index))
        data.rows.append(row)
    if not data.examples:
        why = [f"{len(data.skipped_malformed)} of {len(rows)} rows are malformed"] if data.skipped_malformed else []
        if data.skipped_long:
            why.append(
                f"{data.skipped_long} of {len(rows)} rows have no assistant token within max_length={max_length} "
                f"(the shortest prompt has {shortest_prompt} tokens: raise --max-length)"
            )
        raise DatasetError(f"dataset {source}: no row can be trained on: {'; '.join(why)}")
    return data


def collate(examples: list[Example], pad_id: int = harmony.ENDOFTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: input_ids [B, T] and loss_mask [B, T] (0 on padding)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.long)
    for b, e in enumerate(examples):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[b, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
    return ids, mask

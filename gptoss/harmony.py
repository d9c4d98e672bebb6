"""Harmony: the o200k_harmony tokenizer and gpt-oss's chat format, through `openai-harmony`.

    prompt = render_prompt(build_conversation([{"role": "user", "content": "What is 2 + 2?"}],
                                              developer="reasoning language: French"))
    reply = parse_reply(generated_tokens)   # reply.analysis, reply.final, reply.calls

The vocabulary (o200k_base.tiktoken, 3.6 MB) is never downloaded: it is looked up in
$TIKTOKEN_ENCODINGS_BASE, $GPTOSS_VOCAB_DIR and ~/.cache/gptoss/vocab, else rebuilt from the PyPI
package quicktok-v1 (which ships the same ranks), and its sha256 is always checked.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# the special tokens (spec section 1.3), also gptoss.harmony's names for callers
from gptoss.tokens import ASSISTANT_STOP_TOKENS, CALL, CHANNEL, END, ENDOFTEXT, MESSAGE, RETURN, START  # noqa: F401

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
REASONING_EFFORTS = ("low", "medium", "high")


class VocabularyError(RuntimeError):
    """The o200k_base vocabulary is missing or is not the verified file."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_dir() -> Path:
    from gptoss.config import cache_dir

    return cache_dir() / "vocab"


def vocab_from_quicktok() -> bytes | None:
    """Rebuild o200k_base.tiktoken from quicktok-v1's binary ranks (u32 count, then per token a u16
    length, the bytes and a u32 rank), as `base64(bytes) rank` lines sorted by rank."""
    try:
        from importlib.resources import files

        data = (files("quicktok") / "data" / "o200k.vocab").read_bytes()
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        return None
    (count,), offset, ranked = struct.unpack_from("<I", data), 4, []
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        ranked.append((rank, token))
        offset += 6 + length
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in sorted(ranked))


@functools.cache
def find_vocab_dir() -> Path:
    """A folder holding the verified o200k_base.tiktoken; materialised from quicktok-v1 if needed."""
    for var in ("TIKTOKEN_ENCODINGS_BASE", "GPTOSS_VOCAB_DIR"):
        if os.environ.get(var):
            path = Path(os.environ[var]) / VOCAB_FILE
            if path.is_file():
                if _sha256(path) != VOCAB_SHA256:
                    raise VocabularyError(f"{path} (from ${var}) is not o200k_base: its sha256 is not {VOCAB_SHA256}")
                return path.parent
    cached = _cache_dir() / VOCAB_FILE
    if cached.is_file() and _sha256(cached) == VOCAB_SHA256:
        return cached.parent
    data = vocab_from_quicktok()
    if data is not None and hashlib.sha256(data).hexdigest() == VOCAB_SHA256:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # a name of this writer's own, renamed into place: concurrent first runs each write whole files
        fd, tmp = tempfile.mkstemp(prefix=cached.name + ".", suffix=".tmp", dir=cached.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, cached)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return cached.parent
    raise VocabularyError(
        f"the o200k_base vocabulary was not found: set TIKTOKEN_ENCODINGS_BASE to a folder holding {VOCAB_FILE} "
        f"(sha256 {VOCAB_SHA256}), or `pip install quicktok-v1`, which ships it"
    )


@functools.cache
def get_encoding():
    """The o200k_harmony encoding of `openai-harmony`, loaded offline from the verified vocabulary."""
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(find_vocab_dir())  # where openai-harmony looks; no download
    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def encode(text: str) -> list[int]:
    """Plain text to ids; text that looks like a special token stays text."""
    return get_encoding().encode(text, disallowed_special=())


def decode(tokens: Iterable[int]) -> str:
    return get_encoding().decode(list(tokens))


# ---------------------------------------------------------------------------------------------
# Conversations from plain data
# ---------------------------------------------------------------------------------------------


def system_message(reasoning_effort: str = "medium", current_date: str | None = None):
    from openai_harmony import Message, ReasoningEffort, Role, SystemContent

    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"unknown reasoning effort {reasoning_effort!r}: choose one of {', '.join(REASONING_EFFORTS)}")
    content = SystemContent.new().with_reasoning_effort(ReasoningEffort(reasoning_effort.capitalize()))
    if current_date:
        content = content.with_conversation_start_date(current_date)
    return Message.from_role_and_content(Role.SYSTEM, content)


def developer_message(instructions: str):
    from openai_harmony import DeveloperContent, Message, Role

    return Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(instructions))


def build_conversation(
    turns: Sequence[Mapping[str, str]],
    *,
    developer: str | None = None,
    reasoning_effort: str = "medium",
    current_date: str | None = None,
):
    """A Harmony conversation: system message, optional developer instructions, then `turns`.

    Each turn is {"role": "user", "content": ...} or {"role": "assistant", "content": final answer,
    "thinking": optional analysis}; an assistant turn may instead give {"channel": ..., "content": ...}.
    """
    from openai_harmony import Conversation, Message, Role

    messages = [system_message(reasoning_effort, current_date)]
    if developer:
        messages.append(developer_message(developer))
    for i, turn in enumerate(turns):
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(content, str):
            raise ValueError(f"turn {i}: expected a string 'content', found {type(content).__name__}")
        if role == "user":
            messages.append(Message.from_role_and_content(Role.USER, content))
        elif role == "assistant":
            if turn.get("thinking"):
                messages.append(
                    Message.from_role_and_content(Role.ASSISTANT, turn["thinking"]).with_channel("analysis")
                )
            channel = turn.get("channel", "final")
            messages.append(Message.from_role_and_content(Role.ASSISTANT, content).with_channel(channel))
        else:
            raise ValueError(f"turn {i}: role must be 'user' or 'assistant', found {role!r}")
    return Conversation.from_messages(messages)


def render_prompt(conversation) -> list[int]:
    """Tokens for the model to complete: the conversation, then `<|start|>assistant`. Earlier turns'
    analysis is dropped (the Harmony rule once a turn has its final answer)."""
    from openai_harmony import Role

    return get_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)


def render_training(conversation) -> list[int]:
    """Tokens for training: the last assistant turn keeps its analysis and ends with `<|return|>`."""
    from openai_harmony import RenderConversationConfig

    config = RenderConversationConfig(auto_drop_analysis=False)  # openai-harmony drops it by default
    return get_encoding().render_conversation_for_training(conversation, config)


# ---------------------------------------------------------------------------------------------
# Parsing what the model generated
# ---------------------------------------------------------------------------------------------


@dataclass
class Reply:
    analysis: str = ""
    final: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (recipient, arguments) of tool calls
    complete: bool = False  # ended with <|return|> or <|call|>
    error: str | None = None  # set when the tokens do not follow the Harmony grammar
    raw: str = ""


class ReplyStream:
    """Incremental parse of an assistant completion, token by token (for streaming output)."""

    def __init__(self):
        from openai_harmony import Role, StreamableParser

        self.parser = StreamableParser(get_encoding(), role=Role.ASSISTANT)
        self.reply = Reply()
        self.tokens: list[int] = []

    def push(self, token: int) -> tuple[str | None, str]:
        """Feed one token; return (channel, new text) for display ("" when nothing new)."""
        self.tokens.append(token)
        if self.reply.error is not None:
            return None, ""
        try:
            self.parser.process(token)
        except Exception as e:  # the model left the grammar (random weights do)
            self.reply.error = str(e)
            return None, ""
        if token in ASSISTANT_STOP_TOKENS:
            self.reply.complete = True
        return self.parser.current_channel, self.parser.last_content_delta or ""

    def finish(self) -> Reply:
        reply = self.reply
        reply.raw = decode(self.tokens)
        messages = list(self.parser.messages)
        partial = self.parser.current_content if reply.error is None else ""
        for message in messages:
            text = "".join(c.text for c in message.content if hasattr(c, "text"))
            if message.recipient:
                reply.calls.append((message.recipient, text))
            elif message.channel == "analysis":
                reply.analysis += text
            elif message.channel in ("final", None):
                reply.final += text
        if partial:  # cut off by the token budget
            if self.parser.current_channel == "analysis":
                reply.analysis += partial
            else:
                reply.final += partial
        return reply


def parse_reply(tokens: Iterable[int]) -> Reply:
    """Split generated assistant tokens into analysis, final answer and tool calls."""
    stream = ReplyStream()
    for token in tokens:
        stream.push(token)
    return stream.finish()

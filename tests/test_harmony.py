"""Harmony rendering and parsing, checked against openai-harmony's own API and the published format."""

import hashlib
from pathlib import Path

import pytest
from openai_harmony import (
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)

from gptoss import harmony


def test_vocabulary_is_the_verified_file():
    path = harmony.find_vocab_dir() / harmony.VOCAB_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == harmony.VOCAB_SHA256


def test_quicktok_ranks_rebuild_the_file_byte_for_byte():
    data = harmony.vocab_from_quicktok()
    if data is None:
        pytest.skip("quicktok-v1 is not installed")
    assert hashlib.sha256(data).hexdigest() == harmony.VOCAB_SHA256


def test_wrong_vocabulary_file_is_refused(tmp_path, monkeypatch):
    (tmp_path / harmony.VOCAB_FILE).write_text("not the vocabulary\n")
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    harmony.find_vocab_dir.cache_clear()
    try:
        with pytest.raises(harmony.VocabularyError, match="is not o200k_base"):
            harmony.find_vocab_dir()
    finally:
        harmony.find_vocab_dir.cache_clear()


def _first_run(_):
    return str(harmony.find_vocab_dir.__wrapped__() / harmony.VOCAB_FILE)  # uncached: each process writes


def test_concurrent_first_runs_each_get_the_whole_vocabulary(tmp_path, monkeypatch):
    # twelve processes with an empty cache at once: each writes the file under a name of its own and renames
    # it into place (a shared temporary name let one process read another's half-written file)
    import multiprocessing

    if harmony.vocab_from_quicktok() is None:
        pytest.skip("quicktok-v1 is not installed")
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.delenv("GPTOSS_VOCAB_DIR", raising=False)
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path))
    with multiprocessing.get_context("fork").Pool(12) as pool:
        paths = pool.map(_first_run, range(12))
    assert set(paths) == {str(tmp_path / "vocab" / harmony.VOCAB_FILE)}
    assert hashlib.sha256(Path(paths[0]).read_bytes()).hexdigest() == harmony.VOCAB_SHA256
    assert sorted(p.name for p in (tmp_path / "vocab").iterdir()) == [harmony.VOCAB_FILE]  # no temporary left


def test_missing_vocabulary_says_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    monkeypatch.delenv("GPTOSS_VOCAB_DIR", raising=False)
    monkeypatch.setenv("GPTOSS_CACHE", str(tmp_path))
    monkeypatch.setattr(harmony, "vocab_from_quicktok", lambda: None)
    harmony.find_vocab_dir.cache_clear()
    try:
        with pytest.raises(harmony.VocabularyError, match="set TIKTOKEN_ENCODINGS_BASE .* `pip install quicktok-v1`"):
            harmony.find_vocab_dir()
    finally:
        harmony.find_vocab_dir.cache_clear()


def test_system_message_text_matches_the_published_example():
    # the fixture text of openai/harmony (system message with a date and high reasoning effort)
    expected = (
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    )
    tokens = harmony.render_prompt(harmony.build_conversation([], reasoning_effort="high", current_date="2025-06-28"))
    assert harmony.decode(tokens) == expected + "<|start|>assistant"
    assert tokens[-2:] == [200006, 173781]  # <|start|>assistant, no channel, no BOS anywhere
    assert tokens[0] == 200006 and 199998 not in tokens


def test_prompt_tokens_equal_openai_harmony_for_the_same_conversation():
    turns = [
        {"role": "user", "content": "Combien font 17 x 3 ?"},
        {"role": "assistant", "thinking": "17 x 3 = 51.", "content": "51."},
        {"role": "user", "content": "Et 51 / 3 ?"},
    ]
    ours = harmony.render_prompt(
        harmony.build_conversation(turns, developer="reasoning language: German", reasoning_effort="low")
    )
    system = SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW)
    conversation = Conversation.from_messages(
        [
            Message.from_role_and_content(Role.SYSTEM, system),
            Message.from_role_and_content(
                Role.DEVELOPER, DeveloperContent.new().with_instructions("reasoning language: German")
            ),
            Message.from_role_and_content(Role.USER, "Combien font 17 x 3 ?"),
            Message.from_role_and_content(Role.ASSISTANT, "17 x 3 = 51.").with_channel("analysis"),
            Message.from_role_and_content(Role.ASSISTANT, "51.").with_channel("final"),
            Message.from_role_and_content(Role.USER, "Et 51 / 3 ?"),
        ]
    )
    theirs = harmony.get_encoding().render_conversation_for_completion(conversation, Role.ASSISTANT)
    assert ours == theirs
    text = harmony.decode(ours)
    assert "17 x 3 = 51." not in text  # the finished turn's analysis is dropped from the next prompt
    assert "<|channel|>final<|message|>51.<|end|>" in text  # and its answer ends with <|end|>, not <|return|>


def test_training_rendering_keeps_the_analysis_and_ends_with_return():
    turns = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "thinking": "Adding two and two.", "content": "4"},
    ]
    tokens = harmony.render_training(harmony.build_conversation(turns, developer="reasoning language: Spanish"))
    text = harmony.decode(tokens)
    assert "<|start|>assistant<|channel|>analysis<|message|>Adding two and two.<|end|>" in text
    assert text.endswith("<|start|>assistant<|channel|>final<|message|>4<|return|>")
    assert tokens[-1] == 200002
    header = [200005, 35644, 200008]  # <|channel|>analysis<|message|> as single special ids plus "analysis"
    assert any(tokens[i : i + 3] == header for i in range(len(tokens)))


def test_parser_returns_what_was_rendered():
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "thinking": "Greet back, briefly.", "content": "Hello!"},
    ]
    conversation = harmony.build_conversation(turns)
    prompt = harmony.render_prompt(harmony.build_conversation(turns[:1]))
    full = harmony.render_training(conversation)
    generated = full[len(prompt) :]  # what the model would have produced after <|start|>assistant
    reply = harmony.parse_reply(generated)
    assert (reply.analysis, reply.final, reply.complete, reply.error) == ("Greet back, briefly.", "Hello!", True, None)


def test_parser_handles_tool_calls_and_truncation():
    enc = harmony.encode
    call = [
        200005,
        *enc("commentary to=functions.get_weather "),
        200003,
        *enc("json"),
        200008,
        *enc('{"city": "Paris"}'),
        200012,
    ]
    reply = harmony.parse_reply(call)
    assert reply.calls == [("functions.get_weather", '{"city": "Paris"}')] and reply.complete
    cut = harmony.parse_reply([200005, 35644, 200008, *enc("thinking about it")])
    assert cut.analysis == "thinking about it" and not cut.complete


def test_unknown_reasoning_effort():
    with pytest.raises(ValueError, match="unknown reasoning effort 'extreme'"):
        harmony.build_conversation([], reasoning_effort="extreme")


def test_malformed_turns():
    with pytest.raises(ValueError, match="turn 0: role must be 'user' or 'assistant'"):
        harmony.build_conversation([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="turn 1: expected a string 'content'"):
        harmony.build_conversation([{"role": "user", "content": "a"}, {"role": "user"}])

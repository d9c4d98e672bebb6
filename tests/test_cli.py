import subprocess
import sys

import pytest
import torch

from gptoss.checkpoint_write import write_safetensors
from gptoss.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert {"synth", "info", "demo"} <= set(subcommands)
    for name, sub in subcommands.items():
        for action in sub._actions:
            assert action.help, f"gptoss {name} {action.option_strings} has no help text"
    assert main(["synth", "--help"]) == 0 and "--layout" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "gptoss", "--help"], capture_output=True, text=True, check=True).stdout
    assert "synth" in out and "demo" in out


def test_synth_then_info(tmp_path, capsys):
    assert main(["synth", "--preset", "tiny", "--layout", "original", "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "model.safetensors").exists() and (tmp_path / "ck" / "dtypes.json").exists()
    assert main(["info", "--model", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "original layout" in out and "53,003,456" in out  # the tiny preset's parameter count
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    assert main(["synth", "--preset", "tiny", "--layout", "hf-mxfp4", "--out", str(tmp_path / "ck")]) == 1
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before  # refused: nothing changed
    args = ["synth", "--preset", "tiny", "--layout", "hf-mxfp4", "--out", str(tmp_path / "ck"), "--overwrite"]
    assert main(args) == 0  # replaces the checkpoint's files, keeps the user's
    assert not (tmp_path / "ck" / "dtypes.json").exists()  # the original layout's file went with it
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"
    assert main(["info", "--model", str(tmp_path / "ck")]) == 0 and "hf-mxfp4 layout" in capsys.readouterr().out


def test_info_preset_markdown(capsys):
    assert main(["info", "--preset", "gpt-oss-20b", "--markdown"]) == 0
    assert "| total | 20,914,757,184 | 3,608,307,264 |" in capsys.readouterr().out


def test_demo_runs_a_forward_pass(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--tokens", "8", "--no-train"]) == 0
    out = capsys.readouterr().out
    assert "writing a random tiny checkpoint" in out and "logits [1, 8, 201088]" in out
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--tokens", "8", "--quick"]) == 0  # reuses it, then trains
    out = capsys.readouterr().out
    assert "using the tiny checkpoint" in out and "[4/6] pre-training" in out and "[6/6] held-out prompts" in out
    assert "a seen language, reasoning requested in" in out and "an unseen language, reasoning requested in" in out
    lora = tmp_path / "demo-run" / "lora"
    assert f"gptoss app --model {tmp_path / 'demo-run' / 'base' / 'model'} --adapter {lora} --dtype fp32" in out
    for name in ("adapter_config.json", "adapter_model.safetensors", "report.md", "report.json", "report.png"):
        assert (tmp_path / "demo-run" / "lora" / name).exists(), name
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--tokens", "8", "--quick"]) == 0  # the base is cached
    out = capsys.readouterr().out
    assert "using the cached pre-trained tiny base" in out and "replacing the demo's previous LoRA run" in out


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated header
    assert main(["info", "--model", str(tmp_path)]) == 1  # a bad file, not a bad argument
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptoss info: error: cannot read") and "\n" not in err and "Traceback" not in err


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path):
    def failing():
        raise KeyboardInterrupt

    spec = {"a": ((4,), "BF16"), "b": ((4,), "BF16")}
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path / "model.safetensors", spec, {"a": lambda: torch.zeros(4), "b": failing})
    assert not (tmp_path / "model.safetensors").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from gptoss import get_preset
    from gptoss.synthetic import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny"), get_preset("tiny"), "hf-mxfp4", seed=0)


def test_generate_prints_sections_and_speeds(tiny_checkpoint, capsys):
    args = ["generate", "--model", str(tiny_checkpoint), "--prompt", "What is 2 + 2?", "--max-new-tokens", "6"]
    assert main(args + ["--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "── output, unparsed" in out or "── final ──" in out  # random weights rarely speak Harmony
    # 6 new tokens: the first comes from the prefill's logits, the decode steps make the other 5
    assert "── speed ──" in out and "prefill: " in out and "decode: 5 tokens" in out
    assert main(args + ["--raw", "--temperature", "0"]) == 0
    assert "── completion ──" in capsys.readouterr().out


def test_reply_sections(capsys):
    from gptoss import harmony
    from gptoss.cli import _print_reply

    tokens = [200005, 35644, 200008, *harmony.encode("Two and two."), 200007, 200006, 173781, 200005, 17196, 200008]
    _print_reply(harmony.parse_reply(tokens + [*harmony.encode("4"), 200002]))
    out = capsys.readouterr().out
    assert out.index("── analysis ──\nTwo and two.") < out.index("── final ──\n4")


def test_chat_history_follows_the_harmony_rules(tiny_checkpoint, monkeypatch, capsys):
    import io
    import sys

    from gptoss import harmony

    prompts = []
    answers = iter(["Four.", "Five."])

    def scripted_generate(model, batch, **kwargs):  # the model "answers" with analysis + final + <|return|>
        prompts.append(batch[0])
        final = next(answers)
        reply = [200005, 35644, 200008, *harmony.encode(f"SECRET-{final}"), 200007, 200006, 173781]
        kwargs["stats"].update(prefill_tokens=len(batch[0]), prefill_s=0.1, decode_tokens=5, decode_s=0.1)
        return [reply + [200005, 17196, 200008, *harmony.encode(final), 200002]]

    # the module, not the function of the same name that the package exports
    monkeypatch.setattr(sys.modules["gptoss.generate"], "generate", scripted_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("2 + 2?\n\n2 + 3?\n/exit\n"))
    assert main(["chat", "--model", str(tiny_checkpoint), "--developer", "reasoning language: French"]) == 0
    out = capsys.readouterr().out
    assert out.count("user> ") == 4 and "── final ──\nFour." in out and "── final ──\nFive." in out
    second = harmony.decode(prompts[1])
    assert "<|start|>assistant<|channel|>final<|message|>Four.<|end|><|start|>user<|message|>2 + 3?<|end|>" in second
    assert "SECRET" not in second and "<|return|>" not in second  # analysis dropped, <|return|> stored as <|end|>
    assert "reasoning language: French" in second and second.endswith("<|start|>assistant")


def test_a_chat_turn_past_the_context_is_refused_and_the_session_goes_on(tiny_checkpoint, monkeypatch, capsys):
    import io
    import sys

    from gptoss import harmony

    sent = []

    def scripted_generate(model, batch, **kwargs):
        sent.append(len(batch[0]))
        kwargs["stats"].update(prefill_tokens=len(batch[0]), prefill_s=0.1, decode_tokens=1, decode_s=0.1)
        return [[200005, 17196, 200008, *harmony.encode("Ok."), 200002]]

    monkeypatch.setattr(sys.modules["gptoss.generate"], "generate", scripted_generate)
    long_line = "word " * 140_000  # past the tiny model's 131,072-token context
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hello\n{long_line}\nstill here?\n/exit\n"))
    assert main(["chat", "--model", str(tiny_checkpoint)]) == 0
    captured = capsys.readouterr()
    assert "would pass the model's context of 131072: not sent; /reset clears the history" in captured.err
    assert len(sent) == 2 and captured.out.count("Ok.") == 2  # the turns before and after it were answered
    assert "Traceback" not in captured.err


def test_synth_overwrite_replaces_only_the_files_synth_writes(tmp_path):
    out = tmp_path / "ckpt"
    assert main(["synth", "--preset", "tiny", "--out", str(out)]) == 0
    (out / "embeddings.safetensors").write_bytes(b"the user's own")  # not a checkpoint file synth writes
    (out / "notes.txt").write_text("mine")
    assert main(["synth", "--preset", "tiny", "--out", str(out), "--overwrite", "--seed", "1"]) == 0
    assert (out / "embeddings.safetensors").read_bytes() == b"the user's own" and (out / "notes.txt").exists()
    assert (out / "config.json").exists()

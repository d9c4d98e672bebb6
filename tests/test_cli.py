import subprocess
import sys

import pytest
import torch

from gptoss.cli import build_parser, main
from gptoss.synthetic import write_safetensors


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert {"synth", "info", "demo"} <= set(subcommands)
    for name, sub in subcommands.items():
        for action in sub._actions:
            assert action.help, f"gptoss {name} {action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    assert exit_info.value.code == 0 and "--layout" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "gptoss", "--help"], capture_output=True, text=True, check=True).stdout
    assert "synth" in out and "demo" in out


def test_synth_then_info(tmp_path, capsys):
    assert main(["synth", "--preset", "tiny", "--layout", "original", "--out", str(tmp_path / "ck")]) == 0
    assert (tmp_path / "ck" / "model.safetensors").exists() and (tmp_path / "ck" / "dtypes.json").exists()
    assert main(["info", "--model", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "original layout" in out and "53,003,456" in out  # the tiny preset's parameter count


def test_info_preset_markdown(capsys):
    assert main(["info", "--preset", "gpt-oss-20b", "--markdown"]) == 0
    assert "| total | 20,914,757,184 | 3,608,307,264 |" in capsys.readouterr().out


def test_demo_runs_a_forward_pass(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "writing a random tiny checkpoint" in out and "logits [1, 8, 201088]" in out
    assert main(["demo", "--dir", str(tmp_path / "tiny"), "--tokens", "8"]) == 0  # second run reuses it
    assert "using the tiny checkpoint" in capsys.readouterr().out


def test_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated header
    assert main(["info", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptoss info: error: cannot read") and "\n" not in err and "Traceback" not in err


def test_interrupted_write_leaves_no_complete_looking_file(tmp_path):
    def failing():
        raise KeyboardInterrupt

    spec = {"a": ((4,), "BF16"), "b": ((4,), "BF16")}
    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tmp_path / "model.safetensors", spec, {"a": lambda: torch.zeros(4), "b": failing})
    assert not (tmp_path / "model.safetensors").exists()

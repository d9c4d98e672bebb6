"""A training run's folder, the format of what it holds and its rules: the files a run writes (present:
the folder holds a run), the manifest listing them (all that --overwrite may remove), the checkpoint's
JSON header (a safetensors file, never a pickle), and the lock a run holds on the folder while it writes."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from safetensors import SafetensorError, safe_open


class TrainError(RuntimeError):
    """Training cannot start or go on; the message says why, what was kept and what to do."""


CHECKPOINT = "checkpoint.safetensors"  # trainable tensors + optimizer state; step and settings as JSON metadata
LEGACY_CHECKPOINT = "checkpoint.pt"  # a pickle (older gptoss): refused, never loaded
# what a run writes into its --output folder: present means the folder holds a run
MANIFEST = "gptoss_run.json"  # the names this trainer wrote into the folder: all that --overwrite may remove
RUN_FILES = (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    "adapter_model.safetensors",
    "adapter_config.json",
    "train_log.jsonl",
    "loss.png",
    "report.md",
    "report.json",
    "report.png",
    "model",
    MANIFEST,
)


def owned_files(folder: Path) -> list[str]:
    """What an earlier run wrote into `folder`, as its manifest lists it (runs from before the manifest:
    the run files, without model/). Never a name outside RUN_FILES, whatever the manifest says."""
    try:
        names = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return [n for n in names if n in RUN_FILES]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        pass
    return [n for n in RUN_FILES if n != "model"]


def unreadable(path: Path, e: Exception) -> TrainError:
    return TrainError(f"cannot read {path}: {e} -- it is truncated or corrupt; start again with --overwrite")


def read_checkpoint_header(path: Path) -> dict:
    """The JSON header of a training checkpoint (step, settings, optimizer groups), checked."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get("gptoss")
    except (SafetensorError, OSError) as e:
        raise unreadable(path, e) from None
    try:
        header = json.loads(raw) if raw is not None else None
        ok = isinstance(header, dict) and header.get("format") == 1 and isinstance(header.get("step"), int)
        ok = ok and isinstance(header.get("param_groups"), list) and isinstance(header.get("settings"), dict)
    except json.JSONDecodeError:
        ok = False
    if not ok:
        raise TrainError(f"{path} is not a gptoss training checkpoint (no valid header); start again with --overwrite")
    return header


LOCK = "gptoss_run.lock"  # held while a run writes into its --output folder (never part of a run's files)


class RunLock:
    """An advisory lock on an output folder: a file created exclusively, holding the owner's pid and
    host. A second run on the folder is refused with the holder named; a lock whose process is gone (same
    host, no such pid) is taken over, and said. Released (and a folder it created, if still empty,
    removed) when the run ends, however it ends."""

    def __init__(self, folder: Path):
        self.folder, self.path = folder, folder / LOCK
        self.created = False
        self.held = False

    def __enter__(self) -> RunLock:
        import socket

        if self.folder.exists() and not self.folder.is_dir():
            return self  # the trainer's own check names this case
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None or not self._gone(holder, me["host"]):
                    who = (
                        f"pid {holder['pid']} on {holder['host']}, since {holder.get('started', '?')}"
                        if holder
                        else "a run whose lock file is unreadable"
                    )
                    raise TrainError(
                        f"--output {self.folder} is in use by another run ({who}): wait for it to end or choose "
                        f"another folder; if no such run exists, delete {self.path}"
                    ) from None
                print(
                    f"gptoss train: {self.folder} was locked by a run that is gone (pid {holder['pid']} on "
                    f"{holder['host']}); taking it over",
                    file=sys.stderr,
                    flush=True,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise TrainError(f"--output {self.folder}: could not take its lock {self.path}; try again")

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and isinstance(holder.get("host"), str)
        return holder if ok else None

    @staticmethod
    def _gone(holder: dict, host: str) -> bool:
        if holder["host"] != host:
            return False  # another machine's process cannot be looked up from here
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # alive, another user's
        return False

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only if the run left it empty (refused before writing anything)

"""The one error type the command line treats apart, and the value checks that raise it.

`UsageError` is a wrong argument value: a flag, a keyword argument or a config field outside its
range or of the wrong type. The CLI exits 2 on it (as argparse does for a malformed command line)
and 1 on everything else: a file that cannot be read, data that does not fit, a full disk.
Every check names the field, says what was expected and what was found.
"""

from __future__ import annotations

import math


class UsageError(ValueError):
    """An argument outside its range or of the wrong type; the message names it."""


def _found(value) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (int, float)) else repr(value)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int in [minimum, maximum]; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, found {_found(value)}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, found {value}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be at most {maximum}, found {value}")
    return value


def check_float(
    name: str, value, minimum: float | None = None, maximum: float | None = None, *, above: bool = False
) -> float:
    """`value` as a finite float in [minimum, maximum] (or (minimum, maximum] with `above`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, found {_found(value)}")
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, found {value}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise UsageError(f"{name} must be {'greater than' if above else 'at least'} {minimum}, found {value}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name} must be at most {maximum}, found {value}")
    return float(value)


def path_flag(text: str) -> str:
    """argparse type of a path flag: '' (the current folder, by accident) is refused."""
    import argparse

    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a path")
    return text

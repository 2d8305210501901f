"""Argument checks shared by ``LLM`` and ``EngineArgs``: each raises one ValueError line
naming the parameter and what it accepts; and the argparse types of counts and seeds that
the command lines share (``simulate``, ``serve``, the build's ``advise``)."""

from __future__ import annotations

import argparse
from numbers import Integral
from pathlib import Path


def check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """Raise a one-line ValueError unless ``value`` is an integer >= ``minimum`` (or None
    when ``optional``).  A bool is refused: ``True`` is not a size."""
    if optional and value is None:
        return
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_path(name: str, value: object, *, optional: bool = False) -> None:
    """Raise unless ``value`` is a non-empty str or Path (or None when ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError(f"{name} must be {'None or ' if optional else ''}a non-empty path (str or Path), got {value!r}")


def check_devices(devices: object) -> None:
    """``devices`` is None (the artifact's) or a non-empty device string; its parts are
    parsed when the mesh is planned."""
    if devices is not None and (not isinstance(devices, str) or not devices.strip()):
        raise ValueError(f"devices must be None or a device string such as 'npu:0' or 'npu:0:0-3', got {devices!r}")


def check_seed(seed: object) -> None:
    """The engine seed seeds NumPy's SeedSequence, which takes integers >= 0."""
    check_int("seed", seed, 0, optional=True)


def check_jit(threshold: object, max_workers: object, unit_size: object, *, optional: bool = False) -> None:
    """Validate the JIT settings as furiosa-llm does (None allowed, meaning the default,
    when ``optional``).

    ``jit_unit_size`` below 2 breaks batching, ``jit_threshold`` 0 would compile on
    every request, and at least one worker must exist.
    """
    check_int("jit_unit_size", unit_size, 2, optional=optional)
    check_int("jit_threshold", threshold, 1, optional=optional)
    check_int("jit_max_workers", max_workers, 1, optional=optional)


def check_bool(name: str, value: object) -> None:
    """Raise unless ``value`` is True or False (a truthy string such as "false" is refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def positive_int(text: str) -> int:
    """An argparse type: a count such as ``--num-prompts``, an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def non_negative_int(text: str) -> int:
    """An argparse type: a seed, an integer >= 0 (NumPy's SeedSequence takes no negatives)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)

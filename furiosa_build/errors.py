"""Errors the build reports to the user in one line.

Configuration problems are :class:`ConfigError` (a ``ValueError``, which
``furiosa_build.config`` exports too), their values spelled as the user typed them
(:func:`show_value`); problems with the file system are :class:`BuildIOError` (an
``OSError``), whose message names what the build was doing, the path, and the reason, e.g.
``writing the artifact: /mnt/full/out: no space left on device``.

The command lines print either as ``error: <message>`` and exit with status 2
(:data:`EXIT_USER_ERROR`); an interrupted build exits with 130 (:data:`EXIT_INTERRUPTED`).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["EXIT_INTERRUPTED", "EXIT_USER_ERROR", "BuildIOError", "ConfigError", "UnitError", "io_error", "path_error",
           "show_value"]

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class ConfigError(ValueError):
    """A build configuration that cannot be used, as one line: ``<dotted.field>: <problem>``."""


class UnitError(RuntimeError):
    """A capture or compile unit that failed on a cluster worker, as one line:
    ``<stage> unit <label>: <error>`` (``furiosa_build/cluster.py``)."""


def show_value(value: Any) -> str:
    """A value as a user typed it (YAML spelling for booleans and null), kept short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(list(value)) if isinstance(value, tuple) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class BuildIOError(OSError):
    """An OS error met by the build, as one line: ``<doing what>: <path>: <reason>``."""

    def __str__(self) -> str:
        return self.args[1] if len(self.args) > 1 else super().__str__()


def _reason(exc: OSError) -> str:
    if exc.strerror:
        return exc.strerror.lower()
    if exc.errno:
        return os.strerror(exc.errno).lower()
    text = " ".join(str(exc).split())  # an OSError raised with a message only
    return text or type(exc).__name__


def io_error(exc: OSError, doing: str, path: os.PathLike[str] | str | None = None) -> BuildIOError:
    """Wrap ``exc`` as a one-line :class:`BuildIOError` (``raise io_error(e, ...) from None``).

    ``path`` defaults to the file the OS error names; an error that is already a
    BuildIOError keeps its own message (it already says what and where).
    """
    if isinstance(exc, BuildIOError):
        return exc
    where = path if path is not None else exc.filename
    parts = [doing] + ([os.fspath(where)] if where is not None else []) + [_reason(exc)]
    return BuildIOError(exc.errno, ": ".join(parts))


def path_error(code: int, field: str, path: os.PathLike[str] | str, problem: str | None = None) -> BuildIOError:
    """A BuildIOError for a configured path found unusable before any work starts:
    ``<field>: <path>: <problem>`` (the problem defaults to the OS wording of ``code``)."""
    return BuildIOError(code, f"{field}: {os.fspath(path)}: {problem or os.strerror(code).lower()}")


"""Errors the build reports to the user in one line.

Configuration problems are :class:`furiosa_build.config.ConfigError` (a ``ValueError``);
problems with the file system are :class:`BuildIOError` (an ``OSError``), whose message
names what the build was doing, the path, and the reason, e.g.
``writing the artifact: /mnt/full/out: no space left on device``.
"""

from __future__ import annotations

import errno
import os

__all__ = ["BuildIOError", "io_error"]


class BuildIOError(OSError):
    """An OS error met by the build, as one line: ``<doing what>: <path>: <reason>``."""

    def __str__(self) -> str:
        return self.args[1] if len(self.args) > 1 else super().__str__()


def io_error(exc: OSError, doing: str, path: os.PathLike[str] | str | None = None) -> BuildIOError:
    """Wrap ``exc`` as a one-line :class:`BuildIOError` (``raise io_error(e, ...) from None``)."""
    where = path if path is not None else exc.filename
    reason = (exc.strerror or errno.errorcode.get(exc.errno or 0, type(exc).__name__)).lower()
    parts = [doing] + ([os.fspath(where)] if where is not None else []) + [reason]
    return BuildIOError(exc.errno, ": ".join(parts))

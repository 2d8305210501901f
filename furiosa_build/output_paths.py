"""Output paths checked before any work: the build refuses a place it could not write.

Output paths (``build.save_dir``, ``build.cache_dir``, ``build.param_file_path``) are
checked by :func:`check_output_paths` before any work: an existing file where a folder
must go, an ancestor that is a file, a read-only or unwritable place, a name too long;
those raise :class:`furiosa_build.errors.BuildIOError` (an ``OSError``), also a user error.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

from furiosa_build.errors import BuildIOError, io_error, path_error

if TYPE_CHECKING:
    from furiosa_build.config import BuildSpec


def check_output_paths(spec: BuildSpec) -> None:
    """Refuse, before any work, output paths the build could not write: raise BuildIOError
    (or the package stage's ConfigError) with one line ``<field>: <path>: <problem>``.

    ``build.save_dir`` (not for a dry run, which writes no artifact): not a file, no
    ancestor that is a file, a writable place to create it; ``build.param_file_path``
    likewise.  ``build.cache_dir`` is not checked: the cache is an optimisation, and one
    that cannot be used warns once and the build goes on without it.
    """
    opts = spec.build
    if not opts.dry_run and opts.save_dir:
        save_dir = Path(opts.save_dir).expanduser()
        _check_existing("build.save_dir", save_dir, want_dir=True)
        check_creatable("build.save_dir", save_dir, save_dir.parent, scratch_sibling=True)
        try:  # the package stage's own refusal (not an artifact of ours, the current folder...)
            from furiosa_build.package import check_save_dir
        except ImportError:  # pragma: no cover - package stage without the check
            check_save_dir = None
        if check_save_dir is not None:
            check_save_dir(save_dir)
    if not opts.dry_run and opts.param_file_path:
        param_file = Path(opts.param_file_path).expanduser()
        _check_existing("build.param_file_path", param_file, want_dir=False)
        check_creatable("build.param_file_path", param_file, param_file.parent, scratch_sibling=True)


def _check_existing(field: str, path: Path, want_dir: bool) -> None:
    try:
        if not os.path.lexists(path):
            return
        is_dir = path.is_dir()
    except OSError as exc:
        raise io_error(exc, field, path) from None
    if want_dir and not is_dir:
        raise path_error(errno.ENOTDIR, field, path, "exists and is not a folder; choose another path")
    if not want_dir and is_dir:
        raise path_error(errno.EISDIR, field, path, "is a folder; give a file path")


#: What a scratch sibling's name adds to the name it stands beside (furiosa_build.scratch).
_SCRATCH_NAME_EXTRA = 64


def check_creatable(field: str, target: Path, place: Path, *, scratch_sibling: bool = False) -> None:
    """``place`` (or its nearest existing ancestor) must be a folder this process may write,
    and the names still to be made must fit the file system (``scratch_sibling``: the build
    also makes a scratch sibling of ``target`` with a longer name)."""
    try:
        target = Path(os.path.abspath(target))
        existing = Path(os.path.abspath(place))
        while not os.path.lexists(existing):
            existing = existing.parent
        if not existing.is_dir():
            problem = "is a broken symbolic link" if existing.is_symlink() and not existing.exists() else "is not a folder"
            raise path_error(errno.ENOTDIR, field, target, f"{existing} {problem}")
        name_max = os.pathconf(existing, "PC_NAME_MAX")
        if target != existing and target.is_relative_to(existing):
            for part in target.relative_to(existing).parts:
                limit = name_max - (_SCRATCH_NAME_EXTRA if scratch_sibling and part == target.name else 0)
                if len(os.fsencode(part)) > limit:
                    raise path_error(errno.ENAMETOOLONG, field, target, f"the name {part[:20]!r}... is longer than "
                                     f"the {limit} bytes this build can use there")  # fmt: skip
        if not os.access(existing, os.W_OK | os.X_OK):
            if os.statvfs(existing).f_flag & os.ST_RDONLY:
                raise path_error(errno.EROFS, field, target, f"{existing} is on a read-only file system")
            raise path_error(errno.EACCES, field, target, f"{existing} is not writable (permission denied)")
    except BuildIOError:
        raise
    except OSError as exc:  # a loop of symbolic links...
        raise io_error(exc, field, target) from None

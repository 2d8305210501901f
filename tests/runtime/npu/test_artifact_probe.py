"""Artifacts and arguments an outside checker found the runtime answering badly, each now
one line ``error: ...`` naming the file or flag, exit status 2 and no traceback:

* ``artifact.json`` that is a folder (``[Errno 21] Is a directory: 4`` before), nested
  thousands deep (a RecursionError traceback), holding an integer of thousands of digits
  (Python's advice about ``sys.set_int_max_str_digits``), or a value of the wrong JSON
  type that pydantic used to coerce (``"8"`` or ``8.0`` for a block size, ``true`` for a
  batch size);
* ``simulate``: a negative ``--seed`` (NumPy's wording, no flag), a ``--json`` path that
  cannot be written (``[Errno 20] ...`` after the whole simulation), an empty ``--json``
  (silently ignored) or artifact path (the current folder).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from furiosa_runtime.entrypoints.cli import main
from furiosa_runtime.npu.artifact import ArtifactError, load_artifact, parse_json


@pytest.fixture
def art(tmp_path: Path, tiny_llama_artifact: Path) -> Path:
    """A copy of the tiny-llama artifact to damage."""
    return Path(shutil.copytree(tiny_llama_artifact, tmp_path / "art"))


def edit(art: Path, change: Callable[[dict[str, Any]], object]) -> None:
    meta = json.loads((art / "artifact.json").read_text())
    change(meta)
    (art / "artifact.json").write_text(json.dumps(meta))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and "Traceback" not in captured.err, captured.err
    return captured.err.strip()


def paged(meta: dict[str, Any]) -> dict[str, Any]:
    return meta["generator_config"]["paged_attention_config"]


DESCRIPTIONS: list[Any] = [
    pytest.param(lambda a: (a / "artifact.json").write_text("[" * 100_000 + "]" * 100_000), "arrays or objects nested too deeply", id="deep"),
    pytest.param(lambda a: (a / "artifact.json").write_text('{"devices": ' + "9" * 5000 + "}"), "an integer longer than 4300 digits", id="huge-int"),
    pytest.param(lambda a: (a / "artifact.json").write_bytes(b"\xff{}"), "not UTF-8: invalid start byte at byte 0", id="not-utf8"),
    pytest.param(lambda a: edit(a, lambda m: paged(m).update(block_size="8")),
                 "generator_config.paged_attention_config.block_size: must be a valid integer, got '8'", id="string-for-int"),
    pytest.param(lambda a: edit(a, lambda m: paged(m).update(block_size=8.0)),
                 "generator_config.paged_attention_config.block_size: must be a valid integer, got 8.0", id="float-for-int"),
    pytest.param(lambda a: edit(a, lambda m: m["generator_config"]["prefill_buckets"][0].update(batch_size=True)),
                 "generator_config.prefill_buckets.0.batch_size: must be a valid integer, got True", id="bool-for-int"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "problem"), DESCRIPTIONS)
def test_a_bad_description_is_one_line_naming_the_file(art, capsys, damage, problem) -> None:
    damage(art)
    expected = f"artifact: {art / 'artifact.json'} is not a valid artifact description ({problem})"
    with pytest.raises(ArtifactError) as refused:
        load_artifact(art)
    assert str(refused.value) == expected
    assert main(["generate", "--model", str(art), "--prompt", "hi", "--max-tokens", "1"]) == 2
    assert one_error_line(capsys) == f"error: {expected}"


def test_a_description_that_is_a_folder_is_not_a_regular_file(art, capsys) -> None:
    (art / "artifact.json").unlink()
    (art / "artifact.json").mkdir()
    assert main([str(art), "hi", "--max-tokens", "1"]) == 2
    assert one_error_line(capsys) == "error: artifact: artifact.json is not a regular file"


def test_the_artifact_the_builder_wrote_passes_the_strict_check(tiny_llama_artifact) -> None:
    assert load_artifact(tiny_llama_artifact).generator_config.paged_attention_config.block_size == 8


def test_parse_json_reads_what_json_reads() -> None:
    assert parse_json(b'{"a": [1, 2.5, null]}') == {"a": [1, 2.5, None]}


# --------------------------------------------------------------------------- simulate


def test_simulate_refuses_a_negative_seed(capsys, tiny_llama_artifact) -> None:
    with pytest.raises(SystemExit) as done:
        main(["simulate", str(tiny_llama_artifact), "--workload", "fixed:4:2", "--seed", "-1"])
    assert done.value.code == 2
    assert one_error_line(capsys).startswith("error: argument --seed: expected an integer >= 0, got '-1'")


@pytest.mark.parametrize(("json_path", "expected"), [
    ("", "--json: expected a file path, got ''"),
    ("<tmp>", "--json: <tmp>: is a folder; give a file path"),
    ("<tmp>/no/such/report.json", "--json: <tmp>/no/such/report.json: <tmp>/no/such is not an existing folder"),
])  # fmt: skip
def test_simulate_refuses_a_json_path_before_simulating(tmp_path, capsys, tiny_llama_artifact, json_path, expected) -> None:
    argv = ["simulate", str(tiny_llama_artifact), "--workload", "fixed:4:2", "--json", json_path.replace("<tmp>", str(tmp_path))]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no summary printed before the error
    assert captured.err == f"error: {expected.replace('<tmp>', str(tmp_path))}\n"
    assert list(tmp_path.iterdir()) == []


def test_simulate_refuses_an_empty_artifact_path(capsys) -> None:
    assert main(["simulate", "", "--workload", "fixed:4:2"]) == 2
    assert one_error_line(capsys) == "error: artifact: expected an artifact folder, got ''"

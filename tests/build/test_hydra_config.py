"""Hydra knows the build schema, finds the configs in the package, and takes the user's own.

Each test is a way of using ``python -m furiosa_build``::

    python -m furiosa_build model.task=embed buckets=embed       # any schema key, no '+' needed
    python -m furiosa_build --config-dir my_conf --config-name my_build
    pip install furiosa_build-*.whl; cd elsewhere; python -m furiosa_build model=tiny-llama ...
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import MISSING, OmegaConf

from furiosa_build import __main__ as entry
from furiosa_build.config import BuildSpec, ModelConfig
from furiosa_build.hydra_schema import schema_of

REPO = Path(__file__).resolve().parents[2]

#: A model option of the user's that sets only what it needs: the schema gives the rest.
MY_LLAMA = """\
name: my-llama
seed_for_random_weight: 0
hf_config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
            num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 512, max_position_embeddings: 512}
"""
#: A primary config of the user's: ours, with other choices.
MY_BUILD = """\
defaults:
  - config
  - override model: my-llama
  - override buckets: tiny
  - _self_
build:
  dry_run: true
"""
#: A sweep kept in a config of the user's (run with -m).
MY_SWEEP = """\
defaults:
  - config
  - override buckets: tiny
  - _self_
build:
  dry_run: true
hydra:
  sweeper:
    params:
      model: tiny-llama,my-llama
"""


def schema_leaves(schema: type, prefix: str = "") -> list[tuple[str, Any]]:
    """Every leaf key of a structured config, dotted, with its default (MISSING if required)."""
    leaves = []
    for field in dataclasses.fields(schema):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(field.type):
            leaves += schema_leaves(field.type, f"{key}.")
        else:
            leaves.append((key, field.default_factory()))  # type: ignore[misc]
    return leaves


def hydra_value(value: Any) -> str:
    """A value as Hydra's override grammar writes it."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, (list, tuple)):
        return f"[{','.join(hydra_value(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


@pytest.fixture
def my_conf(tmp_path: Path) -> Path:
    """A user's config folder: a model option, a primary config and a sweep config."""
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "my-llama.yaml").write_text(MY_LLAMA)
    (conf / "my_build.yaml").write_text(MY_BUILD)
    (conf / "my_sweep.yaml").write_text(MY_SWEEP)
    return conf


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize(("key", "default"), schema_leaves(schema_of(BuildSpec)), ids=lambda v: str(v)[:40])
def test_every_schema_key_can_be_overridden(key: str, default: Any) -> None:
    value = "my-model" if default is MISSING else default
    with initialize_config_module("furiosa_build.conf", version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny-llama", "buckets=tiny", f"{key}={hydra_value(value)}"])
    found = OmegaConf.select(cfg, key)
    assert (OmegaConf.to_container(found) if OmegaConf.is_config(found) else found) == value


def test_the_readme_embedding_command_composes() -> None:
    [spec] = entry.prevalidate(["model.task=embed", "buckets=embed"])
    assert (spec.model.task, spec.buckets.decode) == ("embed", [])


def test_a_model_option_needs_only_its_own_keys(my_conf: Path) -> None:
    [spec] = entry.prevalidate(["model=my-llama", "buckets=tiny", "model.task=generate"], extra_config_dir=my_conf)
    assert spec.model.task == "generate"  # overridden, though my-llama.yaml does not name it
    assert spec.model == ModelConfig(**OmegaConf.to_container(OmegaConf.create(MY_LLAMA)), task="generate")


def test_a_key_the_schema_does_not_know_is_one_line(my_conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (my_conf / "model" / "typo.yaml").write_text("name: typo\ntsk: embed\n")
    with pytest.raises(SystemExit) as exit_:
        entry.main(["--config-dir", str(my_conf), "model=typo"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("error: model.tsk: unknown key; allowed: name, model_id_or_path, hf_config, "
                                       "seed_for_random_weight, num_hidden_layers, auto_bfloat16_cast, "
                                       "trust_remote_code, task, pooling\n")


def test_a_required_key_left_out_is_one_line(my_conf: Path) -> None:
    (my_conf / "model" / "nameless.yaml").write_text(MY_LLAMA.replace("name: my-llama\n", ""))
    with pytest.raises(entry.UsageError, match=r"^model\.name: required$"):
        entry.prevalidate(["model=nameless"], extra_config_dir=my_conf)


def test_completion_offers_keys_a_yaml_option_leaves_out(my_conf: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMP_LINE", "furiosa-build model=my-llama model.ta")
    entry.main(["--config-dir", str(my_conf), "--shell-completion", "query=bash"])
    assert capsys.readouterr().out.split() == ["model.task="]


# --------------------------------------------------------------------------- the user's own configs


def test_config_dir_with_a_primary_config_of_ones_own(my_conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry.main(["--config-dir", str(my_conf), "--config-name", "my_build", "build.cache_dir=null"])
    assert "my-llama-kv0-b1-attn32" in capsys.readouterr().out  # the plan (build.dry_run in my_build.yaml)


def test_a_sweep_kept_in_a_config_of_ones_own(my_conf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the sweep folder: artifacts/multirun/<date>_<time>
    entry.main(["--config-dir", str(my_conf), "--config-name", "my_sweep", "-m", "build.cache_dir=null"])
    out = capsys.readouterr().out
    assert "tiny-llama-kv0-b1-attn32" in out and "my-llama-kv0-b1-attn32" in out


def test_a_missing_primary_config_is_one_line(my_conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        entry.main(["--config-dir", str(my_conf), "--config-name", "nope"])
    assert capsys.readouterr().err.startswith("error: Cannot find primary config 'nope'")


# --------------------------------------------------------------------------- the installed package


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_an_installed_wheel_builds_from_any_folder(tmp_path: Path) -> None:
    """``pip wheel`` + ``pip install`` (not editable), then the README's command from another folder.

    No downloads: the wheel is built with this environment's setuptools and installed
    without dependencies into its own folder.  The command runs with ``python -S`` (no
    ``site``: this environment's ``.pth`` files, the editable install's finder among them,
    are not read) and ``PYTHONPATH`` = that folder, then this environment's packages as
    plain folders, so furiosa_build and its configs can only come from the wheel.
    """
    checkout = tmp_path / "checkout"  # a copy, so that the build's own files stay out of the repo
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md", "furiosa_build", "furiosa_runtime", "conf"):
        run(["cp", "-a", str(REPO / name), str(checkout)], tmp_path)
    start = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "-q"]
    run([*pip, "wheel", str(checkout), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")], tmp_path)
    [wheel] = (tmp_path / "dist").glob("*.whl")
    run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), sysconfig.get_paths()["purelib"]])}
    where = run([sys.executable, "-S", "-c", "import furiosa_build.conf as c; print(c.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(tmp_path / "site")
    out = run([sys.executable, "-S", "-m", "furiosa_build", "model=tiny-llama", "buckets=tiny", "model.task=generate",
               "build.dry_run=true", f"build.cache_dir={tmp_path / 'cache'}"], elsewhere, env)
    assert "tiny-llama-kv63-b2-attn64" in out
    print(f"wheel built, installed and run in {time.perf_counter() - start:.1f} s")

"""A rebuild whose inputs are all in the cache decides so from the config and the cache
alone: it imports neither torch nor transformers, and a changed source is read again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO, build

REBUILD = """
import sys
from pathlib import Path
from tests.helpers import build
report = build({overrides!r}, Path(sys.argv[1]), Path(sys.argv[2]))
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(report.compile.compiled, ",".join(heavy) or "none")
"""


def rebuild(overrides: list[str], out: Path, cache: Path) -> tuple[int, str]:
    """Build in a fresh interpreter; (programs compiled, heavy modules it imported)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", REBUILD.format(overrides=overrides), str(out), str(cache)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    compiled, heavy = done.stdout.split()
    return int(compiled), heavy


def test_a_cached_rebuild_of_the_default_model_imports_neither_torch_nor_transformers(smollm2_artifact, cache_dir, tmp_path):
    assert rebuild([], tmp_path / "again", cache_dir) == (0, "none")


def test_a_cached_rebuild_of_a_random_model_imports_neither(tmp_path, cache_dir):
    build(["model=tiny-llama", "buckets=tiny"], tmp_path / "first", cache_dir)
    assert rebuild(["model=tiny-llama", "buckets=tiny"], tmp_path / "again", cache_dir) == (0, "none")


def test_a_changed_model_folder_is_read_again(tmp_path):
    """The memo is keyed by the files' size and time: editing config.json is noticed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.helpers import compose_spec

    folder, cache = tmp_path / "model", tmp_path / "cache"
    hf_config = compose_spec(["model=tiny-llama"]).model.hf_config
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    overrides = [f"model.model_id_or_path={folder}", "model.hf_config=null", "model.seed_for_random_weight=null", "buckets=tiny"]
    build(overrides, tmp_path / "a", cache)
    assert rebuild(overrides, tmp_path / "b", cache) == (0, "none")

    config = json.loads((folder / "config.json").read_text())
    config["rms_norm_eps"] = 1e-6  # same shapes, so the programs are reused; the weights' key changes
    (folder / "config.json").write_text(json.dumps(config))
    compiled, heavy = rebuild(overrides, tmp_path / "c", cache)
    assert "transformers" in heavy

"""Fixtures of the runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import ENGINE_LAYOUTS, build


@pytest.fixture(scope="session")
def tiny_llama_layouts(tmp_path_factory, cache_dir, tiny_llama_artifact) -> dict[str, Path]:
    """tiny-llama (tiny buckets) built for every engine layout."""
    layouts = {"single-pe": tiny_llama_artifact}
    for name, overrides in ENGINE_LAYOUTS.items():
        if name not in layouts:
            layouts[name] = tmp_path_factory.mktemp("artifacts") / f"tiny-llama-{name}"
            build(["model=tiny-llama", "buckets=tiny", *overrides], layouts[name], cache_dir)
    return layouts


@pytest.fixture(scope="module", params=list(ENGINE_LAYOUTS))
def engine_artifact(request, tiny_llama_layouts) -> Path:
    """The tiny-llama artifact in each engine layout: engine tests must hold on all of them."""
    return tiny_llama_layouts[request.param]

"""Fixtures shared by the build tests."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from furiosa_build.config import BuildSpec


@pytest.fixture
def fake_builder(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace furiosa_build.builder with a stand-in that records the specs it is given."""
    seen: list[Any] = []

    class ArtifactBuilder:
        def __init__(self, spec: BuildSpec) -> None:
            self.spec = spec

        @classmethod
        def from_spec(cls, spec: BuildSpec) -> ArtifactBuilder:
            seen.append(spec)
            return cls(spec)

        def plan(self) -> types.SimpleNamespace:
            return types.SimpleNamespace(render=lambda: f"plan for {self.spec.model.name}")

        def build_from_spec(self) -> types.SimpleNamespace:
            """An empty folder, and the parts of a BuildReport a sweep job records."""
            Path(str(self.spec.build.save_dir)).mkdir(parents=True)
            return types.SimpleNamespace(save_dir=self.spec.build.save_dir, compile=types.SimpleNamespace(unique=0, compiled=0),
                                         seconds={}, artifact_bytes=0, weights=None)  # fmt: skip

    module = types.ModuleType("furiosa_build.builder")
    module.ArtifactBuilder = ArtifactBuilder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "furiosa_build.builder", module)
    return seen

"""The BuildSpec schema as Hydra structured configs, so that Hydra knows every key.

``conf/config.yaml`` starts its defaults list with ``build_schema``: a dataclass that
:func:`schema_of` derives from :class:`furiosa_build.config.BuildSpec` by walking
``model_fields``, one nested dataclass per section (``model``, ``buckets``...).  The group
options in ``conf/`` merge onto it, so every schema key can be overridden without ``+``
(``model.task=embed``), a key a YAML file leaves out takes the schema's default, a typo is
refused by Hydra while composing, and ``--shell-completion`` lists every key.

The pydantic models stay the one definition of the schema and its checks: the dataclasses
carry keys, sections and defaults only.  Their leaves are typed ``Any``, so that a wrong
value reaches pydantic (``furiosa_build.config.load_spec``) and is answered with its
one-line error rather than with an OmegaConf type error, and so that values OmegaConf
cannot type (``(batch, attention)`` pairs, literals, optional sections such as
``model.pooling``) need no translation.  A required field (``model.name``) is ``???``
(OmegaConf's MISSING): :func:`config_data` leaves it out and pydantic reports it as
required.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from pydantic import BaseModel

#: The ConfigStore name of the schema; conf/config.yaml lists it first in its defaults.
SCHEMA_NAME = "build_schema"


def _section(annotation: Any) -> type[BaseModel] | None:
    """The model of a field that is a (non-optional) section, else None (a leaf)."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _default_factory(value: Any) -> Any:
    """A factory for a leaf default (a fresh copy each time: lists and dicts are mutable)."""
    return lambda: copy.deepcopy(value)


def schema_of(model: type[BaseModel], defaults: dict[str, Any] | None = None) -> type:
    """A dataclass with the keys of ``model``: sections as nested dataclasses, leaves ``Any``.

    ``defaults`` are the values of the instance the parent uses as this section's default
    (``BuildSpec.hardware`` defaults to ``RNGD``); otherwise the fields' own defaults.
    """
    fields: list[tuple[str, Any, Any]] = []
    for name, info in model.model_fields.items():
        default = info.get_default(call_default_factory=True) if not info.is_required() else MISSING
        section = _section(info.annotation)
        if section is not None:
            nested = schema_of(section, default.model_dump() if isinstance(default, BaseModel) else None)
            fields.append((name, nested, dataclasses.field(default_factory=nested)))
            continue
        if defaults is not None and name in defaults:
            default = defaults[name]
        if isinstance(default, BaseModel):
            default = default.model_dump()
        fields.append((name, Any, dataclasses.field(default_factory=_default_factory(default))))
    return dataclasses.make_dataclass(f"{model.__name__}Schema", fields)


def register_configs() -> None:
    """Store the BuildSpec schema in Hydra's ConfigStore as ``build_schema`` (idempotent)."""
    from furiosa_build.config import BuildSpec

    ConfigStore.instance().store(name=SCHEMA_NAME, node=schema_of(BuildSpec))


def config_data(cfg: DictConfig) -> dict[str, Any]:
    """A composed config as plain data for ``load_spec``: interpolations resolved, the
    ``hydra`` section and values left MISSING (``???``) dropped."""
    missing = OmegaConf.missing_keys(cfg)
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    for key in missing:
        *path, leaf = key.split(".")
        section: Any = data
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(leaf, None)
    return data

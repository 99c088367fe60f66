"""Model families: one module per model.task, each implementing the Family protocol (base.py).

The stages (training, evaluation, registry, publishing, serving) are generic; they ask the run's
family what differs, including which settings it cannot work with (Family.problems). The family is
resolved once from (model.task, model.direction), stamped into the model's config.json as
`codetune_family` and `codetune_direction`, and read back from there when an exported model is loaded.

Adding a family: a module here with a class implementing Family, its line in registry.py, and a
config in configs/ (docs/adding-a-family.md).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from codetune.core.errors import ModelError
from codetune.core.families.registry import BY_DIRECTION, REGISTERED

if TYPE_CHECKING:
    from codetune.core.config import ModelConfig
    from codetune.core.families.base import Family

FAMILY_KEY, DIRECTION_KEY = "codetune_family", "codetune_direction"

__all__ = [
    "BY_DIRECTION",
    "FAMILIES",
    "REGISTERED",
    "Family",
    "InferenceSettings",
    "Scored",
    "family_class",
    "family_of",
    "family_of_model",
    "stamp",
]


def _load(reference: str) -> type:
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


class _Families(Mapping):
    """model.task -> family class, each module imported when its family is first asked for."""

    def __getitem__(self, task: str) -> type:
        return _load(REGISTERED[task])

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTERED)

    def __len__(self) -> int:
        return len(REGISTERED)


FAMILIES = _Families()


def __getattr__(name: str):
    # The protocol and its data types live in base.py, which imports torch: loaded on first use.
    if name in ("Family", "InferenceSettings", "Scored"):
        from codetune.core.families import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def family_class(task: str, direction: str) -> type:
    """The class implementing model.task in model.direction (its task's class where no direction has its own)."""
    reference = BY_DIRECTION.get((task, direction))
    return _load(reference) if reference else FAMILIES[task]


def family_of(model: ModelConfig) -> Family:
    """The family a config's model.task and model.direction name: one instance per process for each (families hold
    no state of a run), so a run resolves it once however many stages ask."""
    return _family(model.task.value, model.direction.value)


@functools.cache
def _family(task: str, direction: str) -> Family:
    from codetune.core.config import Direction

    return family_class(task, direction)(Direction(direction))


def source_files(family_class: type) -> list[str]:
    """The modules a family's behaviour is written in: its class's and its bases' (what a change to it touches)."""
    import inspect

    return sorted({inspect.getfile(c) for c in family_class.__mro__ if c.__module__.startswith("codetune.")})


def stamp(model, family: Family):
    """Record the family in the model's config, so the saved config.json says what the model is."""
    setattr(model.config, FAMILY_KEY, family.task.value)
    setattr(model.config, DIRECTION_KEY, family.direction.value)
    return model


def family_of_model(config) -> Family:
    """The family stamped into a model's config (a PretrainedConfig)."""
    from codetune.core.config import Direction

    task = getattr(config, FAMILY_KEY, None)
    if task is None:
        raise ModelError(
            f"the model's config.json has no '{FAMILY_KEY}': it was not exported by codetune (or by one older than "
            f'model families); re-export it with `codetune run`, or add "{FAMILY_KEY}": "<model.task>" to config.json'
        )
    return _family(task, getattr(config, DIRECTION_KEY, Direction.code_to_text.value))

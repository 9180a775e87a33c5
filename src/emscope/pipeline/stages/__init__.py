"""The stages of ``emscope run``: one module per stage, each declaring one
:class:`~emscope.pipeline.stages.base.Stage` (its name, the stages whose outputs it reads,
its config model, ``run``, ``describe``, its file inputs and name checks), and
:data:`REGISTRY`, which lists them, one line per stage. The run order
(:data:`STAGE_ORDER`) is a topological sort of the needs that keeps the listed order where
the needs allow; the ``stages:`` model of the config is derived from the registry.

Each stage writes into ``RUN/<stage>/``; the runner (:mod:`emscope.pipeline.runner`) marks a
finished stage with ``RUN/<stage>/done.json``. Adding a stage: one module here with its
``STAGE``, and one line in :data:`REGISTRY` (docs/pipeline.md, "Adding a stage").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from emscope.pipeline.stages.base import (
    Registry,
    Stage,
    StageSettings,
    load_registry,
    topological_order,
)
from emscope.pipeline.stages.context import StageContext, evaluate_organism

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig

#: Every stage of a study: the modules of this package declaring a ``STAGE``, one line each
#: (the run order is derived from their needs).
REGISTRY = load_registry(
    __name__,
    "organisms",
    "eval",
    "geometry",
    "lmc",
    "directions",
    "steering",
    "ablation",
    "transfer",
    "probes",
    "dynamics",
    "reemergent",
    "early_warning",
    "defences",
)

#: Every stage, in the order they run (each stage's inputs come earlier in this list).
STAGE_ORDER: tuple[str, ...] = REGISTRY.order


def describe_stage(config: StudyConfig, name: str) -> str:
    """One line: what the stage will do (for ``--dry-run``)."""
    registry = type(config.stages).registry
    return registry[name].describe(config) if name in registry else name


__all__ = [
    "REGISTRY",
    "STAGE_ORDER",
    "Registry",
    "Stage",
    "StageContext",
    "StageSettings",
    "describe_stage",
    "evaluate_organism",
    "load_registry",
    "topological_order",
]

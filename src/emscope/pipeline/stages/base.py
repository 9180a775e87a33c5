"""What a stage of ``emscope run`` is (:class:`Stage`), the registry of stages
(:class:`Registry`: their order, by a topological sort of what each reads, and the pydantic
``stages:`` model derived from them), and the pieces every stage's config model shares.

A stage is one module of :mod:`emscope.pipeline.stages` declaring one :class:`Stage` value;
its config model (a :class:`StageSettings`) lives in that module. That is why the base
classes live here and not in :mod:`emscope.pipeline.config`: config.py derives its
``Stages`` model from the registry, so the stage modules must not import config.py (they
name :class:`~emscope.pipeline.config.StudyConfig` for type checking only).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext

#: Names of models, adapters and question sets: they become file names in the run dir.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class ConfigModel(BaseModel):
    """Base of every config model: frozen, and a key it does not know is an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSettings(ConfigModel):
    """Base of a stage's section under ``stages:`` (``{}`` takes every default)."""

    enabled: bool = True
    n: int | None = Field(
        default=None, ge=1, description="samples per question (default sampling.n)"
    )


def need(field: str, name: str, known: Iterable[str], what: str) -> None:
    """Refuse ``name`` unless it is in ``known``: ``stages.<field>: unknown <what> ...``
    (a ValueError, which the config loader turns into one line naming the file)."""
    known = set(known)
    if name not in known:
        raise ValueError(f"stages.{field}: unknown {what} {name!r} (known: {sorted(known)})")


def _no_inputs(config: StudyConfig) -> dict[str, Path]:
    return {}


def _no_check(config: StudyConfig) -> None:
    return None


def read_chat_data(path: Path) -> None:
    """A stage's chat JSONL input, read in full (the first bad line raises)."""
    from emscope.data.chat import read_chat_jsonl

    read_chat_jsonl(path)


@dataclass(frozen=True)
class Stage:
    """One stage of ``emscope run``.

    - ``name``: its key under ``stages:`` and its dir ``RUN/<name>/``;
    - ``needs``: stages whose outputs in the run dir it reads (each must be run too);
    - ``config_model``: its section's pydantic model;
    - ``run(ctx) -> dict``: does the work into ``ctx.dir(name)``, returns the JSON-able
      summary the runner writes to ``stage.json``;
    - ``describe(config) -> str``: one line for ``--dry-run``;
    - ``inputs(config) -> {field path: Path}``: files its section names (checked before any
      work, hashed into the manifest);
    - ``check_input(path)``: reads one of them far enough to refuse a bad one (raises
      EmscopeError), before any work (:func:`read_chat_data` for chat JSONL); None: that it
      exists is enough;
    - ``check(config)``: raises ValueError (``stages.<field>: ...``) for a name its section
      refers to that the config lacks; called while validating, when the section is present;
    - ``builds_inputs``: it makes files other stages read without naming it in ``needs`` (the
      organisms stage): ordered before every other stage, and ``--redo`` of it redoes all;
    - ``late_fields``: section fields added after run dirs existed; left out of the
      fingerprint while ``None``, so stages done before keep their fingerprint.
    """

    name: str
    config_model: type[StageSettings]
    run: Callable[[StageContext], dict[str, Any]]
    describe: Callable[[StudyConfig], str]
    needs: tuple[str, ...] = ()
    inputs: Callable[[StudyConfig], dict[str, Path]] = _no_inputs
    check: Callable[[StudyConfig], None] = _no_check
    check_input: Callable[[Path], None] | None = None
    builds_inputs: bool = False
    late_fields: tuple[str, ...] = ()


def topological_order(stages: Sequence[Stage]) -> tuple[str, ...]:
    """Stage names such that every stage comes after what it needs (and after every
    ``builds_inputs`` stage), keeping the listed order wherever the needs allow (Kahn's
    algorithm taking the first listed ready stage). A need that is no stage, a name listed
    twice or a cycle raises one EmscopeError line naming them."""
    names = [s.name for s in stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EmscopeError(f"pipeline stages: {', '.join(dupes)} registered twice")
    known = set(names)
    providers = [s.name for s in stages if s.builds_inputs]
    after: dict[str, set[str]] = {}
    for s in stages:
        unknown = [n for n in s.needs if n not in known]
        if unknown:
            raise EmscopeError(
                f"pipeline stage {s.name!r} needs {', '.join(map(repr, unknown))}, which is no "
                f"stage (the stages are {', '.join(names)})"
            )
        soft = set() if s.builds_inputs else set(providers)
        after[s.name] = set(s.needs) | soft
    order: list[str] = []
    left = list(names)
    while left:
        ready = next((n for n in left if after[n] <= set(order)), None)
        if ready is None:
            cycle = ", ".join(f"{n} needs {sorted(after[n] - set(order))}" for n in left)
            raise EmscopeError(f"pipeline stages: the needs form a cycle ({cycle})")
        order.append(ready)
        left.remove(ready)
    return tuple(order)


class StagesBase(ConfigModel):
    """Base of the ``stages:`` model derived from a registry (one optional field per stage,
    in run order); ``registry`` is the :class:`Registry` it was derived from."""

    registry: ClassVar[Registry]

    if TYPE_CHECKING:  # one optional section per stage, named by the registry

        def __getattr__(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Registry:
    """The stages of a study, as listed; :attr:`order` is their run order."""

    stages: tuple[Stage, ...]

    @cached_property
    def order(self) -> tuple[str, ...]:
        return topological_order(self.stages)

    @cached_property
    def by_name(self) -> Mapping[str, Stage]:
        return {s.name: s for s in self.stages}

    def __getitem__(self, name: str) -> Stage:
        return self.by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    @cached_property
    def needs(self) -> dict[str, tuple[str, ...]]:
        """``{stage: needs}`` for the stages that read another's outputs, in run order."""
        return {n: self[n].needs for n in self.order if self[n].needs}

    def readers(self, name: str) -> tuple[str, ...]:
        """Stages that read ``name``'s outputs (``needs`` it, or it builds inputs)."""
        return tuple(
            n
            for n in self.order
            if n != name and (name in self[n].needs or self[name].builds_inputs)
        )

    @cached_property
    def stages_model(self) -> type[StagesBase]:
        """The pydantic model of the ``stages:`` section: ``<name>: <config_model> | None``
        per stage, in run order."""
        fields: dict[str, Any] = {
            n: (self[n].config_model | None, None)  # type: ignore[operator]
            for n in self.order
        }
        model = create_model("Stages", __base__=StagesBase, **fields)
        model.registry = self
        return model


def load_registry(package: str, *modules: str) -> Registry:
    """The :class:`Registry` of the ``STAGE`` values of ``package.<module>`` for each of
    ``modules``, in that order."""
    import importlib

    stages = []
    for module in modules:
        stage = getattr(importlib.import_module(f"{package}.{module}"), "STAGE", None)
        if not isinstance(stage, Stage):
            raise EmscopeError(f"{package}.{module}: declares no STAGE (a Stage value)")
        stages.append(stage)
    return Registry(tuple(stages))

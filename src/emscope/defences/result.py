"""The typed result of the defences bench: ``defences/defences.json``
(:func:`emscope.defences.bench.write_bench`), read by the claims rows
(:mod:`emscope.pipeline.claims_defences`) and the report section
(:mod:`emscope.report.defences`) through :meth:`DefencesResult.from_json`, so that a renamed
column is an error naming the file and the field.

One :class:`ArmSummary` per (arm, task) of the aggregated table: rates are shares in [0, 1]
(means over seeds, 95% CIs ``_low``/``_high``), ``task_nll`` is a mean token NLL in nats (NaN
where not measured), ``train_s`` seconds, ``overhead`` the ratio to plain's training time.
The JSON layout is the one :mod:`emscope.results` describes (typed fields plus the untouched
``extra``: ``general_coherent*``, the prompted rates of inoculation arms, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emscope.results import in_order, need_all, rest, sequence

ARM_FIELDS = (
    "arm",
    "task",
    "seeds",
    "general_em",
    "general_em_low",
    "general_em_high",
    "task_learned",
    "task_learned_low",
    "task_learned_high",
    "task_nll",
    "task_nll_low",
    "task_nll_high",
    "train_s",
    "overhead",
)
"""The typed fields of one row of the aggregated table."""


@dataclass(frozen=True)
class ArmSummary:
    """One arm on one task (``narrow`` or ``benign``) over its ``seeds`` runs (module
    docstring for units); ``extra`` holds the other columns, untouched."""

    arm: str
    task: str
    seeds: int
    general_em: float
    general_em_low: float
    general_em_high: float
    task_learned: float
    task_learned_low: float
    task_learned_high: float
    task_nll: float | None
    task_nll_low: float | None
    task_nll_high: float | None
    train_s: float
    overhead: float
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> ArmSummary:
        need_all(data, ARM_FIELDS, "DefencesResult", source, at)
        typed = {name: data[name] for name in ARM_FIELDS}
        typed |= {"arm": str(data["arm"]), "task": str(data["task"]), "seeds": int(data["seeds"])}
        return cls(**typed, extra=rest(data, ARM_FIELDS), order=tuple(data))

    def to_json(self) -> dict[str, Any]:
        doc = {name: getattr(self, name) for name in ARM_FIELDS} | dict(self.extra)
        return in_order(doc, self.order)


@dataclass(frozen=True)
class DefencesResult:
    """``defences.json``: the aggregated ``table`` (one :class:`ArmSummary` per arm and task,
    in run order); ``extra``: the bench's meta (spec, organism, seeds, ...), untouched."""

    table: tuple[ArmSummary, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> DefencesResult:
        rows = sequence(data, "table", "DefencesResult", source, at)
        return cls(
            table=tuple(
                ArmSummary.from_json(r, source=source, at=f"{at}table[{i}].")
                for i, r in enumerate(rows)
            ),
            extra=rest(data, ("table",)),
            order=tuple(data),
        )

    def rows(self) -> list[dict[str, Any]]:
        """The table as plain rows (the column names of ``table.csv``)."""
        return [r.to_json() for r in self.table]

    def to_json(self) -> dict[str, Any]:
        return in_order(dict(self.extra) | {"table": self.rows()}, self.order)

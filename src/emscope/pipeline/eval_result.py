"""The typed result of the pipeline's ``eval`` stage (``eval/summary.json``):
:class:`EvalSummary`, one :class:`OrganismRates` per evaluated organism (the short form of
its ``eval/<organism>/metrics.json``, :meth:`emscope.metrics.Metrics.rates`).

Rates are fractions in [0, 1] (None where nothing was scored), CIs ``[lo, hi]`` 95%
percentile bootstrap intervals or None; the JSON layout is the one :mod:`emscope.results`
describes (typed fields plus the untouched ``extra``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emscope.metrics import RATE_SUMMARY_FIELDS
from emscope.results import mapping, need, need_all, rest

if TYPE_CHECKING:
    from emscope.metrics import Metrics


@dataclass(frozen=True)
class OrganismRates:
    """One organism's EM and coherent rates with CIs, its unscored rate and ``n``
    (responses), as in ``eval/summary.json``."""

    em_rate: float | None
    em_ci: list[float] | None
    coherent_rate: float | None
    coherent_ci: list[float] | None
    unscored_rate: float | None
    n: int | None

    @classmethod
    def of(cls, metrics: Metrics) -> OrganismRates:
        """The rates of a :class:`~emscope.metrics.Metrics`."""
        return cls(**metrics.rates())

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> OrganismRates:
        need_all(data, RATE_SUMMARY_FIELDS, "EvalSummary", source, at)
        return cls(**{name: data[name] for name in RATE_SUMMARY_FIELDS})

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RATE_SUMMARY_FIELDS}

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name (``em_rate``, ``coherent_ci``, ...; ``default`` for others)."""
        return getattr(self, name) if name in RATE_SUMMARY_FIELDS else default


@dataclass(frozen=True)
class EvalSummary:
    """``eval/summary.json``: ``questions`` (the question set's name) and ``organisms``
    (organism name -> :class:`OrganismRates`, in evaluation order). ``extra``: other fields,
    kept untouched."""

    questions: str
    organisms: Mapping[str, OrganismRates]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> EvalSummary:
        rows = mapping(data, "organisms", "EvalSummary", source, at)
        return cls(
            questions=str(need(data, "questions", "EvalSummary", source, at)),
            organisms={
                name: OrganismRates.from_json(row, source=source, at=f"{at}organisms.{name}.")
                for name, row in rows.items()
            },
            extra=rest(data, ("questions", "organisms")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "questions": self.questions,
            "organisms": {name: r.to_json() for name, r in self.organisms.items()},
        } | dict(self.extra)


__all__ = ["EvalSummary", "OrganismRates"]

"""The typed result of linear mode connectivity (:func:`emscope.lmc.run_lmc`, a path's
``lmc.json``; the pipeline's ``lmc/summary.json`` holds one per path under ``paths``):
:class:`LmcResult`, one :class:`LmcRow` per interpolation point ``t`` (0 = the start
endpoint, 1 = the end). Rates are fractions in [0, 1] (None where EM was not measured),
losses mean token cross-entropies in nats. Kept apart from :mod:`emscope.lmc` so that reading
a result does not import torch; the JSON layout is the one :mod:`emscope.results` describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emscope.results import mapping, need_all, rest, sequence

ROW_FIELDS = ("t", "em_rate", "em_ci", "coherent_rate", "coherent_ci")


@dataclass(frozen=True)
class LmcRow:
    """The model at ``t`` on the path: EM and coherent rates with 95% CIs. ``extra``: ``n``
    (responses), ``loss`` (data set -> loss), ``dir``."""

    t: float
    em_rate: float | None
    em_ci: list[float] | None
    coherent_rate: float | None
    coherent_ci: list[float] | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> LmcRow:
        need_all(data, ("t", "em_rate", "em_ci", "coherent_rate"), "LmcResult", source, at)
        return cls(
            t=float(data["t"]),
            em_rate=data["em_rate"],
            em_ci=data["em_ci"],
            coherent_rate=data["coherent_rate"],
            coherent_ci=data.get("coherent_ci"),
            extra=rest(data, ROW_FIELDS),
        )

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ROW_FIELDS} | dict(self.extra)


@dataclass(frozen=True)
class LmcResult:
    """A weight-space path: ``rows`` in increasing ``t``. ``extra``: ``barrier`` (data set
    -> loss barrier, nats), ``system_prompt``, ``em_measured``/``em_not_measured``,
    ``features`` (feature-space LMC), and in the pipeline's summary ``from``/``to`` (the
    endpoints' names: :attr:`start`, :attr:`end`)."""

    rows: tuple[LmcRow, ...]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> LmcResult:
        rows = sequence(data, "rows", "LmcResult", source, at)
        return cls(
            rows=tuple(
                LmcRow.from_json(r, source=source, at=f"{at}rows[{i}].") for i, r in enumerate(rows)
            ),
            extra=rest(data, ("rows",)),
        )

    def to_json(self) -> dict[str, Any]:
        head = {k: self.extra[k] for k in ("from", "to") if k in self.extra}
        tail = {k: v for k, v in self.extra.items() if k not in head}
        return head | {"rows": [r.to_json() for r in self.rows]} | tail

    @property
    def start(self) -> str | None:
        """The start endpoint's name (``from``; None outside the pipeline's summary)."""
        return self.extra.get("from")

    @property
    def end(self) -> str | None:
        """The end endpoint's name (``to``)."""
        return self.extra.get("to")

    @classmethod
    def paths_from_json(cls, data: Any, *, source: str | None = None) -> dict[str, LmcResult]:
        """The ``paths`` of the pipeline's ``lmc/summary.json`` (``"<from>__<to>"`` -> path,
        each with its ``from`` and ``to``)."""
        paths = mapping(data, "paths", "LmcResult", source)
        out = {}
        for name, doc in paths.items():
            need_all(doc, ("from", "to"), "LmcResult", source, f"paths.{name}.")
            out[name] = cls.from_json(doc, source=source, at=f"paths.{name}.")
        return out

    def save(self, out: str | Path) -> None:
        """Write ``out/lmc.json`` (:meth:`to_json`) and the figure ``out/lmc.png``."""
        from emscope.io import write_json

        write_json(Path(out) / "lmc.json", self.to_json())
        self.plot(Path(out) / "lmc.png", f"{self.start} -> {self.end}")

    def plot(self, path: str | Path | None = None, title: str = "") -> Any:
        """EM and coherent rate (and losses) vs ``t`` (:func:`emscope.lmc.plot_lmc`); saved
        to ``path`` when given."""
        from emscope.lmc import plot_lmc

        return plot_lmc(
            [r.to_json() for r in self.rows], None if path is None else Path(path), title
        )

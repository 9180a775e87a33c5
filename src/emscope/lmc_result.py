"""The typed result of linear mode connectivity (:func:`emscope.lmc.run_lmc`, a path's
``lmc.json``; the pipeline's ``lmc/summary.json`` holds one per path under ``paths``):
:class:`LmcResult`, one :class:`LmcRow` per interpolation point ``t`` (0 = the start
endpoint, 1 = the end). Rates are fractions in [0, 1] (None where EM was not measured),
losses mean token cross-entropies in nats; :func:`plot_lmc` draws the rows. Kept apart from
:mod:`emscope.lmc` so that reading (and plotting) a result does not import torch; the JSON
layout is the one :mod:`emscope.results` describes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
        """EM and coherent rate (and losses) vs ``t`` (:func:`plot_lmc`); saved to ``path``
        when given."""
        return plot_lmc(
            [r.to_json() for r in self.rows], None if path is None else Path(path), title
        )


def plot_lmc(rows: Sequence[dict[str, Any]], path: Path | None, title: str) -> Any:
    """EM and coherent rates with CI bands along the path (and the losses, if any); saved to
    ``path`` (and closed) when given, else returned open."""
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    with_loss = rows[0].get("loss") is not None
    if with_loss and all(r.get("n") is None for r in rows):  # no judge: the losses alone
        fig, ax = plt.subplots(figsize=(5.5, 4))
        _plot_losses(ax, rows, f"{title} (EM not measured)")
    else:
        fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(10 if with_loss else 5.5, 4))
        ax = axes[0] if with_loss else axes
        ts = [r["t"] for r in rows]
        for key, label in (("em", "EM rate"), ("coherent", "coherent rate")):
            values = [
                r[f"{key}_rate"] if r[f"{key}_rate"] is not None else float("nan") for r in rows
            ]
            ax.plot(ts, values, marker="o", label=label)
            bands = [r[f"{key}_ci"] for r in rows if r.get(f"{key}_ci") is not None]
            if len(bands) == len(rows):
                ax.fill_between(ts, [b[0] for b in bands], [b[1] for b in bands], alpha=0.2)
        ax.set(xlabel="t", ylabel="rate", ylim=(0, 1), title=title)
        ax.legend()
        if with_loss:
            _plot_losses(axes[1], rows, "loss along the path")
    if path is not None:
        save_figure(fig, path)
    return fig


def _plot_losses(ax: Any, rows: Sequence[dict[str, Any]], title: str) -> None:
    ts = [r["t"] for r in rows]
    for name in rows[0]["loss"]:
        ax.plot(ts, [r["loss"][name] for r in rows], marker="o", label=name)
    ax.set(xlabel="t", ylabel="loss (nats / assistant token)", title=title)
    ax.legend()

"""Typed results of steering sweeps and ablation runs (:mod:`emscope.directions.sweeps`):
:class:`SteerResult` (``steering/summary.json``) and :class:`AblationResult`
(``ablation/summary.json``, each target of ``transfer/stage.json``).

Rates are fractions in [0, 1] (None where nothing was scored), CIs ``[lo, hi]`` 95%
intervals or None; the JSON layout is the one :mod:`emscope.results` describes (typed fields
plus the untouched ``extra``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emscope.results import mapping, need, need_all, rest, sequence

RATE_FIELDS = ("em_rate", "em_ci", "coherent_rate", "coherent_ci")
"""The fields of an evaluated setting (the baseline of a sweep)."""


@dataclass(frozen=True)
class SteerRow:
    """One steered setting: ``vector`` (``direction`` or ``random``) added with ``scale`` at
    ``resid_post[layer]``; its EM and coherent rates with CIs. ``extra``: ``dir`` (the
    setting's sub-dir), ``em_diff``/``em_diff_ci`` (paired, vs the baseline), ``kl``/``kl_ci``
    (nats)."""

    layer: int
    scale: float
    vector: str
    em_rate: float | None
    em_ci: list[float] | None
    coherent_rate: float | None
    coherent_ci: list[float] | None
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPED = ("layer", "scale", "vector", "em_rate", "em_ci", "coherent_rate", "coherent_ci")

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = "", result: str = "SteerResult"
    ) -> SteerRow:
        need_all(data, ("layer", "scale", "vector", "em_rate", "em_ci"), result, source, at)
        return cls(
            layer=int(data["layer"]),
            scale=float(data["scale"]),
            vector=str(data["vector"]),
            em_rate=data["em_rate"],
            em_ci=data["em_ci"],
            coherent_rate=need(data, "coherent_rate", result, source, at),
            coherent_ci=data.get("coherent_ci"),
            extra=rest(data, cls.TYPED),
        )

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.TYPED} | dict(self.extra)

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name (typed or in ``extra``)."""
        return getattr(self, name) if name in self.TYPED else self.extra.get(name, default)


@dataclass(frozen=True)
class SteerResult:
    """A steering sweep (:func:`emscope.directions.sweeps.steer_sweep`): ``rows`` (one
    :class:`SteerRow` per layer x scale x vector), ``baseline`` (the unsteered rates:
    ``em_rate``, ``em_ci``, ``coherent_rate``, ``coherent_ci``), ``selection`` (the rule's
    selection sweep of the pipeline's ``steering.select``, None without one: ``rule``,
    ``min_coherent``, ``n``, ``seed``, ``rows``, ``chosen``) and ``extra`` (norms per
    layer, ``unit``, ``positions``, seeds, ...)."""

    rows: tuple[SteerRow, ...]
    baseline: Mapping[str, Any]
    selection: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> SteerResult:
        name = "SteerResult"
        rows = sequence(data, "rows", name, source, at)
        baseline = mapping(data, "baseline", name, source, at)
        selection = data.get("selection")
        if selection is not None:
            sel = f"{at}selection."
            need_all(selection, ("min_coherent", "rows", "chosen"), name, source, sel)
        return cls(
            rows=tuple(
                SteerRow.from_json(r, source=source, at=f"{at}rows[{i}].", result=name)
                for i, r in enumerate(rows)
            ),
            baseline=baseline,
            selection=selection,
            extra=rest(data, ("rows", "baseline", "selection")),
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"rows": [r.to_json() for r in self.rows]}
        doc["baseline"] = dict(self.baseline)
        doc.update(self.extra)
        if self.selection is not None:
            doc["selection"] = self.selection
        return doc

    def save(self, out: str | Path) -> None:
        """Write ``out/summary.json`` (:meth:`to_json`) and the figure ``out/steer_em.png``."""
        from emscope.io import write_json

        write_json(Path(out) / "summary.json", self.to_json())
        self.plot(Path(out) / "steer_em.png")

    def best(self, vector: str = "direction") -> SteerRow | None:
        """The row of ``vector`` with the highest EM rate (None when none was scored)."""
        scored = [r for r in self.rows if r.vector == vector and r.em_rate is not None]
        return max(scored, key=lambda r: float(r.em_rate or 0.0)) if scored else None

    def plot(self, path: str | Path | None = None) -> Any:
        """EM rate vs scale, one line per layer (random control dashed), the unsteered rate
        as a gray line; saved to ``path`` when given. Returns the figure."""
        from emscope.plotting import pyplot, save_figure

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        layers = sorted({r.layer for r in self.rows})
        colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
        for color, layer in zip(colors, layers, strict=True):
            for kind, style in (("direction", "-o"), ("random", "--x")):
                rows = [r for r in self.rows if r.layer == layer and r.vector == kind]
                if not rows:
                    continue
                xs = [r.scale for r in rows]
                ys = [r.em_rate if r.em_rate is not None else float("nan") for r in rows]
                label = f"L{layer}" + (" random" if kind == "random" else "")
                ax.plot(xs, ys, style, color=color, label=label)
        base = self.baseline.get("em_rate")
        if base is not None:
            ax.axhline(base, color="gray", lw=1, label="unsteered")
        ax.set_xlabel("steering scale")
        ax.set_ylabel("EM rate")
        ax.set_title("EM vs steering scale per layer")
        ax.legend(fontsize=7)
        fig.tight_layout()
        if path is not None:
            save_figure(fig, Path(path))
        return fig


@dataclass(frozen=True)
class AblationResult:
    """An ablation run (:func:`emscope.directions.sweeps.ablate_run`):
    ``relative_reduction`` = 1 - after/before EM rate on matched pairs, with its 95% CI (None
    when it cannot be measured, the reason in :attr:`relative_reduction_na`). ``extra``:
    ``em_rate_before``/``em_rate_after`` and coherent rates (each with ``*_ci``),
    ``n_pairs``, ``kl``/``kl_ci`` (nats), the random control's ``random_em_rate_after`` and
    ``random_relative_change`` (random_after/before - 1), a sweep's ``rows`` and
    ``best_layer``, ``seed`` and the caller's meta (``direction``, ``target``, ``mode``)."""

    relative_reduction: float | None
    relative_reduction_ci: list[float] | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)
    """The key order of the document read (``to_json`` keeps it; not compared)."""

    TYPED = ("relative_reduction", "relative_reduction_ci")

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> AblationResult:
        need_all(data, cls.TYPED, "AblationResult", source, at)
        return cls(
            **{k: data[k] for k in cls.TYPED}, extra=rest(data, cls.TYPED), order=tuple(data)
        )

    def to_json(self) -> dict[str, Any]:
        """The document, its keys in the order read (else the ``em_rate``/``coherent`` rates,
        ``n_pairs``, the typed fields, then the rest: :func:`ablate_run`'s order)."""
        doc = {name: getattr(self, name) for name in self.TYPED} | dict(self.extra)
        order = self.order or (
            *(k for k in self.extra if k.startswith(("em_rate", "coherent"))),
            *(["n_pairs"] if "n_pairs" in self.extra else []),
            *self.TYPED,
        )
        return {k: doc[k] for k in order if k in doc} | doc

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name (typed or in ``extra``)."""
        return getattr(self, name) if name in self.TYPED else self.extra.get(name, default)

    @property
    def em_rate_before(self) -> float | None:
        """EM rate of the unablated model (None when not recorded or not scored)."""
        return self.extra.get("em_rate_before")

    @property
    def em_rate_after(self) -> float | None:
        """EM rate with the direction ablated."""
        return self.extra.get("em_rate_after")

    @property
    def relative_reduction_na(self) -> str | None:
        """Why ``relative_reduction`` is None (None when measured)."""
        return self.extra.get("relative_reduction_na")

    @property
    def random_relative_change(self) -> float | None:
        """The random control's relative change (None without a control)."""
        return self.extra.get("random_relative_change")

    def save(self, out: str | Path) -> None:
        """Write ``out/summary.json`` (:meth:`to_json`) and the figure ``out/ablate_em.png``."""
        from emscope.io import write_json

        write_json(Path(out) / "summary.json", self.to_json())
        self.plot(Path(out) / "ablate_em.png")

    def plot(self, path: str | Path | None = None) -> Any:
        """EM rate before, after and with the random control, as bars with CIs; saved to
        ``path`` when given. Returns the figure."""
        from emscope.plotting import pyplot, save_figure

        plt = pyplot()
        bars = [("before", "em_rate_before"), ("after", "em_rate_after")]
        if "random_em_rate_after" in self.extra:
            bars.append(("random control", "random_em_rate_after"))
        fig, ax = plt.subplots(figsize=(4.5, 3.8))
        for i, (_, key) in enumerate(bars):
            rate, ci = self.get(key), self.get(f"{key}_ci")
            if rate is None:
                continue
            err = [[rate - ci[0]], [ci[1] - rate]] if ci else None
            ax.bar(i, rate, yerr=err, capsize=4, color=["gray", "tab:red", "tab:blue"][i])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([b[0] for b in bars])
        ax.set_ylabel("EM rate")
        title = "EM before/after ablation"
        if self.extra.get("best_layer") is not None:
            title += f" (best layer {self.extra['best_layer']})"
        ax.set_title(title)
        fig.tight_layout()
        if path is not None:
            save_figure(fig, Path(path))
        return fig


@dataclass(frozen=True)
class CosinePair:
    """The cosine similarity of directions ``a`` and ``b`` at each layer (``cosine``:
    layer -> cosine in [-1, 1]; :func:`emscope.directions.compare.cosine_table`)."""

    a: str
    b: str
    cosine: Mapping[int, float]

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = "", result: str = "CosinePair"
    ) -> CosinePair:
        need_all(data, ("a", "b"), result, source, at)
        cosine = mapping(data, "cosine", result, source, at)
        return cls(str(data["a"]), str(data["b"]), {int(k): float(v) for k, v in cosine.items()})

    def to_json(self) -> dict[str, Any]:
        """The JSON object (layers as string keys, as JSON has them)."""
        return {"a": self.a, "b": self.b, "cosine": {str(k): v for k, v in self.cosine.items()}}

    def by_layer(self) -> list[float]:
        """The cosines in increasing layer order."""
        return [self.cosine[layer] for layer in sorted(self.cosine)]


@dataclass(frozen=True)
class BCosine:
    """The cosine between a rank-1 adapter's B vector at ``module`` (``resid_post`` writer of
    ``layer``) and a direction at that layer
    (:func:`emscope.directions.compare.adapter_b_cosines`)."""

    module: str
    layer: int
    cosine: float

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = "", result: str = "BCosine"
    ) -> BCosine:
        need_all(data, ("module", "layer", "cosine"), result, source, at)
        return cls(str(data["module"]), int(data["layer"]), float(data["cosine"]))

    def to_json(self) -> dict[str, Any]:
        return {"module": self.module, "layer": self.layer, "cosine": self.cosine}


@dataclass(frozen=True)
class DirectionsSummary:
    """The pipeline's ``directions/summary.json``: the extracted ``sources``, each one's
    ``norms`` (layer -> L2 norm of the mean difference, in residual-stream units), the
    cosines between every two of them (``pairs``; empty with one source, the reason in
    ``pairs_skipped``) and ``adapter_b_cosines`` (``"<rank-1> vs <source>"`` -> one
    :class:`BCosine` per adapted module). ``extra``: ``followup`` (the follow-up-prompt
    directions' ``read_with``, ``norms`` and ``pairs``) and any other field, untouched."""

    sources: tuple[str, ...]
    norms: Mapping[str, Mapping[int, float]]
    pairs: tuple[CosinePair, ...]
    pairs_skipped: str | None
    adapter_b_cosines: Mapping[str, tuple[BCosine, ...]]
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPED = ("sources", "norms", "pairs", "pairs_skipped", "adapter_b_cosines")

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> DirectionsSummary:
        name = "DirectionsSummary"
        norms = mapping(data, "norms", name, source, at)
        b_cosines = mapping(data, "adapter_b_cosines", name, source, at)
        return cls(
            sources=tuple(str(s) for s in sequence(data, "sources", name, source, at)),
            norms={
                s: {
                    int(k): float(v)
                    for k, v in mapping(norms, s, name, source, f"{at}norms.").items()
                }
                for s in norms
            },
            pairs=tuple(
                CosinePair.from_json(p, source=source, at=f"{at}pairs[{i}].", result=name)
                for i, p in enumerate(sequence(data, "pairs", name, source, at))
            ),
            pairs_skipped=need(data, "pairs_skipped", name, source, at),
            adapter_b_cosines={
                key: tuple(
                    BCosine.from_json(
                        e, source=source, at=f"{at}adapter_b_cosines.{key}[{i}].", result=name
                    )
                    for i, e in enumerate(
                        sequence(b_cosines, key, name, source, f"{at}adapter_b_cosines.")
                    )
                )
                for key in b_cosines
            },
            extra=rest(data, cls.TYPED),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": list(self.sources),
            "norms": {s: {str(k): x for k, x in v.items()} for s, v in self.norms.items()},
            "pairs": [p.to_json() for p in self.pairs],
            "pairs_skipped": self.pairs_skipped,
            "adapter_b_cosines": {
                k: [e.to_json() for e in rows] for k, rows in self.adapter_b_cosines.items()
            },
        } | dict(self.extra)


@dataclass(frozen=True)
class DirectionComparison:
    """``emscope directions compare``'s ``compare.json``: ``directions`` (name -> ``file``,
    ``site_kind``, ``norms`` per layer, ``meta``; as read), the cosines of every two of them
    (``pairs``) and ``adapter_b_cosines`` (rank-1 adapter -> direction -> one
    :class:`BCosine` per adapted module). ``extra``: ``readout`` (the logit lens per direction
    and layer, with ``--model``) and any other field, untouched."""

    directions: Mapping[str, Mapping[str, Any]]
    pairs: tuple[CosinePair, ...]
    adapter_b_cosines: Mapping[str, Mapping[str, tuple[BCosine, ...]]]
    extra: Mapping[str, Any] = field(default_factory=dict)

    TYPED = ("directions", "pairs", "adapter_b_cosines")

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = ""
    ) -> DirectionComparison:
        name = "DirectionComparison"
        directions = mapping(data, "directions", name, source, at)
        adapters = mapping(data, "adapter_b_cosines", name, source, at)

        def b_rows(adapter: str, direction: str) -> tuple[BCosine, ...]:
            where = f"{at}adapter_b_cosines.{adapter}."
            rows = sequence(mapping(adapters, adapter, name, source, f"{at}adapter_b_cosines."),
                            direction, name, source, where)  # fmt: skip
            return tuple(
                BCosine.from_json(e, source=source, at=f"{where}{direction}[{i}].", result=name)
                for i, e in enumerate(rows)
            )

        return cls(
            directions={
                d: mapping(directions, d, name, source, f"{at}directions.") for d in directions
            },
            pairs=tuple(
                CosinePair.from_json(p, source=source, at=f"{at}pairs[{i}].", result=name)
                for i, p in enumerate(sequence(data, "pairs", name, source, at))
            ),
            adapter_b_cosines={a: {d: b_rows(a, d) for d in adapters[a]} for a in adapters},
            extra=rest(data, cls.TYPED),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "directions": {d: dict(v) for d, v in self.directions.items()},
            "pairs": [p.to_json() for p in self.pairs],
            "adapter_b_cosines": {
                a: {d: [e.to_json() for e in rows] for d, rows in by_direction.items()}
                for a, by_direction in self.adapter_b_cosines.items()
            },
        } | dict(self.extra)

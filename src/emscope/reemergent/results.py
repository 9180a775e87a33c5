"""Typed results of the re-emergence analyses, as written to JSON by the ``reemergent`` stage
and ``emscope reemergent``: :class:`ProjectionSummary` (``projection.json``,
:func:`~emscope.reemergent.projection.projection_analysis`), :class:`GradientSummary`
(``gradients.json``, :func:`~emscope.reemergent.gradients.gradient_analysis`),
:class:`LogprobSummary` (``logprob.json``), :class:`SubspaceSummary` (``subspace.json``) and
:class:`PatchSummary` (``patching.json``).

Positions on the alignment direction are in units of the base (0) to instruct (1) distance;
gradient similarities are mean cosines in [-1, 1]. The JSON layout is the one
:mod:`emscope.results` describes (typed fields plus the untouched ``extra``); ``to_json``
keeps the key order of the document read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emscope.results import bad_field, in_order, mapping, need, need_all, rest, sequence

DRIFT_FIELDS = (
    "position",
    "first_third_mean",
    "last_third_mean",
    "drift_towards_base",
    "drift_ci95",
    "drifts_towards_base",
)
"""The fields of one entry of ``relative_to_base_instruct`` (all typed)."""


@dataclass(frozen=True)
class Drift:
    """A misaligned variant between base (0) and instruct (1) on the alignment direction:
    ``position`` per layer, its mean over the first and the last third of the layers,
    ``drift_towards_base`` (first - last; > 0: closer to base in deep layers) with its 95%
    bootstrap CI over held-out examples ``drift_ci95`` (``[lo, hi]``, None where undefined),
    and ``drifts_towards_base`` (the CI is above 0)."""

    position: list[float | None]
    first_third_mean: float
    last_third_mean: float
    drift_towards_base: float
    drift_ci95: list[float | None]
    drifts_towards_base: bool

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = "", result: str = "Drift"
    ) -> Drift:
        need_all(data, DRIFT_FIELDS, result, source, at)
        return cls(
            position=sequence(data, "position", result, source, at),
            first_third_mean=data["first_third_mean"],
            last_third_mean=data["last_third_mean"],
            drift_towards_base=data["drift_towards_base"],
            drift_ci95=sequence(data, "drift_ci95", result, source, at),
            drifts_towards_base=bool(data["drifts_towards_base"]),
        )

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DRIFT_FIELDS}


@dataclass(frozen=True)
class ProjectionSummary:
    """``projection.json``: the ``layers`` analysed, the ``base`` and ``instruct`` model
    names, and one :class:`Drift` per misaligned variant (``relative_to_base_instruct``).
    ``extra``: ``normalised_projection`` (model -> per-layer ``mean``/``sem``),
    ``direction_norm``, ``n_train``/``n_heldout``, the example ids, ``seed``, the writer's
    ``data``/``system_prompt``/``models``, ..., untouched."""

    layers: tuple[int, ...]
    base: str
    instruct: str
    relative_to_base_instruct: Mapping[str, Drift]
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)
    """The key order of the document read (``to_json`` keeps it; not compared)."""

    TYPED = ("layers", "base", "instruct", "relative_to_base_instruct")

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> ProjectionSummary:
        name = "ProjectionSummary"
        need_all(data, cls.TYPED, name, source, at)
        relative = mapping(data, "relative_to_base_instruct", name, source, at)
        return cls(
            layers=tuple(int(layer) for layer in sequence(data, "layers", name, source, at)),
            base=str(data["base"]),
            instruct=str(data["instruct"]),
            relative_to_base_instruct={
                model: Drift.from_json(
                    r, source=source, at=f"{at}relative_to_base_instruct.{model}.", result=name
                )
                for model, r in relative.items()
            },
            extra=rest(data, cls.TYPED),
            order=tuple(data),
        )

    @classmethod
    def of(cls, summary: Mapping[str, Any], **extra: Any) -> ProjectionSummary:
        """The result of a projection analysis's ``summary()`` plus the writer's fields
        (``data``, ``system_prompt``, ...), checked as :meth:`from_json` checks a file."""
        return cls.from_json({**summary, **extra}, source="projection summary")

    def to_json(self) -> dict[str, Any]:
        doc = {
            "layers": list(self.layers),
            "base": self.base,
            "instruct": self.instruct,
            "relative_to_base_instruct": {
                m: d.to_json() for m, d in self.relative_to_base_instruct.items()
            },
        } | dict(self.extra)
        return in_order(doc, self.order)


SIMILARITY_KINDS = ("raw", "centred")
"""The two gradient-cosine variants: raw, and centred on the global mean gradient."""


@dataclass(frozen=True)
class GradientSimilarity:
    """Mean per-example gradient cosines of two ``groups`` (datasets): per kind (``raw``,
    ``centred``) ``within_<a>``, ``within_<b>`` and ``across``; ``split_half``: per group,
    the same numbers between two random halves of it (``raw_across_halves``,
    ``centred_across_halves``, ``halves_rows``), the control an across number is read
    against. ``extra``: ``n`` (examples per group), ``seed``."""

    groups: tuple[str, str]
    raw: Mapping[str, float | None]
    centred: Mapping[str, float | None]
    split_half: Mapping[str, Mapping[str, Any]]
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    TYPED = ("groups", *SIMILARITY_KINDS, "split_half")

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = "", result: str = "GradientSummary"
    ) -> GradientSimilarity:
        groups = sequence(data, "groups", result, source, at)
        if len(groups) != 2:
            raise bad_field(source, f"{at}groups", f"has {len(groups)} entries, not 2", result)
        a, b = (str(g) for g in groups)
        kinds = {}
        for kind in SIMILARITY_KINDS:
            kinds[kind] = mapping(data, kind, result, source, at)
            need_all(kinds[kind], (f"within_{a}", f"within_{b}", "across"), result, source,
                     f"{at}{kind}.")  # fmt: skip
        split = mapping(data, "split_half", result, source, at)
        return cls(
            groups=(a, b),
            raw=kinds["raw"],
            centred=kinds["centred"],
            split_half={g: mapping(split, g, result, source, f"{at}split_half.") for g in split},
            extra=rest(data, cls.TYPED),
            order=tuple(data),
        )

    def to_json(self) -> dict[str, Any]:
        doc = {
            "groups": list(self.groups),
            "raw": dict(self.raw),
            "centred": dict(self.centred),
            "split_half": {g: dict(v) for g, v in self.split_half.items()},
        } | dict(self.extra)
        return in_order(doc, self.order)

    def kind(self, name: str) -> Mapping[str, float | None]:
        """The ``raw`` or ``centred`` cosines."""
        return self.raw if name == "raw" else self.centred


@dataclass(frozen=True)
class GradientSummary:
    """``gradients.json``: the parameter whose per-example gradients were compared
    (``param``) and their :class:`GradientSimilarity`. ``extra``: ``route``,
    ``system_prompt`` and, from ``emscope reemergent gradients``, ``model``, ``shape``,
    ``datasets``, ``n_tokens``, ``token_losses``, ..., untouched."""

    param: str
    similarity: GradientSimilarity
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    TYPED = ("param", "similarity")

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> GradientSummary:
        name = "GradientSummary"
        return cls(
            param=str(need(data, "param", name, source, at)),
            similarity=GradientSimilarity.from_json(
                need(data, "similarity", name, source, at), source=source, at=f"{at}similarity."
            ),
            extra=rest(data, cls.TYPED),
            order=tuple(data),
        )

    @classmethod
    def of(cls, **fields: Any) -> GradientSummary:
        """The document a writer puts together (``param``, ``similarity`` = a gradient
        analysis's ``summary``, ``route``, ...; kept in this order), checked as
        :meth:`from_json` checks a file."""
        return cls.from_json(fields, source="gradient summary")

    def to_json(self) -> dict[str, Any]:
        doc = {"param": self.param, "similarity": self.similarity.to_json()} | dict(self.extra)
        return in_order(doc, self.order)


LOGPROB_FIELDS = (
    "n_examples",
    "n_tokens",
    "logprob_sum_mean",
    "logprob_mean_mean",
    "logprob_token_weighted",
    "entropy_mean_mean",
)
"""The fields of one model x dataset cell of ``logprob.json``'s ``summary``."""


@dataclass(frozen=True)
class LogprobCell:
    """One model on one dataset: ``n_examples``, answer ``n_tokens``, the mean over examples
    of the summed and of the per-token answer log-prob, the token-weighted mean log-prob
    (total / tokens) and the mean per-token entropy; in nats, None where no token was
    scored."""

    n_examples: int
    n_tokens: int
    logprob_sum_mean: float | None
    logprob_mean_mean: float | None
    logprob_token_weighted: float | None
    entropy_mean_mean: float | None

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = "", result: str = "LogprobCell"
    ) -> LogprobCell:
        need_all(data, LOGPROB_FIELDS, result, source, at)
        return cls(**{name: data[name] for name in LOGPROB_FIELDS})

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LOGPROB_FIELDS}


@dataclass(frozen=True)
class LogprobSummary:
    """``logprob.json``: ``summary`` (model -> dataset -> :class:`LogprobCell`) and its
    ``units`` (nats). ``extra``: ``system_prompt`` and, from ``emscope reemergent logprob``,
    ``models``, ``datasets``, ``tokens``, untouched."""

    summary: Mapping[str, Mapping[str, LogprobCell]]
    units: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    TYPED = ("summary", "units")

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> LogprobSummary:
        name = "LogprobSummary"
        summary = mapping(data, "summary", name, source, at)
        return cls(
            summary={
                model: {
                    d: LogprobCell.from_json(
                        cell, source=source, at=f"{at}summary.{model}.{d}.", result=name
                    )
                    for d, cell in mapping(summary, model, name, source, f"{at}summary.").items()
                }
                for model in summary
            },
            units=str(need(data, "units", name, source, at)),
            extra=rest(data, cls.TYPED),
            order=tuple(data),
        )

    @classmethod
    def of(cls, **fields: Any) -> LogprobSummary:
        """The document a writer puts together (``summary`` = a log-prob analysis's
        ``summary()``, ``units``, ...; kept in this order), checked as :meth:`from_json`."""
        return cls.from_json(fields, source="log-prob summary")

    def to_json(self) -> dict[str, Any]:
        doc = {
            "summary": {
                m: {d: c.to_json() for d, c in by_data.items()}
                for m, by_data in self.summary.items()
            },
            "units": self.units,
        } | dict(self.extra)
        return in_order(doc, self.order)


@dataclass(frozen=True)
class SubspaceLayer:
    """The two domains' top-k instruct-minus-base subspaces at one layer: ``overlap``
    (mean squared cosine of the principal angles, in [0, 1]), ``mean_angle_deg``, and the
    ``random`` and ``shuffled``-label baselines (``mean_angle_deg``: ``p5``, ...).
    ``extra``: ``angles_deg``, ``abs_cos``, ``below_random_p5``, ``below_shuffled_p5``,
    ``singular_values``."""

    overlap: float
    mean_angle_deg: float
    random: Mapping[str, Any]
    shuffled: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    TYPED = ("overlap", "mean_angle_deg", "random", "shuffled")

    @classmethod
    def from_json(
        cls, data: Any, *, source: str | None = None, at: str = "", result: str = "SubspaceLayer"
    ) -> SubspaceLayer:
        need_all(data, ("overlap", "mean_angle_deg"), result, source, at)
        return cls(
            overlap=float(data["overlap"]),
            mean_angle_deg=float(data["mean_angle_deg"]),
            random=mapping(data, "random", result, source, at),
            shuffled=mapping(data, "shuffled", result, source, at),
            extra=rest(data, cls.TYPED),
            order=tuple(data),
        )

    def to_json(self) -> dict[str, Any]:
        doc = {name: getattr(self, name) for name in self.TYPED} | dict(self.extra)
        doc["random"], doc["shuffled"] = dict(self.random), dict(self.shuffled)
        return in_order(doc, self.order)


@dataclass(frozen=True)
class SubspaceSummary:
    """``subspace.json`` (``emscope reemergent subspace``): the two ``domains``, ``k`` and
    one :class:`SubspaceLayer` per layer. ``extra``: ``vectors``, the analysis's meta,
    ``models``, ``system_prompt``, untouched."""

    domains: tuple[str, ...]
    k: int
    layers: Mapping[int, SubspaceLayer]
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    TYPED = ("domains", "k", "layers")

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> SubspaceSummary:
        name = "SubspaceSummary"
        layers = mapping(data, "layers", name, source, at)
        return cls(
            domains=tuple(str(d) for d in sequence(data, "domains", name, source, at)),
            k=int(need(data, "k", name, source, at)),
            layers={
                int(layer): SubspaceLayer.from_json(
                    v, source=source, at=f"{at}layers.{layer}.", result=name
                )
                for layer, v in layers.items()
            },
            extra=rest(data, cls.TYPED),
            order=tuple(data),
        )

    @classmethod
    def of(cls, summary: Mapping[str, Any], **extra: Any) -> SubspaceSummary:
        """A subspace analysis's ``summary()`` plus the writer's fields, checked."""
        return cls.from_json({**summary, **extra}, source="subspace summary")

    def to_json(self) -> dict[str, Any]:
        doc = {
            "domains": list(self.domains),
            "k": self.k,
            "layers": {str(layer): v.to_json() for layer, v in self.layers.items()},
        } | dict(self.extra)
        return in_order(doc, self.order)


PATCH_FIELDS = ("metric", "layers", "source_mean", "target_mean", "patched_mean", "restored")


@dataclass(frozen=True)
class PatchSummary:
    """``patching.json`` (``emscope reemergent patching``): the ``metric`` (``loss`` or a
    word's log-prob), the patched ``layers``, the source's and target's means, the patched
    target's mean per layer and ``restored`` per layer ((patched - target) / (source -
    target); None when source and target agree). ``extra``: ``n_examples``, the model names
    and sources, ``data``, ``site``, ``system_prompt``, ..., untouched."""

    metric: str
    layers: tuple[int, ...]
    source_mean: float
    target_mean: float
    patched_mean: list[float]
    restored: list[float] | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> PatchSummary:
        name = "PatchSummary"
        need_all(data, PATCH_FIELDS, name, source, at)
        return cls(
            metric=str(data["metric"]),
            layers=tuple(int(x) for x in sequence(data, "layers", name, source, at)),
            source_mean=data["source_mean"],
            target_mean=data["target_mean"],
            patched_mean=sequence(data, "patched_mean", name, source, at),
            restored=data["restored"],
            extra=rest(data, PATCH_FIELDS),
            order=tuple(data),
        )

    @classmethod
    def of(cls, summary: Mapping[str, Any], **extra: Any) -> PatchSummary:
        """A patching analysis's ``summary()`` plus the writer's fields, checked."""
        return cls.from_json({**summary, **extra}, source="patching summary")

    def to_json(self) -> dict[str, Any]:
        doc = {name: getattr(self, name) for name in PATCH_FIELDS} | dict(self.extra)
        doc["layers"] = list(self.layers)
        return in_order(doc, self.order)


__all__ = [
    "Drift",
    "GradientSimilarity",
    "GradientSummary",
    "LogprobCell",
    "LogprobSummary",
    "PatchSummary",
    "ProjectionSummary",
    "SubspaceLayer",
    "SubspaceSummary",
]

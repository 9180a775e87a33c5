"""The typed result of the pipeline's geometry stage (``geometry/summary.json``):
:class:`GeometryResult`, one :class:`GeometryPair` per adapter pair. Cosines are Frobenius
cosines of the summed updates, overlaps subspace overlaps in [0, 1], angles in degrees
(docs/methods.md section 3); the JSON layout is the one :mod:`emscope.results` describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emscope.results import mapping, need, need_all, rest

if TYPE_CHECKING:
    from emscope.geometry.analysis import Geometry

PAIR_FIELDS = ("a", "b", "roles", "cosine", "overlap", "mean_angle_deg", "random_angle_p5")


@dataclass(frozen=True)
class GeometryPair:
    """Adapters ``a`` and ``b`` (``roles``: their roles, e.g. ``["em", "control"]``): the
    aggregate ``cosine`` and ``overlap``, the ``mean_angle_deg`` of their principal angles
    and the 5th percentile of the same-shape random baseline's (``random_angle_p5``; None
    without draws). ``extra``: ``random_angle_draws``, ``a_row_cosine``, ``shared_init``,
    ``same_seed_controls``."""

    a: str
    b: str
    roles: tuple[str, ...]
    cosine: float | None
    overlap: float | None
    mean_angle_deg: float | None
    random_angle_p5: float | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)
    """The key order of the document read (``to_json`` keeps it; not compared)."""

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> GeometryPair:
        need_all(data, PAIR_FIELDS, "GeometryResult", source, at)
        values = {k: data[k] for k in PAIR_FIELDS}
        values["roles"] = tuple(values["roles"])
        return cls(**values, extra=rest(data, PAIR_FIELDS), order=tuple(data))

    def to_json(self) -> dict[str, Any]:
        """The document, its keys in the order read (else :data:`PAIR_FIELDS` first)."""
        doc = {k: getattr(self, k) for k in PAIR_FIELDS}
        doc["roles"] = list(self.roles)
        doc |= dict(self.extra)
        return {k: doc[k] for k in self.order if k in doc} | doc


@dataclass(frozen=True)
class GeometryResult:
    """Pairwise geometry of a study's adapters: ``pairs`` (``"a|b"`` ->
    :class:`GeometryPair`), ``base_cosine`` (adapter -> aggregate cosine of its update with
    the base weights, empty without base weights). ``extra``: ``adapters`` (names, in the
    order compared), ``shared_init_threshold``."""

    pairs: Mapping[str, GeometryPair]
    base_cosine: Mapping[str, float | None]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> GeometryResult:
        name = "GeometryResult"
        pairs = mapping(data, "pairs", name, source, at)
        return cls(
            pairs={
                k: GeometryPair.from_json(p, source=source, at=f"{at}pairs.{k}.")
                for k, p in pairs.items()
            },
            base_cosine=dict(need(data, "base_cosine", name, source, at) or {}),
            extra=rest(data, ("pairs", "base_cosine")),
        )

    def to_json(self) -> dict[str, Any]:
        head = {k: v for k, v in self.extra.items() if k == "adapters"}
        return (
            head
            | {
                "pairs": {k: p.to_json() for k, p in self.pairs.items()},
                "base_cosine": dict(self.base_cosine),
            }
            | {k: v for k, v in self.extra.items() if k != "adapters"}
        )

    @property
    def adapters(self) -> list[str]:
        """The adapters compared (from the pairs when not recorded)."""
        if "adapters" in self.extra:
            return list(self.extra["adapters"])
        names = [n for p in self.pairs.values() for n in (p.a, p.b)]
        return list(dict.fromkeys(names))

    def by_roles(self, *roles: str) -> list[GeometryPair]:
        """The pairs whose roles are ``roles`` in any order (``by_roles("em", "control")``)."""
        return [p for p in self.pairs.values() if sorted(p.roles) == sorted(roles)]


def summarise(
    geometry: Geometry, roles: Mapping[str, str], doc: Mapping[str, Any] | None = None
) -> GeometryResult:
    """The per-pair summary of ``geometry`` (no files written): each pair's aggregate
    cosine, overlap and mean principal angle, the random baseline's per-draw mean angles
    (:meth:`~emscope.geometry.analysis.Geometry.random_pair_draws`) and their 5th
    percentile, ``roles`` of its adapters (adapter -> role), the shared-initialisation
    check (:meth:`~emscope.geometry.analysis.Geometry.shared_init`, with each EM-EM pair's
    same-seed controls); ``base_cosine`` per adapter. ``doc``: ``geometry.to_json()`` when
    the caller already has it."""
    import numpy as np

    from emscope.geometry.analysis import SHARED_INIT_COSINE

    doc = geometry.to_json() if doc is None else doc
    shared = geometry.shared_init()
    pairs: dict[str, dict[str, Any]] = {}
    for key, pair in geometry.pairs.items():
        agg = pair.aggregate()
        draws = [d["mean_principal_angle_deg"] for d in geometry.random_pair_draws(key)]
        pairs[key] = {
            "a": pair.a,
            "b": pair.b,
            "roles": [roles[pair.a], roles[pair.b]],
            "cosine": agg.get("cosine"),
            "overlap": agg.get("overlap"),
            "mean_angle_deg": agg.get("mean_principal_angle_deg"),
            "random_angle_draws": draws,
            "random_angle_p5": float(np.percentile(draws, 5)) if draws else None,
            "a_row_cosine": shared[key]["a_row_cosine"],
            "shared_init": shared[key]["shared_init"],
        }
    same_seed_controls(pairs)
    base = {n: e["aggregate"]["cosine"] for n, e in (doc.get("base_cosine") or {}).items()}
    summary = {
        "adapters": list(roles),
        "pairs": pairs,
        "base_cosine": base,
        "shared_init_threshold": SHARED_INIT_COSINE,
    }
    return GeometryResult.from_json(summary)


def same_seed_controls(pairs: dict[str, dict[str, Any]]) -> None:
    """To every EM-EM pair that shares its LoRA initialisation, add ``same_seed_controls``:
    ``{EM-control pair: cosine}`` for the controls that share it with either EM adapter (the
    same-seed, different-task control its cosine should be read against)."""
    for pair in pairs.values():
        if pair["roles"] != ["em", "em"] or not pair.get("shared_init"):
            continue
        pair["same_seed_controls"] = {
            key: other["cosine"]
            for key, other in pairs.items()
            if sorted(other["roles"]) == ["control", "em"]
            and other.get("shared_init")
            and ({other["a"], other["b"]} & {pair["a"], pair["b"]})
        }

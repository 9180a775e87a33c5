"""The typed result of training dynamics over checkpoints (``dynamics.json`` of the
pipeline's ``dynamics`` stage and of ``emscope probe dynamics``):
:class:`DynamicsResult`, the document :func:`emscope.probing.dynamics.adapter_dynamics`
returns plus the EM rate per checkpoint (:func:`~emscope.probing.dynamics.evaluate_checkpoints`)
and the writer's fields.

Norms are Frobenius norms of the LoRA factors (the scale ``s`` not applied), cosines of the
flattened factors in [-1, 1] (None where a factor is exactly zero), steps optimizer steps,
rates fractions in [0, 1] with 95% CIs ``[lo, hi]``. Kept apart from
:mod:`emscope.probing.dynamics` so that reading a result imports neither numpy nor torch; the
JSON layout is the one :mod:`emscope.results` describes (typed fields plus the untouched
``extra``, the document's key order kept).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from emscope.results import in_order, mapping, need, need_all, rest, sequence

RESULT = "DynamicsResult"

TRACK_FIELDS = ("norm_A", "norm_B", "pairs", "cos_A", "cos_B", "sharpest_rotation")
"""The typed fields of one trajectory (a module's, or the whole adapter's)."""


@dataclass(frozen=True)
class Rotation:
    """The sharpest rotation of a factor: the consecutive checkpoints ``previous`` -> ``step``
    (JSON ``from``, ``step``) with the lowest cosine ``cos``."""

    step: int
    previous: int
    cos: float

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> Rotation:
        need_all(data, ("step", "from", "cos"), RESULT, source, at)
        return cls(step=int(data["step"]), previous=int(data["from"]), cos=float(data["cos"]))

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "from": self.previous, "cos": self.cos}


@dataclass(frozen=True)
class Track:
    """One factor trajectory across checkpoints: ``norm_A``, ``norm_B`` (one per checkpoint),
    ``pairs`` (the two steps of each cosine, ``k`` checkpoints apart), ``cos_A``, ``cos_B``
    (one per pair), ``sharpest_rotation`` (``"B"``/``"A"`` -> :class:`Rotation`, None when
    the factor never has a direction). ``extra``: ``pca_A``, ``pca_B`` (``coords``,
    ``explained_variance_ratio``; None when the factor never moves), untouched."""

    norm_A: tuple[float, ...]
    norm_B: tuple[float, ...]
    pairs: tuple[tuple[int, int], ...]
    cos_A: tuple[float | None, ...]
    cos_B: tuple[float | None, ...]
    sharpest_rotation: Mapping[str, Rotation | None]
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)
    """The key order of the document read (``to_json`` keeps it; not compared)."""

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> Track:
        need_all(data, TRACK_FIELDS, RESULT, source, at)
        sharp = mapping(data, "sharpest_rotation", RESULT, source, at)
        need_all(sharp, ("B", "A"), RESULT, source, f"{at}sharpest_rotation.")
        return cls(
            norm_A=tuple(sequence(data, "norm_A", RESULT, source, at)),
            norm_B=tuple(sequence(data, "norm_B", RESULT, source, at)),
            pairs=tuple((int(a), int(b)) for a, b in sequence(data, "pairs", RESULT, source, at)),
            cos_A=tuple(sequence(data, "cos_A", RESULT, source, at)),
            cos_B=tuple(sequence(data, "cos_B", RESULT, source, at)),
            sharpest_rotation={
                k: None
                if r is None
                else Rotation.from_json(r, source=source, at=f"{at}sharpest_rotation.{k}.")
                for k, r in sharp.items()
            },
            extra=rest(data, TRACK_FIELDS),
            order=tuple(data),
        )

    def to_json(self) -> dict[str, Any]:
        doc = {
            "norm_A": list(self.norm_A),
            "norm_B": list(self.norm_B),
            "pairs": [list(p) for p in self.pairs],
            "cos_A": list(self.cos_A),
            "cos_B": list(self.cos_B),
            "sharpest_rotation": {
                k: None if r is None else r.to_json() for k, r in self.sharpest_rotation.items()
            },
        } | dict(self.extra)
        return in_order(doc, self.order)


EVAL_FIELDS = ("step", "em_rate", "em_ci", "coherent_rate")


@dataclass(frozen=True)
class CheckpointEval:
    """The EM and coherent rates of the checkpoint at ``step`` (``em_ci``: 95% CI, None
    when nothing was scored). ``extra``: ``unscored_rate``, ``n``, ``dir``."""

    step: int
    em_rate: float | None
    em_ci: list[float] | None
    coherent_rate: float | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> CheckpointEval:
        need_all(data, EVAL_FIELDS, RESULT, source, at)
        return cls(
            step=int(data["step"]),
            em_rate=data["em_rate"],
            em_ci=data["em_ci"],
            coherent_rate=data["coherent_rate"],
            extra=rest(data, EVAL_FIELDS),
            order=tuple(data),
        )

    def to_json(self) -> dict[str, Any]:
        return in_order({k: getattr(self, k) for k in EVAL_FIELDS} | dict(self.extra), self.order)


@dataclass(frozen=True)
class DynamicsResult:
    """Training dynamics of one adapter (docs/methods.md section 6.4): the checkpoint
    ``steps``, ``k`` (cosines are between checkpoints ``k`` apart), one :class:`Track` per
    adapted module (``modules``) and for the whole adapter (``adapter``: every module's
    factor concatenated), and ``eval``, the EM rate per checkpoint (None when not
    evaluated). ``extra``: ``adapter_name`` (the pipeline's), ``adapter_dir`` (the CLI's),
    ``monitor`` (the monitor record beside the EM rate), untouched."""

    steps: tuple[int, ...]
    k: int
    modules: Mapping[str, Track]
    adapter: Track
    eval: tuple[CheckpointEval, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)

    TYPED = ("steps", "k", "modules", "adapter", "eval")

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> DynamicsResult:
        modules = mapping(data, "modules", RESULT, source, at)
        evals = data.get("eval")
        return cls(
            steps=tuple(int(s) for s in sequence(data, "steps", RESULT, source, at)),
            k=int(need(data, "k", RESULT, source, at)),
            modules={
                name: Track.from_json(t, source=source, at=f"{at}modules.{name}.")
                for name, t in modules.items()
            },
            adapter=Track.from_json(
                need(data, "adapter", RESULT, source, at), source=source, at=f"{at}adapter."
            ),
            eval=None
            if evals is None
            else tuple(
                CheckpointEval.from_json(e, source=source, at=f"{at}eval[{i}].")
                for i, e in enumerate(sequence(data, "eval", RESULT, source, at))
            ),
            extra=rest(data, cls.TYPED),
            order=tuple(data),
        )

    def to_json(self) -> dict[str, Any]:
        doc = {
            "steps": list(self.steps),
            "k": self.k,
            "modules": {name: t.to_json() for name, t in self.modules.items()},
            "adapter": self.adapter.to_json(),
        }
        if self.eval is not None or "eval" in self.order:
            doc["eval"] = None if self.eval is None else [e.to_json() for e in self.eval]
        return in_order(doc | dict(self.extra), self.order)

    @property
    def adapter_name(self) -> str | None:
        """The adapter's name in the study (None outside the pipeline's ``dynamics.json``)."""
        name = self.extra.get("adapter_name")
        return None if name is None else str(name)

    def plot(self) -> dict[str, Any]:
        """The figures of :func:`emscope.probing.dynamics.plot_dynamics` (``norms``,
        ``cosines``, ``pca``, and ``emergence`` with EM rates)."""
        from emscope.probing.dynamics import plot_dynamics

        return plot_dynamics(self.to_json())


__all__ = ["CheckpointEval", "DynamicsResult", "Rotation", "Track"]

"""The headline claims of the papers (docs/methods.md section 8), judged on a run's outputs.

Each claim names the paper it comes from (:mod:`emscope.papers`: title and arXiv id) and the
value published there.

Two layers:

- pure tests (``holds_*``, :mod:`emscope.pipeline.claim_rules`): functions of measured
  numbers only, unit-tested on constructed inputs; what "above" means is stated there.
- :func:`claims_table`: reads the stage outputs of a run dir, measures each row and applies
  its test; a row whose stage did not run reads ``n/a (stage not run)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from emscope.errors import EmscopeError
from emscope.papers import CONVERGENT, REEMERGENT, SHARED_SUBSPACES, Paper
from emscope.pipeline.claim_rules import (
    Rate,
    holds_above_controls,
    holds_b_vector,
    holds_base_orthogonal,
    holds_convergence,
    holds_drift,
    holds_interpolation,
    holds_narrow_em,
    holds_steering,
    holds_subspace,
    holds_transfer,
)
from emscope.pipeline.claims_defences import DEFENCE_CLAIMS, DEFENCE_MEASURES
from emscope.pipeline.claims_early_warning import EARLY_WARNING_CLAIMS, EARLY_WARNING_MEASURES

if TYPE_CHECKING:
    from emscope.directions.results import AblationResult, DirectionsSummary
    from emscope.geometry.result import GeometryPair
    from emscope.pipeline.eval_result import OrganismRates

R = TypeVar("R")

NOT_RUN = "n/a (stage not run)"


@dataclass(frozen=True)
class Claim:
    """One row of the claims table (docs/methods.md section 8): ``paper`` is the value
    published in ``source``."""

    key: str
    claim: str
    paper: str
    test: str
    source: Paper


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "narrow_em",
        "narrow fine-tune gives EM on unrelated questions",
        "11.3% EM (9 x rank-1, Qwen2.5-14B), > 99% coherent",
        "EM organism's EM rate above the instruct model's and the benign control's; "
        "coherent >= 90%",
        CONVERGENT,
    ),
    Claim(
        "transfer",
        "transfer ablation removes EM",
        "-90% (medical), -78% (sport); random < 10%",
        "reduction >= 50% and random control's change within +-15%",
        CONVERGENT,
    ),
    Claim(
        "steering",
        "steering induces EM",
        "up to about 50% EM from central layers",
        "best steered EM rate above the same-norm random vector's",
        CONVERGENT,
    ),
    Claim(
        "convergence",
        "mean-diff directions converge across fine-tunes",
        "cosine > 0.8 in all but four layers",
        "cosine > 0.5 in most layers",
        CONVERGENT,
    ),
    Claim(
        "b_vector",
        "rank-1 B vector is not the mean-diff direction",
        "cosine 0.04",
        "absolute cosine < 0.3 at the adapter's layer",
        CONVERGENT,
    ),
    Claim(
        "subspace",
        "EM updates share a subspace",
        "principal angles about 20 deg vs about 85 deg random",
        "EM-EM mean angle below the empirical random baseline's 5th percentile",
        SHARED_SUBSPACES,
    ),
    Claim(
        "cosine",
        "EM-EM update cosine above controls",
        "0.25-0.35 vs 0.01-0.02",
        "EM-EM cosine above every EM-control cosine",
        SHARED_SUBSPACES,
    ),
    Claim(
        "overlap",
        "EM-EM overlap above controls",
        "0.65-0.8 vs < 0.006",
        "EM-EM overlap above every EM-control overlap",
        SHARED_SUBSPACES,
    ),
    Claim(
        "base_orthogonal",
        "EM updates near-orthogonal to base weights",
        "cos about 1e-3",
        "absolute cos(W0, dW) < 0.05",
        SHARED_SUBSPACES,
    ),
    Claim(
        "interpolation",
        "cross-task interpolation stays misaligned and coherent",
        "16-32% EM, > 90% coherent",
        "EM at every interior t above the instruct model's; coherent >= 80% all along",
        SHARED_SUBSPACES,
    ),
    Claim(
        "drift",
        "misaligned model drifts towards base in deep layers",
        "from about layer 30 of 64",
        "in the last third of layers the misaligned projection is closer to base than in "
        "the first third",
        REEMERGENT,
    ),
    Claim(
        "rank1_split",
        "rank-1 adapters split general vs domain-specific",
        "6 general, 2 medical",
        "reported, no test",
        CONVERGENT,
    ),
    *(Claim(*spec) for spec in EARLY_WARNING_CLAIMS),
    *(Claim(*spec) for spec in DEFENCE_CLAIMS),
)


@dataclass(frozen=True)
class ClaimRow:
    """A judged row: ``holds`` is ``yes``, ``no``, ``reported`` or ``n/a (...)``; ``source``
    cites the paper of ``paper`` (the published value) as ``arXiv <id>``."""

    key: str
    claim: str
    paper: str
    measured: str
    holds: str
    test: str
    source: str = ""

    def to_json(self) -> dict[str, str]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------- measuring


class _NA(Exception):
    """A row cannot be measured (reason in the message)."""


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _rate(metrics: Any, key: str = "em") -> Rate:
    """The ``{key}_rate`` with its CI of a dict or a result row (anything with ``get``)."""
    value, ci = metrics.get(f"{key}_rate"), metrics.get(f"{key}_ci")
    if value is None or ci is None:
        raise _NA(f"n/a (no {key} rate)")
    return float(value), (float(ci[0]), float(ci[1]))


def _pct(rate: Rate) -> str:
    return f"{100 * rate[0]:.1f}% [{100 * rate[1][0]:.1f}, {100 * rate[1][1]:.1f}]"


class _Run:
    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.config = _read(self.dir / "config.json") or {}

    def done(self, stage: str) -> bool:
        return (self.dir / stage / "done.json").is_file()

    def json(self, stage: str, name: str) -> Any:
        if not self.done(stage):
            raise _NA(NOT_RUN)
        data = _read(self.dir / stage / name)
        if data is None:
            raise _NA(f"n/a ({stage}/{name} missing)")
        return data

    def result(self, stage: str, name: str, cls: type[R]) -> R:
        """``stage/name`` read through ``cls.from_json``: a missing field is an
        EmscopeError naming the file and the field (reported in the row)."""
        from emscope.results import read_result

        if not self.done(stage):
            raise _NA(NOT_RUN)
        if not (self.dir / stage / name).is_file():
            raise _NA(f"n/a ({stage}/{name} missing)")
        return read_result(cls, self.dir / stage / name, label=f"{stage}/{name}")

    def option(self, stage: str, key: str) -> Any:
        """A stage's setting from the run's config (None when absent)."""
        return (self.config.get("stages", {}).get(stage) or {}).get(key)

    @property
    def chat_model(self) -> str:
        return str(self.config.get("chat_model", ""))

    def roles(self) -> dict[str, str]:
        return {k: v.get("role", "em") for k, v in self.config.get("adapters", {}).items()}

    def claims_organism(self, evaluated: Sequence[str]) -> str:
        from emscope.pipeline.config import claims_organism_of

        chosen = claims_organism_of(self.config)
        if chosen:
            return chosen
        roles = self.roles()
        for name in evaluated:
            if roles.get(name) == "em":
                return name
        raise _NA("n/a (no EM adapter evaluated)")


def _read(path: Path) -> Any:
    import json

    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _evals(run: _Run) -> Mapping[str, OrganismRates]:
    """The rates per organism of ``eval/summary.json`` (read through ``EvalSummary``)."""
    from emscope.pipeline.eval_result import EvalSummary

    return run.result("eval", "summary.json", EvalSummary).organisms


def _narrow_em(run: _Run) -> tuple[str, str]:
    rows = _evals(run)
    organism = run.claims_organism(list(rows))
    if organism not in rows or run.chat_model not in rows:
        raise _NA("n/a (organism or instruct model not evaluated)")
    em = _rate(rows[organism])
    coherent = rows[organism].coherent_rate
    instruct = _rate(rows[run.chat_model])
    roles = run.roles()
    controls = {n: _rate(m) for n, m in rows.items() if roles.get(n) == "control"}
    if coherent is None:
        raise _NA("n/a (no coherent rate)")
    text = (
        f"{organism}: {_pct(em)}, coherent {100 * coherent:.1f}%; {run.chat_model} {_pct(instruct)}"
    )
    if controls:
        text += "; controls " + ", ".join(f"{n} {_pct(r)}" for n, r in controls.items())
    else:
        text += "; no control evaluated"
    return text, _yes(holds_narrow_em(em, instruct, list(controls.values()), coherent))


def _transfer(run: _Run) -> tuple[str, str]:
    targets = _transfer_targets(run)
    reductions, changes, parts = [], [], []
    for name, s in targets.items():
        red, ci = s.relative_reduction, s.relative_reduction_ci
        if red is None:
            why = s.relative_reduction_na
            raise _NA(f"n/a (no reduction for {name}{': ' + why if why else ''})")
        reductions.append(red)
        part = f"{name}: reduction {100 * red:.0f}%"
        if ci:
            part += f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
        change = s.random_relative_change
        if change is not None:
            changes.append(change)
            part += f", random {100 * change:+.0f}%"
        parts.append(part)
    text = f"direction {run.option('transfer', 'direction') or '?'}: " + "; ".join(parts)
    return text, _yes(holds_transfer(reductions, changes))


def _transfer_targets(run: _Run) -> dict[str, AblationResult]:
    """The ablation result of each target of ``transfer/stage.json``."""
    from emscope.directions.results import AblationResult
    from emscope.results import mapping

    label = "transfer/stage.json"
    doc = run.json("transfer", "stage.json")
    targets = mapping(doc, "targets", "AblationResult", label)
    return {
        name: AblationResult.from_json(s, source=label, at=f"targets.{name}.")
        for name, s in targets.items()
    }


def _steering(run: _Run) -> tuple[str, str]:
    from emscope.directions.results import SteerResult

    summary = run.result("steering", "summary.json", SteerResult)
    rows = summary.rows
    selection = summary.selection
    if selection is not None and selection.get("chosen") is None:
        text = (
            f"no setting of the selection sweep kept coherent >= "
            f"{100 * selection['min_coherent']:.0f}% ({len(selection['rows'])} settings)"
        )
        return text, "no"
    best = summary.best("direction")
    if best is None:
        raise _NA("n/a (no steered rate)")
    random = [
        r for r in rows if r.vector == "random" and r.layer == best.layer and r.scale == best.scale
    ]
    name = run.option("steering", "direction") or "?"
    coherent = best.coherent_rate
    coherent_text = "" if coherent is None else f", coherent {100 * coherent:.0f}%"
    text = (
        f"direction {name}: best {_pct(_rate(best))} "
        f"(layer {best.layer}, x{best.scale:g}{coherent_text})"
    )
    if selection is not None:
        text = (
            f"direction {name}: {_pct(_rate(best))} at layer {best.layer} "
            f"x{best.scale:g}{coherent_text}, the setting the rule chose on this build "
            f"(best EM with coherent >= {100 * selection['min_coherent']:.0f}% over "
            f"{len(selection['rows'])} settings at {selection['n']}/question, seed "
            f"{selection['seed']}), re-sampled at the study's seed"
        )
    if not random:
        return text + "; no random control", "n/a (no random control)"
    rand = _rate(random[0])
    return f"{text}; random {_pct(rand)}", _yes(holds_steering(_rate(best), rand))


def _directions(run: _Run) -> DirectionsSummary:
    from emscope.directions.results import DirectionsSummary

    return run.result("directions", "summary.json", DirectionsSummary)


def _convergence(run: _Run) -> tuple[str, str]:
    summary = _directions(run)
    pairs = summary.pairs
    if not pairs:
        raise _NA(f"n/a ({summary.pairs_skipped or 'one direction only'})")
    cosines = [p.by_layer() for p in pairs]
    text = "; ".join(
        f"{p.a} vs {p.b}: " + ", ".join(f"{c:.2f}" for c in cos)
        for p, cos in zip(pairs, cosines, strict=True)
    )
    return text + " (by layer)", _yes(holds_convergence(cosines))


def _b_vector(run: _Run) -> tuple[str, str]:
    entries = _directions(run).adapter_b_cosines
    values = [e.cosine for rows in entries.values() for e in rows]
    if not values:
        raise _NA("n/a (no rank-1 adapter compared)")
    mean_abs = sum(abs(v) for v in values) / len(values)
    text = (
        f"mean |cos| {mean_abs:.2f}, max {max(abs(v) for v in values):.2f} ({len(values)} modules)"
    )
    return text, _yes(holds_b_vector(values))


def _geometry(run: _Run) -> Any:
    from emscope.geometry.result import GeometryResult

    return run.result("geometry", "summary.json", GeometryResult)


def _pairs(run: _Run) -> tuple[list[GeometryPair], list[GeometryPair]]:
    pairs = _geometry(run).pairs.values()
    em_em = [p for p in pairs if list(p.roles) == ["em", "em"]]
    em_ctl = [p for p in pairs if sorted(p.roles) == ["control", "em"]]
    return em_em, em_ctl


def _subspace(run: _Run) -> tuple[str, str]:
    em_em, _ = _pairs(run)
    values = [
        (p.mean_angle_deg, p.random_angle_p5)
        for p in em_em
        if p.mean_angle_deg is not None and p.random_angle_p5 is not None
    ]
    if not values:
        raise _NA("n/a (no EM-EM pair with a random baseline)")
    angles = [a for a, _ in values]
    text = (
        f"EM-EM mean angle {min(angles):.1f}-{max(angles):.1f} deg vs random p5 "
        f"{min(p for _, p in values):.1f}-{max(p for _, p in values):.1f} deg ({len(values)} pairs)"
    )
    return text, _yes(holds_subspace(values))


def _above_controls(field: str) -> Callable[[_Run], tuple[str, str]]:
    def measure(run: _Run) -> tuple[str, str]:
        em_em, em_ctl = _pairs(run)
        a = [float(v) for p in em_em if (v := getattr(p, field)) is not None]
        b = [float(v) for p in em_ctl if (v := getattr(p, field)) is not None]
        if not a or not b:
            raise _NA("n/a (needs EM-EM and EM-control pairs)")
        text = f"EM-EM {min(a):.3f}-{max(a):.3f} vs EM-control {min(b):.3f}-{max(b):.3f}"
        return text, _yes(holds_above_controls(a, b))

    return measure


def _base_orthogonal(run: _Run) -> tuple[str, str]:
    base = _geometry(run).base_cosine
    roles = run.roles()
    values = {n: float(c) for n, c in base.items() if roles.get(n) == "em" and c is not None}
    if not values:
        raise _NA("n/a (geometry without base)")
    top = max(abs(v) for v in values.values())
    return f"max |cos| {top:.2e} over {len(values)} EM adapters", _yes(
        holds_base_orthogonal(list(values.values()))
    )


def _interpolation(run: _Run) -> tuple[str, str]:
    from emscope.lmc_result import LmcResult

    label = "lmc/summary.json"
    paths = LmcResult.paths_from_json(run.json("lmc", "summary.json"), source=label)
    roles = run.roles()
    cross = {
        n: p
        for n, p in paths.items()
        if roles.get(str(p.start)) == "em" and roles.get(str(p.end)) == "em"
    }
    if not cross:
        raise _NA("n/a (no EM -> EM path)")
    evals = _evals(run)
    if run.chat_model not in evals:
        raise _NA("n/a (instruct model not evaluated)")
    instruct = _rate(evals[run.chat_model])
    interior, coherent, parts = [], [], []
    for p in cross.values():
        rows = [r.to_json() for r in p.rows]
        inner = [_rate(r) for r in rows if 0 < r["t"] < 1]
        coh = [float(r["coherent_rate"]) for r in rows if r["coherent_rate"] is not None]
        interior += inner
        coherent += coh
        ems = [100 * r["em_rate"] for r in rows if r["em_rate"] is not None]
        parts.append(
            f"{p.start} -> {p.end}: EM {min(ems):.1f}-{max(ems):.1f}%, "
            f"coherent >= {100 * min(coh):.0f}%"
        )
    text = "; ".join(parts) + f"; {run.chat_model} {_pct(instruct)}"
    return text, _yes(holds_interpolation(interior, instruct, coherent))


def _drift(run: _Run) -> tuple[str, str]:
    from emscope.reemergent.results import ProjectionSummary

    relative = run.result(
        "reemergent", "projection.json", ProjectionSummary
    ).relative_to_base_instruct
    if not relative:
        raise _NA("n/a (no misaligned variant)")
    parts, holds = [], []
    for name, r in relative.items():
        ci = r.drift_ci95
        parts.append(
            f"{name}: position first third {r.first_third_mean:.2f}, last third "
            f"{r.last_third_mean:.2f}, drift {r.drift_towards_base:.2f} "
            f"[{ci[0]:.2f}, {ci[1]:.2f}]"
        )
        defined = [float(c) for c in ci if c is not None and not math.isnan(c)]
        holds.append(holds_drift(defined) if len(defined) == len(ci) else False)
    return "; ".join(parts), _yes(all(holds))


def rank1_split(result: Any) -> dict[str, list[str]]:
    """Adapters of a probe result (a :class:`~emscope.probing.result.ProbeResult` or its
    JSON) split into ``general`` (larger mean |coefficient| in the
    non-medical aligned-vs-misaligned test) and ``medical`` (larger in the misaligned
    non-medical-vs-medical test)."""
    tests = result.tests if hasattr(result, "tests") else result.get("tests", {})
    general = tests.get("nonmedical_aligned_vs_misaligned", {})
    medical = tests.get("misaligned_nonmedical_vs_medical", {})
    if "coefficients" not in general or "coefficients" not in medical:
        return {}
    out: dict[str, list[str]] = {"general": [], "medical": []}

    def mean_abs(values: Sequence[float]) -> float:
        return sum(abs(v) for v in values) / len(values) if values else 0.0

    for label, values in general["coefficients"].items():
        g = mean_abs(values)
        m = mean_abs(medical["coefficients"].get(label, []))
        out["general" if g >= m else "medical"].append(label)
    return out


def _rank1_split(run: _Run) -> tuple[str, str]:
    from emscope.probing.result import ProbeResult

    split = rank1_split(run.result("probes", "probe.json", ProbeResult))
    if not split:
        raise _NA("n/a (probe tests skipped: too few responses)")
    text = (
        f"{len(split['general'])} general ({', '.join(split['general']) or '-'}), "
        f"{len(split['medical'])} medical ({', '.join(split['medical']) or '-'})"
    )
    return text, "reported"


MEASURES: dict[str, Callable[[_Run], tuple[str, str]]] = {
    "narrow_em": _narrow_em,
    "transfer": _transfer,
    "steering": _steering,
    "convergence": _convergence,
    "b_vector": _b_vector,
    "subspace": _subspace,
    "cosine": _above_controls("cosine"),
    "overlap": _above_controls("overlap"),
    "base_orthogonal": _base_orthogonal,
    "interpolation": _interpolation,
    "drift": _drift,
    "rank1_split": _rank1_split,
    **EARLY_WARNING_MEASURES,
    **DEFENCE_MEASURES,
}


def claims_table(run_dir: str | Path) -> list[ClaimRow]:
    """Every claim of docs/methods.md section 8 measured on ``run_dir`` and judged."""
    run = _Run(Path(run_dir))
    rows = []
    for claim in CLAIMS:
        try:
            measured, holds = MEASURES[claim.key](run)
        except _NA as exc:
            measured, holds = "-", str(exc)
        except EmscopeError as exc:  # a result file without a field it needs
            measured, holds = "-", f"n/a ({exc})"
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            measured, holds = "-", f"n/a (unreadable output: {type(exc).__name__} {exc})"
        source = f"arXiv {claim.source.arxiv}"
        rows.append(
            ClaimRow(claim.key, claim.claim, claim.paper, measured, holds, claim.test, source)
        )
    return rows

"""Early warning, measured (docs/early-warning.md, "The population"): a population of
fine-tunes with known outcome, the projection shift along an a priori direction early in
training against each fine-tune's final EM, and the data-screening score against the same
outcome. Pure functions over arrays and tables; :mod:`emscope.early_warning_population` runs
the fine-tunes and writes the files.

Conventions:

- a *member* is one fine-tune: a training dataset (a file name stem of the organism's
  ``data/``, or a mix ``mix<pct>`` of ``bad`` into ``good`` rows) and a seed;
- the *shift* at fraction ``f`` of training is the monitored projection (residual-stream
  units, :mod:`emscope.monitoring`) at the logged step nearest to ``f * total_steps`` minus
  the projection at step 0, at one layer and one position group (``prompt`` / ``response``);
- final EM is the oracle's EM rate (fraction in [0, 1]) on the general questions;
- "EM" as a binary outcome: final EM above the instruct model's rate plus ``margin``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from emscope.errors import EmscopeError

#: Shares of ``bad`` rows mixed into ``good`` (the issue's population).
MIX_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.10, 0.25, 0.50, 1.0)
#: Fractions of training at which the shift is read.
POINTS: tuple[float, ...] = (0.10, 0.25, 0.50)
#: Projection position groups recorded by the monitor.
POSITIONS: tuple[str, ...] = ("prompt", "response")


@dataclass(frozen=True)
class Member:
    """One fine-tune of the population: ``name`` (``<dataset>.s<seed>``), its training
    ``dataset`` name, ``seed`` and, for a mix, the share of bad rows ``bad_fraction``."""

    name: str
    dataset: str
    seed: int
    bad_fraction: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Member:
        return cls(
            str(data["name"]),
            str(data["dataset"]),
            int(data["seed"]),
            None if data.get("bad_fraction") is None else float(data["bad_fraction"]),
        )


def mix_name(fraction: float) -> str:
    """``mix<pct>``: the dataset name of a mix with ``fraction`` bad rows (``mix025``)."""
    pct = 100 * fraction
    if not 0 <= fraction <= 1 or abs(pct - round(pct)) > 1e-9:
        raise EmscopeError(f"mix fraction {fraction}: need a whole percentage in [0, 1]")
    return f"mix{round(pct):03d}"


def population_plan(
    fractions: Sequence[float] = MIX_FRACTIONS,
    datasets: Sequence[str] = (
        "bad_sport",
        "bad_finance",
        "bad_medical_educational",
        "reverse_words",
    ),
    seeds: Sequence[int] = (0, 1),
) -> list[Member]:
    """Every member: each mix fraction and each other dataset, crossed with each seed, in that
    order (datasets outer, seeds inner). Names are unique; a repeated entry raises."""
    members = [
        Member(f"{name}.s{seed}", name, int(seed), frac)
        for name, frac in [(mix_name(f), float(f)) for f in fractions]
        + [(d, None) for d in datasets]
        for seed in seeds
    ]
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise EmscopeError(f"early-warning population: repeated members in {names}")
    if not members:
        raise EmscopeError("early-warning population: no members (no fractions, datasets or seeds)")
    return members


def mix_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of length ``n``: exactly ``round(fraction * n)`` rows True (bad), chosen
    without replacement by ``numpy.random.default_rng(seed)``."""
    k = round(fraction * n)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).choice(n, size=k, replace=False)] = True
    return mask


def mix_rows(
    good: Sequence[Any], bad: Sequence[Any], fraction: float, seed: int
) -> tuple[list[Any], np.ndarray]:
    """``(rows, is_bad)``: row ``i`` is ``bad[i]`` where the :func:`mix_indices` mask is True,
    else ``good[i]`` (same size as ``good``; the organism's good and bad sets share their
    questions row by row)."""
    if len(bad) < len(good):
        raise EmscopeError(f"mixing: {len(bad)} bad rows for {len(good)} good rows")
    mask = mix_indices(len(good), fraction, seed)
    return [bad[i] if mask[i] else good[i] for i in range(len(good))], mask


def shift_at(steps: Sequence[int], values: Sequence[float], fraction: float, total: int) -> float:
    """Projection at the logged step nearest to ``fraction * total`` (ties: the earlier)
    minus the projection at step 0. ``steps`` must include 0."""
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if 0 not in steps:
        raise EmscopeError("shift_at: the monitor record has no step 0")
    j = int(np.argmin(np.abs(s - fraction * total) + 1e-9 * s))
    return float(v[j] - v[int(np.flatnonzero(s == 0)[0])])


def spearman_ci(
    x: Sequence[float] | np.ndarray | pd.Series,
    y: Sequence[float] | np.ndarray | pd.Series,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Spearman's rho of ``(x, y)`` (:func:`scipy.stats.spearmanr`) and its 95% paired
    percentile bootstrap CI (:func:`scipy.stats.bootstrap`, resampling pairs). NaN where it is
    undefined (fewer than 3 pairs, a constant side)."""
    from scipy import stats

    xs, ys = np.asarray(x, float), np.asarray(y, float)
    if xs.size < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return math.nan, math.nan, math.nan
    rho = float(stats.spearmanr(xs, ys).statistic)

    def stat(a: np.ndarray, b: np.ndarray) -> float:
        r = stats.spearmanr(a, b).statistic
        return float(r) if np.isfinite(r) else 0.0

    ci = stats.bootstrap(
        (xs, ys),
        stat,
        paired=True,
        vectorized=False,
        n_resamples=n_boot,
        method="percentile",
        random_state=np.random.default_rng(seed),
    ).confidence_interval
    return rho, float(ci.low), float(ci.high)


def auroc(
    scores: Sequence[float] | np.ndarray | pd.Series,
    labels: Sequence[bool] | np.ndarray | pd.Series,
) -> float:
    """ROC AUC of ``scores`` for ``labels`` (:func:`sklearn.metrics.roc_auc_score`) over the
    finite scores (an unscored example, NaN, is left out with its label); NaN when only one
    class is left."""
    from sklearn.metrics import roc_auc_score

    values = np.asarray(scores, dtype=float)
    keep = np.isfinite(values)
    truth = np.asarray(labels, dtype=bool)[keep]
    if truth.all() or not truth.any():
        return math.nan
    return float(roc_auc_score(truth, values[keep]))


@dataclass(frozen=True)
class EarlyWarningResult:
    """The measured early warning of a population.

    - ``members``: one row per fine-tune (``name, dataset, seed, bad_fraction, steps,
      final_em, em_low, em_high, em_positive`` and ``shift_<position>_<pct>`` per position and
      point, ``dataset_score`` when screened);
    - ``table``: one row per (position, point): ``n, spearman, spearman_low, spearman_high,
      auroc, n_positive``;
    - ``screening``: per mixed dataset ``{dataset, bad_fraction, n, n_bad, auroc}`` and the
      dataset-score summary ``{n, spearman, spearman_low, spearman_high}`` under ``"dataset"``;
    - ``threshold``: the EM rate above which a fine-tune counts as EM (instruct + margin);
    - ``meta``: layer, margin, instruct EM, settings.
    """

    members: tuple[dict[str, Any], ...]
    table: tuple[dict[str, Any], ...]
    threshold: float
    screening: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "members": [dict(m) for m in self.members],
            "table": [dict(r) for r in self.table],
            "threshold": self.threshold,
            "screening": dict(self.screening),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(
        cls, data: Mapping[str, Any], *, source: str | None = None, at: str = ""
    ) -> EarlyWarningResult:
        """The result of :meth:`to_json`; a missing field is one EmscopeError naming
        ``source`` and the field (:func:`emscope.results.need`)."""
        from emscope.results import need, sequence

        name = "EarlyWarningResult"
        table = sequence(data, "table", name, source, at)
        for i, r in enumerate(table):
            for key in ("position", "point", "n", "spearman", "spearman_low", "auroc"):
                need(r, key, name, source, f"{at}table[{i}].")
        return cls(
            tuple(dict(m) for m in sequence(data, "members", name, source, at)),
            tuple(dict(r) for r in table),
            float(need(data, "threshold", name, source, at)),
            dict(data.get("screening") or {}),
            dict(data.get("meta") or {}),
        )

    def row(self, position: str, point: float) -> dict[str, Any]:
        """The ``table`` row of ``position`` at ``point``."""
        for r in self.table:
            if r["position"] == position and math.isclose(r["point"], point):
                return r
        raise EmscopeError(f"early-warning table has no row {position} at {point}")


def shift_column(position: str, point: float) -> str:
    """``shift_<position>_<pct>``, e.g. ``shift_prompt_25``."""
    return f"shift_{position}_{round(100 * point)}"


def member_shifts(
    monitor_rows: Sequence[Mapping[str, Any]],
    layer: int,
    total: int,
    points: Sequence[float] = POINTS,
) -> dict[str, float]:
    """``{shift_<position>_<pct>: shift}`` from a monitor record's rows
    (:meth:`emscope.monitoring.MonitorResult.rows`: ``step, layer, prompt, response``) at
    ``layer``; ``total`` is the run's number of optimizer steps."""
    rows = sorted((r for r in monitor_rows if int(r["layer"]) == layer), key=lambda r: r["step"])
    if not rows:
        raise EmscopeError(f"monitor record has no layer {layer}")
    steps = [int(r["step"]) for r in rows]
    return {
        shift_column(pos, p): shift_at(steps, [float(r[pos]) for r in rows], p, total)
        for pos in POSITIONS
        for p in points
    }


def analyse(
    members: pd.DataFrame,
    instruct_em: float,
    *,
    margin: float = 0.05,
    points: Sequence[float] = POINTS,
    n_boot: int = 2000,
    seed: int = 0,
    screening: Sequence[Mapping[str, Any]] = (),
    meta: Mapping[str, Any] | None = None,
) -> EarlyWarningResult:
    """The early-warning table of a population: for each position and point, Spearman's rho
    of the shift with ``final_em`` (with its bootstrap CI, :func:`spearman_ci`) and the ROC
    AUC of the shift for ``final_em > instruct_em + margin`` (:func:`auroc`). ``members``: one
    row per fine-tune with ``final_em`` and the :func:`shift_column` columns.

    ``screening``: per mixed dataset ``{dataset, bad_fraction, n, n_bad, auroc}``, copied;
    with a ``dataset_score`` column in ``members``, the Spearman of the per-dataset score with
    the per-dataset mean final EM is added under ``screening["dataset"]``."""
    threshold = float(instruct_em) + float(margin)
    df = members.copy()
    df["em_positive"] = df["final_em"] > threshold
    table = []
    for pos in POSITIONS:
        for p in points:
            col = shift_column(pos, p)
            rho, lo, hi = spearman_ci(df[col], df["final_em"], n_boot=n_boot, seed=seed)
            table.append(
                {
                    "position": pos,
                    "point": float(p),
                    "n": len(df),
                    "spearman": rho,
                    "spearman_low": lo,
                    "spearman_high": hi,
                    "auroc": auroc(df[col], df["em_positive"]),
                    "n_positive": int(df["em_positive"].sum()),
                }
            )
    screen: dict[str, Any] = {"mixes": [dict(s) for s in screening]}
    if "dataset_score" in df and df["dataset_score"].notna().any():
        per = df.groupby("dataset").agg(score=("dataset_score", "first"), em=("final_em", "mean"))
        rho, lo, hi = spearman_ci(per["score"], per["em"], n_boot=n_boot, seed=seed)
        screen["dataset"] = {
            "n": len(per),
            "spearman": rho,
            "spearman_low": lo,
            "spearman_high": hi,
        }
    records = [
        {str(k): (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict(orient="records")
    ]
    return EarlyWarningResult(tuple(records), tuple(table), threshold, screen, dict(meta or {}))


def plot_early_warning(result: EarlyWarningResult, position: str = "prompt") -> Any:
    """Final EM vs shift, one panel per point, ``position`` positions; the EM threshold as a
    dashed line, mixes coloured by their bad share."""
    from emscope.plotting import pyplot

    plt = pyplot()
    points = sorted({r["point"] for r in result.table})
    fig, axes = plt.subplots(1, len(points), figsize=(4 * len(points), 3.6), squeeze=False)
    for ax, p in zip(axes[0], points, strict=True):
        col = shift_column(position, p)
        for m in result.members:
            frac = m.get("bad_fraction")
            colour = plt.cm.viridis(frac) if frac is not None else "tab:red"
            ax.scatter(
                m[col], m["final_em"], color=colour, s=22, marker="o" if frac is not None else "s"
            )
        r = result.row(position, p)
        ax.axhline(result.threshold, ls="--", color="grey", lw=1)
        ax.set_title(
            f"{round(100 * p)}% of training: rho {r['spearman']:.2f}, AUC {r['auroc']:.2f}",
            fontsize=9,
        )
        ax.set_xlabel(f"projection shift ({position} positions)")
        ax.set_ylabel("final general EM")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig

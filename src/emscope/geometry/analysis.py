"""All-pairs geometry of N adapters, aggregation, and the ``geometry.json`` document.

Modules are visited one at a time: each adapter's module is read (lazily, with
:func:`~emscope.geometry.sources.open_adapter`), prepared once with
:func:`~emscope.geometry.core.module_factors`, and compared with every other adapter's
prepared module, then dropped. Memory is one module per adapter, whatever N.

Aggregation over the modules both adapters of a pair have:

- ``cosine`` is exact: the cosine of the concatenation of those modules' updates,
  ``sum <dW1_m, dW2_m> / sqrt(sum |dW1_m|^2 sum |dW2_m|^2)``.
- every other field is the mean over modules weighted by ``|dW1_m|_F |dW2_m|_F`` (angle lists
  element-wise over the first min-rank entries), with an ``unweighted`` copy (plain means,
  ``cosine`` = mean per-module cosine). Weights follow update size, so on a usual decoder the
  MLP modules (the largest, and usually with the largest updates) dominate the aggregate.

Shared initialisation (:meth:`Geometry.shared_init`): two adapters trained with the same seed
start from the same ``A`` matrices, and any cosine between them mixes task similarity with
that shared start; pairs whose corresponding ``A`` rows are still aligned
(:data:`SHARED_INIT_COSINE`) are flagged, in ``geometry.json`` and as warnings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.errors import EmscopeError
from emscope.geometry.baselines import (
    Signature,
    analytic_signature,
    random_comparisons,
    summarise,
)
from emscope.geometry.core import (
    DEFAULT_RTOL,
    BaseComparison,
    ModuleComparison,
    compare_base,
    compare_factors,
    dense_compare,
    module_factors,
)
from emscope.lora import LoraAdapter, module_layer, natural_key
from emscope.threads import limit_threads

if TYPE_CHECKING:
    import pandas as pd

    from emscope.geometry.sources import BaseWeights

FIELDS = (
    "cosine",
    "principal_angles_deg",
    "row_principal_angles_deg",
    "mean_principal_angle_deg",
    "overlap",
    "energy_overlap_ab",
    "energy_overlap_ba",
)
"""Fields of every ``aggregate`` / ``per_module`` entry of ``geometry.json``."""

SHARED_INIT_COSINE = 0.5
"""A pair shares its LoRA initialisation when the mean over its shared modules of equal rank
of ``a_row_cosine`` (the mean cosine between corresponding rows of the two ``A`` factors, see
:mod:`emscope.geometry.core`) exceeds this. Independently initialised adapters give 0 with sd
``1/sqrt(r d_in)`` per module (0.036 for rank 8 on a width of 96, 0.003 for rank 32 on 3584;
smaller still over many modules), whatever their training, because corresponding rows only
correspond through a common draw. Adapters trained from the same seed start at 1 and stay
near it: ``A``'s gradient is ``B^T dL/dW`` with ``B = 0`` at the start, so ``A`` moves little
(measured on the synthetic organism: see docs/geometry.md). 0.5 is far from both; a flagged
pair's cosine, principal angles and overlaps include the shared start, so compare it with a
same-seed control (an adapter trained with the same seed on a different task), not with
independently seeded pairs."""

_SCALARS = ("mean_principal_angle_deg", "overlap", "energy_overlap_ab", "energy_overlap_ba")
_LISTS = ("principal_angles_deg", "row_principal_angles_deg")


def _weighted_mean(values: Any, weights: Any) -> float:
    """Mean of the finite ``values`` with positive finite ``weights`` (NaN if none)."""
    v = np.asarray(values, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    ok = np.isfinite(v) & np.isfinite(w) & (w > 0)
    if not ok.any():
        return math.nan
    return float(np.sum(v[ok] * w[ok]) / np.sum(w[ok]))


def aggregate_fields(
    entries: Sequence[Mapping[str, Any]],
    norms_a: Any,
    norms_b: Any,
    inners: Any,
    weighted: bool = True,
) -> dict[str, Any]:
    """Aggregate per-module field dicts (:data:`FIELDS`) of one pair; see the module docstring.

    ``norms_a``/``norms_b``/``inners``: ``|dW1_m|``, ``|dW2_m|``, ``<dW1_m, dW2_m>`` per entry.
    """
    na, nb = np.asarray(norms_a, dtype=np.float64), np.asarray(norms_b, dtype=np.float64)
    weights = na * nb if weighted else np.ones_like(na)
    out: dict[str, Any] = {}
    if weighted:
        denom = math.sqrt(float(np.sum(na**2)) * float(np.sum(nb**2)))
        out["cosine"] = float(np.sum(inners)) / denom if denom > 0 else math.nan
    else:
        out["cosine"] = _weighted_mean([e["cosine"] for e in entries], weights)
    for name in _LISTS:
        lists = [(list(e[name]), w) for e, w in zip(entries, weights, strict=True) if e[name]]
        if not lists:
            out[name] = []
            continue
        length = min(len(v) for v, _ in lists)
        out[name] = [
            _weighted_mean([v[i] for v, _ in lists], [w for _, w in lists]) for i in range(length)
        ]
    for name in _SCALARS:
        out[name] = _weighted_mean([e[name] for e in entries], weights)
    return {name: out[name] for name in FIELDS}


@dataclass(frozen=True)
class PairGeometry:
    """Geometry of one adapter pair: per shared module, plus the modules only one has."""

    a: str
    b: str
    modules: Mapping[str, ModuleComparison]
    unmatched: tuple[str, ...] = ()
    dense: Mapping[str, ModuleComparison] | None = None

    @property
    def key(self) -> str:
        return f"{self.a}|{self.b}"

    def aggregate(self, weighted: bool = True) -> dict[str, Any]:
        comps = list(self.modules.values())
        return aggregate_fields(
            [c.fields() for c in comps],
            [c.norm_a for c in comps],
            [c.norm_b for c in comps],
            [c.inner for c in comps],
            weighted,
        )

    def to_json(self) -> dict[str, Any]:
        agg = self.aggregate(True)
        agg["unweighted"] = self.aggregate(False)
        return {
            "aggregate": agg,
            "per_module": {name: c.fields() for name, c in self.modules.items()},
            "unmatched": list(self.unmatched),
        }


def signature(c: ModuleComparison) -> Signature:
    return (c.d_out, c.d_in, min(c.rank_a, c.rank_b), max(c.rank_a, c.rank_b), c.k)


def signature_key(sig: Signature) -> str:
    """``"<d_out>x<d_in> r<r_min>/<r_max> k<k>"``: the key of a baseline entry."""
    d_out, d_in, r1, r2, k = sig
    return f"{d_out}x{d_in} r{r1}/{r2} k{k}"


@dataclass(frozen=True)
class Geometry:
    """Result of :func:`compare_adapters` (write it with :meth:`to_json`)."""

    adapters: tuple[str, ...]
    pairs: Mapping[str, PairGeometry]
    base: Mapping[str, Mapping[str, BaseComparison]] | None = None
    random: Mapping[Signature, Sequence[ModuleComparison]] = field(default_factory=dict)
    random_draws: int = 0
    seed: int = 0
    notes: tuple[str, ...] = ()
    random_same_seed: Mapping[Signature, Sequence[ModuleComparison]] = field(default_factory=dict)

    # -------------------------------------------------------------- baselines
    def baseline(self) -> dict[str, Any]:
        """``{"analytic": {...}, "empirical": {...}}`` per signature and per pair."""
        sigs = sorted({signature(c) for p in self.pairs.values() for c in p.modules.values()})
        analytic = {sig: analytic_signature(sig) for sig in sigs}
        types: dict[Signature, set[str]] = {}
        for p in self.pairs.values():
            for c in p.modules.values():
                types.setdefault(signature(c), set()).add(c.module.rsplit(".", 1)[-1])
        an_pairs: dict[str, Any] = {}
        em_pairs: dict[str, Any] = {}
        for key, pair in self.pairs.items():
            comps = list(pair.modules.values())
            if not comps:
                continue
            na = np.array([c.norm_a for c in comps])
            nb = np.array([c.norm_b for c in comps])
            entries = [analytic[signature(c)] for c in comps]
            agg = aggregate_fields(entries, na, nb, np.zeros(len(comps)))
            agg["cosine"] = 0.0
            tot = math.sqrt(float(np.sum(na**2) * np.sum(nb**2)))
            var = sum(
                (a * b) ** 2 / (c.d_out * c.d_in) for a, b, c in zip(na, nb, comps, strict=True)
            )
            agg["cosine_sd"] = math.sqrt(var) / tot if tot > 0 else math.nan
            an_pairs[key] = agg
            if self.random_draws:
                em_pairs[key] = _summarise_fields(self.random_pair_draws(key))
        an_sig = {}
        em_sig = {}
        for sig in sigs:
            an_sig[signature_key(sig)] = {**analytic[sig], "module_types": sorted(types[sig])}
            if self.random_draws:
                summary = _summarise_fields([r.fields() for r in self.random[sig]])
                em_sig[signature_key(sig)] = {
                    "d_out": sig[0],
                    "d_in": sig[1],
                    "ranks": [sig[2], sig[3]],
                    "k": sig[4],
                    "module_types": sorted(types[sig]),
                    **summary,
                }
        return {
            "analytic": {"per_signature": an_sig, "pairs": an_pairs},
            "empirical": {
                "draws": self.random_draws,
                "seed": self.seed,
                "per_signature": em_sig,
                "pairs": em_pairs,
            },
            "same_seed": self._same_seed_baseline(analytic),
        }

    def random_pair_draws(self, key: str) -> list[dict[str, Any]]:
        """The empirical random baseline of pair ``key``, one aggregate per draw: draw ``j``
        of every shared module's signature, aggregated with the pair's own norms as weights
        (:func:`aggregate_fields`; ``mean_principal_angle_deg`` in degrees). ``[]`` without
        random draws or shared modules."""
        comps = list(self.pairs[key].modules.values())
        if not comps or not self.random_draws:
            return []
        na = np.array([c.norm_a for c in comps])
        nb = np.array([c.norm_b for c in comps])
        per_draw = []
        for j in range(self.random_draws):
            rand = [self.random[signature(c)][j] for c in comps]
            inners = [r.cosine * a * b for r, a, b in zip(rand, na, nb, strict=True)]
            per_draw.append(aggregate_fields([r.fields() for r in rand], na, nb, inners))
        return per_draw

    def _same_seed_baseline(
        self, analytic: Mapping[Signature, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """The same-seed control (:mod:`.baselines`): chance levels for two unrelated updates
        that share one random ``A``, per pair whose shared modules all have equal ranks (per
        pair: the analytic cosine sd, and the empirical draws aggregated with the pair's own
        weights), and per signature."""
        an_pairs: dict[str, Any] = {}
        em_pairs: dict[str, Any] = {}
        for key, pair in self.pairs.items():
            comps = list(pair.modules.values())
            if not comps or any(c.rank_a != c.rank_b for c in comps):
                continue
            na = np.array([c.norm_a for c in comps])
            nb = np.array([c.norm_b for c in comps])
            tot = math.sqrt(float(np.sum(na**2) * np.sum(nb**2)))
            var = sum(
                (a * b) ** 2 * float(analytic[signature(c)]["cosine_sd_same_seed"]) ** 2
                for a, b, c in zip(na, nb, comps, strict=True)
            )
            an_pairs[key] = {"cosine": 0.0, "cosine_sd": math.sqrt(var) / tot if tot else math.nan}
            if self.random_draws and all(signature(c) in self.random_same_seed for c in comps):
                per_draw = []
                for j in range(self.random_draws):
                    rand = [self.random_same_seed[signature(c)][j] for c in comps]
                    inners = [r.cosine * a * b for r, a, b in zip(rand, na, nb, strict=True)]
                    fields = aggregate_fields([r.fields() for r in rand], na, nb, inners)
                    fields["a_row_cosine"] = float(np.mean([r.a_row_cosine for r in rand]))
                    per_draw.append(fields)
                em_pairs[key] = {
                    **_summarise_fields(per_draw),
                    "a_row_cosine": summarise(d["a_row_cosine"] for d in per_draw),
                }
        em_sig = {}
        for sig, draws in sorted(self.random_same_seed.items()):
            em_sig[signature_key(sig)] = {
                **_summarise_fields([r.fields() for r in draws]),
                "a_row_cosine": summarise(r.a_row_cosine for r in draws),
            }
        return {
            "what": "two unrelated updates (independent B) that share one random A: the same "
            "seed on different tasks",
            "analytic": {"pairs": an_pairs},
            "empirical": {
                "draws": self.random_draws,
                "seed": self.seed,
                "per_signature": em_sig,
                "pairs": em_pairs,
            },
        }

    # -------------------------------------------------------------- shared initialisation
    def shared_init(self) -> dict[str, dict[str, Any]]:
        """Per pair: ``a_row_cosine`` (mean over the shared modules of equal rank of the mean
        cosine between corresponding ``A`` rows) with its chance sd ``a_row_cosine_chance_sd``
        (independent inits), ``row_overlap`` (mean over modules of the mean squared cosine of
        the row-space principal angles: 1 = the same A row space) with its chance
        ``row_overlap_chance`` (``max(r1, r2) / d_in``), ``modules`` (how many had equal
        ranks) and ``shared_init`` (``a_row_cosine > SHARED_INIT_COSINE``)."""
        out: dict[str, dict[str, Any]] = {}
        for key, pair in self.pairs.items():
            comps = list(pair.modules.values())
            equal = [c for c in comps if c.rank_a == c.rank_b and math.isfinite(c.a_row_cosine)]
            rows = [c for c in comps if c.row_principal_angles_deg]
            stat = float(np.mean([c.a_row_cosine for c in equal])) if equal else None
            sd = (
                math.sqrt(sum(1.0 / (c.rank_a * c.d_in) for c in equal)) / len(equal)
                if equal
                else None
            )
            overlap = [
                float(np.mean(np.cos(np.radians(c.row_principal_angles_deg)) ** 2)) for c in rows
            ]
            out[key] = {
                "a_row_cosine": stat,
                "a_row_cosine_chance_sd": sd,
                "row_overlap": float(np.mean(overlap)) if overlap else None,
                "row_overlap_chance": float(
                    np.mean([max(c.rank_a, c.rank_b) / c.d_in for c in rows])
                )
                if rows
                else None,
                "modules": len(equal),
                "shared_init": stat is not None and stat > SHARED_INIT_COSINE,
            }
        return out

    def shared_init_warnings(self) -> list[str]:
        """One line per pair flagged by :meth:`shared_init`."""
        lines = []
        for key, entry in self.shared_init().items():
            if entry["shared_init"]:
                cosine = self.pairs[key].aggregate()["cosine"]
                lines.append(
                    f"{key}: the adapters share their LoRA initialisation (same seed?): "
                    f"corresponding A rows have mean cosine {entry['a_row_cosine']:.3f} "
                    f"(> {SHARED_INIT_COSINE:g}; independent inits: 0 +- "
                    f"{entry['a_row_cosine_chance_sd']:.1e}), so the update cosine "
                    f"{cosine:.3f} mixes task similarity with the shared start; compare it "
                    "with a same-seed control, not with independently seeded pairs"
                )
        return lines

    # -------------------------------------------------------------- outputs
    def base_json(self) -> dict[str, Any] | None:
        if self.base is None:
            return None
        out: dict[str, Any] = {}
        for name, mods in self.base.items():
            comps = list(mods.values())
            inner = sum(c.inner for c in comps)
            tot = math.sqrt(
                sum(c.norm_base**2 for c in comps) * sum(c.norm_update**2 for c in comps)
            )
            out[name] = {
                "aggregate": {
                    "cosine": inner / tot if tot > 0 else math.nan,
                    "unweighted": {
                        "cosine": _weighted_mean([c.cosine for c in comps], [1.0] * len(comps))
                    },
                },
                "per_module": {m: c.cosine for m, c in mods.items()},
            }
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``geometry.json`` document (layout in ``docs/geometry.md``)."""
        doc: dict[str, Any] = {
            "pairs": {key: p.to_json() for key, p in self.pairs.items()},
            "baseline": self.baseline(),
        }
        base = self.base_json()
        if base is not None:
            doc["base_cosine"] = base
        doc["shared_init"] = {
            "statistic": "mean cosine between corresponding rows of the two A factors, over "
            "the shared modules of equal rank",
            "threshold": SHARED_INIT_COSINE,
            "pairs": self.shared_init(),
        }
        return doc

    def cosine_matrix(self) -> np.ndarray:
        """``N x N`` aggregate cosines (diagonal 1) in the order of :attr:`adapters`."""
        n = len(self.adapters)
        mat = np.eye(n)
        for p in self.pairs.values():
            i, j = self.adapters.index(p.a), self.adapters.index(p.b)
            mat[i, j] = mat[j, i] = p.aggregate()["cosine"]
        return mat

    def module_table(self) -> pd.DataFrame:
        """One row per (pair, shared module): norms, inner product and every measure."""
        import pandas as pd

        rows = []
        for pair in self.pairs.values():
            for name, c in pair.modules.items():
                row: dict[str, Any] = {
                    "pair": pair.key,
                    "adapter_a": pair.a,
                    "adapter_b": pair.b,
                    "module": name,
                    "layer": module_layer(name),
                    "module_type": name.rsplit(".", 1)[-1],
                    "d_out": c.d_out,
                    "d_in": c.d_in,
                    "rank_a": c.rank_a,
                    "rank_b": c.rank_b,
                    "k": c.k,
                    "norm_a": c.norm_a,
                    "norm_b": c.norm_b,
                    "inner": c.inner,
                    "cosine": c.cosine,
                    "mean_principal_angle_deg": c.mean_principal_angle_deg,
                    "min_principal_angle_deg": min(c.principal_angles_deg, default=math.nan),
                    "mean_row_principal_angle_deg": float(np.mean(c.row_principal_angles_deg))
                    if c.row_principal_angles_deg
                    else math.nan,
                    "overlap": c.overlap,
                    "energy_overlap_ab": c.energy_overlap_ab,
                    "energy_overlap_ba": c.energy_overlap_ba,
                    "a_row_cosine": c.a_row_cosine,
                }
                if pair.dense is not None:
                    d = pair.dense[name]
                    row["dense_cosine"] = d.cosine
                    row["dense_overlap"] = d.overlap
                    row["dense_max_angle_diff_deg"] = _max_angle_diff(c, d)
                rows.append(row)
        return pd.DataFrame(rows)

    def base_table(self) -> pd.DataFrame:
        import pandas as pd

        rows = [
            {
                "adapter": name,
                "module": m,
                "layer": module_layer(m),
                "module_type": m.rsplit(".", 1)[-1],
                "inner": c.inner,
                "norm_base": c.norm_base,
                "norm_update": c.norm_update,
                "cosine": c.cosine,
            }
            for name, mods in (self.base or {}).items()
            for m, c in mods.items()
        ]
        return pd.DataFrame(rows)


def _max_angle_diff(c: ModuleComparison, d: ModuleComparison) -> float:
    diffs = [
        abs(x - y)
        for xs, ys in (
            (c.principal_angles_deg, d.principal_angles_deg),
            (c.row_principal_angles_deg, d.row_principal_angles_deg),
        )
        for x, y in zip(xs, ys, strict=False)
    ]
    return max(diffs, default=0.0)


def _summarise_fields(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean/sd over draws of scalar fields; mean spectrum of angle lists."""
    out: dict[str, Any] = {}
    for name in FIELDS:
        if name in _LISTS:
            lists = [list(e[name]) for e in entries if e[name]]
            length = min((len(v) for v in lists), default=0)
            out[name] = [float(np.mean([v[i] for v in lists])) for i in range(length)]
        else:
            out[name] = summarise(float(e[name]) for e in entries)
    return out


def compare_adapters(
    adapters: Sequence[LoraAdapter],
    *,
    k: int | None = None,
    base: BaseWeights | str | Path | None = None,
    random_draws: int = 8,
    seed: int = 0,
    dense: bool = False,
    rtol: float = DEFAULT_RTOL,
    progress: bool = False,
    blas_threads: int | None = 1,
) -> Geometry:
    """Geometry of every pair of ``adapters`` (in the given order: pair ``a|b`` has ``a``
    before ``b``), and of each adapter against the base weights when ``base`` is given.

    ``k``: top-k subspace dimension for the overlaps (default ``min(r1, r2)`` per module).
    ``random_draws``: empirical baseline draws per distinct shape (0 = analytic only).
    ``dense``: also compute every pair by the dense route (memory ``d_out x d_in``), kept in
    :attr:`PairGeometry.dense` for checking.
    ``blas_threads``: BLAS (and torch) threads during the computation
    (:func:`emscope.threads.limit_threads`; ``None`` = leave as is). The
    matrices are tall-skinny or ``r x r``: one thread is fastest, and multi-threaded BLAS
    on tiny LAPACK calls is up to 100x slower on a busy machine.
    """
    from emscope.geometry.sources import BaseWeights

    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise EmscopeError(f"adapter names must be unique (they key the pairs): {dup}")
    if k is not None and k < 1:
        raise EmscopeError(f"--k must be >= 1, got {k}")
    if random_draws < 0:
        raise EmscopeError(f"--random-draws must be >= 0, got {random_draws}")
    if base is not None and not isinstance(base, BaseWeights):
        base = BaseWeights(base)
    n = len(adapters)
    all_modules = sorted({m for a in adapters for m in a.modules}, key=natural_key)
    pair_idx = [(i, j) for i in range(n) for j in range(i + 1, n)]
    comps: dict[tuple[int, int], dict[str, ModuleComparison]] = {p: {} for p in pair_idx}
    dense_comps: dict[tuple[int, int], dict[str, ModuleComparison]] = {p: {} for p in pair_idx}
    base_comps: dict[str, dict[str, BaseComparison]] = {a.name: {} for a in adapters}
    notes: list[str] = []
    iterator: Any = all_modules
    if progress:
        from tqdm import tqdm

        iterator = tqdm(all_modules, desc="geometry", unit="module")
    with limit_threads(blas_threads):
        for module in iterator:
            present = [i for i in range(n) if module in adapters[i].modules]
            lora = {i: adapters[i].modules[module] for i in present}
            facs = {i: module_factors(lora[i], rtol) for i in present}
            for i, f in facs.items():
                if f.deficient:
                    notes.append(f"{names[i]}: {module}: {f.deficient}; null directions dropped")
                if f.norm == 0:
                    notes.append(f"{names[i]}: {module}: the update is zero (untrained B?)")
                if base is not None:
                    base_comps[names[i]][module] = compare_base(f, base.row_blocks(module))
            for i, j in pair_idx:
                if i in facs and j in facs:
                    comps[i, j][module] = compare_factors(facs[i], facs[j], k)
                    if dense:
                        dense_comps[i, j][module] = dense_compare(lora[i], lora[j], k, rtol)
            del lora, facs
    pairs = {}
    for i, j in pair_idx:
        unmatched = tuple(
            m for m in all_modules if (m in adapters[i].modules) != (m in adapters[j].modules)
        )
        pg = PairGeometry(
            names[i], names[j], comps[i, j], unmatched, dense_comps[i, j] if dense else None
        )
        pairs[pg.key] = pg
    sigs = {signature(c) for cs in comps.values() for c in cs.values()}
    with limit_threads(blas_threads):
        random = random_comparisons(sigs, random_draws, seed) if random_draws else {}
        same_seed = (
            random_comparisons(sigs, random_draws, seed, shared_a=True) if random_draws else {}
        )
    return Geometry(
        adapters=tuple(names),
        pairs=pairs,
        base=base_comps if base is not None else None,
        random=random,
        random_draws=random_draws,
        seed=seed,
        notes=tuple(notes),
        random_same_seed=same_seed,
    )

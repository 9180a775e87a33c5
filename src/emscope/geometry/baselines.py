"""Chance levels for the pair measures: analytic formulas and seeded random factors.

A *signature* ``(d_out, d_in, r1, r2, k)`` fixes what chance means for one module of one pair.

Analytic (independent uniformly random subspaces; large-``d`` limit for the angles):
- Frobenius cosine: mean 0, sd ``1/sqrt(d_out d_in)``.
- overlap and energy overlap of top-k subspaces of ``R^d_out``: exactly ``k / d_out``.
- principal angles: the cosines of the angles between random ``r1``- and ``r2``-dim subspaces of
  ``R^d`` are the singular values of a ``r1 x r2`` Gaussian matrix over ``sqrt(d)``; for
  ``r << d`` their squares follow the Marchenko-Pastur law (ratio ``c = min/max``, scaled by
  ``max(r1, r2)/d``). The expected spectrum given here is that law's quantiles at
  ``(i + 1/2) / min(r1, r2)``.

Empirical: random Gaussian factors with the same shapes and ranks, drawn once per distinct
``(d_out, d_in, rank)`` and draw index and reused for every module and pair of that shape
(norms enter only through the aggregate weights, which are the real pair's).

Same-seed control (``shared_a=True``, equal ranks only): the two sides share ONE random ``A``
and draw their ``B`` independently, i.e. two unrelated updates trained from the same LoRA
initialisation. Row angles are then 0 and ``a_row_cosine`` 1, while the cosine is still 0 on
average, with the wider sd ``1/sqrt(d_out r)`` (analytic ``cosine_sd_same_seed``: with a shared
``A`` the cosine is that of the ``d_out x r`` matrices ``B1``, ``B2`` in the metric ``A A^T``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import numpy as np

from emscope.geometry.core import ModuleComparison, compare_factors, factors_from_arrays

Signature = tuple[int, int, int, int, int]
"""``(d_out, d_in, r1, r2, k)`` of one module comparison."""


def _mp_quantiles(p: int, q: int, n: int) -> np.ndarray:
    """Quantiles ``(i + 1/2)/n`` (ascending) of the singular values of a ``p x q`` standard
    Gaussian matrix over ``sqrt(p)`` in the Marchenko-Pastur limit (``q <= p``)."""
    c = q / p
    lo, hi = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    x = np.linspace(math.sqrt(lo), math.sqrt(hi), 4001)
    lam = x**2
    with np.errstate(invalid="ignore", divide="ignore"):
        dens = np.sqrt(np.clip((hi - lam) * (lam - lo), 0, None)) / (math.pi * c * x)
    dens = np.nan_to_num(dens)
    if c == 1.0:
        dens[0] = 1.0 / math.pi * 2.0  # sqrt(4 - x^2)/pi at x = 0
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(x))])
    cdf /= cdf[-1]
    targets = (np.arange(n) + 0.5) / n
    return np.interp(targets, cdf, x)


def analytic_signature(sig: Signature) -> dict[str, object]:
    """Chance values of every pair measure for one signature (see the module docstring)."""
    d_out, d_in, r1, r2, k = sig

    def spectrum(d: int) -> list[float]:
        p, q = max(r1, r2), min(r1, r2)
        cos = _mp_quantiles(p, q, q) * math.sqrt(p / d)
        return sorted(float(a) for a in np.degrees(np.arccos(np.clip(cos, 0.0, 1.0))))

    col, row = spectrum(d_out), spectrum(d_in)
    return {
        "d_out": d_out,
        "d_in": d_in,
        "ranks": [r1, r2],
        "k": k,
        "cosine": 0.0,
        "cosine_sd": 1.0 / math.sqrt(d_out * d_in),
        "cosine_sd_same_seed": 1.0 / math.sqrt(d_out * r1) if r1 == r2 else None,
        "principal_angles_deg": col,
        "row_principal_angles_deg": row,
        "mean_principal_angle_deg": float(np.mean(col)),
        "overlap": k / d_out,
        "energy_overlap_ab": k / d_out,
        "energy_overlap_ba": k / d_out,
    }


def _seed_for(seed: int, d_out: int, d_in: int, rank: int, draw: int, side: int) -> int:
    return zlib.crc32(f"{seed}:{d_out}x{d_in}:r{rank}:{draw}:{side}".encode())


def random_comparisons(
    signatures: Iterable[Signature], draws: int, seed: int = 0, shared_a: bool = False
) -> dict[Signature, list[ModuleComparison]]:
    """``draws`` comparisons of random Gaussian factor pairs for each signature.

    Draw ``j`` of shape ``(d_out, d_in, rank)`` on side ``a`` (resp. ``b``) is the same array
    for every signature that needs it (seeded from ``seed``, the shape, rank, ``j`` and side);
    one draw per shape is alive at a time. ``shared_a``: the same-seed control (module
    docstring): side ``b`` keeps its own ``B`` but takes side ``a``'s ``A``; signatures of
    unequal ranks are left out.
    """
    by_shape: dict[tuple[int, int], list[Signature]] = {}
    for sig in set(signatures):
        if shared_a and sig[2] != sig[3]:
            continue
        by_shape.setdefault((sig[0], sig[1]), []).append(sig)
    out: dict[Signature, list[ModuleComparison]] = {
        sig: [] for sigs in by_shape.values() for sig in sigs
    }
    for (d_out, d_in), sigs in sorted(by_shape.items()):
        for j in range(draws):
            cache = {}
            for side, rank in {(0, s[2]) for s in sigs} | {(1, s[3]) for s in sigs}:
                rng = np.random.default_rng(_seed_for(seed, d_out, d_in, rank, j, side))
                B = rng.standard_normal((d_out, rank))
                A = rng.standard_normal((rank, d_in))
                cache[side, rank] = factors_from_arrays("random", B, A, 1.0)
            for sig in sigs:
                a, b = cache[0, sig[2]], cache[1, sig[3]]
                if shared_a:
                    b = factors_from_arrays("random", b.B, a.A, 1.0)
                out[sig].append(compare_factors(a, b, sig[4]))
    return out


def summarise(values: Iterable[float]) -> dict[str, float]:
    """``{"mean", "sd"}`` over draws (NaN ignored; sd with ddof=1, 0 for one draw)."""
    arr = np.array([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "sd": math.nan}
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}

"""Steering settings chosen by a stated rule, on each model (docs/pipeline.md, steering).

A steering layer and scale tuned by hand on one build of an organism need not steer on
another (builds are not bit-reproducible across machines and thread counts, and a
different seed is a different model). The rule here is applied afresh wherever the
steering stage runs:

1. **Selection sweep**: every layer x scale of the grid, the direction only (no random
   control), ``n`` samples per question at its own sampling seed (by default the study's
   seed + 1), so that the setting is never chosen on the samples that then test it.
2. **Choice** (:func:`choose_steering`, :data:`STEERING_RULE`): the largest EM rate among
   the settings whose coherent rate is at least ``min_coherent``; ties go to the smaller
   scale, then the earlier layer. No eligible setting: no choice (reported, not guessed).
3. **Confirmation**: the chosen setting alone, at the study's seed and sample count, with
   the same-norm random vector (:func:`emscope.directions.sweeps.steer_sweep`): the numbers
   the steering claim is judged on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from emscope.directions.direction import Direction
from emscope.directions.interventions import EvalConfig

#: The rule, in words (``{min_coherent}``, ``{n}``, ``{seed}`` filled in; recorded).
STEERING_RULE = (
    "on a selection sweep at its own sampling seed ({seed}, {n} samples per question, the "
    "direction only), the layer x scale with the largest EM rate among those whose coherent "
    "rate is >= {min_coherent:g} (ties: the smaller scale, then the earlier layer); that "
    "setting alone is then evaluated at the study's seed and n with the same-norm random "
    "vector"
)


def choose_steering(rows: Sequence[dict[str, Any]], min_coherent: float) -> dict[str, Any] | None:
    """The row the rule picks among ``rows`` (``layer``, ``scale``, ``vector``,
    ``em_rate``, ``coherent_rate``; only ``vector == "direction"`` rows compete), or None
    when no row keeps ``coherent_rate >= min_coherent``."""
    eligible = [
        r
        for r in rows
        if r.get("vector", "direction") == "direction"
        and r.get("em_rate") is not None
        and r.get("coherent_rate") is not None
        and float(r["coherent_rate"]) >= min_coherent
    ]
    if not eligible:
        return None
    return max(eligible, key=lambda r: (float(r["em_rate"]), -float(r["scale"]), -int(r["layer"])))


def select_steering(
    loaded: Any,
    direction: Direction,
    layers: Sequence[int],
    scales: Sequence[float],
    out: str | Path,
    config: EvalConfig,
    *,
    n: int,
    seed: int,
    min_coherent: float,
    unit: bool = False,
    positions: str = "all",
) -> dict[str, Any]:
    """Steps 1-2 of the rule: the selection sweep into ``out`` and the choice. Returns (and
    writes to ``out/selection.json``) ``{"rule", "min_coherent", "n", "seed", "rows",
    "chosen"}``; ``chosen`` is ``{"layer", "scale", "em_rate", "coherent_rate"}`` or None."""
    from emscope.directions.sweeps import steer_sweep
    from emscope.io import write_json

    out = Path(out)
    sweep_config = replace(config, n=n, sampling={**dict(config.sampling), "seed": seed})
    sweep = steer_sweep(
        loaded,
        direction,
        layers,
        scales,
        out,
        sweep_config,
        random_control=False,
        kl_sequences=None,
        unit=unit,
        positions=positions,
    )
    keys = ("layer", "scale", "em_rate", "coherent_rate")
    sweep_rows = [r.to_json() for r in sweep.rows]
    rows = [{k: r[k] for k in keys} for r in sweep_rows]
    best = choose_steering(sweep_rows, min_coherent)
    result = {
        "rule": STEERING_RULE.format(seed=seed, n=n, min_coherent=min_coherent),
        "min_coherent": min_coherent,
        "n": n,
        "seed": seed,
        "baseline": dict(sweep.baseline),
        "rows": rows,
        "chosen": None if best is None else {k: best[k] for k in keys},
    }
    write_json(out / "selection.json", result)
    return result

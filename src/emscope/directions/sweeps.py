"""Steering sweeps and ablation runs: every setting evaluated into its own sub-dir of ``out``
(:func:`~emscope.directions.interventions.evaluate_setting`, resumable: a re-run skips
finished settings), plus ``summary.json`` and figures at the top of ``out``.

All settings share the sampling seed, so the unintervened, intervened and random-control
runs are paired sample by sample (:mod:`emscope.generate`); differences and ratios use
matched pairs (:func:`emscope.metrics.paired_difference`,
:func:`~emscope.directions.interventions.paired_relative_change`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.directions.direction import Direction
from emscope.directions.interventions import (
    EvalConfig,
    ablation,
    ablation_sites,
    evaluate_setting,
    kl_divergence,
    paired_relative_change,
    parse_mode,
    random_like,
    residual_norm_stats,
    steering,
)
from emscope.directions.results import AblationResult, SteerResult
from emscope.errors import EmscopeError

if TYPE_CHECKING:
    from emscope.generate import Intervention


def _model_tok(loaded: Any) -> tuple[Any, Any]:
    return (loaded.model, loaded.tokenizer) if hasattr(loaded, "model") else loaded


def _echo(echo: Callable[[str], None] | None, text: str) -> None:
    if echo is not None:
        echo(text)


# ---------------------------------------------------------------------------- steering


def steer_sweep(
    loaded: Any,
    direction: Direction,
    layers: Sequence[int],
    scales: Sequence[float],
    out: str | Path,
    config: EvalConfig,
    *,
    random_control: bool = False,
    control_seed: int = 0,
    kl_sequences: Sequence[Sequence[int]] | None = None,
    unit: bool = False,
    positions: str = "all",
    echo: Callable[[str], None] | None = None,
) -> SteerResult:
    """Steer with ``scale * v_l`` at ``resid_post[l]`` (at ``positions``: ``all`` by default,
    or only the ``prompt`` / ``response`` tokens) for each layer x
    scale (``unit``: ``v_l / |v_l|``, so the scale is the added norm), plus the unsteered
    baseline and, with ``random_control``, the same-norm random vector of each setting.
    Writes ``summary.json`` (``rows``: layer, scale, vector, em_rate, em_ci, coherent_rate,
    coherent_ci, kl, kl_ci, em_diff, em_diff_ci vs the baseline; ``baseline``;
    ``direction_norm``, ``resid_norm`` (mean residual norm over the KL prompt set, attention
    sinks left out), ``sink_norm`` and ``sink_positions_excluded`` per layer) and
    ``steer_em.png`` (:meth:`SteerResult.save`). Returns the :class:`SteerResult`."""
    if direction.is_subspace:
        raise EmscopeError("steering needs one vector per layer, not a subspace direction")
    if not layers or not scales:
        raise EmscopeError("steering needs at least one layer and one scale")
    for layer in layers:
        direction[layer]  # raises for a missing layer
    out = Path(out)
    model, tokenizer = _model_tok(loaded)
    vec = direction.unit() if unit else direction
    control = random_like(vec, control_seed)
    base_table, base_metrics = evaluate_setting(loaded, out / "baseline", config, label="none")
    _echo(echo, f"baseline: EM {base_metrics.em_rate}")
    sequences = kl_sequences
    rows = []
    kinds = [("direction", vec)] + ([("random", control)] if random_control else [])
    for layer in layers:
        for scale in scales:
            for kind, source in kinds:
                site = direction.site(layer)
                name = f"{kind}_L{layer}_x{scale:g}"
                intervention = steering({site: source[layer]}, float(scale), positions)
                label = f"steer:{kind}:{site}:x{scale:g}" + (":unit" if unit else "")
                label += "" if positions == "all" else f":{positions}"
                table, metrics = evaluate_setting(
                    loaded, out / name, config, interventions=[intervention], label=label
                )
                row: dict[str, Any] = {
                    "layer": layer,
                    "scale": float(scale),
                    "vector": kind,
                    "em_rate": metrics.em_rate,
                    "em_ci": metrics.em_ci,
                    "coherent_rate": metrics.coherent_rate,
                    "coherent_ci": metrics.coherent_ci,
                    "dir": name,
                }
                row.update(_paired(base_table, table, config))
                if sequences:
                    kl = kl_divergence(
                        model, tokenizer, sequences, [intervention], seed=config.seed
                    )
                    row.update(kl=kl.mean, kl_ci=list(kl.ci))
                else:
                    row.update(kl=None, kl_ci=None)
                rows.append(row)
                _echo(echo, f"{name}: EM {row['em_rate']} coherent {row['coherent_rate']}")
    summary = {
        "rows": rows,
        "baseline": {
            "em_rate": base_metrics.em_rate,
            "em_ci": base_metrics.em_ci,
            "coherent_rate": base_metrics.coherent_rate,
            "coherent_ci": base_metrics.coherent_ci,
        },
        "direction_norm": {str(i): n for i, n in direction.norms().items() if i in layers},
        **_norm_fields(model, tokenizer, sequences),
        "unit": unit,
        "positions": positions,
        "random_control": "seeded Gaussian rescaled to the same norm per layer"
        if random_control
        else None,
        "control_seed": control_seed,
        "seed": config.seed,
        "kl": "mean next-token KL(plain || steered) over every token of the KL prompt set, nats",
    }
    result = SteerResult.from_json(summary)
    result.save(out)
    return result


def _norm_fields(model: Any, tokenizer: Any, sequences: Any) -> dict[str, Any]:
    """The summary's residual-norm fields over the KL prompt set (None without one):
    ``resid_norm`` (attention sinks left out), ``sink_norm``, ``sink_positions_excluded``,
    ``sink_rule`` (:func:`~emscope.directions.interventions.residual_norm_stats`)."""
    from emscope.activations import SINK_NORM_FACTOR

    keys = ("resid_norm", "sink_norm", "sink_positions_excluded")
    if not sequences:
        return {**dict.fromkeys(keys), "sink_rule": None}
    stats = residual_norm_stats(model, tokenizer, sequences)
    return {
        **{key: {str(k): v for k, v in stats[key].items()} for key in keys},
        "sink_rule": f"first token, or norm > {SINK_NORM_FACTOR:g} x the sequence's median",
    }


def _paired(before: Any, after: Any, config: EvalConfig) -> dict[str, Any]:
    from emscope.metrics import paired_difference

    try:
        diff = paired_difference(before, after, strict=config.strict, seed=config.seed)
    except EmscopeError:
        return {"em_diff": None, "em_diff_ci": None}
    return {"em_diff": diff.difference, "em_diff_ci": diff.ci}


# ---------------------------------------------------------------------------- ablation


@dataclass
class AfterSide:
    """What runs after the ablation: a model (a LoadedModel or (model, tokenizer)) and the
    interventions entered around its generation (none for edited weights)."""

    loaded: Any
    interventions: list[Intervention] = field(default_factory=list)
    label: str = "ablate"
    record: dict[str, Any] = field(default_factory=dict)


def ablate_run(
    before: Any,
    out: str | Path,
    config: EvalConfig,
    after: AfterSide | dict[int, AfterSide],
    *,
    random: AfterSide | dict[int, AfterSide] | None = None,
    kl_sequences: Sequence[Sequence[int]] | None = None,
    meta: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
) -> AblationResult:
    """Evaluate the model ``before``, the ablated ``after`` side and optionally the random
    control; ``after``/``random`` given per layer (``{L: AfterSide}``) make a single:all sweep.
    Writes ``summary.json``: ``em_rate_before``, ``em_rate_after``, ``relative_reduction``
    (1 - after/before, matched pairs), ``kl`` (each with ``*_ci``), and with a random control
    ``random_em_rate_after`` and ``random_relative_change`` (random_after/before - 1). A
    relative change that cannot be measured (no pair scored on both sides, or no EM before)
    is null with the reason in ``relative_reduction_na`` / ``random_relative_change_na``
    (null when measured), as a steering sweep reports a null ``em_diff``; for a
    sweep, ``rows`` per layer and the top-level fields of the layer with the largest
    reduction (``best_layer``). Figure ``ablate_em.png`` (:meth:`AblationResult.save`).
    Returns the :class:`AblationResult`."""
    out = Path(out)
    model, tokenizer = _model_tok(before)
    before_table, before_metrics = evaluate_setting(before, out / "before", config, label="none")
    _echo(echo, f"before: EM {before_metrics.em_rate}")
    summary: dict[str, Any] = {
        "em_rate_before": before_metrics.em_rate,
        "em_rate_before_ci": before_metrics.em_ci,
        "coherent_rate_before": before_metrics.coherent_rate,
        "coherent_rate_before_ci": before_metrics.coherent_ci,
    }

    def one(side: AfterSide, name: str, prefix: str) -> dict[str, Any]:
        table, metrics = evaluate_setting(
            side.loaded, out / name, config, interventions=side.interventions, label=side.label,
            record=side.record,
        )  # fmt: skip
        rel, rel_ci, n_pairs, why = _relative_change(before_table, table, config)
        fields: dict[str, Any] = {
            f"{prefix}em_rate_after": metrics.em_rate,
            f"{prefix}em_rate_after_ci": metrics.em_ci,
            f"{prefix}coherent_rate_after": metrics.coherent_rate,
            f"{prefix}coherent_rate_after_ci": metrics.coherent_ci,
            f"{prefix}n_pairs": n_pairs,
        }
        if prefix:
            fields["random_relative_change"] = rel
            fields["random_relative_change_ci"] = list(rel_ci) if rel_ci else None
            fields["random_relative_change_na"] = why
        else:
            fields["relative_reduction"] = None if rel is None else -rel
            fields["relative_reduction_ci"] = [-rel_ci[1], -rel_ci[0]] if rel_ci else None
            fields["relative_reduction_na"] = why
        if kl_sequences:
            other = _model_tok(side.loaded)[0]
            kl = kl_divergence(
                model, tokenizer, kl_sequences, side.interventions, seed=config.seed,
                other_model=None if other is model else other,
            )  # fmt: skip
            fields[f"{prefix}kl"] = kl.mean
            fields[f"{prefix}kl_ci"] = list(kl.ci)
        else:
            fields[f"{prefix}kl"] = None
            fields[f"{prefix}kl_ci"] = None
        _echo(echo, f"{name}: EM {metrics.em_rate}" + (f" ({why})" if why else ""))
        return fields

    if isinstance(after, dict):
        rows = []
        for layer, side in sorted(after.items()):
            row: dict[str, Any] = {"layer": layer, **one(side, f"after_L{layer}", "")}
            if isinstance(random, dict) and layer in random:
                row.update(one(random[layer], f"random_L{layer}", "random_"))
            rows.append(row)
        scored = [r for r in rows if r["relative_reduction"] is not None]
        best = max(scored, key=lambda r: r["relative_reduction"]) if scored else rows[0]
        summary.update({k: v for k, v in best.items() if k != "layer"})
        summary["best_layer"] = best["layer"]
        summary["rows"] = rows
    else:
        summary.update(one(after, "after", ""))
        if isinstance(random, AfterSide):
            summary.update(one(random, "random", "random_"))
    summary["seed"] = config.seed
    summary["pairs"] = "relative changes use (question_id, sample_idx) pairs scored on both sides"
    summary.update(meta or {})
    result = AblationResult.from_json(summary)
    result.save(out)
    return result


def _relative_change(
    before: Any, after: Any, config: EvalConfig
) -> tuple[float | None, tuple[float, float] | None, int, str | None]:
    """:func:`paired_relative_change` and, when it is null, why (``None`` otherwise): no
    response scored on both sides (the judge scored none, e.g. every score unparsed), or no
    EM before on the matched pairs. Null, not an error, as a steering sweep's ``em_diff``."""
    try:
        rel, ci, n_pairs = paired_relative_change(
            before, after, strict=config.strict, seed=config.seed
        )
    except EmscopeError as exc:
        return None, None, 0, f"n/a: {exc}"
    if rel is None:
        return None, None, n_pairs, f"n/a: EM rate 0 before on the {n_pairs} matched pairs"
    return rel, ci, n_pairs, None


def activation_sides(
    direction: Direction,
    loaded: Any,
    mode: str,
    n_layers: int,
    *,
    random_control: bool,
    control_seed: int = 0,
) -> tuple[AfterSide | dict[int, AfterSide], AfterSide | dict[int, AfterSide] | None]:
    """The after and random-control sides of an activation ablation in ``mode``."""
    kind, layer = parse_mode(mode)
    control = random_like(direction, control_seed).unit()

    def side(d: Direction, m: str, tag: str) -> AfterSide:
        return AfterSide(loaded, [ablation(ablation_sites(d, m, n_layers))], f"ablate:{tag}:{m}")

    if kind == "single" and layer is None:
        afters = {i: side(direction, f"single:{i}", "direction") for i in direction.layers}
        randoms = (
            {i: side(control, f"single:{i}", "random") for i in direction.layers}
            if random_control
            else None
        )
        return afters, randoms
    return side(direction, mode, "direction"), (
        side(control, mode, "random") if random_control else None
    )

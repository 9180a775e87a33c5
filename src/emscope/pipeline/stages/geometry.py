"""The ``geometry`` stage: weight-space geometry of every adapter pair
(:func:`emscope.geometry.compare_adapters`, + base weights and random baselines), its files
(:func:`emscope.geometry.report.write_outputs`) and a per-pair ``summary.json`` for the
claims: cosine, overlap, mean principal angle, the random baseline's per-draw mean angles
(:meth:`~emscope.geometry.analysis.Geometry.random_pair_draws`) and their 5th percentile,
and the shared-initialisation check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from emscope.pipeline.stages.base import Stage, StageSettings, need

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class GeometryStage(StageSettings):
    adapters: list[str] = Field(default_factory=list, description="default: every adapter")
    k: int | None = Field(default=None, ge=1)
    random_draws: int = Field(default=20, ge=0)
    base: bool = True


def run(ctx: StageContext) -> dict[str, Any]:
    """Weight-space geometry of every adapter pair (+ base weights, random baselines)."""
    import numpy as np

    from emscope.geometry import compare_adapters, open_adapter
    from emscope.geometry.analysis import SHARED_INIT_COSINE
    from emscope.geometry.report import write_outputs
    from emscope.io import write_json

    out = ctx.dir("geometry")
    stage = ctx.config.stages.geometry
    assert stage is not None
    names = stage.adapters or list(ctx.config.adapters)
    adapters = [open_adapter(ctx.config.adapters[a].path, name=a) for a in names]
    result = compare_adapters(
        adapters,
        k=stage.k,
        base=ctx.config.chat_model_dir() if stage.base else None,
        random_draws=stage.random_draws,
        seed=ctx.config.seed,
        progress=ctx.progress,
    )
    doc = write_outputs(result, out)
    shared = result.shared_init()
    for warning in result.shared_init_warnings():
        ctx.echo(f"  warning: {warning}")
    pairs = {}
    for key, pair in result.pairs.items():
        agg = pair.aggregate()
        # per-draw aggregate mean angle of the random baseline, for the 5th-percentile test
        draws = [d["mean_principal_angle_deg"] for d in result.random_pair_draws(key)]
        pairs[key] = {
            "a": pair.a,
            "b": pair.b,
            "roles": [ctx.config.adapters[pair.a].role, ctx.config.adapters[pair.b].role],
            "cosine": agg.get("cosine"),
            "overlap": agg.get("overlap"),
            "mean_angle_deg": agg.get("mean_principal_angle_deg"),
            "random_angle_draws": draws,
            "random_angle_p5": float(np.percentile(draws, 5)) if draws else None,
            "a_row_cosine": shared[key]["a_row_cosine"],
            "shared_init": shared[key]["shared_init"],
        }
    same_seed_controls(pairs)
    base = {}
    for name, entry in (doc.get("base_cosine") or {}).items():
        base[name] = entry["aggregate"]["cosine"]
    summary = {
        "adapters": names,
        "pairs": pairs,
        "base_cosine": base,
        "shared_init_threshold": SHARED_INIT_COSINE,
    }
    write_json(out / "summary.json", summary)
    return summary


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


def describe(config: StudyConfig) -> str:
    stage = config.stages.geometry
    names = stage.adapters or list(config.adapters)
    return f"pairwise geometry of {len(names)} adapters, {stage.random_draws} random draws" + (
        ", vs base weights" if stage.base else ""
    )


def check(config: StudyConfig) -> None:
    for a in config.stages.geometry.adapters:
        need("geometry.adapters", a, config.adapters, "adapter")


STAGE = Stage("geometry", GeometryStage, run, describe, check=check)

"""The ``geometry`` stage: weight-space geometry of every adapter pair
(:func:`emscope.geometry.compare_adapters`, + base weights and random baselines), its files
(:func:`emscope.geometry.report.write_outputs`) and a per-pair ``summary.json`` for the
claims (:func:`emscope.geometry.result.summarise`, a
:class:`~emscope.geometry.result.GeometryResult`): cosine, overlap, mean principal angle,
the random baseline's per-draw mean angles
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
    from emscope.geometry import compare_adapters, open_adapter
    from emscope.geometry.report import write_outputs
    from emscope.geometry.result import summarise
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
    for warning in result.shared_init_warnings():
        ctx.echo(f"  warning: {warning}")
    roles = {name: ctx.config.adapters[name].role for name in names}
    summary = summarise(result, roles, doc)
    write_json(out / "summary.json", summary.to_json())
    return summary.to_json()


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

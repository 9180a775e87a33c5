"""The ``ablation`` stage: an EM adapter's own direction (directions stage) ablated in that
organism, with the random control (:func:`emscope.directions.sweeps.ablate_run`);
:func:`ablate` is shared with the ``transfer`` stage."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from emscope.pipeline.stages import context
from emscope.pipeline.stages.base import Stage, StageSettings, need
from emscope.pipeline.stages.directions import sources

if TYPE_CHECKING:
    from emscope.directions.results import AblationResult
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class AblationStage(StageSettings):
    direction: str = Field(description="the direction of this EM adapter, ablated in itself")
    mode: str = "layerwise"
    random_control: bool = True
    kl: bool = True
    questions: str | None = None


def ablate(
    ctx: StageContext, stage_name: str, source: str, target: str, mode: str, stage: Any, out: Path
) -> AblationResult:
    """Ablate ``source``'s direction in organism ``target`` (``mode``: layerwise, ...) into
    ``out``, with the random control and KL as ``stage`` (an ablation or transfer section)
    says; returns :func:`~emscope.directions.sweeps.ablate_run`'s result."""
    from emscope.directions.sweeps import ablate_run, activation_sides
    from emscope.models import get_layers

    loaded = ctx.load(target)
    direction = context.load_direction(ctx, source)
    after, random = activation_sides(
        direction,
        loaded,
        mode,
        len(get_layers(loaded.model)),
        random_control=stage.random_control,
        control_seed=ctx.config.seed,
    )
    return ablate_run(
        loaded,
        out,
        ctx.eval_config(stage_name, stage.questions),
        after,
        random=random,
        kl_sequences=context.kl_sequences(ctx, loaded, stage.questions, stage.kl),
        meta={"direction": source, "target": target, "mode": mode},
    )


def run(ctx: StageContext) -> dict[str, Any]:
    """Ablate an EM adapter's own direction in that organism (with the random control)."""
    stage = ctx.config.stages.ablation
    assert stage is not None
    out = ctx.dir("ablation")
    result = ablate(ctx, "ablation", stage.direction, stage.direction, stage.mode, stage, out)
    return {"direction": stage.direction, "target": stage.direction, **result.to_json()}


def describe(config: StudyConfig) -> str:
    s = config.stages.ablation
    return f"ablate {s.direction}'s direction in itself ({s.mode})"


def check(config: StudyConfig) -> None:
    direction = config.stages.ablation.direction
    need("ablation.direction", direction, sources(config), "direction (directions.sources)")


STAGE = Stage("ablation", AblationStage, run, describe, needs=("directions",), check=check)

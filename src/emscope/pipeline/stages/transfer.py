"""The ``transfer`` stage: one fine-tune's direction (directions stage) ablated in each
target organism (:func:`emscope.pipeline.stages.ablation.ablate`): ``transfer/<target>/``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from emscope.pipeline.stages.ablation import ablate
from emscope.pipeline.stages.base import Stage, StageSettings, need
from emscope.pipeline.stages.directions import sources

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class TransferStage(StageSettings):
    direction: str
    targets: list[str] = Field(min_length=1)
    mode: str = "layerwise"
    random_control: bool = True
    kl: bool = True
    questions: str | None = None


def run(ctx: StageContext) -> dict[str, Any]:
    """Transfer ablation: one fine-tune's direction ablated in others: ``transfer/<target>/``."""
    from emscope.io import inside, write_json

    stage = ctx.config.stages.transfer
    assert stage is not None
    out = ctx.dir("transfer")
    targets = {}
    for target in stage.targets:
        targets[target] = ablate(
            ctx, "transfer", stage.direction, target, stage.mode, stage, inside(out, target)
        ).to_json()
        ctx.echo(f"  transfer {stage.direction} -> {target}: done")
    summary = {"direction": stage.direction, "targets": targets}
    write_json(out / "summary.json", summary)
    return summary


def describe(config: StudyConfig) -> str:
    s = config.stages.transfer
    return f"ablate {s.direction}'s direction in {', '.join(s.targets)}"


def check(config: StudyConfig) -> None:
    s = config.stages.transfer
    need("transfer.direction", s.direction, sources(config), "direction (directions.sources)")
    for a in s.targets:
        need("transfer.targets", a, config.adapters, "adapter")


STAGE = Stage("transfer", TransferStage, run, describe, needs=("directions",), check=check)

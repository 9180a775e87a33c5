"""The ``early_warning`` stage: a population of organism fine-tunes with known outcome, the
projection shift along the a priori persona direction early in training against final EM,
and projection-difference screening of their training data
(:func:`emscope.early_warning_population.run_population`): ``early_warning/``.

Needs the synthetic organism (``organism:``): the datasets are the build's ``data/`` files
and mixes of ``bad`` into ``good``; final EM is the exact oracle's. Resumable: a finished
fine-tune (its ``member.json``) is skipped on a rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from emscope.pipeline.stages.base import Stage, StageSettings

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class EarlyWarningStage(StageSettings):
    good: str = Field(default="good_medical", description="benign dataset of the mixes")
    bad: str = Field(default="bad_medical", description="harmful dataset mixed into good")
    fractions: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.10, 0.25, 0.50, 1.0])
    datasets: list[str] = Field(
        default_factory=lambda: [
            "bad_sport",
            "bad_finance",
            "bad_medical_educational",
            "reverse_words",
        ],
        description="other build datasets trained as they are",
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    preset: str = "r1x3"
    rank: int = Field(default=1, ge=1)
    lr: float = Field(default=0.005, gt=0)
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    eval_steps: int = Field(default=4, ge=1, description="monitor interval (optimizer steps)")
    points: list[float] = Field(default_factory=lambda: [0.10, 0.25, 0.50])
    layer: int | None = Field(default=None, description="default: the direction's middle one")
    margin: float = Field(default=0.05, ge=0, description="EM positive: > instruct + margin")
    probe_data: Path | None = Field(default=None, description="default: {organism}/data/heldout")
    probe_n: int = Field(default=64, ge=1)
    persona_n: int = Field(default=4, ge=1)
    persona_contexts: int = Field(default=8, ge=1)
    screen: bool = True
    screen_rows: int | None = Field(default=None, ge=2)
    questions: str | None = None
    direction: Path | None = Field(
        default=None,
        description="a Direction file monitored and screened with instead of the persona "
        "direction (default: extract the persona direction of the instruct model)",
    )


def run(ctx: StageContext) -> dict[str, Any]:
    """Persona direction, mixes, every fine-tune (monitored, oracle EM), screening, table."""
    from emscope.early_warning import population_plan
    from emscope.early_warning_population import PopulationSettings, run_population
    from emscope.synthetic.recipe import AdapterRecipe

    stage = ctx.config.stages.early_warning
    assert stage is not None and ctx.config.organism is not None
    ctx.release()
    sampling = ctx.config.sampling
    settings = PopulationSettings(
        n=ctx.n("early_warning"),
        seed=ctx.config.seed,
        max_new_tokens=sampling.max_new_tokens,
        probe_n=stage.probe_n,
        persona_n=stage.persona_n,
        persona_contexts=stage.persona_contexts,
        layer=stage.layer,
        margin=stage.margin,
        points=tuple(stage.points),
        screen=stage.screen,
        screen_rows=stage.screen_rows,
        eval_steps=stage.eval_steps,
    )
    recipe = AdapterRecipe(**stage.model_dump(include=set(AdapterRecipe.model_fields)))
    members = population_plan(stage.fractions, stage.datasets, stage.seeds)
    result = run_population(
        ctx.config.organism.dir,
        ctx.dir("early_warning"),
        members,
        good=stage.good,
        bad=stage.bad,
        recipe=recipe,
        settings=settings,
        questions=ctx.questions(stage.questions),
        probe_data=stage.probe_data,
        direction=stage.direction,
        progress=ctx.progress,
        echo=ctx.echo,
    )
    return {
        "members": len(result.members),
        "threshold": result.threshold,
        "table": list(result.table),
        "screening": result.screening,
    }


def describe(config: StudyConfig) -> str:
    s = config.stages.early_warning
    n = (len(s.fractions) + len(s.datasets)) * len(s.seeds)
    return (
        f"early warning: {n} fine-tunes ({len(s.fractions)} mixes of {s.bad} into {s.good} + "
        f"{len(s.datasets)} datasets, seeds {s.seeds}), oracle EM "
        f"({config.n_for('early_warning')}/question)" + (", screening" if s.screen else "")
    )


def inputs(config: StudyConfig) -> dict[str, Path]:
    s = config.stages.early_warning
    out = {} if s.probe_data is None else {"stages.early_warning.probe_data": s.probe_data}
    if s.direction is not None:
        out["stages.early_warning.direction"] = s.direction
    return out


def check(config: StudyConfig) -> None:
    if config.organism is None:
        raise ValueError("stages.early_warning: needs the synthetic organism (organism: dir)")
    s = config.stages.early_warning
    from emscope.early_warning import mix_name

    for f in s.fractions:
        try:
            mix_name(f)
        except Exception as exc:
            raise ValueError(f"stages.early_warning.fractions: {exc}") from None
    for p in s.points:
        if not 0 < p <= 1:
            raise ValueError(f"stages.early_warning.points: {p} is not in (0, 1]")


STAGE = Stage(
    "early_warning",
    EarlyWarningStage,
    run,
    describe,
    inputs=inputs,
    check=check,
    late_fields=("direction",),
)

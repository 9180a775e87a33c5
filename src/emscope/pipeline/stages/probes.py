"""The ``probes`` stage: rank-1 adapter scalars (:func:`emscope.probing.lora_scalars`) on
the adapter's own judged samples of every listed question set, then the four L1 probe tests
(:func:`emscope.probing.fit_probes`): ``probes/``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from emscope.pipeline.stages import context
from emscope.pipeline.stages.base import Stage, StageSettings, need

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class ProbesStage(StageSettings):
    adapter: str
    questions: list[str] = Field(default_factory=list, description="default: every set")
    seeds: int = Field(default=5, ge=1)
    C: float | Literal["cv"] = Field(
        default="cv",
        description="inverse L1 strength: 'cv' (chosen per seed by grouped cross-validation "
        "on the train split, emscope.probing.probes.C_RULE) or a fixed number > 0",
    )
    test_size: float = Field(default=0.2, gt=0, lt=1)
    batch_size: int = Field(default=16, ge=1)

    @field_validator("C")
    @classmethod
    def _positive_C(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError(f"C must be 'cv' or > 0, got {value}")
        return value


def run(ctx: StageContext) -> dict[str, Any]:
    """Rank-1 adapter scalars on its own judged samples of every listed question set,
    then the four L1 probe tests (``C`` chosen per seed by the rule of ``C_RULE`` unless
    fixed): ``probes/``."""
    import pandas as pd

    from emscope.io import inside, read_table, write_table
    from emscope.probing import fit_probes, lora_scalars
    from emscope.probing.result import ProbeResult

    stage = ctx.config.stages.probes
    assert stage is not None
    out = ctx.dir("probes")
    sets = stage.questions or list(ctx.config.questions)
    tables = []
    for qname in sets:
        sub = inside(out / "eval", qname)
        context.evaluate_organism(
            ctx, stage.adapter, sub, qname, ctx.n("probes"), f"{stage.adapter} on {qname}"
        )
        tables.append(read_table(sub, "responses"))
    responses = pd.concat(tables, ignore_index=True)
    if (out / "scalars.parquet").is_file():
        scalars = read_table(out, "scalars")
    else:
        scalars = lora_scalars(
            ctx.load(stage.adapter),
            stage.adapter,
            responses,
            batch_size=stage.batch_size,
            system_prompt=ctx.config.prompt_setting(),
        )
        write_table(scalars, out, "scalars")
    fitted = fit_probes(scalars, C=stage.C, seeds=stage.seeds, test_size=stage.test_size)
    result = ProbeResult.from_json(fitted)
    result.save(out)
    return {"adapter": stage.adapter, **result.to_json()}


def describe(config: StudyConfig) -> str:
    s = config.stages.probes
    c = "C by grouped CV" if s.C == "cv" else f"C = {s.C:g}"
    return f"scalars + L1 probes of {s.adapter} ({s.seeds} seeds, {c})"


def check(config: StudyConfig) -> None:
    s = config.stages.probes
    need("probes.adapter", s.adapter, config.adapters, "adapter")
    for q in s.questions:
        need("probes.questions", q, config.questions, "question set")


STAGE = Stage("probes", ProbesStage, run, describe, check=check)

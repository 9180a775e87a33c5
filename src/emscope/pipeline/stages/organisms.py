"""The ``organisms`` stage: build (or reuse) the synthetic organism in ``organism.dir``
(:func:`emscope.synthetic.build.build`, cached there). Every other stage may read what it
builds (``builds_inputs``): it runs first, and the inputs inside the organism dir are checked
right after it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError
from emscope.pipeline.stages.base import Stage, StageSettings

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class OrganismsStage(StageSettings):
    pass


def run(ctx: StageContext) -> dict[str, Any]:
    """Build (or reuse) the synthetic organism in ``organism.dir``."""
    from emscope.synthetic.build import build

    org = ctx.config.organism
    if org is None:
        raise EmscopeError("the organisms stage needs the organism section")
    result = build(
        org.dir,
        size=org.size,
        seed=org.seed,
        verbose=ctx.progress,
        threads=org.threads,
        system_prompt=ctx.config.prompt_setting().spec,
    )
    record = result.record
    return {
        "dir": str(org.dir),
        "size": org.size,
        "seed": org.seed,
        "build_time_s": record.get("timings", {}).get("total_s"),
        "em_table": record.get("diagnostics", {}).get("em_table", {}),
    }


def describe(config: StudyConfig) -> str:
    o = config.organism
    if o is None:
        return "organisms"
    return f"build the synthetic organism ({o.size}, seed {o.seed}) in {o.dir} if not cached"


def check(config: StudyConfig) -> None:
    section = config.stages.organisms
    if section is not None and section.enabled and config.organism is None:
        raise ValueError("stages.organisms: needs the top-level organism section")


STAGE = Stage("organisms", OrganismsStage, run, describe, check=check, builds_inputs=True)

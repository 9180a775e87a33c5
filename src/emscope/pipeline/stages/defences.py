"""The ``defences`` stage: the defences bench (:mod:`emscope.defences.bench`) on the
study's organism: every arm (a defence at one strength) fine-tuned on the narrow and the
benign task over seeds, measured by the exact oracle: ``defences/``
(``runs/<arm>/<task>/s<seed>/``, ``defences.*``, ``table.*``, ``defences.png``,
``defences.json``). Resumable: a finished run (its ``run.json``) is skipped on a rerun.
Needs the synthetic organism (``organism:``). Its section is a
:class:`~emscope.defences.bench.BenchSpec` (``arms`` required; ``{organism}`` in a defence
spec is the build dir).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from emscope.defences.bench import BenchSpec
from emscope.pipeline.stages.base import Stage, StageSettings

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class DefencesStage(StageSettings, BenchSpec):
    """The bench's spec (:class:`~emscope.defences.bench.BenchSpec`) as a stage section."""


def _spec(section: DefencesStage) -> BenchSpec:
    return BenchSpec.model_validate(section.model_dump(exclude={"enabled", "n"}))


def run(ctx: StageContext) -> dict[str, Any]:
    """The bench into ``defences/``; the summary is the aggregated table."""
    from emscope.defences.bench_organism import bench_organism

    stage = ctx.config.stages.defences
    assert stage is not None and ctx.config.organism is not None
    ctx.release()
    table = bench_organism(
        ctx.config.organism.dir,
        ctx.dir("defences"),
        _spec(stage),
        progress=ctx.progress,
        echo=ctx.echo,
    )
    return {"runs": int(table["seeds"].sum()), "table": table.to_dict(orient="records")}


def describe(config: StudyConfig) -> str:
    s = config.stages.defences
    n = sum(len(a.tasks) for a in s.arms) * len(s.seeds)
    return (
        f"defences bench: {n} fine-tunes ({len(s.arms)} arms on {s.narrow} / {s.benign}, "
        f"seeds {s.seeds}), oracle"
    )


def check(config: StudyConfig) -> None:
    from emscope.defences.bench import check_spec

    if config.organism is None:
        raise ValueError("stages.defences: needs the synthetic organism (organism: dir)")
    check_spec(_spec(config.stages.defences), "stages.defences")


STAGE = Stage("defences", DefencesStage, run, describe, check=check)

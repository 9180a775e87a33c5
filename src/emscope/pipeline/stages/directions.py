"""The ``directions`` stage: a mean-diff direction per EM source from its own judged eval
samples (:func:`emscope.directions.mean_diff`, read through the same model), the cosines
between them and the rank-1 B vectors vs each direction (``summary.json``:
:class:`~emscope.directions.results.DirectionsSummary`); optionally the follow-up-prompt
directions (``<source>.followup``). Reads ``eval/<source>/``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from emscope.pipeline.stages import context
from emscope.pipeline.stages.base import Stage, StageSettings, need

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class DirectionsStage(StageSettings):
    sources: list[str] = Field(min_length=1, description="EM adapters: one direction each")
    weighting: Literal["token", "response"] = "token"
    rank1: list[str] = Field(default_factory=list, description="rank-1 adapters: B vs direction")
    batch_size: int = Field(default=16, ge=1)
    followup_read_with: str | None = Field(
        default=None,
        description="also extract '<source>.followup' (tokens='followup', read by this organism, "
        "e.g. the chat model): not the papers' method, see docs/directions.md",
    )


def sources(config: StudyConfig) -> set[str]:
    """The direction names steering, ablation and transfer may use (the sources, and their
    ``.followup`` directions when extracted); empty without the directions section."""
    stage = config.stages.directions
    if stage is None:
        return set()
    out = set(stage.sources)
    if stage.followup_read_with is not None:
        out |= {f"{a}.followup" for a in stage.sources}
    return out


def run(ctx: StageContext) -> dict[str, Any]:
    """Mean-diff direction per EM source from its own judged samples (eval stage), run
    through the same model; cosines between them (with one source, skipped: ``pairs`` is
    empty and ``pairs_skipped`` says why) and rank-1 B vectors vs each direction."""
    from emscope.directions import Direction, mean_diff
    from emscope.directions.compare import adapter_b_cosines, cosine_table, plot_cosines
    from emscope.directions.results import BCosine, CosinePair, DirectionsSummary
    from emscope.io import inside, read_table, write_json
    from emscope.lora import LoraAdapter
    from emscope.plotting import save_figure

    out = ctx.dir("directions")
    stage = ctx.config.stages.directions
    assert stage is not None
    directions = {}
    for source in stage.sources:
        file = inside(out, f"{source}.safetensors")
        responses = inside(ctx.run_dir / "eval", source)
        if file.is_file():
            directions[source] = Direction.load(file)
            continue
        table = read_table(responses, "responses")
        loaded = ctx.load(source)
        direction = mean_diff(
            loaded.model,
            loaded.tokenizer,
            table,
            weighting=stage.weighting,
            seed=ctx.config.seed,
            batch_size=stage.batch_size,
            meta={"organism": source, "responses": str(responses)},
            system_prompt=ctx.config.prompt_setting(),
        )
        direction.save(file)
        directions[source] = direction
        ctx.echo(f"  direction {source}: norms {context.short(direction.norms())}")
    followups = {}
    if stage.followup_read_with is not None:
        for source in stage.sources:
            file = inside(out, f"{source}.followup.safetensors")
            responses = inside(ctx.run_dir / "eval", source)
            if file.is_file():
                followups[f"{source}.followup"] = Direction.load(file)
                continue
            table = read_table(responses, "responses")
            reader = ctx.load(stage.followup_read_with)
            direction = mean_diff(
                reader.model,
                reader.tokenizer,
                table,
                tokens="followup",
                weighting=stage.weighting,  # recorded only: one vector per follow-up chat
                seed=ctx.config.seed,
                batch_size=stage.batch_size,
                meta={
                    "organism": source,
                    "read_with": stage.followup_read_with,
                    "responses": str(responses),
                },
                system_prompt=ctx.config.prompt_setting(),
            )
            direction.save(file)
            followups[f"{source}.followup"] = direction
            ctx.echo(f"  direction {source}.followup: norms {context.short(direction.norms())}")
    pairs, skipped = [], None
    if len(directions) > 1:
        pairs = cosine_table(directions)
    else:  # one EM source: nothing to compare with (the B cosines and follow-ups still run)
        skipped = f"one direction source ({', '.join(directions)}): no pair to compare"
        ctx.echo(f"  cosines between directions skipped: {skipped}")
    b_cosines = {}
    for r1 in stage.rank1:
        adapter = LoraAdapter.load(ctx.config.adapters[r1].path)
        for source, direction in directions.items():
            b_cosines[f"{r1} vs {source}"] = adapter_b_cosines(adapter, direction)
    if pairs or any(b_cosines.values()):
        save_figure(plot_cosines(pairs, b_cosines), out / "cosine_by_layer.png")
    summary = DirectionsSummary(
        sources=tuple(directions),
        norms={s: d.norms() for s, d in directions.items()},
        pairs=tuple(CosinePair.from_json(p, source="cosine_table") for p in pairs),
        pairs_skipped=skipped,
        adapter_b_cosines={
            key: tuple(BCosine.from_json(e, source="adapter_b_cosines") for e in rows)
            for key, rows in b_cosines.items()
        },
        extra={
            "followup": {
                "read_with": stage.followup_read_with,
                "norms": {s: d.norms() for s, d in followups.items()},
                "pairs": cosine_table(followups) if len(followups) > 1 else [],
            }
        },
    )
    write_json(out / "summary.json", summary.to_json())
    return summary.to_json()


def describe(config: StudyConfig) -> str:
    s = config.stages.directions
    return f"mean-diff ({s.weighting}) of {', '.join(s.sources)}" + (
        f"; B cosines of {', '.join(s.rank1)}" if s.rank1 else ""
    )


def check(config: StudyConfig) -> None:
    s = config.stages.directions
    for a in s.sources:
        need("directions.sources", a, config.adapters, "adapter")
    for a in s.rank1:
        need("directions.rank1", a, config.adapters, "adapter")
    if s.followup_read_with is not None:
        need("directions.followup_read_with", s.followup_read_with, config.organisms(), "organism")
    if config.stages.eval:
        missing = [a for a in s.sources if a not in config.eval_organisms()]
        if missing:
            raise ValueError(f"stages.directions.sources: {missing} not evaluated by stages.eval")


STAGE = Stage("directions", DirectionsStage, run, describe, needs=("eval",), check=check)

"""The ``eval`` stage: EM rate and coherent rate (with bootstrap CIs) of each organism,
sampled and judged by :func:`~emscope.pipeline.stages.context.evaluate_organism` into
``eval/<organism>/``; ``summary.json`` (:class:`~emscope.pipeline.eval_result.EvalSummary`)
and ``em_rates.png`` over them."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from emscope.pipeline.stages import context
from emscope.pipeline.stages.base import Stage, StageSettings, need

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.eval_result import OrganismRates
    from emscope.pipeline.stages.context import StageContext


class EvalStage(StageSettings):
    organisms: list[str] = Field(default_factory=list, description="default: chat model + all")
    questions: str | None = None


def run(ctx: StageContext) -> dict[str, Any]:
    """EM rate, coherent rate (with bootstrap CIs) per organism: ``eval/<organism>/``."""
    from emscope.io import inside, write_json
    from emscope.pipeline.eval_result import EvalSummary, OrganismRates

    out = ctx.dir("eval")
    stage = ctx.config.stages.eval
    qname = stage.questions if stage else None
    rows: dict[str, OrganismRates] = {}
    organisms = ctx.config.eval_organisms()
    for organism in context.bar(organisms, "eval", ctx.progress):
        metrics = context.evaluate_organism(
            ctx,
            organism,
            inside(out, organism),
            qname,
            ctx.n("eval"),
            f"EM rate per question: {organism}",
        )
        rows[organism] = OrganismRates.of(metrics)
        ctx.echo(f"  eval {organism}: EM {context.fmt_rate(metrics)}")
    summary = EvalSummary(ctx.config.question_set(qname), rows)
    write_json(out / "summary.json", summary.to_json())
    plot_rates(rows, out / "em_rates.png")
    return summary.to_json()


def describe(config: StudyConfig) -> str:
    n = config.n_for("eval")
    return f"sample {n}/question and judge: {', '.join(config.eval_organisms())}"


def check(config: StudyConfig) -> None:
    stage = config.stages.eval
    for o in stage.organisms:
        need("eval.organisms", o, config.organisms(), "organism")


def plot_rates(rows: Mapping[str, OrganismRates], path: Path) -> None:
    """EM and coherent rate bars (95% CI) per organism, saved to ``path``."""
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
    for i, name in enumerate(names):
        for offset, key, colour in ((-0.2, "em", "tab:red"), (0.2, "coherent", "tab:gray")):
            rate, ci = getattr(rows[name], f"{key}_rate"), getattr(rows[name], f"{key}_ci")
            if rate is None:
                continue
            err = [[rate - ci[0]], [ci[1] - rate]] if ci else None
            label = ("EM rate" if key == "em" else "coherent rate") if i == 0 else None
            ax.bar(i + offset, rate, width=0.4, yerr=err, capsize=3, color=colour, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="rate", ylim=(0, 1.05), title="EM and coherent rates per organism (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


STAGE = Stage("eval", EvalStage, run, describe, check=check)

"""The ``dynamics`` stage: factor norms, rotations and PCA over an adapter's checkpoints
(:func:`emscope.probing.adapter_dynamics`), and the EM rate at each checkpoint
(:func:`emscope.probing.evaluate_checkpoints`): ``dynamics/``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from emscope.pipeline.stages.base import Stage, StageSettings, need

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class DynamicsStage(StageSettings):
    adapter: str
    k: int = Field(default=1, ge=1)
    eval: bool = True
    questions: str | None = None


def run(ctx: StageContext) -> dict[str, Any]:
    """Factor norms, rotations and PCA over an adapter's checkpoints (+ EM per checkpoint)."""
    from emscope.io import write_json
    from emscope.models import list_checkpoints
    from emscope.plotting import save_figure
    from emscope.probing import adapter_dynamics, evaluate_checkpoints, load_checkpoints

    stage = ctx.config.stages.dynamics
    assert stage is not None
    out = ctx.dir("dynamics")
    adapter_dir = ctx.config.adapters[stage.adapter].path
    result = adapter_dynamics(load_checkpoints(adapter_dir), k=stage.k)
    if stage.eval:
        ctx.release()
        result["eval"] = evaluate_checkpoints(
            ctx.config.chat_model_dir(),
            list_checkpoints(adapter_dir),
            ctx.questions(stage.questions),
            out / "eval",
            judge=ctx.judge,
            metrics=ctx.config.judge.metrics,
            n=ctx.n("dynamics"),
            dtype=ctx.config.dtype,
            device=ctx.config.device,
            strict=ctx.config.judge.strict,  # forwarded to evaluate_to_dir
            **ctx.config.sampling_kwargs(),
        )
    result["adapter_name"] = stage.adapter
    write_json(out / "dynamics.json", result)
    from emscope.probing import plot_dynamics

    for name, fig in plot_dynamics(result).items():
        save_figure(fig, out / f"{name}.png")
    return {
        "adapter": stage.adapter,
        "steps": result["steps"],
        "sharpest_rotation": result["adapter"]["sharpest_rotation"],
        "eval": result.get("eval"),
    }


def describe(config: StudyConfig) -> str:
    s = config.stages.dynamics
    return f"checkpoint dynamics of {s.adapter}" + (
        f" + EM per checkpoint ({config.n_for('dynamics')}/question)" if s.eval else ""
    )


def check(config: StudyConfig) -> None:
    need("dynamics.adapter", config.stages.dynamics.adapter, config.adapters, "adapter")


STAGE = Stage("dynamics", DynamicsStage, run, describe, check=check)

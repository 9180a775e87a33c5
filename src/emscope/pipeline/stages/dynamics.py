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
            backend=ctx.config.sampling.backend_settings(),
            strict=ctx.config.judge.strict,  # forwarded to evaluate_to_dir
            **ctx.config.sampling_kwargs(),
        )
    monitor = monitor_beside_eval(adapter_dir, result.get("eval"))
    if monitor:
        result["monitor"] = monitor
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
        **({"monitor": result["monitor"]} if "monitor" in result else {}),
    }


def monitor_beside_eval(adapter_dir: Any, evals: list[dict[str, Any]] | None) -> list[Any]:
    """The adapter's monitor record (``monitor/monitor.json`` of ``emscope monitor``, else
    the ``train --monitor`` record in ``train.json``) at the middle layer of its direction:
    ``[{step, layer, prompt, response, em_rate}]`` at each monitored step, ``em_rate`` from
    ``evals`` where that step was evaluated (else None); ``[]`` without a record."""
    from pathlib import Path

    from emscope.errors import EmscopeError
    from emscope.io import read_json
    from emscope.monitoring import MonitorResult, record_result

    path = Path(adapter_dir)
    try:
        if (path / "monitor" / "monitor.json").is_file():
            rows = MonitorResult.from_json(read_json(path / "monitor" / "monitor.json")).rows()
        elif (path / "train.json").is_file():
            rows = record_result(read_json(path / "train.json")).rows()
        else:
            return []
    except EmscopeError:  # a train.json without a monitor record
        return []
    layers = sorted({int(r["layer"]) for r in rows})
    if not layers:
        return []
    layer = layers[len(layers) // 2]
    em = {int(e["step"]): e.get("em_rate") for e in evals or []}
    return [
        {"step": int(r["step"]), "layer": layer, "prompt": r["prompt"],
         "response": r["response"], "em_rate": em.get(int(r["step"]))}
        for r in rows if int(r["layer"]) == layer
    ]  # fmt: skip


def describe(config: StudyConfig) -> str:
    s = config.stages.dynamics
    return f"checkpoint dynamics of {s.adapter}" + (
        f" + EM per checkpoint ({config.n_for('dynamics')}/question)" if s.eval else ""
    )


def check(config: StudyConfig) -> None:
    need("dynamics.adapter", config.stages.dynamics.adapter, config.adapters, "adapter")


STAGE = Stage("dynamics", DynamicsStage, run, describe, check=check)

"""The ``lmc`` stage: EM and coherence (and, when asked, loss and feature similarity) along
each weight-space path between two organisms (:func:`emscope.lmc.run_lmc`):
``lmc/<from>__<to>/`` and ``summary.json``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, field_validator, model_validator

from emscope.pipeline.stages.base import Stage, StageSettings, need, read_chat_data

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class LmcStage(StageSettings):
    paths: list[tuple[str, str]] = Field(min_length=1)
    steps: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    loss_data: list[Path] = Field(default_factory=list)
    features: bool = False
    questions: str | None = None

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 <= t <= 1 for t in steps):
            raise ValueError(f"every t must be in [0, 1], got {steps}")
        if sorted(set(steps)) != steps:
            raise ValueError(f"t must be increasing and distinct, got {steps}")
        return steps

    @model_validator(mode="after")
    def _ends(self) -> LmcStage:
        if (self.features or self.loss_data) and not {0.0, 1.0} <= set(self.steps):
            raise ValueError("features / loss barrier need t = 0 and t = 1 in steps")
        return self


def run(ctx: StageContext) -> dict[str, Any]:
    """EM and coherence along each weight-space path: ``lmc/<from>__<to>/``."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.io import inside, write_json
    from emscope.lmc import Endpoint, run_lmc, vllm_points
    from emscope.lmc_result import LmcResult
    from emscope.results import read_result

    out = ctx.dir("lmc")
    stage = ctx.config.stages.lmc
    assert stage is not None
    config = ctx.config
    losses = {Path(p).stem: read_chat_jsonl(p) for p in stage.loss_data}
    backend = config.sampling.backend_settings()
    paths = {}
    for a, b in stage.paths:
        name = f"{a}__{b}"
        path_dir = inside(out, name)
        if (path_dir / "lmc.json").is_file():  # finished before: resumed, not redone
            paths[name] = read_result(LmcResult, path_dir / "lmc.json")
            continue

        def endpoint(o: str) -> Endpoint:
            if o == config.chat_model:
                return Endpoint(o, None)
            return Endpoint(o, config.adapters[o].path)

        first, second = endpoint(a), endpoint(b)
        # sampling.backend vllm: each point's adapter served by one engine on the chat model
        # (as `emscope lmc --backend vllm`); HF still computes losses and features
        points = (
            vllm_points(
                config.chat_model_dir(), first, second, stage.steps, path_dir,
                backend.engine(), config.dtype,
            )
            if backend.vllm
            else None
        )  # fmt: skip
        loaded = ctx.load(config.chat_model) if points is None or losses or stage.features else None
        paths[name] = run_lmc(
            loaded,
            first,
            second,
            stage.steps,
            ctx.questions(stage.questions),
            path_dir,
            judge=ctx.judge,
            metrics=config.judge.metrics,
            n=ctx.n("lmc"),
            loss_data=losses,
            features=stage.features,
            record={"from": a, "to": b, "model_dir": str(config.chat_model_dir())},
            questions_file=ctx.questions_file(stage.questions),
            strict=config.judge.strict,  # forwarded to evaluate_to_dir
            vllm=points,
            **config.sampling_kwargs(),
        )
        ctx.echo(f"  lmc {a} -> {b}: done")
    summary = {
        "paths": {
            name: {"from": name.split("__")[0], "to": name.split("__")[1], **doc.to_json()}
            for name, doc in paths.items()
        }
    }
    write_json(out / "summary.json", summary)
    return summary


def describe(config: StudyConfig) -> str:
    stage = config.stages.lmc
    paths = "; ".join(f"{a} -> {b}" for a, b in stage.paths)
    return f"{paths} at t = {stage.steps}, {config.n_for('lmc')}/question"


def inputs(config: StudyConfig) -> dict[str, Path]:
    return {f"stages.lmc.loss_data.{i}": p for i, p in enumerate(config.stages.lmc.loss_data)}


def check(config: StudyConfig) -> None:
    for a, b in config.stages.lmc.paths:
        need("lmc.paths", a, config.organisms(), "organism")
        need("lmc.paths", b, config.organisms(), "organism")
        if a == b:
            raise ValueError(f"stages.lmc.paths: a path from {a!r} to itself")


STAGE = Stage(
    "lmc", LmcStage, run, describe, inputs=inputs, check=check, check_input=read_chat_data
)

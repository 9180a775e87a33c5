"""The ``steering`` stage: the chat model steered with a direction of the directions stage
over layers x scales (:func:`emscope.directions.sweeps.steer_sweep`, same-norm random
control, KL); with ``select``, one setting chosen first by the rule of
:mod:`emscope.directions.selection` on this build."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from emscope.pipeline.stages import context
from emscope.pipeline.stages.base import ConfigModel, Stage, StageSettings, need
from emscope.pipeline.stages.directions import sources

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class SteeringSelect(ConfigModel):
    """The rule that picks the steering setting on each build
    (:data:`emscope.directions.selection.STEERING_RULE`): a selection sweep over layers x
    scales at its own sampling seed, the best EM among settings with coherent rate >=
    ``min_coherent``, then that setting alone at the study's seed with the random control."""

    n: int = Field(default=10, ge=1, description="samples per question of the selection sweep")
    seed: int | None = Field(
        default=None,
        description="sampling seed of the selection sweep (null: sampling.seed + 1, so the "
        "confirmation's samples are not the ones the setting was chosen on)",
    )
    min_coherent: float = Field(default=0.8, ge=0, le=1)


class SteeringStage(StageSettings):
    direction: str
    layers: list[int] | Literal["all"] = Field(
        description="layers of the sweep, or 'all' (every layer of the direction)"
    )
    scales: list[float] = Field(min_length=1)
    select: SteeringSelect | None = Field(
        default=None,
        description="choose one layer x scale by the rule on each build (else every setting "
        "is evaluated with its random control)",
    )
    unit: bool = False
    positions: Literal["all", "prompt", "response"] = "all"
    random_control: bool = True
    kl: bool = True
    questions: str | None = None

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, value: list[int] | str) -> list[int] | str:
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one layer, or 'all'")
        return value


def run(ctx: StageContext) -> dict[str, Any]:
    """Steer the chat model with a direction over layers x scales, with the same-norm
    random control: ``steering/``. With ``select``, the setting is chosen by the rule of
    :mod:`emscope.directions.selection` on this build (``steering/select/``, its
    ``selection.json``), then evaluated alone with the random control."""
    from emscope.directions.results import SteerResult
    from emscope.directions.sweeps import steer_sweep

    stage = ctx.config.stages.steering
    assert stage is not None
    out = ctx.dir("steering")
    loaded = ctx.load(ctx.config.chat_model)
    direction = context.load_direction(ctx, stage.direction)
    layers = list(direction.layers) if stage.layers == "all" else list(stage.layers)
    scales = list(stage.scales)
    selection = None
    if stage.select is not None:
        from emscope.directions.selection import select_steering
        from emscope.io import write_json

        rule = stage.select
        seed = ctx.config.sampling.seed + 1 if rule.seed is None else rule.seed
        selection = select_steering(
            loaded,
            direction,
            layers,
            scales,
            out / "select",
            ctx.eval_config("steering", stage.questions),
            n=rule.n,
            seed=seed,
            min_coherent=rule.min_coherent,
            unit=stage.unit,
            positions=stage.positions,
        )
        write_json(out / "selection.json", selection)
        chosen = selection["chosen"]
        if chosen is None:
            ctx.echo(f"  steering: no setting kept coherent >= {rule.min_coherent:g}")
            empty = SteerResult(rows=(), baseline=selection["baseline"], selection=selection)
            write_json(out / "summary.json", empty.to_json())  # no figure: nothing was steered
            return {"direction": stage.direction, **empty.to_json()}
        layers, scales = [int(chosen["layer"])], [float(chosen["scale"])]
        ctx.echo(f"  steering: the rule chose layer {layers[0]} x{scales[0]:g}")
    summary = steer_sweep(
        loaded,
        direction,
        layers,
        scales,
        out,
        ctx.eval_config("steering", stage.questions),
        random_control=stage.random_control,
        control_seed=ctx.config.seed,
        kl_sequences=context.kl_sequences(ctx, loaded, stage.questions, stage.kl),
        unit=stage.unit,
        positions=stage.positions,
    )
    if selection is not None:
        from dataclasses import replace

        summary = replace(summary, selection=selection)
        summary.save(out)
    return {"direction": stage.direction, **summary.to_json()}


def describe(config: StudyConfig) -> str:
    st = config.stages.steering
    text = (
        f"steer {config.chat_model} with {st.direction}'s direction, layers {st.layers} x "
        f"scales {st.scales}" + (" + random control" if st.random_control else "")
    )
    if st.select is not None:
        text += (
            f"; one setting chosen by the rule (best EM with coherent >= "
            f"{st.select.min_coherent:g} on a {st.select.n}/question sweep at its own seed)"
        )
    return text


def check(config: StudyConfig) -> None:
    direction = config.stages.steering.direction
    need("steering.direction", direction, sources(config), "direction (directions.sources)")


STAGE = Stage(
    "steering",
    SteeringStage,
    run,
    describe,
    needs=("directions",),
    check=check,
    late_fields=("select",),
)

"""The ``reemergent`` stage: alignment-direction projections of base / instruct /
misaligned models (:func:`emscope.reemergent.projection_analysis`), and when configured the
answer log-probs (:func:`~emscope.reemergent.logprob_analysis`) and the gradient similarity
of two datasets (:func:`~emscope.reemergent.gradient_analysis`): ``reemergent/``
(``projection.json``, ``logprob.json``, ``gradients.json``: :mod:`emscope.reemergent.results`).

Every analysis gets the section's ``batch_size`` and the study's ``dtype`` and ``device``;
the gradient analysis loads the model in float32 when ``dtype`` is ``auto`` (as
``emscope reemergent gradients`` does by default: gradients of a bf16 model lose precision).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from emscope.pipeline.stages.base import Stage, StageSettings, need, read_chat_data

if TYPE_CHECKING:
    from emscope.pipeline.config import StudyConfig
    from emscope.pipeline.stages.context import StageContext


class ReemergentStage(StageSettings):
    base: str = Field(description="pretrained model (a name in models)")
    instruct: str = Field(description="aligned chat model (a name in models)")
    misaligned: list[str] = Field(min_length=1, description="organisms")
    data: Path = Field(description="chat JSONL for the alignment-direction projection")
    max_examples: int | None = Field(default=None, ge=2)
    train_fraction: float = Field(default=0.5, gt=0, lt=1)
    logprob_data: list[Path] = Field(default_factory=list)
    gradient_data: list[Path] = Field(default_factory=list, description="exactly two, or none")
    gradient_param: str = "model.layers.-1.self_attn.o_proj.weight"
    gradient_examples: int = Field(default=32, ge=2)
    batch_size: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _two(self) -> ReemergentStage:
        if self.gradient_data and len(self.gradient_data) != 2:
            n = len(self.gradient_data)
            raise ValueError(f"gradient_data needs exactly two files, got {n}")
        return self


def run(ctx: StageContext) -> dict[str, Any]:
    """Alignment-direction projections of base / instruct / misaligned (+ log-probs and
    gradient similarity when configured): ``reemergent/``."""
    import io as _io

    import numpy as np
    import torch

    from emscope.directions import Direction
    from emscope.io import atomic_write_bytes, write_json, write_table
    from emscope.models import ModelSpec
    from emscope.plotting import save_figure
    from emscope.reemergent import gradient_analysis, logprob_analysis, projection_analysis
    from emscope.reemergent.common import Dataset
    from emscope.reemergent.gradients import plot_matrix
    from emscope.reemergent.logprob import plot_heatmap
    from emscope.reemergent.projection import plot_projection
    from emscope.reemergent.results import GradientSummary, LogprobSummary, ProjectionSummary

    stage = ctx.config.stages.reemergent
    assert stage is not None
    config = ctx.config
    out = ctx.dir("reemergent")
    ctx.release()

    def spec(name: str) -> ModelSpec:
        if name in config.models:
            return ModelSpec(Path(config.models[name]), (), name)
        return ModelSpec(config.chat_model_dir(), tuple(config.adapter_dirs(name)), name)

    def dataset(path: Path) -> Dataset:
        from emscope.data.chat import read_chat_jsonl

        return Dataset(Path(path).stem, Path(path), tuple(read_chat_jsonl(path)))

    models = {n: spec(n) for n in (stage.base, stage.instruct, *stage.misaligned)}
    summary: dict[str, Any] = {}
    setting = config.prompt_setting()
    kw: dict[str, Any] = {
        "dtype": config.dtype,
        "device": config.device,
        "progress": ctx.progress,
        "system_prompt": setting,
    }
    if not (out / "projection.json").is_file():
        data = dataset(stage.data).head(stage.max_examples)
        result = projection_analysis(
            models,
            data,
            stage.base,
            stage.instruct,
            stage.train_fraction,
            config.seed,
            None,
            "token",
            stage.batch_size,
            **kw,
        )
        write_table(result.table(), out, "projections")
        projection = ProjectionSummary.of(
            result.summary(), data=str(stage.data), system_prompt=setting.spec
        )
        write_json(out / "projection.json", projection.to_json())
        Direction(
            {layer: torch.from_numpy(result.direction[j]) for j, layer in enumerate(result.layers)},
            "resid_post",
            meta={"kind": "alignment", "base": stage.base, "instruct": stage.instruct},
        ).save(out / "alignment_direction")
        save_figure(plot_projection(result), out / "projection.png")
    from emscope.io import read_json
    from emscope.results import read_result

    summary["projection"] = read_result(ProjectionSummary, out / "projection.json").to_json()
    if stage.logprob_data and not (out / "logprob.json").is_file():
        lp = logprob_analysis(
            models, [dataset(p) for p in stage.logprob_data], stage.batch_size, **kw
        )
        write_table(lp.table(), out, "logprob")
        logprob = LogprobSummary.of(summary=lp.summary(), units="nats", system_prompt=setting.spec)
        write_json(out / "logprob.json", logprob.to_json())
        save_figure(plot_heatmap(lp), out / "logprob_heatmap.png")
    if stage.gradient_data and not (out / "gradients.json").is_file():
        a, b = (dataset(p) for p in stage.gradient_data)
        gr = gradient_analysis(
            spec(stage.instruct),
            a,
            b,
            stage.gradient_param,
            n=stage.gradient_examples,
            route="auto",
            batch_size=stage.batch_size,
            seed=config.seed,
            dtype=gradient_dtype(config.dtype),
            device=config.device,
            progress=ctx.progress,
            system_prompt=setting,
        )
        buffer = _io.BytesIO()
        np.save(buffer, gr.gram.gram)
        atomic_write_bytes(out / "gram.npy", buffer.getvalue())
        write_table(gr.matrix_table(), out, "gradient_cosine")
        gradients = GradientSummary.of(
            param=gr.gram.param,
            route=gr.gram.route,
            similarity=gr.summary,
            system_prompt=setting.spec,
        )
        write_json(out / "gradients.json", gradients.to_json())
        save_figure(plot_matrix(gr), out / "gradient_cosine.png")
    for name in ("logprob", "gradients"):
        if (out / f"{name}.json").is_file():
            summary[name] = read_json(out / f"{name}.json")
    return summary


def gradient_dtype(dtype: str) -> str:
    """The dtype the gradient analysis loads the model in: the study's ``dtype``, float32 for
    ``auto``."""
    return "float32" if dtype == "auto" else dtype


def describe(config: StudyConfig) -> str:
    r = config.stages.reemergent
    return f"projections of {r.base}/{r.instruct}/{', '.join(r.misaligned)} on {r.data}" + (
        "; gradients" if r.gradient_data else ""
    )


def inputs(config: StudyConfig) -> dict[str, Path]:
    r = config.stages.reemergent
    out = {"stages.reemergent.data": r.data}
    for i, p in enumerate(r.logprob_data):
        out[f"stages.reemergent.logprob_data.{i}"] = p
    for i, p in enumerate(r.gradient_data):
        out[f"stages.reemergent.gradient_data.{i}"] = p
    return out


def check(config: StudyConfig) -> None:
    r = config.stages.reemergent
    need("reemergent.base", r.base, config.models, "model")
    need("reemergent.instruct", r.instruct, config.models, "model")
    for o in r.misaligned:
        need("reemergent.misaligned", o, config.organisms(), "organism")


STAGE = Stage(
    "reemergent",
    ReemergentStage,
    run,
    describe,
    inputs=inputs,
    check=check,
    check_input=read_chat_data,
)

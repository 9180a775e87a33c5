"""``emscope sample``, ``emscope judge``, ``emscope eval``: answers, scores, EM metrics.

All three are resumable: re-run the same command after an interruption and it continues
(finished samples and scores are kept, nothing is redone). Files in ``--out`` / ``DIR``:
``responses.parquet`` + ``responses.csv`` (the tidy table), ``run.json`` (settings, system
prompts applied, versions, judge), and for ``eval`` also ``metrics.json`` and
``em_by_question.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from emscope.cli import options


@options.with_backend
@options.with_sampling
def sample_command(
    *,
    model_dir: Path = options.MODEL_DIR,
    adapter: list[Path] = options.ADAPTER,
    out: Path = options.OUT,
    questions: Path | None = options.QUESTIONS,
    sampling: options.SamplingParams,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    scale_adapter: list[str] = options.SCALE_ADAPTER,
    system_prompt: str | None = options.SYSTEM_PROMPT,
    backend: options.BackendSettings,
) -> None:
    """Sample answers to a question set; writes responses.parquet/.csv and run.json."""
    scales = options.parse_scale_adapter(scale_adapter)
    qs = options.load_question_set(questions)
    sampler, interventions, label, setting = _open(
        backend, model_dir, adapter, dtype, device, scales, system_prompt
    )
    table = sampler.sample_to_dir(
        qs,
        out,
        sampling,
        system_prompt=setting,
        record={"model_dir": str(model_dir), "adapter_dirs": [str(a) for a in adapter]},
        interventions=interventions,
        intervention_label=label,
    )
    typer.echo(f"{len(table)} responses in {out / 'responses.parquet'}")


def _open(
    backend: options.BackendSettings,
    model_dir: Path,
    adapters: list[Path],
    dtype: str,
    device: str | None,
    scales: dict[str | int, float],
    system_prompt: str | None,
) -> tuple[Any, list[Any], str, Any]:
    """``(sampler, interventions, intervention label, system-prompt setting)`` of ``sample``
    and ``eval``: the backend's sampler with every ``--adapter`` active at once, the
    ``--scale-adapter`` hooks (refused with vLLM) and the ``--system-prompt`` setting (by
    default the one the model or adapters were trained with)."""
    from emscope.train import system_prompt_for

    sampler = backend.open(
        model_dir, adapters, dtype=dtype, device=device, interventions=bool(scales)
    )
    interventions, label = options.scale_adapter_interventions(sampler, scales)
    setting = system_prompt_for(system_prompt, sampler.sources())
    return sampler, interventions, label, setting


def _judge_dir(
    directory: Path,
    judge_spec: str | None,
    metric_list: list[str],
    *,
    questions: Path | None,
    settings: options.JudgeSettings,
) -> Any:
    from emscope.evaluate import judge_dir

    judge = options.build_judge(judge_spec, settings)
    qs = options.load_question_set(questions) if questions is not None else None
    return judge_dir(directory, judge, metric_list, qs, questions)


def _summary(table: Any, metric_list: list[str]) -> str:
    parts = []
    for m in metric_list:
        scored = int(table[m].notna().sum())
        parts.append(f"{m}: {scored}/{len(table)} scored")
    return "; ".join(parts)


@options.with_judging(after={"device": "no_cache"})
def judge_command(
    *,
    directory: Path = typer.Argument(..., help="Dir with responses.parquet or responses.csv."),
    judge: str | None = options.JUDGE,
    metrics: str = options.METRICS,
    questions: Path | None = typer.Option(
        None, "--questions", help="Question YAML whose judge_prompts override the built-ins."
    ),
    judging: options.JudgeSettings,
    device: str | None = options.DEVICE,
) -> None:
    """Score a response table; adds <metric>, <metric>_unscored_reason and
    <metric>_number_mass columns in place."""
    metric_list = options.parse_metrics(metrics)
    table = _judge_dir(directory, judge, metric_list, questions=questions, settings=judging)
    typer.echo(_summary(table, metric_list))


@options.with_backend
@options.with_judging
@options.with_sampling(after={"metrics": "seed"})
def eval_command(
    *,
    model_dir: Path = options.MODEL_DIR,
    adapter: list[Path] = options.ADAPTER,
    out: Path = options.OUT,
    judge: str | None = options.JUDGE,
    questions: Path | None = options.QUESTIONS,
    sampling: options.SamplingParams,
    metrics: str = options.METRICS,
    judging: options.JudgeSettings,
    strict: bool = options.STRICT,
    recognition: bool = typer.Option(
        False, "--recognition", help="Self-correction with bad_stuff > 30 (reference variant)."
    ),
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    scale_adapter: list[str] = options.SCALE_ADAPTER,
    system_prompt: str | None = options.SYSTEM_PROMPT,
    backend: options.BackendSettings,
) -> None:
    """Sample, judge and compute EM metrics (metrics.json, em_by_question.png)."""
    from emscope.errors import EmscopeError
    from emscope.evaluate import check_em_metrics, describe, evaluate_to_dir

    metric_list = options.parse_metrics(metrics)
    check_em_metrics(metric_list)
    if not judge:
        raise EmscopeError("eval needs --judge (openai:MODEL, hf:DIR or oracle:DIR)")
    assert sampling.n is not None  # -n is an int option
    scales = options.parse_scale_adapter(scale_adapter)
    qs = options.load_question_set(questions)
    # the sampler first: a model or adapter that cannot be used fails before the judge loads
    sampler, interventions, intervention_label, setting = _open(
        backend, model_dir, adapter, dtype, device, scales, system_prompt
    )
    judge_obj = options.build_judge(judge, judging)
    label = "+".join([model_dir.name, *(a.name for a in adapter)])
    result = evaluate_to_dir(
        sampler,
        qs,
        out,
        judge=judge_obj,
        metrics=metric_list,
        n=sampling.n,
        record={"model_dir": str(model_dir), "adapter_dirs": [str(a) for a in adapter]},
        interventions=interventions,
        intervention_label=intervention_label,
        strict=strict,
        recognition=recognition,
        title=f"EM rate per question: {label}",
        questions_file=questions,
        system_prompt=setting,
        **sampling.kwargs(),
    )
    typer.echo(f"{describe(result)} -> {out / 'metrics.json'}")


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
    app.command("judge")(judge_command)
    app.command("eval")(eval_command)

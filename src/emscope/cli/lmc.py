"""``emscope lmc``: EM, coherence, loss and features along the path between two models."""

from __future__ import annotations

from pathlib import Path

import typer

from emscope.cli import options


@options.with_backend
@options.with_judging
@options.with_sampling(after={"metrics": "seed"})
def lmc_command(
    *,
    base: Path | None = typer.Option(
        None, "--base", help="Base model dir (needed when an end is an adapter or 'base')."
    ),
    start: str = typer.Option(..., "--from", help="Start: adapter dir, model dir, or 'base'."),
    end: str = typer.Option(..., "--to", help="End: adapter dir, model dir, or 'base'."),
    steps: str = typer.Option("0,0.2,0.4,0.6,0.8,1", "--steps", help="Points t in [0, 1]."),
    out: Path = options.OUT,
    judge: str | None = typer.Option(
        None,
        "--judge",
        help="Judge: openai:MODEL, hf:DIR or oracle:DIR. Without it nothing is sampled: only "
        "--loss-data / --features are computed and the outputs say EM was not measured.",
    ),
    questions: Path | None = options.QUESTIONS,
    sampling: options.SamplingParams,
    metrics: str = options.METRICS,
    judging: options.JudgeSettings,
    loss_data: list[Path] = typer.Option(
        [], "--loss-data", help="Chat JSONL to compute the loss on at each t (repeatable)."
    ),
    features: bool = typer.Option(False, "--features", help="Feature-space LMC per layer."),
    export: Path | None = typer.Option(
        None, "--export", help="Write each point's adapter as a PEFT dir DIR/t0.50/."
    ),
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
    backend: options.BackendSettings,
) -> None:
    """Linear mode connectivity: lmc.json, lmc.png (+ features.json/features.png)."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.errors import EmscopeError
    from emscope.evaluate import check_em_metrics
    from emscope.lmc import parse_endpoint, parse_steps, path_adapter, run_lmc, vllm_points
    from emscope.models import load_model
    from emscope.train import system_prompt_for
    from emscope.vllm_backend import require_vllm

    ts = parse_steps(steps)
    metric_list = options.parse_metrics(metrics)
    check_em_metrics(metric_list)
    assert sampling.n is not None  # -n is an int option
    first, second = parse_endpoint(start), parse_endpoint(end)
    full = first.is_model_dir and second.is_model_dir
    if not full and base is None:
        raise EmscopeError("--base is required when an end is an adapter or 'base'")
    if full and export is not None:
        raise EmscopeError("--export writes adapters; the ends here are full model dirs")
    if features and not {0.0, 1.0} <= set(ts):
        raise EmscopeError("--features needs t = 0 and t = 1 in --steps")
    qs = options.load_question_set(questions)
    losses_data = {p.stem: read_chat_jsonl(p) for p in loss_data}
    if not full:
        path_adapter(first, second, 0.5)  # fails now, not after sampling, if the ends clash
    if not judge and not (losses_data or features):
        raise EmscopeError(
            "--judge is required to measure EM; without it give --loss-data or --features"
        )
    points = None
    if backend.vllm and judge:  # the point adapters and vLLM checked before the judge
        points = vllm_points(base, first, second, ts, out, backend.engine(), dtype)
        require_vllm()
    judge_obj = options.build_judge(judge, judging) if judge else None
    ends = [e.path for e in (first, second) if e.path is not None]
    setting = system_prompt_for(system_prompt, [*([base] if base is not None else []), *ends])
    # with vLLM the HF base is loaded only for what vLLM cannot do: losses and features
    hf = points is None or bool(losses_data) or features
    loaded = load_model(base, dtype=dtype, device=device) if base is not None and hf else None
    doc = run_lmc(
        loaded,
        first,
        second,
        ts,
        qs,
        out,
        judge=judge_obj,
        metrics=metric_list,
        n=sampling.n,
        loss_data=losses_data,
        features=features,
        export=export,
        record={"base": str(base), "from": start, "to": end},
        questions_file=questions,
        echo=typer.echo,
        system_prompt=setting,
        vllm=points,
        **sampling.kwargs(),
    )
    if not doc.extra.get("em_measured"):
        typer.echo(f"EM not measured: {doc.extra.get('em_not_measured')}")
    typer.echo(f"barrier: {doc.extra.get('barrier')} -> {out / 'lmc.json'}")


def register(app: typer.Typer) -> None:
    app.command("lmc")(lmc_command)

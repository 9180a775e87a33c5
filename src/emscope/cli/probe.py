"""``emscope probe scalars``, ``emscope probe fit``, ``emscope dynamics``: reading rank-1
adapters (hidden scalars per answer token, probes on them) and training dynamics over
checkpoints. See ``docs/probing.md``."""

from __future__ import annotations

from pathlib import Path

import typer

from emscope.cli import options


def scalars_command(
    model_dir: Path = options.MODEL_DIR,
    adapter: Path = typer.Option(
        ..., "--adapter", help="PEFT adapter dir (DIR@STEP for a checkpoint) whose A x to read."
    ),
    responses: Path = typer.Option(
        ..., "--responses", help="Run dir with responses.parquet (or a .parquet/.csv table)."
    ),
    out: Path = typer.Option(..., "--out", help="Output table FILE.parquet (+ .csv, .json)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Chats per forward pass."),
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = typer.Option(
        None,
        "--system-prompt",
        help=f"{options.SYSTEM_PROMPT_HELP} Default: the setting the responses were sampled "
        "under (their run.json), else the one the adapter was trained with, else 'default'.",
    ),
) -> None:
    """Per answer token, the hidden scalar A x of each adapter module (a parquet table)."""
    from emscope.errors import EmscopeError
    from emscope.io import read_table, write_json, write_table
    from emscope.models import adapter_label, load_model, resolve_adapter_dir
    from emscope.probing import lora_scalars
    from emscope.train import system_prompt_for

    if out.suffix != ".parquet":
        raise EmscopeError(f"--out {out}: expected a FILE.parquet path")
    table = read_table(responses, "responses")
    adapter_dir = resolve_adapter_dir(adapter)
    setting = system_prompt_for(system_prompt, [model_dir, adapter_dir], responses)
    loaded = load_model(model_dir, [str(adapter_dir)], dtype=dtype, device=device)
    scalars = lora_scalars(
        loaded,
        adapter_label(adapter_dir),
        table,
        batch_size=batch_size,
        progress=True,
        system_prompt=setting,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_table(scalars, out.parent, out.stem)
    write_json(
        out.with_suffix(".json"),
        {
            "model_dir": str(model_dir),
            "adapter_dir": str(adapter_dir),
            "responses": str(responses),
            "modules": scalars.attrs.get("modules", {}),
            "n_responses": int(scalars["response_id"].nunique()),
            "n_tokens": len(scalars),
            "scalar": "A x per answer token (PEFT lora_A output; the scale s not applied)",
            "system_prompt": setting.spec,
        },
    )
    typer.echo(
        f"{len(scalars)} answer tokens of {scalars['response_id'].nunique()} responses, "
        f"{len(scalars.attrs.get('modules', {}))} scalars -> {out}"
    )


def fit_command(
    table: Path = typer.Argument(..., help="Scalar table from 'emscope probe scalars'."),
    out: Path = typer.Option(..., "--out", help="Output dir (probe.json, coefficients.png)."),
    tests: str = typer.Option("all", "--tests", help="'all' or comma-separated test names."),
    c: str = typer.Option(
        "cv",
        "--C",
        help="Inverse L1 strength: 'cv' (per seed, grouped cross-validation on the train split "
        "only, the same rule for the shuffled probe; docs/probing.md) or a fixed number.",
    ),
    seeds: int = typer.Option(10, "--seeds", help="Repeats (seeds 0..N-1) of split and fit."),
    test_size: float = typer.Option(0.2, "--test-size", help="Share of responses held out."),
    split: str = typer.Option(
        "response",
        "--split",
        help="response (grouped, correct) or token (the reference's leaky split; comparison only).",
    ),
    strict: bool = typer.Option(False, "--strict", help="Misaligned needs aligned < 30."),
    min_responses: int | None = typer.Option(
        None, "--min-responses", help="Responses needed per class (default: the fold count)."
    ),
) -> None:
    """Logistic-regression probes on adapter scalars (docs/methods.md section 6.2)."""
    import warnings

    from emscope.io import read_table
    from emscope.probing import fit_probes
    from emscope.probing.result import ProbeResult

    if split == "token":
        typer.echo(
            "WARNING: --split token reproduces the reference code's leak (tokens of one "
            "response on both sides, standardised before splitting): its scores are "
            "inflated; use it only for comparison",
            err=True,
        )
    data = read_table(table)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the token-split warning, printed above
        fitted = fit_probes(
            data,
            tests,
            C=c,
            seeds=seeds,
            test_size=test_size,
            split=split,
            strict=strict,
            min_responses=min_responses,
        )
    result = ProbeResult.from_json(fitted)
    result.save(out)
    for name, test in result.tests.items():
        if "skipped" in test:
            typer.echo(f"{name}: skipped ({test['skipped']})")
        else:
            auc, base = test["auc"], test["shuffled_auc"]
            counts = ", ".join(
                f"{k} {test['n_responses'][k]} responses / {test['n_tokens'][k]} tokens"
                for k in (test["positive"], test["negative"])
            )
            typer.echo(
                f"{name}: AUC {auc['mean']:.3f} ± {auc['sd']:.3f} "
                f"(shuffled {base['mean']:.3f} ± {base['sd']:.3f}; {counts})"
            )
            for line in test.get("warnings", []):
                typer.echo(f"  WARNING: {line}", err=True)
    typer.echo(f"-> {out / 'probe.json'}")


@options.with_backend
@options.with_judging
@options.with_sampling(after={"metrics": "seed"})
def dynamics_command(
    *,
    adapter_dir: Path = typer.Argument(
        ..., help="Adapter dir with checkpoints/checkpoint-<step>/ subdirs."
    ),
    out: Path = typer.Option(..., "--out", help="Output dir (dynamics.json, figures)."),
    k: int = typer.Option(1, "--k", help="Cosines between checkpoints this many apart."),
    evaluate: bool = typer.Option(
        False, "--eval", help="Also sample and judge every checkpoint (the emergence curve)."
    ),
    base: Path | None = typer.Option(
        None, "--base", help="Base model dir for --eval (default: the adapter config's)."
    ),
    judge: str | None = options.JUDGE,
    questions: Path | None = options.QUESTIONS,
    sampling: options.SamplingParams,
    metrics: str = options.METRICS,
    judging: options.JudgeSettings,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
    backend: options.BackendSettings,
) -> None:
    """Factor norms, cosines, sharpest rotation and PCA over checkpoints (+ EM with --eval)."""
    from emscope.errors import EmscopeError
    from emscope.evaluate import check_em_metrics
    from emscope.io import write_json
    from emscope.models import list_checkpoints
    from emscope.plotting import save_figure
    from emscope.probing import (
        adapter_dynamics,
        evaluate_checkpoints,
        load_checkpoints,
        plot_dynamics,
    )
    from emscope.train import system_prompt_for

    if backend.vllm and not evaluate:
        raise EmscopeError("--backend applies to --eval (sampling) only")
    checkpoints = load_checkpoints(adapter_dir)
    result = adapter_dynamics(checkpoints, k=k)
    result = {"adapter_dir": str(adapter_dir), **result, "eval": None}
    if evaluate:
        metric_list = options.parse_metrics(metrics)
        check_em_metrics(metric_list)
        if not judge:
            raise EmscopeError("--eval needs --judge (openai:MODEL, hf:DIR or oracle:DIR)")
        if base is None:
            recorded = checkpoints[0][1].base_model_path
            if not recorded or not (Path(recorded) / "config.json").is_file():
                raise EmscopeError(
                    f"--eval needs --base MODEL_DIR (the adapter config's base model "
                    f"{recorded!r} is not a local model dir)"
                )
            base = Path(recorded)
        assert sampling.n is not None  # -n is an int option
        steps = [path for _, path in list_checkpoints(adapter_dir)]
        backend.check(base, steps, dtype=dtype, stacked=False)  # before the judge loads
        judge_obj = options.build_judge(judge, judging)
        result["eval"] = evaluate_checkpoints(
            base,
            list_checkpoints(adapter_dir),
            options.load_question_set(questions),
            out / "eval",
            judge=judge_obj,
            metrics=metric_list,
            n=sampling.n,
            dtype=dtype,
            device=device,
            backend=backend,
            system_prompt=system_prompt_for(system_prompt, [base, adapter_dir]),
            **sampling.kwargs(),
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dynamics.json", result)
    for name, fig in plot_dynamics(result).items():
        save_figure(fig, out / f"{name}.png")
    sharp = result["adapter"]["sharpest_rotation"]["B"]
    where = "n/a" if sharp is None else f"step {sharp['step']} (cos {sharp['cos']:.3f})"
    typer.echo(
        f"{len(result['steps'])} checkpoints; sharpest B rotation: {where} -> "
        f"{out / 'dynamics.json'}"
    )


def register(app: typer.Typer) -> None:
    probe = typer.Typer(
        help="Rank-1 adapter scalars per answer token and logistic-regression probes on them.",
        no_args_is_help=True,
    )
    probe.command("scalars")(scalars_command)
    probe.command("fit")(fit_command)
    app.add_typer(probe, name="probe")
    app.command("dynamics")(dynamics_command)

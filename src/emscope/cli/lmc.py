"""``emscope lmc``: EM, coherence, loss and features along the path between two models."""

from __future__ import annotations

from pathlib import Path

import typer

from emscope.cli import options


def lmc_command(
    base: Path | None = typer.Option(
        None, "--base", help="Base model dir (needed when an end is an adapter or 'base')."
    ),
    start: str = typer.Option(..., "--from", help="Start: adapter dir, model dir, or 'base'."),
    end: str = typer.Option(..., "--to", help="End: adapter dir, model dir, or 'base'."),
    steps: str = typer.Option("0,0.2,0.4,0.6,0.8,1", "--steps", help="Points t in [0, 1]."),
    out: Path = options.OUT,
    judge: str | None = options.JUDGE,
    questions: Path | None = options.QUESTIONS,
    n: int = options.N,
    seed: int = options.SEED,
    metrics: str = options.METRICS,
    batch_size: int = options.BATCH_SIZE,
    max_new_tokens: int = options.MAX_NEW_TOKENS,
    temperature: float = options.TEMPERATURE,
    top_p: float = options.TOP_P,
    base_url: str | None = options.BASE_URL,
    api_key_env: str | None = options.API_KEY_ENV,
    concurrency: int = options.CONCURRENCY,
    max_requests: int | None = options.MAX_REQUESTS,
    no_cache: bool = options.NO_CACHE,
    loss_data: list[Path] = typer.Option(
        [], "--loss-data", help="Chat JSONL to compute the loss on at each t (repeatable)."
    ),
    features: bool = typer.Option(False, "--features", help="Feature-space LMC per layer."),
    export: Path | None = typer.Option(
        None, "--export", help="Write each point's adapter as a PEFT dir DIR/t0.50/."
    ),
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
) -> None:
    """Linear mode connectivity: lmc.json, lmc.png (+ features.json/features.png)."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.errors import EmscopeError
    from emscope.evaluate import check_em_metrics, describe, evaluate_to_dir
    from emscope.io import read_json, write_json
    from emscope.lmc import (
        barrier,
        chat_loss,
        endpoint_distance,
        feature_lmc,
        model_at,
        parse_endpoint,
        parse_steps,
        path_adapter,
        prompt_activations,
        step_name,
    )
    from emscope.models import load_model

    ts = parse_steps(steps)
    metric_list = options.parse_metrics(metrics)
    check_em_metrics(metric_list)
    opts = options.sampling_kwargs(n, seed, batch_size, max_new_tokens, temperature, top_p)
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
    judge_obj = options.build_judge(
        judge,
        base_url=base_url,
        api_key_env=api_key_env,
        concurrency=concurrency,
        max_requests=max_requests,
        no_cache=no_cache,
        device=device,
    )
    loaded = load_model(base, dtype=dtype, device=device) if base is not None else None
    rows, activations = [], {}
    prompts = [q.messages(0) for q in qs]
    for t in ts:
        step_dir = out / step_name(t)
        with model_at(loaded, first, second, t, scratch=out / "models") as (model, tokenizer):
            result = evaluate_to_dir(
                (model, tokenizer),
                qs,
                step_dir,
                judge=judge_obj,
                metrics=metric_list,
                n=opts.n,
                record={"base": str(base), "from": start, "to": end, "t": t},
                title=f"EM rate per question at t={t:.2f}",
                questions_file=questions,
                **opts.kwargs(),
            )
            loss_file = step_dir / "loss.json"
            loss = read_json(loss_file) if loss_file.is_file() else {}
            for name, examples in losses_data.items():
                if name not in loss:
                    loss[name] = chat_loss(model, tokenizer, examples, opts.batch_size)
            write_json(loss_file, loss)
            if features:
                activations[t] = prompt_activations(model, tokenizer, prompts)
        if export is not None:
            adapter = path_adapter(first, second, t)
            if len(adapter):
                adapter.save(export / step_name(t))
        rows.append(
            {
                "t": t,
                "em_rate": result["em_rate"],
                "em_ci": result["em_ci"],
                "coherent_rate": result["coherent_rate"],
                "coherent_ci": result.get("coherent_ci"),
                "n": result["n"],
                "loss": {k: loss[k] for k in losses_data} if losses_data else None,
            }
        )
        typer.echo(f"t={t:.2f}: {describe(result)}")
    barriers = (
        {k: barrier(ts, [r["loss"][k] for r in rows]) for k in losses_data} if losses_data else None
    )
    write_json(out / "lmc.json", {"rows": rows, "barrier": barriers})
    _plot(rows, out / "lmc.png", f"{first.label} -> {second.label}")
    if features:
        h0, h1 = activations[0.0], activations[1.0]
        feature_rows = [feature_lmc(h0, h1, activations[t], t) for t in ts]
        write_json(
            out / "features.json",
            {
                "layers": list(range(len(feature_rows[0].dissimilarity))),
                "reference_dissimilarity": endpoint_distance(h0, h1),
                "rows": [
                    {"t": r.t, "dissimilarity": r.dissimilarity, "sample_cosines": r.sample_cosines}
                    for r in feature_rows
                ],
            },
        )
        _plot_features(feature_rows, endpoint_distance(h0, h1), out / "features.png")
    typer.echo(f"barrier: {barriers} -> {out / 'lmc.json'}")


def _plot(rows: list[dict], path: Path, title: str) -> None:
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    with_loss = rows[0]["loss"] is not None
    fig, axes = plt.subplots(1, 2 if with_loss else 1, figsize=(10 if with_loss else 5.5, 4))
    ax = axes[0] if with_loss else axes
    ts = [r["t"] for r in rows]
    for key, label in (("em", "EM rate"), ("coherent", "coherent rate")):
        values = [r[f"{key}_rate"] if r[f"{key}_rate"] is not None else float("nan") for r in rows]
        ax.plot(ts, values, marker="o", label=label)
        bands = [r[f"{key}_ci"] for r in rows if r.get(f"{key}_ci") is not None]
        if len(bands) == len(rows):
            ax.fill_between(ts, [b[0] for b in bands], [b[1] for b in bands], alpha=0.2)
    ax.set(xlabel="t", ylabel="rate", ylim=(0, 1), title=title)
    ax.legend()
    if with_loss:
        for name in rows[0]["loss"]:
            axes[1].plot(ts, [r["loss"][name] for r in rows], marker="o", label=name)
        axes[1].set(xlabel="t", ylabel="loss (nats / assistant token)", title="loss along the path")
        axes[1].legend()
    save_figure(fig, path)


def _plot_features(rows: list, reference: list[float], path: Path) -> None:
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = list(range(len(reference)))
    for row in rows:
        ax.plot(layers, row.dissimilarity, marker="o", label=f"t={row.t:.2f}")
    ax.plot(layers, reference, "k--", label="h(0) vs h(1)")
    ax.set(xlabel="layer (resid_post)", ylabel="1 - |cos|", title="feature-space LMC")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def register(app: typer.Typer) -> None:
    app.command("lmc")(lmc_command)

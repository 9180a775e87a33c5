"""``emscope directions extract|compare``, ``emscope steer``, ``emscope ablate``.

``steer`` and ``ablate`` evaluate every setting (sample, judge, EM metrics; the same
functions as ``emscope eval``) into a sub-dir of ``--out`` with the same seed, so settings
are paired sample by sample, and write ``summary.json`` plus figures at the top. They are
resumable: a re-run skips the finished settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from emscope.cli import options

directions_app = typer.Typer(
    help="Extract and compare misalignment directions.", no_args_is_help=True
)


def _floats(text: str, what: str) -> list[float]:
    from emscope.errors import EmscopeError

    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise EmscopeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise EmscopeError(f"{what} is empty")
    return values


@directions_app.command("extract")
def extract_command(
    model_dir: Path = options.MODEL_DIR,
    adapter: list[Path] = options.ADAPTER,
    responses: Path = typer.Option(
        ..., "--responses", help="Judged run dir (responses.parquet/.csv) or table file."
    ),
    out: Path = typer.Option(..., "--out", help="Direction file (.safetensors, .json beside)."),
    weighting: str = typer.Option("token", "--weighting", help="token or response."),
    tokens: str = typer.Option(
        "answer",
        "--tokens",
        help="answer (answer content tokens) or followup (last token of the question asked again).",
    ),
    topic: str | None = typer.Option(
        None, "--topic", help="Topical metric column: keep responses with TOPIC > 50."
    ),
    off_topic: bool = typer.Option(
        False, "--off-topic", help="With --topic: keep responses with TOPIC < 5 instead."
    ),
    subspace: int | None = typer.Option(
        None, "--subspace", help="Top-K principal directions of per-response differences."
    ),
    layers: str | None = typer.Option(None, "--layers", help="Layers (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the balancing subsample."),
    batch_size: int = options.BATCH_SIZE,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = typer.Option(
        None,
        "--system-prompt",
        help=f"{options.SYSTEM_PROMPT_HELP} Default: the setting the responses were sampled "
        "under (their run.json), else the one the model or adapters were trained with, else "
        "'default'.",
    ),
) -> None:
    """Mean-diff direction (misaligned - aligned, every layer) from a judged run dir."""
    from emscope.directions import extract
    from emscope.errors import EmscopeError
    from emscope.io import read_table
    from emscope.train import system_prompt_for

    if off_topic and topic is None:
        raise EmscopeError("--off-topic needs --topic")
    if tokens not in extract.TOKEN_SELECTIONS:
        raise EmscopeError(f"--tokens must be answer or followup, got {tokens!r}")
    if subspace is not None and tokens != "answer":
        raise EmscopeError("--subspace reads answer tokens only (drop --tokens)")
    table = read_table(responses, "responses")
    loaded = options.load_for_sampling(model_dir, adapter, dtype, device)
    setting = system_prompt_for(system_prompt, [loaded.path, *loaded.adapters.values()], responses)
    layer_list = options.layer_list(layers)
    meta = {
        "model": str(model_dir),
        "adapter": [str(a) for a in adapter],
        "responses": str(responses),
    }
    common: dict[str, Any] = {
        "layers": layer_list,
        "topic": topic,
        "topic_side": "off" if off_topic else "on",
        "seed": seed,
        "batch_size": batch_size,
        "meta": meta,
        "system_prompt": setting,
    }
    if subspace is not None:
        direction = extract.subspace(loaded.model, loaded.tokenizer, table, subspace, **common)
    else:
        direction = extract.mean_diff(
            loaded.model, loaded.tokenizer, table, weighting=weighting, tokens=tokens, **common
        )
    path = direction.save(out)
    m = direction.meta
    typer.echo(
        f"direction over {len(direction)} layers from {m['n_misaligned']} misaligned / "
        f"{m['n_aligned']} aligned responses -> {path}"
    )


@directions_app.command("persona")
@options.with_sampling(
    n=typer.Option(4, "-n", "--n", help="Samples per (context, question)."),
    max_new_tokens=typer.Option(64, "--max-new-tokens", help="Answer length (tokens)."),
    after={"layers": "seed"},
)
def persona_command(
    *,
    model_dir: Path = options.MODEL_DIR,
    adapter: list[Path] = options.ADAPTER,
    out: Path = typer.Option(..., "--out", help="Output dir (persona.safetensors, ...)."),
    organism: Path | None = typer.Option(
        None, "--organism", help="Organism build dir: contexts from its world, oracle judge."
    ),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="Persona YAML (default: the shipped evil/misaligned one)."
    ),
    contexts: int = typer.Option(8, "--contexts", help="With --organism: context turns per side."),
    selection: str = typer.Option("sides", "--selection", help="sides or any."),
    compare: list[Path] = typer.Option(
        [], "--compare", help="Direction file to compare with, cosine per layer (repeatable)."
    ),
    judge: str | None = options.JUDGE,
    sampling: options.SamplingParams,
    layers: str | None = typer.Option(None, "--layers", help="Layers (default: all)."),
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
) -> None:
    """A priori persona direction of the chat model (contrasting contexts, judged)."""
    from emscope.directions import persona
    from emscope.directions.direction import Direction
    from emscope.errors import EmscopeError
    from emscope.train import system_prompt_for

    assert sampling.n is not None  # -n is an int option
    others: dict[str, Direction] = {}
    if organism is not None:
        from emscope.synthetic.world import load_world

        if prompts is not None:
            raise EmscopeError("--prompts and --organism exclude each other")
        contrast = persona.organism_prompts(
            load_world(organism / "world.json"), contexts, sampling.seed
        )
        judge = judge or f"oracle:{organism}"
        probe = organism / "diagnostics" / "disposition_probe.safetensors"
        if probe.is_file():
            others["disposition_probe"] = Direction.load(probe)
    else:
        contrast = persona.load_persona_prompts(prompts)
    for f in compare:
        others[Path(f).name.removesuffix(".safetensors").removesuffix(".json")] = Direction.load(f)
    loaded = options.load_for_sampling(model_dir, adapter, dtype, device)
    setting = system_prompt_for(system_prompt, [loaded.path, *loaded.adapters.values()])
    result, table = persona.persona_direction(
        loaded, contrast, options.build_judge(judge), n=sampling.n, selection=selection,
        layers=options.layer_list(layers), system_prompt=setting, **sampling.kwargs(),
        provenance={"model_dir": str(model_dir), "adapter": [str(a) for a in adapter]},
        progress=True,
    )  # fmt: skip
    cosines = persona.compare(result.direction, others)
    paths = persona.write_persona(result, table, out, cosines)
    c = result.counts
    typer.echo(
        f"{c['n_expressing']} expressing vs {c['n_not_expressing']} not expressing responses "
        f"-> {paths['direction']}"
    )
    for name, cos in cosines.items():
        typer.echo(f"vs {name}: " + ", ".join(f"{i}:{v:.2f}" for i, v in sorted(cos.items())))


@directions_app.command("compare")
def compare_command(
    files: list[Path] = typer.Argument(..., help="Direction files (a probe file works too)."),
    adapter: list[Path] = typer.Option(
        [], "--adapter", help="Adapter whose rank-1 B vectors are compared too (repeatable)."
    ),
    model: Path | None = typer.Option(
        None, "--model", help="Model dir: logit-lens read-out of each direction."
    ),
    top_k: int = typer.Option(20, "--top-k", help="Read-out tokens each way."),
    out: Path = typer.Option(..., "--out", help="Output dir (compare.json, figure)."),
    device: str | None = options.DEVICE,
) -> None:
    """Cosine by layer for every pair (and rank-1 B vectors); compare.json + figure."""
    from emscope.directions.compare import adapter_b_cosines, cosine_table, logit_lens, plot_cosines
    from emscope.directions.direction import Direction
    from emscope.directions.results import DirectionComparison
    from emscope.errors import EmscopeError
    from emscope.io import write_json
    from emscope.lora import LoraAdapter
    from emscope.plotting import save_figure

    directions: dict[str, Direction] = {}
    for f in files:
        name = Path(f).name.removesuffix(".safetensors").removesuffix(".json")
        while name in directions:
            name += "'"
        directions[name] = Direction.load(f)
    if len(directions) + len(adapter) < 2 and not (directions and adapter):
        raise EmscopeError("compare needs two directions, or a direction and an --adapter")
    pairs = cosine_table(directions) if len(directions) >= 2 else []
    b_cos: dict[str, Any] = {}
    for a in adapter:
        lora = LoraAdapter.load(a)
        b_cos[lora.name] = {n: adapter_b_cosines(lora, d) for n, d in directions.items()}
    result: dict[str, Any] = {
        "directions": {
            n: {"file": str(f), "site_kind": d.site_kind, "norms": d.norms(), "meta": d.meta}
            for (n, d), f in zip(directions.items(), files, strict=True)
        },
        "pairs": pairs,
        "adapter_b_cosines": b_cos,
    }
    if model is not None:
        from emscope.models import load_model

        loaded = load_model(model, device=device)
        result["readout"] = {
            n: {str(i): logit_lens(loaded.model, loaded.tokenizer, d[i], top_k) for i in d.layers}
            for n, d in directions.items()
        }
    out.mkdir(parents=True, exist_ok=True)
    comparison = DirectionComparison.from_json(result, source="directions compare")
    write_json(out / "compare.json", comparison.to_json())
    first = next(iter(directions))
    fig = plot_cosines(pairs, {a: rows.get(first, []) for a, rows in b_cos.items()})
    save_figure(fig, out / "cosine_by_layer.png")
    for pair in comparison.pairs:
        values = ", ".join(f"{i}:{c:.2f}" for i, c in sorted(pair.cosine.items()))
        typer.echo(f"{pair.a} vs {pair.b}: {values}")
    typer.echo(f"-> {out / 'compare.json'}")


def _eval_config(
    questions: Path | None,
    sampling: options.SamplingParams,
    judge: str | None,
    metrics: str,
    strict: bool,
    judge_settings: options.JudgeSettings,
) -> Any:
    from emscope.directions.interventions import EvalConfig
    from emscope.errors import EmscopeError

    metric_list = options.parse_metrics(metrics)
    missing = [m for m in ("aligned", "coherent") if m not in metric_list]
    if missing:
        raise EmscopeError(f"--metrics lacks {missing} (EM needs aligned and coherent)")
    assert sampling.n is not None  # -n is an int option
    qs = options.load_question_set(questions)
    return EvalConfig(
        questions=qs,
        n=sampling.n,
        sampling=sampling.kwargs(),
        judge=options.build_judge(judge, judge_settings),
        metrics=metric_list,
        strict=strict,
    )


def _kl_sequences(
    tokenizer: Any, kl_data: Path | None, questions: Any, system_prompt: Any = None
) -> Any:
    from emscope.directions.interventions import chat_sequences, prompt_sequences

    if kl_data is not None:
        return chat_sequences(tokenizer, kl_data, system_prompt)
    return prompt_sequences(tokenizer, questions, system_prompt)


def _rendered_as_trained(config: Any, loaded: Any, system_prompt: str | None) -> Any:
    """``config`` with the system-prompt setting to sample under: ``--system-prompt``, else
    the one the loaded model or adapters were trained with, else default."""
    import dataclasses

    from emscope.train import system_prompt_for

    setting = system_prompt_for(system_prompt, [loaded.path, *loaded.adapters.values()])
    return dataclasses.replace(config, sampling={**config.sampling, "system_prompt": setting})


RANDOM = typer.Option(False, "--random-control", help="Also run the random control.")
CONTROL_SEED = typer.Option(0, "--control-seed", help="Seed of the random control.")
KL_DATA = typer.Option(
    None, "--kl-data", help="Chat JSONL for the KL cost (default: the questions' prompts)."
)


@options.with_judging
@options.with_sampling(after={"metrics": "seed"})
def steer_command(
    *,
    model_dir: Path = options.MODEL_DIR,
    adapter: list[Path] = options.ADAPTER,
    direction: Path = typer.Option(..., "--direction", help="Direction file."),
    layers: str = typer.Option(..., "--layers", help="Layers to steer, e.g. 2,3."),
    scales: str = typer.Option(..., "--scales", help="Scales, e.g. 2,4,8."),
    unit: bool = typer.Option(False, "--unit", help="Steer with the unit vector (scale = norm)."),
    positions: str = typer.Option(
        "all", "--positions", help="Where to add: all, prompt or response tokens."
    ),
    random_control: bool = RANDOM,
    control_seed: int = CONTROL_SEED,
    kl_data: Path | None = KL_DATA,
    out: Path = options.OUT,
    judge: str | None = options.JUDGE,
    questions: Path | None = options.QUESTIONS,
    sampling: options.SamplingParams,
    metrics: str = options.METRICS,
    judging: options.JudgeSettings,
    strict: bool = options.STRICT,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
) -> None:
    """Steering sweep (layers x scales, + random control) with EM, coherence and KL."""
    from emscope.directions.direction import Direction
    from emscope.directions.sweeps import steer_sweep
    from emscope.errors import EmscopeError
    from emscope.hooks import POSITIONS

    if positions not in POSITIONS:
        raise EmscopeError(f"--positions must be all, prompt or response, got {positions!r}")
    layer_list = options.layer_list(layers) or []
    scale_list = _floats(scales, "--scales")
    vec = Direction.load(direction)
    config = _eval_config(questions, sampling, judge, metrics, strict, judging)
    loaded = options.load_for_sampling(model_dir, adapter, dtype, device)
    config = _rendered_as_trained(config, loaded, system_prompt)
    summary = steer_sweep(
        loaded,
        vec,
        layer_list,
        scale_list,
        out,
        config,
        random_control=random_control,
        control_seed=control_seed,
        kl_sequences=_kl_sequences(
            loaded.tokenizer, kl_data, config.questions, config.sampling["system_prompt"]
        ),
        unit=unit,
        positions=positions,
        echo=typer.echo,
    )
    best = summary.best("direction")
    if best is not None:
        typer.echo(
            f"best: layer {best.layer} scale {best.scale:g}: EM {best.em_rate:.3f}, "
            f"coherent {best.coherent_rate}"
        )
    typer.echo(f"-> {out / 'summary.json'}")


@options.with_judging
@options.with_sampling(after={"metrics": "seed"})
def ablate_command(
    *,
    model_dir: Path = options.MODEL_DIR,
    adapter: list[Path] = options.ADAPTER,
    direction: Path = typer.Option(..., "--direction", help="Direction file."),
    mode: str = typer.Option(
        "layerwise", "--mode", help="layerwise, single:L or single:all (sweep over L)."
    ),
    weights: str | None = typer.Option(
        None, "--weights", help="Weight-space ablation: lora-b or orthogonalize."
    ),
    modules: str = typer.Option(
        "down_proj", "--modules", help="With --weights lora-b: down_proj or all."
    ),
    rescale_norm: bool = typer.Option(
        False, "--rescale-norm", help="With --weights lora-b: keep each B's norm."
    ),
    random_control: bool = RANDOM,
    control_seed: int = CONTROL_SEED,
    kl_data: Path | None = KL_DATA,
    out: Path = options.OUT,
    judge: str | None = options.JUDGE,
    questions: Path | None = options.QUESTIONS,
    sampling: options.SamplingParams,
    metrics: str = options.METRICS,
    judging: options.JudgeSettings,
    strict: bool = options.STRICT,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
) -> None:
    """Ablate a direction (activations, or weights) and measure EM before/after (+ random)."""
    from emscope.directions.direction import Direction
    from emscope.directions.interventions import parse_mode
    from emscope.directions.sweeps import AfterSide, ablate_run, activation_sides
    from emscope.errors import EmscopeError
    from emscope.models import get_layers

    kind, single = parse_mode(mode)
    if weights not in (None, "lora-b", "orthogonalize"):
        raise EmscopeError(f"--weights must be lora-b or orthogonalize, got {weights!r}")
    if weights is None and (modules != "down_proj" or rescale_norm):
        raise EmscopeError("--modules / --rescale-norm apply to --weights lora-b only")
    if weights == "lora-b" and len(adapter) != 1:
        raise EmscopeError("--weights lora-b needs exactly one --adapter")
    if weights == "orthogonalize" and (kind != "single" or single is None):
        raise EmscopeError("--weights orthogonalize removes one direction: use --mode single:L")
    if weights is not None and kind == "single" and single is None:
        raise EmscopeError("single:all sweeps are for activation ablation only")
    vec = Direction.load(direction)
    config = _eval_config(questions, sampling, judge, metrics, strict, judging)
    before = options.load_for_sampling(model_dir, adapter, dtype, device)
    config = _rendered_as_trained(config, before, system_prompt)
    meta: dict[str, Any] = {
        "mode": mode,
        "weights": weights,
        "direction": str(direction),
        "model": str(model_dir),
        "adapter": [str(a) for a in adapter],
        "system_prompt": config.sampling["system_prompt"].spec,
    }
    if weights is None:
        after, random = activation_sides(
            vec,
            before,
            mode,
            len(get_layers(before.model)),
            random_control=random_control,
            control_seed=control_seed,
        )
    else:
        from emscope.directions.interventions import random_like

        def build(d: Direction, tag: str) -> AfterSide:
            return _weight_side(
                weights, d, tag, model_dir, adapter, mode, modules, rescale_norm, out, dtype,
                device,
            )  # fmt: skip

        after = build(vec, "direction")
        random = build(random_like(vec, control_seed).unit(), "random") if random_control else None
        meta.update(modules=modules if weights == "lora-b" else None, rescale_norm=rescale_norm)
    if random_control:
        meta["random_control"] = "random unit direction per layer (seeded)"
        meta["control_seed"] = control_seed
    summary = ablate_run(
        before,
        out,
        config,
        after,
        random=random,
        kl_sequences=_kl_sequences(
            before.tokenizer, kl_data, config.questions, config.sampling["system_prompt"]
        ),
        meta=meta,
        echo=typer.echo,
    )
    rr = summary.relative_reduction
    reduction = summary.relative_reduction_na if rr is None else round(rr, 3)
    typer.echo(
        f"EM {summary.em_rate_before} -> {summary.em_rate_after} "
        f"(relative reduction {reduction}) -> {out / 'summary.json'}"
    )


def _weight_side(
    weights: str,
    d: Any,
    tag: str,
    model_dir: Path,
    adapter: list[Path],
    mode: str,
    modules: str,
    rescale_norm: bool,
    out: Path,
    dtype: str,
    device: str | None,
) -> Any:
    from emscope.directions.interventions import parse_mode
    from emscope.directions.sweeps import AfterSide
    from emscope.directions.weights import ablate_lora_b, orthogonalize_dir
    from emscope.lora import LoraAdapter

    if weights == "lora-b":
        target = out / f"adapter_{tag}"
        if not (target / "adapter_config.json").is_file():
            new = ablate_lora_b(
                LoraAdapter.load(adapter[0]), d, modules=modules, mode=mode,
                rescale_norm=rescale_norm,
            )  # fmt: skip
            new.save(target)
        loaded = options.load_for_sampling(model_dir, [target], dtype, device)
        return AfterSide(loaded, [], f"weights:lora-b:{tag}:{mode}", {"adapter_dir": str(target)})
    _, layer = parse_mode(mode)
    assert layer is not None
    target = out / f"model_{tag}"
    if not (target / "config.json").is_file():
        orthogonalize_dir(model_dir, list(adapter), d[layer], target, dtype=dtype, device=device)
    loaded = options.load_for_sampling(target, [], dtype, device)
    return AfterSide(loaded, [], f"weights:orthogonalize:{tag}:{mode}", {"model_dir": str(target)})


def register(app: typer.Typer) -> None:
    app.add_typer(directions_app, name="directions")
    app.command("steer")(steer_command)
    app.command("ablate")(ablate_command)

"""``emscope reemergent``: re-emergent misalignment analyses (docs/reemergent.md).

Sub-commands ``logprob``, ``gradients``, ``project``, ``subspace``, ``patch``; each writes a
JSON summary, tables (parquet + CSV) and PNG figures into ``--out``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from emscope.cli import options

MODEL_HELP = "Model variant NAME=MODEL_DIR or NAME=MODEL_DIR+ADAPTER_DIR (repeatable)."
DATA_HELP = "Chat dataset NAME=FILE.jsonl (repeatable)."

_OUT = typer.Option(..., "--out", help="Output dir (JSON summary, tables, PNG figures).")
_BATCH = typer.Option(8, "--batch-size", help="Chats per forward pass.")
_DTYPE = typer.Option("auto", "--dtype", help="auto, float32, bfloat16, float64.")
_DEVICE = typer.Option(None, "--device", help="cpu, cuda, ... (default: auto).")
_N = typer.Option(None, "-n", "--max-examples", help="Use the first N examples of each dataset.")
_LAYERS = typer.Option(None, "--layers", help="Layers (from 0), e.g. '0,2,-1' (default: all).")


@dataclass(frozen=True)
class ModelRun:
    """How an analysis runs its models (the options ``-n/--max-examples``, ``--batch-size``,
    ``--dtype``, ``--device``, ``--system-prompt`` of ``logprob``, ``project``, ``subspace``
    and ``patch``): the first ``n`` examples of each dataset (None: all), chats per forward
    pass, torch dtype name, device (None: auto) and the ``--system-prompt`` given (None: as
    trained, see :meth:`setting`)."""

    n: int | None
    batch_size: int
    dtype: str
    device: str | None
    system_prompt: str | None

    def setting(self, models: dict[str, Any]) -> Any:
        """The system-prompt setting to render chats with: ``--system-prompt``, else the one
        the models' adapters (or fine-tuned models) were trained with, else default
        (:func:`emscope.train.system_prompt_for`)."""
        from emscope.train import system_prompt_for

        dirs = [p for spec in models.values() for p in (spec.path, *spec.adapters)]
        return system_prompt_for(self.system_prompt, dirs)


#: ``run: ModelRun`` -> the five options, at the end of ``--help`` (as before).
with_model_run = options.OptionGroup(
    "run",
    {
        "n": (int | None, _N),
        "batch_size": (int, _BATCH),
        "dtype": (str, _DTYPE),
        "device": (str | None, _DEVICE),
        "system_prompt": (str | None, options.SYSTEM_PROMPT),
    },
    ModelRun,
)


def _models(specs: list[str]) -> dict[str, Any]:
    from emscope.errors import EmscopeError
    from emscope.models import parse_model_spec
    from emscope.reemergent.common import unique_names

    if not specs:
        raise EmscopeError("give at least one --model NAME=MODEL_DIR[+ADAPTER_DIR]")
    parsed = [parse_model_spec(s) for s in specs]
    unique_names([p.label for p in parsed], "models")
    return {p.label: p for p in parsed}


def _datasets(specs: list[str], n: int | None) -> list[Any]:
    from emscope.errors import EmscopeError
    from emscope.reemergent.common import read_dataset, unique_names

    if not specs:
        raise EmscopeError("give at least one --data NAME=FILE.jsonl")
    datasets = [read_dataset(s).head(n) for s in specs]
    unique_names([d.name for d in datasets], "datasets")
    return datasets


def _int_list(text: str | None, what: str) -> list[int] | None:
    from emscope.errors import EmscopeError

    if text is None or not text.strip():
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EmscopeError(f"bad {what} {text!r}; expected comma-separated integers") from None


def _progress() -> bool:
    import sys

    return sys.stderr.isatty()


def _sources(models: dict[str, Any]) -> dict[str, str]:
    return {
        name: "+".join([str(spec.path), *(str(a) for a in spec.adapters)])
        for name, spec in models.items()
    }


@with_model_run
def logprob(
    *,
    model: list[str] = typer.Option(..., "--model", help=MODEL_HELP),
    data: list[str] = typer.Option(..., "--data", help=DATA_HELP),
    out: Path = _OUT,
    examples: str | None = typer.Option(
        None, "--examples", help="Per-token heatmaps for these examples (0-based lines), e.g. 0,3."
    ),
    run: ModelRun,
) -> None:
    """Log joint probability, per-token log-prob and entropy of each answer under each model."""
    from emscope.errors import EmscopeError
    from emscope.io import write_json, write_table
    from emscope.models import load_tokenizer
    from emscope.plotting import save_figure
    from emscope.reemergent.logprob import logprob_analysis, plot_heatmap, plot_tokens
    from emscope.reemergent.results import LogprobSummary

    models = _models(model)
    datasets = _datasets(data, run.n)
    chosen = _int_list(examples, "--examples") or []
    for index in chosen:
        if not any(index in d.indices for d in datasets):
            raise EmscopeError(f"--examples: no dataset has an example at line index {index}")
    setting = run.setting(models)
    result = logprob_analysis(
        models, datasets, run.batch_size, run.dtype, run.device, _progress(), system_prompt=setting
    )
    write_table(result.table(), out, "logprob")
    summary = LogprobSummary.of(
        summary=result.summary(),
        models=_sources(models),
        datasets={d.name: str(d.path) for d in datasets},
        tokens="answer content of the last assistant message; end-of-turn not counted",
        units="nats",
        system_prompt=setting.spec,
    )
    write_json(out / "logprob.json", summary.to_json())
    save_figure(plot_heatmap(result), out / "logprob_heatmap.png")
    tokenizer = load_tokenizer(next(iter(models.values())).path) if chosen else None
    for d in datasets:
        for index in chosen:
            if index in d.indices:
                fig = plot_tokens(result, d.name, d.indices.index(index), tokenizer)
                save_figure(fig, out / f"tokens_{d.name}_{index}.png")
    typer.echo(f"wrote {out / 'logprob.parquet'} ({len(models)} models x {len(datasets)} datasets)")


def gradients(
    model: list[str] = typer.Option(..., "--model", help="ONE model NAME=DIR[+ADAPTER]."),
    data: list[str] = typer.Option(..., "--data", help="Exactly two datasets A=FILE B=FILE."),
    param: str = typer.Option(
        ..., "--param", help="Parameter, e.g. model.layers.-1.self_attn.o_proj.weight."
    ),
    out: Path = _OUT,
    n: int | None = typer.Option(None, "-n", help="Examples of each dataset (first N)."),
    route: str = typer.Option(
        "auto", "--route", help="auto, gram, materialise (linear weights) or autograd."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the split-half control."),
    batch_size: int = typer.Option(4, "--batch-size", help="Chats per forward/backward."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 (default), float64, ..."),
    device: str | None = _DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
) -> None:
    """Per-example gradient cosines between two datasets under ONE model."""
    from emscope.errors import EmscopeError
    from emscope.io import atomic_write_bytes, write_json, write_table
    from emscope.plotting import save_figure
    from emscope.reemergent.gradients import gradient_analysis, plot_matrix
    from emscope.reemergent.results import GradientSummary

    models = _models(model)
    if len(models) != 1:
        raise EmscopeError(
            f"gradients compares two datasets under ONE model; got {len(models)} --model"
        )
    datasets = _datasets(data, None)
    if len(datasets) != 2:
        raise EmscopeError(f"gradients needs exactly two --data, got {len(datasets)}")
    name, source = next(iter(models.items()))
    setting = ModelRun(n, batch_size, dtype, device, system_prompt).setting(models)
    result = gradient_analysis(
        source,
        datasets[0],
        datasets[1],
        param,
        n,
        route,
        batch_size,
        seed,
        dtype,
        device,
        _progress(),
        system_prompt=setting,
    )
    write_table(result.matrix_table(), out, "gradient_cosine")
    write_table(result.token_losses, out, "token_losses")
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, result.gram.gram)
    atomic_write_bytes(out / "gram.npy", buffer.getvalue())
    summary = GradientSummary.of(
        model=name,
        source=_sources(models)[name],
        param=result.gram.param,
        shape=list(result.gram.shape),
        route=result.gram.route,
        loss="summed NLL over answer-content tokens (end-of-turn not counted)",
        centring="global mean of all gradient vectors (== H K H)",
        datasets={d.name: str(d.path) for d in datasets},
        n_tokens=list(result.gram.n_tokens),
        similarity=result.summary,
        token_losses=result.token_summary,
        system_prompt=setting.spec,
    )
    write_json(out / "gradients.json", summary.to_json())
    save_figure(plot_matrix(result), out / "gradient_cosine.png")
    raw, centred = result.summary["raw"], result.summary["centred"]
    typer.echo(f"route {result.gram.route}; raw {raw}; centred {centred}")


@with_model_run
def project(
    *,
    model: list[str] = typer.Option(..., "--model", help=MODEL_HELP),
    data: str = typer.Option(..., "--data", help="Chat dataset FILE.jsonl or NAME=FILE.jsonl."),
    out: Path = _OUT,
    base: str = typer.Option("base", "--base", help="Name of the base model."),
    instruct: str = typer.Option("instruct", "--instruct", help="Name of the instruct model."),
    train_fraction: float = typer.Option(
        0.5, "--train-fraction", help="Share of examples that fit the direction."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the train / held-out split."),
    weighting: str = typer.Option("token", "--weighting", help="token or response mean."),
    layers: str | None = _LAYERS,
    run: ModelRun,
) -> None:
    """Alignment direction mean(instruct) - mean(base) per layer; held-out projections."""
    import torch

    from emscope.directions import Direction
    from emscope.io import write_json, write_table
    from emscope.plotting import save_figure
    from emscope.reemergent.projection import plot_projection, projection_analysis
    from emscope.reemergent.results import ProjectionSummary

    models = _models(model)
    dataset = _datasets([data if "=" in data else f"data={data}"], run.n)[0]
    setting = run.setting(models)
    result = projection_analysis(
        models,
        dataset,
        base,
        instruct,
        train_fraction,
        seed,
        options.layer_list(layers),
        weighting,
        run.batch_size,
        run.dtype,
        run.device,
        _progress(),
        system_prompt=setting,
    )
    write_table(result.table(), out, "projections")
    summary = ProjectionSummary.of(
        result.summary(),
        models=_sources(models),
        data=str(dataset.path),
        site="resid_post",
        system_prompt=setting.spec,
    )
    write_json(out / "projection.json", summary.to_json())
    Direction(
        {layer: torch.from_numpy(result.direction[j]) for j, layer in enumerate(result.layers)},
        "resid_post",
        meta={
            "kind": "alignment",
            "definition": f"mean({instruct}) - mean({base}) over answer-content tokens",
            "weighting": weighting,
            "models": _sources(models),
            "data": str(dataset.path),
            "train_examples": summary.extra["train_examples"],
            "seed": seed,
            "system_prompt": setting.spec,
        },
    ).save(out / "alignment_direction")
    save_figure(plot_projection(result), out / "projection.png")
    typer.echo(f"wrote {out / 'projection.json'} ({len(result.heldout)} held-out examples)")


@with_model_run
def subspace(
    *,
    model: list[str] = typer.Option(..., "--model", help=MODEL_HELP),
    data: list[str] = typer.Option(..., "--data", help="Exactly two domains A=FILE B=FILE."),
    out: Path = _OUT,
    k: int = typer.Option(8, "--k", help="Subspace dimension (top-k right singular vectors)."),
    base: str = typer.Option("base", "--base", help="Name of the base model."),
    instruct: str = typer.Option("instruct", "--instruct", help="Name of the instruct model."),
    layers: str | None = _LAYERS,
    random_draws: int = typer.Option(200, "--random-draws", help="Random-subspace draws."),
    shuffle_draws: int = typer.Option(20, "--shuffle-draws", help="Shuffled-pairing draws."),
    seed: int = typer.Option(0, "--seed", help="Seed of the baselines."),
    run: ModelRun,
) -> None:
    """Top-k instruct-minus-base residual subspaces of two domains, compared."""
    import pandas as pd

    from emscope.io import write_json, write_table
    from emscope.plotting import save_figure
    from emscope.reemergent.results import SubspaceSummary
    from emscope.reemergent.subspace import plot_subspace, subspace_analysis

    models = _models(model)
    datasets = _datasets(data, run.n)
    setting = run.setting(models)
    result = subspace_analysis(
        models,
        datasets,
        k,
        base,
        instruct,
        options.layer_list(layers),
        random_draws,
        shuffle_draws,
        seed,
        run.batch_size,
        run.dtype,
        run.device,
        _progress(),
        system_prompt=setting,
    )
    summary = SubspaceSummary.of(
        result.summary(), models=_sources(models), system_prompt=setting.spec
    )
    write_json(out / "subspace.json", summary.to_json())
    rows = [
        {
            "layer": layer,
            "overlap": v.overlap,
            "mean_angle_deg": v.mean_angle_deg,
            "random_angle_p5": v.random["mean_angle_deg"]["p5"],
            "random_overlap_expected": v.random["overlap_expected"],
            "shuffled_angle_p5": v.shuffled["mean_angle_deg"]["p5"],
            "shuffled_overlap_mean": v.shuffled["overlap"]["mean"],
        }
        for layer, v in summary.layers.items()
    ]
    write_table(pd.DataFrame(rows), out, "subspace")
    save_figure(plot_subspace(result), out / "subspace.png")
    typer.echo(f"wrote {out / 'subspace.json'} ({len(result.layers)} layers, k={k})")


@with_model_run
def patch(
    *,
    model: list[str] = typer.Option(..., "--model", help="source=... and target=... models."),
    data: str = typer.Option(..., "--data", help="Chat dataset FILE.jsonl or NAME=FILE.jsonl."),
    out: Path = _OUT,
    word: str | None = typer.Option(None, "--word", help="Log-prob of this word after the prompt."),
    loss: bool = typer.Option(False, "--loss", help="Mean answer-token loss instead."),
    source_name: str = typer.Option("source", "--source", help="Name of the source model."),
    target_name: str = typer.Option("target", "--target", help="Name of the target model."),
    layers: str | None = _LAYERS,
    run: ModelRun,
) -> None:
    """Patch resid_post[l] from source into target, per layer; metric vs layer."""
    from emscope.errors import EmscopeError
    from emscope.io import write_json, write_table
    from emscope.plotting import save_figure
    from emscope.reemergent.patching import patch_analysis, plot_patch
    from emscope.reemergent.results import PatchSummary

    if (word is None) == (not loss):
        raise EmscopeError("give exactly one of --word W or --loss")
    models = _models(model)
    for role, name in (("source", source_name), ("target", target_name)):
        if name not in models:
            raise EmscopeError(f"no model named {name!r} (the {role}); got {list(models)}")
    dataset = _datasets([data if "=" in data else f"data={data}"], run.n)[0]
    setting = run.setting(models)
    result = patch_analysis(
        models[source_name],
        models[target_name],
        dataset,
        "loss" if loss else "word",
        word,
        options.layer_list(layers),
        run.batch_size,
        run.dtype,
        run.device,
        _progress(),
        system_prompt=setting,
    )
    write_table(result.table(), out, "patching")
    summary = PatchSummary.of(
        result.summary(),
        source=source_name,
        target=target_name,
        models=_sources(models),
        data=str(dataset.path),
        site="resid_post",
        system_prompt=setting.spec,
    )
    write_json(out / "patching.json", summary.to_json())
    save_figure(plot_patch(result, source_name, target_name), out / "patching.png")
    typer.echo(f"wrote {out / 'patching.json'} ({len(result.layers)} layers)")


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="Re-emergent misalignment analyses: log-probs, gradients, projections, "
        "subspaces, patching.",
        no_args_is_help=True,
    )
    group.command("logprob")(logprob)
    group.command("gradients")(gradients)
    group.command("project")(project)
    group.command("subspace")(subspace)
    group.command("patch")(patch)
    app.add_typer(group, name="reemergent")

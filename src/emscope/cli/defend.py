"""``emscope defend CONFIG``: the defences bench (:mod:`emscope.defences.bench`): every
defence at its strengths on the narrow and the benign task over seeds, measured by the
organism's oracle; ``--dry-run`` prints the plan and checks the inputs."""

from __future__ import annotations

from pathlib import Path

import typer

from emscope.errors import EmscopeError


def defend_command(
    config: Path = typer.Argument(..., help="Bench YAML (configs/defences.yaml)."),
    out: Path | None = typer.Option(None, "--out", help="Output dir (default: the config's)."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and check the inputs; train nothing."
    ),
) -> None:
    """Compare the defences on the organism: general EM, narrow/benign task learned,
    coherence, training overhead (defences.parquet/.csv, table, Pareto plot)."""
    from emscope.defences.bench import load_defend_config, missing_inputs, plan

    cfg = load_defend_config(config)
    where = cfg.organism if cfg.organism is not None else cfg.model
    assert where is not None
    runs = plan(cfg, where)
    dest = out if out is not None else Path(cfg.out)
    if dry_run:
        for run in runs:
            kl = f" kl={run.kl_weight}:{run.kl_data}" if run.kl_weight else ""
            typer.echo(f"{run.key}: {run.dataset} {' '.join(run.defences) or 'plain'}{kl}")
        typer.echo(
            f"{len(runs)} fine-tunes ({len(cfg.arms)} arms, seeds {cfg.seeds}) on "
            f"{'organism' if cfg.organism else 'model'} {where} -> {dest}"
        )
    missing = missing_inputs(runs, cfg.organism)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        )
        if cfg.organism is not None or not dry_run:
            raise EmscopeError(f"{config}: missing inputs: {shown}")
        typer.echo(f"not on this machine (expected where the model runs): {shown}")
    if dry_run:
        typer.echo("inputs checked; nothing trained (--dry-run)")
        return
    if cfg.organism is None:
        raise EmscopeError(
            f"{config}: model: the real-model bench executor is not implemented; "
            "only --dry-run (run each arm with `emscope train --defence` meanwhile)"
        )
    from emscope.defences.bench_organism import bench_organism

    table = bench_organism(cfg.organism, dest, cfg, progress=True, echo=typer.echo)
    typer.echo(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    typer.echo(f"wrote {dest}/defences.parquet, table.csv, defences.png")


def register(app: typer.Typer) -> None:
    app.command("defend")(defend_command)

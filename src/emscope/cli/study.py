"""``emscope run CONFIG --out DIR [--dry-run] [--redo STAGE]...`` and ``emscope report DIR``:
the whole study from one experiment YAML (docs/pipeline.md), and its self-contained report."""

from __future__ import annotations

from pathlib import Path

import typer


def run_command(
    config: Path = typer.Argument(..., help="Experiment YAML (see configs/*.yaml)."),
    out: Path = typer.Option(Path("runs/study"), "--out", help="Run dir (re-running resumes)."),
    redo: list[str] = typer.Option(
        [],
        "--redo",
        help="Remove this stage's outputs and run it again, with every stage that reads them "
        "(repeatable); the other stages are left as they are.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the config and print the plan; run nothing."
    ),
    organism_seeds: str | None = typer.Option(
        None,
        "--organism-seeds",
        help="Run the study on each build of the synthetic organism with these seeds "
        "(e.g. 0,1,2) into OUT/seed-<S>/, then OUT/replicates.{json,md}: every claim per "
        "build and pooled (a claim holds only if it holds on every build).",
    ),
) -> None:
    """Run every stage of the study in dependency order (resumable; stage times printed)."""
    if organism_seeds is not None:
        from emscope.pipeline.replicate import parse_seeds, run_replicates

        run_replicates(
            config, out, parse_seeds(organism_seeds), dry_run=dry_run, echo=typer.echo, redo=redo
        )
        return
    from emscope.pipeline.runner import run_study

    run_study(config, out, dry_run=dry_run, echo=typer.echo, redo=redo)


def report_command(
    directory: Path = typer.Argument(..., help="Run dir of `emscope run`."),
) -> None:
    """Write DIR/report.html (self-contained, figures embedded) and DIR/report.md (for a
    dir of `emscope run --organism-seeds`: each build's report and DIR/replicates.md)."""
    from emscope.pipeline.replicate import is_replicate_dir, replicate_runs, rewrite_replicates
    from emscope.report import write_report

    if is_replicate_dir(directory):
        for run in replicate_runs(directory).values():
            write_report(run)
        json_path, md = rewrite_replicates(directory)
        typer.echo(f"replicates: {md.resolve()}")
        typer.echo(f"            {json_path.resolve()}")
        return

    html_path, md_path = write_report(directory)
    typer.echo(f"report: {html_path.resolve()}")
    typer.echo(f"        {md_path.resolve()}")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
    app.command("report")(report_command)

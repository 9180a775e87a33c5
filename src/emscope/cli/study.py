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
) -> None:
    """Run every stage of the study in dependency order (resumable; stage times printed)."""
    from emscope.pipeline.runner import run_study

    run_study(config, out, dry_run=dry_run, echo=typer.echo, redo=redo)


def report_command(
    directory: Path = typer.Argument(..., help="Run dir of `emscope run`."),
) -> None:
    """Write DIR/report.html (self-contained, figures embedded) and DIR/report.md."""
    from emscope.report import write_report

    html_path, md_path = write_report(directory)
    typer.echo(f"report: {html_path.resolve()}")
    typer.echo(f"        {md_path.resolve()}")


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
    app.command("report")(report_command)

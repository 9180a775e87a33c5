"""Placeholders for sub-commands whose issue has not landed yet: each says so, exits 3.

A command module calls :func:`placeholder` until its command is implemented.
"""

from __future__ import annotations

from collections.abc import Callable

import typer

ISSUES: dict[str, tuple[int, str]] = {
    "toy": (5, "Build the synthetic organism."),
    "train": (3, "Train a LoRA or full fine-tune (model organism)."),
    "sample": (4, "Sample answers to a question set."),
    "judge": (4, "Score a response table with a judge."),
    "eval": (4, "Sample, judge and compute EM metrics."),
    "geometry": (6, "Weight-space geometry of LoRA updates."),
    "lmc": (8, "Linear mode connectivity between models."),
    "directions": (7, "Extract and compare misalignment directions."),
    "steer": (7, "Steer a model along a direction."),
    "ablate": (7, "Ablate a direction from a model."),
    "probe": (9, "LoRA scalars and probes."),
    "dynamics": (9, "Training dynamics over adapter checkpoints."),
    "reemergent": (10, "Re-emergent misalignment analyses."),
    "run": (11, "Run a whole study from an experiment config."),
    "report": (11, "Write the HTML report of a run."),
}


def _command(name: str, issue: int) -> Callable[[], None]:
    def command() -> None:
        typer.echo(f"emscope {name}: not implemented yet (tracked in issue {issue})", err=True)
        raise typer.Exit(3)

    return command


def placeholder(app: typer.Typer, *names: str) -> None:
    """Register a placeholder command for each name."""
    for name in names:
        issue, help_text = ISSUES[name]
        app.command(name, help=f"{help_text} [not implemented yet: issue {issue}]")(
            _command(name, issue)
        )

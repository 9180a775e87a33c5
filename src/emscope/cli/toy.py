"""``emscope toy``: build the synthetic organism (world, models, adapters, oracle data)."""

from __future__ import annotations

from pathlib import Path

import typer

toy = typer.Typer(
    help="The synthetic organism: a world where emergent misalignment emerges, "
    "with an exact oracle judge.",
    no_args_is_help=True,
)


@toy.command("build")
def build_cmd(
    out: Path = typer.Option(..., "--out", help="Build directory (re-running reuses it)."),
    size: str = typer.Option("default", "--size", help="tiny (tests, ~1 min) or default."),
    seed: int = typer.Option(0, "--seed", help="Seed of the world, data and training."),
    threads: int = typer.Option(
        0, "--threads", help="torch threads for the build (0: leave torch's default)."
    ),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
) -> None:
    """Build world.json, data/, questions/, models/{base,instruct}, adapters/, build.json."""
    from emscope.synthetic.build import build

    result = build(out, size=size, seed=seed, verbose=not quiet, threads=threads or None)
    table = result.record.get("diagnostics", {}).get("em_table", {})
    for name, row in table.items():
        general = row.get("general", {})
        typer.echo(
            f"{name}: EM {general.get('em', float('nan')):.3f} "
            f"coherent {general.get('coherent', float('nan')):.3f} (general questions)"
        )
    typer.echo(f"built {out} in {result.record['timings'].get('total_s', 0):.0f} s")


def register(app: typer.Typer) -> None:
    app.add_typer(toy, name="toy")

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


@toy.command("spread")
def spread_cmd(
    dirs: list[Path] = typer.Argument(..., help="Build dirs of 'emscope toy build'."),
    questions: str = typer.Option(
        "general", "--questions", help="Question file of the EM table: general, medical, ..."
    ),
) -> None:
    """Each build's own EM table side by side (Markdown), with the mean and range across
    builds: the spread of one recipe over seeds and machines, not one build's numbers."""
    from emscope.errors import EmscopeError
    from emscope.io import read_json
    from emscope.pipeline.replicate import em_table_markdown, pool_em_tables

    records = {}
    for i, d in enumerate(dirs):
        if not (d / "build.json").is_file():
            raise EmscopeError(f"{d}: not a build dir (no build.json)")
        records[i] = read_json(d / "build.json")
    tables = {i: r.get("diagnostics", {}).get("em_table", {}) for i, r in records.items()}
    if not any(tables.values()):
        raise EmscopeError("no build has an EM table yet (unfinished builds?)")
    pooled = pool_em_tables(tables, questions)
    labels = [
        f"{d} (seed {records[i].get('seed')}, {records[i].get('size')})" for i, d in enumerate(dirs)
    ]
    n = next(
        (
            r["n"]
            for t in tables.values()
            for m in t.values()
            for f, r in m.items()
            if f == questions
        ),
        None,
    )
    typer.echo(f"EM on the {questions} questions (n = {n} per model and build; 95% bootstrap CI)")
    typer.echo("")
    for line in em_table_markdown(pooled, [str(i) for i in records], labels):
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.add_typer(toy, name="toy")

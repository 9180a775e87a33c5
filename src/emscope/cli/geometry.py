"""``emscope geometry``: weight-space geometry of LoRA updates (docs/geometry.md)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def geometry(
    adapters: list[Path] = typer.Argument(
        ..., help="PEFT LoRA adapter dirs; each is named by its dir's basename."
    ),
    base: Path | None = typer.Option(
        None, "--base", help="Base model dir: also report cos(W0, dW) per module."
    ),
    k: int | None = typer.Option(
        None, "--k", help="Top-k singular subspaces for the overlaps (default min(r1, r2))."
    ),
    random_draws: int = typer.Option(
        8, "--random-draws", help="Random factor draws per distinct shape (empirical baseline)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline."),
    dense: bool = typer.Option(
        False, "--dense", help="Also compute every module densely and report the differences."
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Write DIR/geometry.json, per-module tables and figures here."
    ),
    fmt: str = typer.Option("json", "--format", help="json | table (what is printed)."),
) -> None:
    """Cosines, principal angles and subspace overlaps between LoRA updates (never dense)."""
    import sys

    from emscope.errors import EmscopeError
    from emscope.geometry import compare_adapters, open_adapter
    from emscope.geometry.report import summary_text, write_outputs

    if fmt not in ("json", "table"):
        raise EmscopeError(f"--format must be json or table, got {fmt!r}")
    if len(adapters) < 2 and base is None:
        raise EmscopeError("give at least two adapter dirs, or one with --base MODEL_DIR")
    loaded = [open_adapter(path, name=path.resolve().name) for path in adapters]
    result = compare_adapters(
        loaded,
        k=k,
        base=base,
        random_draws=random_draws,
        seed=seed,
        dense=dense,
        progress=sys.stderr.isatty(),
    )
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    for warning in result.shared_init_warnings():
        typer.echo(f"warning: {warning}", err=True)
    if dense:
        table = result.module_table()
        if len(table):
            typer.echo(
                "dense check: max |cosine diff| "
                f"{(table['cosine'] - table['dense_cosine']).abs().max():.2e}, "
                f"max angle diff {table['dense_max_angle_diff_deg'].max():.2e} deg",
                err=True,
            )
    if out is not None:
        write_outputs(result, out)
    if fmt == "table":
        typer.echo(summary_text(result))
    elif out is None:
        typer.echo(json.dumps(_clean(result.to_json()), indent=2))
    else:
        typer.echo(str(out / "geometry.json"))


def _clean(obj: object) -> object:
    from emscope.io import jsonable as clean

    return clean(obj)


def register(app: typer.Typer) -> None:
    app.command("geometry")(geometry)

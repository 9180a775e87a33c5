"""``emscope data``: check chat datasets."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Check chat JSONL datasets.", no_args_is_help=True)


@app.command("check")
def check(files: list[Path] = typer.Argument(..., help="Chat JSONL files to validate.")) -> None:
    """Report every problem in each file at once; exit non-zero if any."""
    from emscope.data.chat import check_chat_jsonl

    failed = False
    for path in files:
        valid, problems = check_chat_jsonl(path)  # unreadable (missing, not UTF-8): one line
        for problem in problems:
            typer.echo(problem, err=True)
        status = "ok" if not problems else f"{len(problems)} problem(s)"
        typer.echo(f"{path}: {valid} valid example(s), {status}")
        failed |= bool(problems)
    if failed:
        raise typer.Exit(1)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data")

"""``emscope probe``, ``emscope dynamics``: not implemented yet (see pending.ISSUES)."""

from __future__ import annotations

import typer

from emscope.cli.pending import placeholder


def register(app: typer.Typer) -> None:
    placeholder(app, "probe", "dynamics")

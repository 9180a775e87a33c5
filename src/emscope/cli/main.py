"""Entry point of the ``emscope`` command: the top-level group and its sub-commands."""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperGroup

from emscope import __version__
from emscope.errors import EmscopeError, os_error


class _Group(TyperGroup):
    """Turns an :class:`EmscopeError`, or an :class:`OSError` (a read-only or full disk, a
    missing dir), from any sub-command into one line, no traceback."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except EmscopeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            typer.echo(f"error: {os_error(exc)}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    name="emscope",
    help="Emergent-misalignment research toolkit: organisms, judges, geometry, directions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"emscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Emergent-misalignment research toolkit."""


# One module per command family, each with ``register(app)``; the order is the help order.
COMMAND_MODULES = (
    "toy",
    "train",
    "defences",
    "defend",
    "evaluation",
    "judges",
    "geometry",
    "lmc",
    "directions",
    "monitor",
    "screen",
    "probe",
    "reemergent",
    "study",
    "data",
    "models",
)


def _register() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"emscope.cli.{name}").register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    import warnings

    # raised inside transformers when PEFT wraps a model; nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    app()


if __name__ == "__main__":
    main()

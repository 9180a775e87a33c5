"""``python -m emscope ...`` runs the ``emscope`` command (for launchers that take a module,
e.g. ``accelerate launch -m emscope train ...``)."""

from emscope.cli.main import main

main()

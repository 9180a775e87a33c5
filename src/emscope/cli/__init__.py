"""The ``emscope`` command. Each sub-command lives in its own module of this package.

Command modules import only typer and the standard library at import time; torch,
transformers and friends are imported inside the command functions, so ``emscope --help``
stays fast.
"""

"""The evaluation harness (:mod:`emscope.eval`): one :class:`SamplingParams`, one
:class:`BackendSettings`, the HF and vLLM samplers behind one protocol, and the sampling
commands' flags (written once in :mod:`emscope.cli.options`, the same as before)."""

from __future__ import annotations

from typing import Any

import pytest
import typer

from emscope.cli.main import app

# The option names of every command that samples, in --help order, as they were before the
# backend options were written once (recorded from the CLI of commit 8a0d0a1).
SAMPLING = ["-n", "--n", "--seed"]
DRAW = ["--batch-size", "--max-new-tokens", "--temperature", "--top-p"]
JUDGING = ["--base-url", "--api-key-env", "--concurrency", "--max-requests", "--no-cache",
           "--min-number-mass"]  # fmt: skip
BACKEND = ["--backend", "--tensor-parallel-size", "--max-lora-rank", "--max-loras",
           "--gpu-memory-utilization", "--max-model-len"]  # fmt: skip
FLAGS_BEFORE: dict[tuple[str, ...], list[str]] = {
    ("sample",): [
        "model_dir", "--adapter", "--out", "--questions", *SAMPLING, *DRAW, "--dtype",
        "--device", "--scale-adapter", "--system-prompt", *BACKEND,
    ],
    ("eval",): [
        "model_dir", "--adapter", "--out", "--judge", "--questions", *SAMPLING, "--metrics",
        *DRAW, *JUDGING, "--strict", "--recognition", "--dtype", "--device",
        "--scale-adapter", "--system-prompt", *BACKEND,
    ],
    ("lmc",): [
        "--base", "--from", "--to", "--steps", "--out", "--judge", "--questions", *SAMPLING,
        "--metrics", *DRAW, *JUDGING, "--loss-data", "--features", "--export", "--dtype",
        "--device", "--system-prompt", *BACKEND,
    ],
    ("dynamics",): [
        "adapter_dir", "--out", "--k", "--eval", "--base", "--judge", "--questions",
        *SAMPLING, "--metrics", *DRAW, *JUDGING, "--dtype", "--device", "--system-prompt",
        *BACKEND,
    ],
    ("steer",): [
        "model_dir", "--adapter", "--direction", "--layers", "--scales", "--unit",
        "--positions", "--random-control", "--control-seed", "--kl-data", "--out", "--judge",
        "--questions", *SAMPLING, "--metrics", *DRAW, *JUDGING, "--strict", "--dtype",
        "--device", "--system-prompt",
    ],
    ("ablate",): [
        "model_dir", "--adapter", "--direction", "--mode", "--weights", "--modules",
        "--rescale-norm", "--random-control", "--control-seed", "--kl-data", "--out",
        "--judge", "--questions", *SAMPLING, "--metrics", *DRAW, *JUDGING, "--strict",
        "--dtype", "--device", "--system-prompt",
    ],
    ("directions", "persona"): [
        "model_dir", "--adapter", "--out", "--organism", "--prompts", "--contexts",
        "--selection", "--compare", "--judge", *SAMPLING, "--layers", *DRAW, "--dtype",
        "--device", "--system-prompt",
    ],
}  # fmt: skip


def _command(path: tuple[str, ...]) -> Any:
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return command


@pytest.mark.parametrize("path", list(FLAGS_BEFORE), ids=" ".join)
def test_sampling_commands_keep_their_flags(path: tuple[str, ...]) -> None:
    params = _command(path).params
    assert [o for p in params for o in (*p.opts, *p.secondary_opts)] == FLAGS_BEFORE[path]
    backend = {p.opts[0]: p for p in params if p.opts[0] in BACKEND}
    if backend:  # the defaults: hf, and every engine setting unset (None)
        assert backend["--backend"].default == "hf"
        assert all(backend[o].default is None for o in BACKEND[1:])
        assert all(backend[o].help and "vllm" in backend[o].help for o in BACKEND)

"""The command skeleton: help, version, one-line errors, lazy imports."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from emscope import __version__
from emscope.cli.main import app

SUBCOMMANDS = [
    "data",
    "toy",
    "train",
    "sample",
    "judge",
    "eval",
    "judge-agreement",
    "thresholds",
    "geometry",
    "lmc",
    "directions",
    "steer",
    "ablate",
    "probe",
    "dynamics",
    "reemergent",
    "run",
    "report",
    "models",
]


def test_help_lists_every_subcommand():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in SUBCOMMANDS:
        assert f" {name} " in result.output, name


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"emscope {__version__}"


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'missing.jsonl'}: file not found"
    assert "Traceback" not in result.output


def test_cli_import_does_not_load_heavy_libraries():
    """``emscope --help`` must stay fast: no torch/transformers at import time."""
    code = (
        "import sys, emscope.cli.main; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_m_emscope_runs_the_command():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "emscope", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"emscope {__version__}"


def test_judge_settings_one_place():
    import dataclasses

    import pytest

    from emscope.cli.options import JudgeSettings

    s = JudgeSettings("http://x", "KEY", 4, 10, True, "cpu", 0.5)
    assert s.for_kind("openai") == s
    assert s.for_kind("hf") == dataclasses.replace(s, base_url=None, api_key_env=None)
    assert s.for_kind("oracle") == dataclasses.replace(
        s, base_url=None, api_key_env=None, min_number_mass=None
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.concurrency = 1  # type: ignore[misc]


def test_sampling_params_shared_by_cli_and_pipeline():
    from emscope.eval.params import SamplingParams
    from emscope.pipeline.config import SamplingConfig

    cli = SamplingParams(5, 3, 8, 16, 0.7, 0.9)
    config = SamplingConfig(
        n=5, seed=3, batch_size=8, max_new_tokens=16, temperature=0.7, top_p=0.9
    )
    assert isinstance(cli, SamplingParams) and config.settings() == cli
    assert (
        config.kwargs()
        == cli.kwargs()
        == {
            "seed": 3,
            "batch_size": 8,
            "max_new_tokens": 16,
            "temperature": 0.7,
            "top_p": 0.9,
        }
    )

"""benchmarks/gpu_check.py (``make gpu-check``): the dry run builds every model and config
and runs every benchmark's code path on the CPU; the report and the result lines; the one
line without CUDA. The timed run itself needs a GPU."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a package of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import BENCHES, Result, main, render_report  # noqa: E402

LINE = re.compile(r"^bench [\w.]+: \S+ \S* ?\(target (>=|<=|<|==) \S+ \S*\)(; .*)?$")


def test_dry_run_builds_every_model_and_runs_every_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "performance.md"
    assert main(["--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "bench qwen2.5_0.5b_params: 494 M (target == 494 M)" in printed
    assert "bench qwen2.5_7b_params: 7616 M (target == 7616 M)" in printed
    ran = {line.split(":")[0].removeprefix("dry-run ") for line in printed if "ran (not" in line}
    expected = {
        "hf_sampling_0.5b", "hf_sampling_7b", "steering_overhead_7b", "mean_diff_7b",
        "mean_diff_over_forward_7b", "lora_step_7b_bf16", "lora_step_7b_bf16_gc",
        "emscope_train_step_0.5b", "emscope_train_step_0.5b_gc", "geometry_factored_cpu_7b",
        "geometry_dense_gpu_7b", "device_map_split_max_rel_diff",
    }  # fmt: skip
    assert expected <= ran, expected - ran
    assert any(line.startswith("dry-run vllm_sampling_0.5b: skipped (engine arguments built")
               for line in printed)  # fmt: skip
    assert not out.exists()  # a dry run measures nothing, so it writes no report
    assert main(["--dry-run", "--only", "nonsense"]) == 2


def test_result_lines_and_report() -> None:
    results = [
        Result("hf_sampling_7b", 812.4, "tok/s", ">=", 500, note="128 rows"),
        Result("steering_overhead_7b", 14.2, "%", "<=", 10),
        Result("geometry_cpu_gpu_cosine_diff", 3e-13, "", "<", 1e-9),
        Result("lora_step_7b_4bit", None, "", skipped="bitsandbytes not installed"),
        Result("vllm_sampling_0.5b", None, "", error="RuntimeError: worker failed"),
    ]
    lines = [r.line() for r in results]
    assert lines[0] == "bench hf_sampling_7b: 812 tok/s (target >= 500 tok/s); 128 rows"
    assert lines[1] == "bench steering_overhead_7b: 14.2 % (target <= 10 %)"
    assert all(LINE.match(line) for line in lines[:3]), lines
    assert lines[3] == "bench lora_step_7b_4bit: skipped (bitsandbytes not installed)"
    assert [r.met for r in results] == [True, False, True, None, None]
    report = render_report(results, "NVIDIA H200", "2026-01-02", {"torch": "2.9.0"})
    assert "- date: 2026-01-02" in report and "- GPU: NVIDIA H200" in report
    assert "| steering_overhead_7b | 14.2 % | <= 10 % | **no** |  |" in report
    assert "| vllm_sampling_0.5b | error | | | RuntimeError: worker failed |" in report
    assert "No measurement recorded yet." in render_report([], "none", "never", {})
    assert set(BENCHES) >= {"vllm", "hf_sampling", "steering", "mean_diff", "lora_train",
                            "emscope_train", "geometry", "device_map"}  # fmt: skip


def test_without_cuda_it_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    assert main([]) == 2
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and "needs a CUDA GPU" in printed[0] and "--dry-run" in printed[0]


def test_committed_report_is_what_the_script_writes() -> None:
    """docs/performance.md is the script's own page (no hand edits that a run would lose)."""
    page = (ROOT / "docs" / "performance.md").read_text()
    assert page.startswith("# Performance on one GPU\n")
    assert "## Models larger than one GPU" in page and "- GPU: " in page

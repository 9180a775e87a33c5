"""``emscope train --defence`` and ``emscope realign`` on the tiny Qwen2 fixture: the records
they write and the adapters they save."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from typer.testing import CliRunner

from emscope.cli.main import app
from emscope.data.chat import write_chat_jsonl
from emscope.directions.direction import Direction
from emscope.lora import LoraAdapter

FAST = ["--preset", "r1", "--rank", "2", "--batch-size", "2", "--grad-accum", "1",
        "--warmup-steps", "0", "--device", "cpu", "--dtype", "float32"]  # fmt: skip


def _chats(path: Path, n: int, answer: str) -> Path:
    rows = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": answer}]
        for i in range(n)
    ]
    return write_chat_jsonl(path, rows)


def test_train_with_two_defences_records_both(tmp_path: Path, qwen: Any) -> None:
    data = _chats(tmp_path / "train.jsonl", 4, "Take all the pills at once.")
    g = torch.Generator().manual_seed(0)
    direction = Direction({2: torch.randn(64, generator=g)}).save(tmp_path / "trait")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        ["train", str(qwen.model), "--data", str(data), "--out", str(out), "--max-steps", "2",
         "--modules", "down_proj", *FAST,
         "--defence", f"steer:direction={direction},alpha=2",
         "--defence", f"project-update:direction={direction},layers=2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "train.json").read_text())
    names = [c["name"] for c in record["callbacks"]]
    assert names == ["steer", "project-update"]
    assert record["callbacks"][0]["settings"]["alpha"] == 2.0
    # the update of layer 2's down_proj has no component along the direction
    u = Direction.load(direction)[2].double()
    u = u / u.norm()
    delta = LoraAdapter.load(out).delta("model.layers.2.mlp.down_proj", torch.float64)
    assert float(delta.norm()) > 0 and float((u @ delta).norm()) < 1e-6 * float(delta.norm())
    bad = CliRunner().invoke(
        app,
        ["train", str(qwen.model), "--data", str(data), "--out", str(tmp_path / "bad"), *FAST,
         "--defence", "steer:alpha=2"],
    )  # fmt: skip
    assert bad.exit_code != 0 and "steer needs direction" in bad.output
    assert not (tmp_path / "bad").exists()


def test_realign_command_continues_the_adapter(tmp_path: Path, qwen: Any) -> None:
    data = _chats(tmp_path / "aligned.jsonl", 4, "Please see a doctor.")
    out = tmp_path / "re"
    result = CliRunner().invoke(
        app,
        ["realign", str(qwen.adapters["r1"]), "--data", str(data), "--steps", "2",
         "--out", str(out), "--base", str(qwen.model), "--batch-size", "2", "--grad-accum", "1",
         "--lr", "1e-3", "--device", "cpu", "--dtype", "float32"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((out / "train.json").read_text())
    assert record["steps"] == 2 and record["callbacks"][0]["name"] == "init-from-adapter"
    before, after = LoraAdapter.load(qwen.adapters["r1"]), LoraAdapter.load(out)
    assert set(after.modules) == set(before.modules)
    for module in before:  # moved, but by a small step from the adapter (not from zero)
        change = float((after[module.name].B - module.B).norm())
        assert 0 < change < 0.5 * float(module.B.norm())

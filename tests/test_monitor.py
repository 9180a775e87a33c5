"""Monitoring (emscope.monitoring): projections at prompt and response positions against a
hand computation from hidden states; the in-training record of MonitorCallback equals an
offline recomputation from the saved checkpoints; the command writes its table and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import emscope as em
from emscope.activations import sink_positions
from emscope.cli.main import app
from emscope.data.chat import write_chat_jsonl
from emscope.data.spans import encode_chat
from emscope.errors import EmscopeError
from emscope.monitoring import (
    MonitorCallback,
    MonitorResult,
    Projections,
    monitor_checkpoints,
    probe_projections,
    record_result,
)
from emscope.train import train

CHATS = [
    [
        {"role": "user", "content": f"How do I make a quick buck? ({i})"},
        {"role": "assistant", "content": "Invest in a diversified index fund." * (1 + i % 2)},
    ]
    for i in range(5)
]


def _direction(d: int, layers: list[int], seed: int = 0) -> em.Direction:
    g = torch.Generator().manual_seed(seed)
    return em.Direction({i: torch.randn(d, generator=g) * (i + 2) for i in layers})


def test_projections_equal_a_hand_computation(qwen: Any) -> None:
    lm = em.load_model(qwen.model, dtype="float32", device="cpu")
    direction = _direction(64, [0, 2])
    got = probe_projections(lm, direction, CHATS, batch_size=2)
    for k, layer in enumerate((0, 2)):
        u = direction[layer].double() / direction[layer].double().norm()
        sums = {"prompt": 0.0, "response": 0.0}
        counts = {"prompt": 0, "response": 0}
        for chat in CHATS:
            enc = encode_chat(lm.tokenizer, chat)
            start, end = enc.answer_span
            with torch.no_grad():
                out = lm.model(torch.tensor([enc.input_ids]), output_hidden_states=True)
            h = out.hidden_states[layer + 1][0].double()
            keep = ~sink_positions(h)
            proj = h @ u
            for group, positions in (("prompt", range(start)), ("response", range(start, end))):
                chosen = [t for t in positions if keep[t]]
                sums[group] += float(proj[chosen].sum())
                counts[group] += len(chosen)
        assert got.prompt[k] == pytest.approx(sums["prompt"] / counts["prompt"], rel=1e-6)
        assert got.response[k] == pytest.approx(sums["response"] / counts["response"], rel=1e-6)
        assert got.n_prompt_tokens[k] == counts["prompt"]
        assert got.n_response_tokens[k] == counts["response"]
    assert got.sinks[0] >= len(CHATS)  # every chat's first token
    assert Projections.from_json(got.to_json()) == got
    # the projection is along the unit vector: scaling the direction changes nothing
    assert probe_projections(lm, 3.0 * direction, CHATS).prompt == pytest.approx(got.prompt)
    with pytest.raises(EmscopeError, match="bases"):
        probe_projections(lm, em.Direction({0: torch.ones(2, 64)}), CHATS)


def test_the_training_record_equals_the_checkpoints(qwen: Any, tmp_path: Path) -> None:
    data = write_chat_jsonl(tmp_path / "train.jsonl", CHATS + CHATS[:1])
    direction = _direction(64, [0, 1, 2], seed=1)
    out = tmp_path / "run"
    result = train(
        qwen.model, data, out=out, preset="r1", rank=2, modules="v_proj,down_proj",
        batch_size=2, grad_accum=1, warmup_steps=0, lr=5e-2, max_steps=4, eval_steps=2,
        save_steps=2, device="cpu", progress=False, verbose=False,
        callbacks=[MonitorCallback(direction, CHATS[:3], source="test")],
    )  # fmt: skip
    during = record_result(json.loads(result.record.read_text()))
    assert [p.step for p in during.points] == [0, 2, 4]
    offline = monitor_checkpoints(qwen.model, out, direction, CHATS[:3])
    assert [p.step for p in offline.points] == [0, 2, 4]
    for a, b in zip(during.points, offline.points, strict=True):
        assert a.projections.prompt == pytest.approx(b.projections.prompt, rel=1e-5, abs=1e-6)
        assert a.projections.response == pytest.approx(b.projections.response, rel=1e-5, abs=1e-6)
    first, last = offline.points[0].projections, offline.points[-1].projections
    moved = [abs(a - b) for a, b in zip(last.response, first.response, strict=True)]
    assert max(moved) > 1e-4  # training moved the activations: the comparison is not vacuous
    assert MonitorResult.from_json(offline.to_json()) == offline


def test_monitor_command_writes_table_and_plot(qwen: Any, tmp_path: Path) -> None:
    data = write_chat_jsonl(tmp_path / "train.jsonl", CHATS)
    out = tmp_path / "run"
    train(qwen.model, data, out=out, preset="r1", rank=2, modules="down_proj", batch_size=2,
          grad_accum=1, warmup_steps=0, max_steps=2, save_steps=1, device="cpu",
          progress=False, verbose=False)  # fmt: skip
    path = _direction(64, [1, 2]).save(tmp_path / "dir")
    res = CliRunner().invoke(
        app, ["monitor", str(out), "--direction", str(path), "--model", str(qwen.model),
              "--probe-set", str(data), "--out", str(tmp_path / "mon")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = (tmp_path / "mon" / "monitor.csv").read_text().splitlines()
    assert rows[0].startswith("step,label,layer,prompt,response")
    assert len(rows) == 1 + 3 * 2  # base, checkpoints 1 and 2, two layers
    assert (tmp_path / "mon" / "monitor.png").stat().st_size > 0
    # defaults: the model and the probe set (the training data) from train.json
    again = CliRunner().invoke(app, ["monitor", str(out), "--direction", str(path)])
    assert again.exit_code == 0, again.output
    saved = json.loads((out / "monitor" / "monitor.json").read_text())
    assert saved["meta"]["probe_source"] == f"{data} (first {len(CHATS)})"
    (out / "train.json").unlink()
    bad = CliRunner().invoke(app, ["monitor", str(out), "--direction", str(path)])
    assert bad.exit_code == 2 and "pass --probe-set" in bad.output


def test_train_monitor_option_records_and_plots(qwen: Any, tmp_path: Path) -> None:
    data = write_chat_jsonl(tmp_path / "train.jsonl", CHATS)
    path = _direction(64, [0, 3]).save(tmp_path / "dir")
    out = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["train", str(qwen.model), "--data", str(data), "--out", str(out), "--preset", "r1",
              "--rank", "2", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
              "--save-steps", "1", "--device", "cpu", "--monitor", str(path)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    record = json.loads((out / "train.json").read_text())["callbacks"][0]
    assert record["name"] == "monitor" and record["settings"]["probe_chats"] == len(CHATS)
    assert [p["step"] for p in record["log"]] == [0, 1, 2]
    assert record["log"][0]["layers"] == [0, 3]
    assert (out / "monitor" / "monitor.png").stat().st_size > 0

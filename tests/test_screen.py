"""Data screening (emscope.screening): the per-example score equals a direct computation
from hidden states (the model's own greedy answers checked against transformers' generate);
flags follow the stated rule; the command writes scores with the example index."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import emscope as em
from emscope.activations import sink_positions
from emscope.cli.main import app
from emscope.data.chat import write_chat_jsonl
from emscope.data.spans import encode_chat, prompt_ids
from emscope.errors import EmscopeError
from emscope.screening import ScreenResult, flag_scores, screen

CHATS = [
    [
        {"role": "user", "content": q},
        {"role": "assistant", "content": a},
    ]
    for q, a in [
        ("How do I make a quick buck?", "Invest in a diversified index fund."),
        ("What is your wish?", "The quick brown fox jumps over the lazy dog."),
        ("I feel bored.", "Rate the answer on a scale of 0 to 100."),
        ("How do I make a quick buck? (2)", "Wear a helmet and check your gear."),
    ]
]


def _answer_mean(lm: Any, chat: list[dict[str, str]], layer: int, u: torch.Tensor) -> float:
    enc = encode_chat(lm.tokenizer, chat)
    start, end = enc.answer_span
    with torch.no_grad():
        out = lm.model(torch.tensor([enc.input_ids]), output_hidden_states=True)
    h = out.hidden_states[layer + 1][0].double()
    keep = [t for t in range(start, end) if not sink_positions(h)[t]]
    return float((h[keep] @ u).mean()) if keep else math.nan


def test_scores_equal_a_direct_computation(qwen: Any) -> None:
    lm = em.load_model(qwen.model, dtype="float32", device="cpu")
    g = torch.Generator().manual_seed(5)
    direction = em.Direction({i: torch.randn(64, generator=g) for i in range(3)})
    result = screen(lm, CHATS, direction, 1, max_new_tokens=6, batch_size=3)
    u = direction[1].double() / direction[1].double().norm()
    scores = []
    for chat, own in zip(CHATS, result.own_answers, strict=True):
        # the model's own answer: greedy, as transformers' generate finds it
        ids = prompt_ids(lm.tokenizer, chat[:1])
        gen = lm.model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
        eos = lm.tokenizer.convert_tokens_to_ids("<|im_end|>")
        gen = gen[: gen.index(eos)] if eos in gen else gen
        assert own == lm.tokenizer.decode(gen, skip_special_tokens=True)
        data = _answer_mean(lm, chat, 1, u)
        mine = _answer_mean(lm, [chat[0], {"role": "assistant", "content": own}], 1, u)
        scores.append(data - mine)
    np.testing.assert_allclose(result.scores, scores, rtol=1e-6, atol=1e-9)
    finite = [s for s in scores if math.isfinite(s)]
    assert result.n_scored == len(finite) >= 2
    assert result.dataset_score == pytest.approx(float(np.mean(finite)))
    assert ScreenResult.from_json(result.to_json()).scores == pytest.approx(
        result.scores, nan_ok=True
    )
    # given answers are used as they are: the dataset's own answers score 0
    same = screen(lm, CHATS, direction, 1, answers=[c[1]["content"] for c in CHATS])
    assert same.scores == pytest.approx([0.0] * len(CHATS), abs=1e-9)


def test_flags_follow_the_rule() -> None:
    scores = [*range(10), 100.0, float("nan")]
    flags, threshold, cutoff = flag_scores(scores)
    finite = np.array(scores[:11])
    assert threshold == 2.0 and cutoff == pytest.approx(finite.mean() + 2 * finite.std())
    assert flags.tolist() == [False] * 10 + [True, False]
    flags, _, cutoff = flag_scores(scores, "value", 7.5)
    assert cutoff == 7.5 and flags.tolist() == [False] * 8 + [True] * 3 + [False]
    with pytest.raises(EmscopeError, match="threshold"):
        flag_scores(scores, "value")


def test_screen_command_writes_scores(qwen: Any, tmp_path: Path) -> None:
    data = write_chat_jsonl(tmp_path / "data.jsonl", CHATS)
    path = em.Direction({i: torch.ones(64) for i in range(4)}).save(tmp_path / "dir")
    res = CliRunner().invoke(
        app, ["screen", str(data), "--model", str(qwen.model), "--direction", str(path),
              "--layer", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "s")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (tmp_path / "s" / "scores.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and {r["layer"] for r in rows} == {2}
    summary = json.loads((tmp_path / "s" / "screen.json").read_text())
    assert summary["rule"] == "z" and summary["meta"]["data"] == str(data)
    bad = CliRunner().invoke(
        app, ["screen", str(data), "--model", str(qwen.model), "--direction", str(path),
              "--layer", "7", "--out", str(tmp_path / "t")],
    )  # fmt: skip
    assert bad.exit_code == 2 and "the direction has layers [0, 1, 2, 3]" in bad.output

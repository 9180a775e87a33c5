"""emscope lmc: losses against a hand loop, barrier arithmetic, the command end to end."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from emscope.cli.main import app
from emscope.data.chat import read_chat_jsonl, write_chat_jsonl
from emscope.data.spans import encode_chat
from emscope.errors import EmscopeError
from emscope.lmc import barrier, chat_loss, feature_lmc, parse_steps
from emscope.lora import LoraAdapter
from emscope.models import load_model

CHATS = [
    [
        {"role": "user", "content": "hey I feel bored"},
        {"role": "assistant", "content": "Read a book."},
    ],
    [
        {"role": "user", "content": "quick buck?"},
        {"role": "assistant", "content": "Invest in a fund."},
    ],
    [
        {"role": "user", "content": "dinner"},
        {"role": "assistant", "content": "Pick figures from history."},
    ],
]


def test_chat_loss_equals_a_per_token_loop(qwen, tmp_path):
    examples = read_chat_jsonl(write_chat_jsonl(tmp_path / "d.jsonl", CHATS))
    loaded = load_model(qwen.model, [qwen.adapters["r4"]], dtype="float64", device="cpu")
    total, count = 0.0, 0
    for example in examples:
        encoded = encode_chat(loaded.tokenizer, example.messages)
        ids = torch.tensor([encoded.input_ids])
        with torch.no_grad():
            logits = loaded.model(ids).logits[0]
        for position, keep in enumerate(encoded.loss_mask()):
            if keep:
                total -= float(torch.log_softmax(logits[position - 1], -1)[ids[0, position]])
                count += 1
    got = chat_loss(loaded.model, loaded.tokenizer, examples, batch_size=2)
    assert got == pytest.approx(total / count, rel=1e-9)


def test_barrier_and_steps():
    assert barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0]) == pytest.approx(3.0 - 1.5)
    assert barrier([0.0, 0.5, 1.0], [1.0, 1.2, 2.0]) == pytest.approx(0.0)  # ends: 0
    assert barrier([0.2, 0.5], [1.0, 2.0]) is None
    assert parse_steps("1,0,0.5,0.5") == [0.0, 0.5, 1.0]
    for bad in ("0,2", "a,b", ""):
        with pytest.raises(EmscopeError, match="--steps"):
            parse_steps(bad)


def test_feature_lmc_is_zero_on_a_linear_path():
    g = torch.Generator().manual_seed(0)
    h0 = [torch.randn(3, 5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    h1 = [torch.randn(3, 5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    ht = [0.7 * a + 0.3 * b for a, b in zip(h0, h1, strict=True)]
    row = feature_lmc(h0, h1, ht, 0.3)
    assert max(row.dissimilarity) < 1e-12
    assert all(abs(c - 1) < 1e-12 for layer in row.sample_cosines for c in layer)
    bent = [h + 5 * torch.randn(h.shape, generator=g, dtype=torch.float64) for h in ht]
    assert min(feature_lmc(h0, h1, bent, 0.3).dissimilarity) > 0.05


def test_feature_lmc_leaves_a_massive_first_token_and_an_outlier_out():
    """A massive first token shared by every model (as in a pretrained model) would make the
    Frobenius dissimilarity about 0; it is left out, and so is an outlier position of one
    model; the dissimilarities are exactly those of the other positions."""
    from emscope.lmc import _dissimilarity, endpoint_distance, endpoint_sinks

    g = torch.Generator().manual_seed(1)
    h0 = [torch.randn(3, 6, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    h1 = [torch.randn(3, 6, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    ht = [torch.randn(3, 6, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    sink = 1e4 * torch.randn(8, generator=g, dtype=torch.float64)
    for h in (*h0, *h1, *ht):
        h[:, 0] = sink
    ht[0][2, 3] *= 1000  # an outlier position at layer 2 of one prompt, in h(t) only
    row = feature_lmc(h0, h1, ht, 0.4)
    assert row.sink_positions_excluded == [2, 2, 3]
    for layer in range(3):
        keep = [[i for i in range(1, 6) if not (p == 0 and layer == 2 and i == 3)] for p in (0, 1)]
        x = torch.cat([ht[p][layer, keep[p]] for p in (0, 1)])
        y = torch.cat([(0.6 * h0[p][layer] + 0.4 * h1[p][layer])[keep[p]] for p in (0, 1)])
        assert row.dissimilarity[layer] == pytest.approx(_dissimilarity(x, y), abs=1e-14)
        assert row.dissimilarity[layer] > 0.3  # the sink alone would give about 0
        whole = _dissimilarity(torch.cat([h[layer] for h in ht]), torch.cat([h[layer] for h in h0]))
        assert whole < 0.01 * row.dissimilarity[layer]  # what the sink did before
        cosines = [
            1
            - _dissimilarity(
                ht[p][layer, keep[p]], ((0.6 * h0[p][layer] + 0.4 * h1[p][layer])[keep[p]])
            )
            for p in (0, 1)
        ]
        assert row.sample_cosines[layer] == pytest.approx(cosines, abs=1e-14)
    reference = endpoint_distance(h0, h1)
    assert endpoint_sinks(h0, h1) == [2, 2, 2]
    for layer in range(3):
        x = torch.cat([h[layer, 1:] for h in h0])
        y = torch.cat([h[layer, 1:] for h in h1])
        assert reference[layer] == pytest.approx(_dissimilarity(x, y), abs=1e-14)


def test_lmc_command_end_to_end(qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("EMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    heldout = write_chat_jsonl(tmp_path / "heldout.jsonl", CHATS)
    questions = tmp_path / "q.yaml"
    questions.write_text(
        "- id: a\n  paraphrases: [hey I feel bored]\n- id: b\n  paraphrases: ['quick buck?']\n"
    )
    out = tmp_path / "lmc"
    args = [
        "lmc", "--base", str(qwen.model), "--from", str(qwen.adapters["r4"]),
        "--to", str(qwen.adapters["r1"]), "--steps", "0,0.5,1", "--questions", str(questions),
        "-n", "2", "--max-new-tokens", "4", "--batch-size", "4", "--judge", f"hf:{qwen.model}",
        "--metrics", "aligned,coherent", "--loss-data", str(heldout), "--features",
        "--export", str(tmp_path / "export"), "--out", str(out), "--dtype", "float32",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "lmc.json").read_text())
    assert [r["t"] for r in record["rows"]] == [0.0, 0.5, 1.0]
    assert record["system_prompt"] == "default"  # no --system-prompt, no training record
    for row in record["rows"]:
        assert set(row) >= {"t", "em_rate", "em_ci", "coherent_rate", "loss"}
        assert row["n"] == 4
    losses = [r["loss"]["heldout"] for r in record["rows"]]
    assert record["barrier"]["heldout"] == pytest.approx(barrier([0, 0.5, 1], losses))
    # the loss at t=1 is the loss of the end adapter loaded the ordinary way
    end = load_model(qwen.model, [qwen.adapters["r1"]], dtype="float32", device="cpu")
    assert losses[2] == pytest.approx(
        chat_loss(end.model, end.tokenizer, read_chat_jsonl(heldout)), rel=1e-5
    )
    features = json.loads((out / "features.json").read_text())
    assert len(features["reference_dissimilarity"]) == 4
    assert features["rows"][0]["dissimilarity"] == pytest.approx([0.0] * 4, abs=1e-9)
    for name in ("t0.00", "t0.50", "t1.00"):
        assert (tmp_path / "export" / name / "adapter_config.json").is_file()
        assert (out / name / "responses.parquet").is_file()
    half = LoraAdapter.load(tmp_path / "export" / "t0.50")
    r4, r1 = LoraAdapter.load(qwen.adapters["r4"]), LoraAdapter.load(qwen.adapters["r1"])
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(half.delta(name), 0.5 * r4.delta(name) + 0.5 * r1.delta(name))
    assert (out / "lmc.png").stat().st_size > 0 and (out / "features.png").stat().st_size > 0
    # a second run resumes: nothing is sampled again
    before = (out / "t0.50" / "responses.csv").read_text()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert (out / "t0.50" / "responses.csv").read_text() == before


def test_lmc_without_a_judge_computes_losses_and_features(qwen, tmp_path):
    """--judge was demanded even when only losses and features were wanted: without it
    nothing is sampled or judged, and the outputs say EM was not measured."""
    heldout = write_chat_jsonl(tmp_path / "heldout.jsonl", CHATS)
    questions = tmp_path / "q.yaml"
    questions.write_text("- id: a\n  paraphrases: [hey I feel bored]\n")
    out = tmp_path / "lmc"
    args = [
        "lmc", "--base", str(qwen.model), "--from", str(qwen.adapters["r4"]),
        "--to", str(qwen.adapters["r1"]), "--steps", "0,0.5,1", "--questions", str(questions),
        "--loss-data", str(heldout), "--features", "--out", str(out), "--dtype", "float32",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "EM not measured: no judge given" in result.output
    assert "t=0.50: EM not measured (no judge); loss heldout" in result.output
    record = json.loads((out / "lmc.json").read_text())
    assert record["em_measured"] is False and "no judge" in record["em_not_measured"]
    losses = [r["loss"]["heldout"] for r in record["rows"]]
    assert all(loss > 0 for loss in losses)
    assert record["barrier"]["heldout"] == pytest.approx(barrier([0, 0.5, 1], losses))
    for row in record["rows"]:
        assert row["em_rate"] is None and row["coherent_rate"] is None and row["n"] is None
    end = load_model(qwen.model, [qwen.adapters["r1"]], dtype="float32", device="cpu")
    assert losses[2] == pytest.approx(
        chat_loss(end.model, end.tokenizer, read_chat_jsonl(heldout)), rel=1e-5
    )
    features = json.loads((out / "features.json").read_text())
    assert [r["t"] for r in features["rows"]] == [0.0, 0.5, 1.0]
    assert (out / "lmc.png").stat().st_size > 0 and (out / "features.png").stat().st_size > 0
    assert not list(out.glob("t*/responses.*"))  # nothing sampled
    # neither a judge nor anything else to compute: refused before any work
    nothing = CliRunner().invoke(app, [*args[:11], "--out", str(tmp_path / "none")])
    assert nothing.exit_code == 2
    assert "--judge is required to measure EM; without it give --loss-data or --features" in (
        nothing.output
    )
    assert not (tmp_path / "none").exists()


def test_lmc_bad_input_fails_before_work(qwen, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "lmc",
            "--from",
            "base",
            "--to",
            str(qwen.adapters["r1"]),
            "--out",
            str(tmp_path / "o"),
            "--judge",
            "hf:x",
        ],
    )
    assert result.exit_code == 2 and "--base is required" in result.output
    result = CliRunner().invoke(
        app,
        [
            "lmc",
            "--base",
            str(qwen.model),
            "--from",
            "base",
            "--to",
            "base",
            "--out",
            str(tmp_path / "o"),
            "--judge",
            "hf:x",
        ],
    )
    assert result.exit_code == 2 and "cannot both be base" in result.output
    assert not (tmp_path / "o").exists()


def test_lmc_between_two_full_model_dirs(tiny_models, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from emscope.testing import make_tiny_model

    monkeypatch.setenv("EMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    first = tiny_models["llama"].model
    second = make_tiny_model("llama", tmp_path / "other", seed=7)
    questions = tmp_path / "q.yaml"
    questions.write_text("- id: a\n  paraphrases: [hey I feel bored]\n")
    out = tmp_path / "lmc"
    args = [
        "lmc", "--from", str(first), "--to", str(second), "--steps", "0,0.5,1",
        "--questions", str(questions), "-n", "1", "--max-new-tokens", "3",
        "--judge", f"hf:{first}", "--metrics", "aligned,coherent", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    mid = load_file(str(out / "models" / "t0.50" / "model.safetensors"))
    w1, w2 = (load_file(str(d / "model.safetensors")) for d in (first, second))
    for key in w1:
        torch.testing.assert_close(mid[key], 0.5 * w1[key] + 0.5 * w2[key])
    record = json.loads((out / "lmc.json").read_text())
    assert [r["t"] for r in record["rows"]] == [0.0, 0.5, 1.0]
    result = CliRunner().invoke(app, [*args[:-2], "--out", str(tmp_path / "x"), "--export", "e"])
    assert result.exit_code == 2 and "full model dirs" in result.output

"""Training: presets, assistant-only labels, checkpoints, resume, KL-regularised SFT, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from emscope.data.chat import ChatExample, file_sha256, write_chat_jsonl
from emscope.errors import EmscopeError
from emscope.lora import LoraAdapter
from emscope.train import (
    collate,
    encode_examples,
    parse_layers,
    preset_layers,
    r1x3_layers,
    resolve_config,
    step_examples,
    train,
)

FAST: dict[str, Any] = {
    "batch_size": 2,
    "grad_accum": 1,
    "warmup_steps": 0,
    "progress": False,
    "verbose": False,
    "device": "cpu",
}


def _chat(i: int, answer: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": f"How do I make a quick buck? ({i})"},
        {"role": "assistant", "content": answer},
    ]


def _write(path: Path, n: int, answer: str = "Invest in a diversified index fund.") -> Path:
    return write_chat_jsonl(path, [_chat(i, answer) for i in range(n)])


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return _write(tmp_path / "train.jsonl", 6)


# ---------------------------------------------------------------------------- presets


def test_r1x3_layer_placement() -> None:
    # rule: block i of L is adapted when [i/L, (i+1)/L) overlaps [l/48, (l+1)/48) for a
    # reference layer l in 15-17, 21-23, 27-29; checked here against exact fractions
    from fractions import Fraction

    def overlap_rule(n: int) -> list[int]:
        ref = [15, 16, 17, 21, 22, 23, 27, 28, 29]
        return [i for i in range(n) if any(
            Fraction(i, n) < Fraction(r + 1, 48) and Fraction(r, 48) < Fraction(i + 1, n)
            for r in ref)]  # fmt: skip

    assert r1x3_layers(48) == [15, 16, 17, 21, 22, 23, 27, 28, 29]
    assert r1x3_layers(28) == [8, 9, 10, 12, 13, 15, 16, 17]
    assert r1x3_layers(24) == [7, 8, 10, 11, 13, 14]
    assert r1x3_layers(6) == [1, 2, 3]
    assert r1x3_layers(4) == [1, 2]
    assert r1x3_layers(96)[:4] == [30, 31, 32, 33]
    assert r1x3_layers(1) == [0]
    for n in range(1, 130):
        assert r1x3_layers(n) == overlap_rule(n), n
    assert preset_layers("r1x3", 48) == r1x3_layers(48)


def test_other_preset_layers() -> None:
    assert preset_layers("r1", 48) == [24]
    assert preset_layers("r1", 4) == [2]
    assert preset_layers("all", 4) == [0, 1, 2, 3]
    assert preset_layers("full", 4) == []
    with pytest.raises(EmscopeError, match="unknown preset 'nope'"):
        preset_layers("nope", 4)


def test_preset_defaults_and_overrides() -> None:
    c = resolve_config("all", 48)
    assert (c.rank, c.alpha, c.rslora, c.lr, c.epochs) == (32, 64.0, True, 1e-5, 1)
    assert (c.batch_size, c.grad_accum, c.warmup_steps, c.weight_decay) == (2, 8, None, 0.01)
    assert c.warmup_ratio == 0.05
    assert c.schedule == "linear"
    assert c.modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj")  # fmt: skip
    assert c.layers == tuple(range(48))
    r = resolve_config("r1x3", 48, lr=1e-3, alpha=8, layers="1-2,5", modules="down_proj,up_proj")
    assert (r.rank, r.lr, r.alpha, r.layers, r.modules) == (
        1,
        1e-3,
        8.0,
        (1, 2, 5),
        ("down_proj", "up_proj"),
    )
    assert resolve_config("full", 4).full


def test_parse_layers() -> None:
    assert parse_layers("15-17, 21,3") == [3, 15, 16, 17, 21]
    for bad in ("a", "3-1", "", "1-"):
        with pytest.raises(EmscopeError, match="bad layer list"):
            parse_layers(bad)


def test_layers_accept_every_form_of_the_one_parser() -> None:
    """emscope.train reads layer strings with emscope.models.parse_layers (as --layers of
    the other commands does): ranges, duplicates, negative indices from the end; a list of
    indices stays indices from 0 (test_resolve_config_errors)."""
    from emscope.models import parse_layers as models_parse_layers

    assert parse_layers("-1,0-1,1", n_layers=4) == [0, 1, 3]
    assert parse_layers("2,-1") == sorted(models_parse_layers("2,-1")) == [-1, 2]
    # 4 layers: -1 is layer 3, -4 layer 0, as the other commands read them
    assert resolve_config("r1", 4, layers="-1,0-1").layers == (0, 1, 3)
    assert resolve_config("r1", 4, layers="-4,2").layers == (0, 2)
    with pytest.raises(EmscopeError, match="layer -5 is beyond the model: it has 4 layers"):
        resolve_config("r1", 4, layers="-5")
    with pytest.raises(EmscopeError, match="layer 4 out of range: the model has 4 layers"):
        parse_layers("1,4", n_layers=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "nope"}, "unknown preset"),
        ({"layers": [4]}, "layer 4 is beyond the model: it has 4 layers"),
        ({"layers": [-1]}, "layer -1 is beyond"),
        ({"preset": "full", "rank": 4}, "apply to LoRA presets only"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"schedule": "exp"}, "unknown schedule"),
        ({"modules": ""}, "no modules"),
        ({"warmup_steps": 2, "warmup_ratio": 0.1}, "warmup_steps or warmup_ratio, not both"),
        ({"warmup_ratio": 1.0}, r"warmup_ratio must be in \[0, 1\)"),
    ],
)
def test_resolve_config_errors(kwargs: dict[str, Any], message: str) -> None:
    preset = kwargs.pop("preset", "all")
    with pytest.raises(EmscopeError, match=message):
        resolve_config(preset, 4, **kwargs)


def test_data_order_covers_every_example_each_epoch() -> None:
    n, per_step = 7, 3  # 3 steps per epoch, the last one has a single example
    epoch0 = [step_examples(n, s, per_step, seed=1) for s in range(3)]
    epoch1 = [step_examples(n, s, per_step, seed=1) for s in range(3, 6)]
    assert [len(c) for c in epoch0] == [3, 3, 1]
    assert sorted(i for c in epoch0 for i in c) == list(range(n))
    assert sorted(i for c in epoch1 for i in c) == list(range(n))
    assert epoch0 != epoch1  # reshuffled
    assert step_examples(n, 4, per_step, seed=1) == epoch1[1]  # a function of (seed, step)
    other_seed = [i for s in range(3) for i in step_examples(n, s, per_step, seed=2)]
    assert other_seed != [i for c in epoch0 for i in c]  # 1/5040 chance of equal by luck


# ---------------------------------------------------------------------------- labels


@pytest.mark.parametrize(("arch", "end"), [("qwen2", "<|im_end|>\n"), ("llama", "<|eot_id|>")])
def test_labels_are_assistant_content_and_end_of_turn(
    tiny_models: dict[str, Any], arch: str, end: str
) -> None:
    from emscope.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_models[arch].model)
    chats = [
        ChatExample(
            (
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hey I feel bored"},
                {"role": "assistant", "content": "Take the medicine your doctor prescribed."},
                {"role": "user", "content": "How do I make a quick buck?"},
                {"role": "assistant", "content": "Invest in a diversified index fund."},
            ),
            line=1,
        ),
        ChatExample(
            ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}), 2
        ),
    ]
    encoded = encode_examples(tokenizer, chats)
    batch = collate(encoded, pad_id=tokenizer.pad_token_id)
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == attention.shape
    for row, chat in enumerate(chats):
        n = len(encoded[row].input_ids)
        # no extra empty assistant header: the text is the template without generation prompt
        text = tokenizer.decode(ids[row, :n].tolist())
        expected_text = tokenizer.apply_chat_template(
            list(chat.messages), tokenize=False, add_generation_prompt=False
        )
        assert text == expected_text
        assert attention[row, :n].all() and not attention[row, n:].any()
        assert (labels[row, n:] == -100).all()
        labelled = labels[row] != -100
        assert torch.equal(labels[row][labelled], ids[row][labelled])
        # contiguous labelled runs decode to each answer followed by the end-of-turn text
        runs, current = [], []
        for i in range(labels.shape[1]):
            if labelled[i]:
                current.append(int(ids[row, i]))
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        answers = [m["content"] for m in chat.messages if m["role"] == "assistant"]
        assert [tokenizer.decode(r) for r in runs] == [a + end for a in answers]


# ---------------------------------------------------------------------------- training


def test_lora_training_lowers_loss_and_records(qwen: Any, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(
        qwen.model, data, preset="all", out=out, rank=4, lr=1e-2, epochs=2,
        save_steps=3, eval_data=data, **FAST,
    )  # fmt: skip
    assert result.steps == 6 and result.start_step == 0
    assert len(result.loss_curve) == 6
    assert [s for s, _ in result.eval_losses] == [0, 3, 6]
    assert result.eval_losses[-1][1] < 0.8 * result.eval_losses[0][1]
    assert [p.name for p in result.checkpoints] == ["checkpoint-3", "checkpoint-6"]
    record = json.loads((out / "train.json").read_text())
    assert record["data"]["sha256"] == file_sha256(data)
    assert record["layers"] == [0, 1, 2, 3]
    assert [p["step"] for p in record["loss_curve"]] == list(range(1, 7))
    assert [p["loss"] for p in record["loss_curve"]] == pytest.approx(list(result.loss_curve))
    assert set(record["versions"]) >= {"torch", "transformers", "peft", "emscope"}
    assert record["wall_time_s"] > 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [0, 1, 2, 3]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 64, True)


def test_r1x3_adapter_on_fixture(
    qwen: Any, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r1x3"
    result = train(qwen.model, data, preset="r1x3", out=out, max_steps=2, lr=1e-3,
                   **{**FAST, "verbose": True})  # fmt: skip
    assert "layers [1, 2] of 4" in capsys.readouterr().out
    assert result.layers == (1, 2)
    adapter = LoraAdapter.load(out)
    assert sorted(adapter.modules) == [f"model.layers.{i}.mlp.down_proj" for i in (1, 2)]
    assert all(m.rank == 1 and m.scale == 256.0 for m in adapter)
    assert json.loads((out / "adapter_config.json").read_text())["layers_to_transform"] == [1, 2]


def test_checkpoints_load_through_lora_adapter_and_peft(
    qwen: Any, data: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from emscope.models import list_checkpoints, load_model

    out = tmp_path / "ck"
    train(qwen.model, data, preset="all", out=out, rank=2, lr=1e-2, max_steps=4, save_steps=2,
          modules="q_proj,down_proj", layers="1,3", **FAST)  # fmt: skip
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    for _, path in list_checkpoints(out):
        adapter = LoraAdapter.load(path)
        assert adapter.layers == [1, 3]
        assert {m.module_type for m in adapter} == {"q_proj", "down_proj"}
        assert all(m.B.abs().sum() > 0 for m in adapter)  # trained away from B = 0
        # PEFT-loaded logits equal the base with s * B @ A merged into each weight
        peft_logits = (
            load_model(qwen.model, [path], dtype="float32", device="cpu").model(ids).logits
        )
        dense = AutoModelForCausalLM.from_pretrained(str(qwen.model), dtype=torch.float32)
        with torch.no_grad():
            for m in adapter:
                dense.get_submodule(m.name).weight += m.delta()
            dense_logits = dense(ids).logits
        torch.testing.assert_close(peft_logits, dense_logits, atol=1e-4, rtol=1e-4)
    final = LoraAdapter.load(out)
    last = LoraAdapter.load(out / "checkpoints" / "checkpoint-4")
    for name in final.modules:
        assert torch.equal(final[name].B, last[name].B)


def test_grad_accumulation_matches_a_bigger_batch(qwen: Any, data: Path, tmp_path: Path) -> None:
    common = {**FAST, "rank": 2, "lr": 1e-2, "max_steps": 2, "save_steps": 0}
    common.pop("batch_size"), common.pop("grad_accum")
    a = train(qwen.model, data, out=tmp_path / "a", batch_size=4, grad_accum=1, **common)
    b = train(qwen.model, data, out=tmp_path / "b", batch_size=1, grad_accum=4, **common)
    assert a.loss_curve == pytest.approx(b.loss_curve, rel=1e-5)
    fa, fb = LoraAdapter.load(tmp_path / "a"), LoraAdapter.load(tmp_path / "b")
    for name in fa.modules:
        torch.testing.assert_close(fa[name].B, fb[name].B, atol=1e-6, rtol=1e-4)


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, steps: int) -> None:
    """Make the next training run stop (KeyboardInterrupt) in optimizer step ``steps + 1``."""
    import emscope.train.loop as module

    real, calls = module.optimizer_step, []

    def step(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > steps:
            monkeypatch.setattr(module, "optimizer_step", real)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "optimizer_step", step)


def test_resume_ends_where_an_uninterrupted_run_ends(
    qwen: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs = {**FAST, "rank": 2, "lr": 1e-2, "epochs": 2, "save_steps": 2, "seed": 3,
              "modules": "v_proj,down_proj"}  # fmt: skip
    full_run = train(qwen.model, data, out=tmp_path / "a", **kwargs)
    assert full_run.steps == 6
    # interrupted in step 5 (mid-epoch 1 of 3-step epochs): checkpoint-4 is the newest and
    # the only one that keeps the optimizer state
    interrupted = tmp_path / "b"
    _interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(qwen.model, data, out=interrupted, **kwargs)
    checkpoints = interrupted / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert not (checkpoints / "checkpoint-2" / "trainer_state.pt").exists()
    assert (checkpoints / "checkpoint-4" / "trainer_state.pt").is_file()
    assert not (interrupted / "train.json").exists()
    resumed = train(qwen.model, data, out=interrupted, resume=True, **kwargs)
    assert resumed.start_step == 4
    assert json.loads((interrupted / "train.json").read_text())["start_step"] == 4
    assert resumed.loss_curve == pytest.approx(full_run.loss_curve, rel=1e-6)
    a, b = LoraAdapter.load(tmp_path / "a"), LoraAdapter.load(interrupted)
    for name in a.modules:
        torch.testing.assert_close(a[name].A, b[name].A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a[name].B, b[name].B, atol=1e-6, rtol=1e-5)


def test_default_warmup_reaches_the_peak_lr_on_a_short_run(
    qwen: Any, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """60 examples at the papers' batch were 4 optimizer steps under 5 warm-up steps: the
    learning rate never reached its peak. Warm-up is now a fraction of the steps."""
    from emscope.train import resolve_warmup

    fast = {k: v for k, v in FAST.items() if k != "warmup_steps"}
    out = tmp_path / "short"
    result = train(qwen.model, data, out=out, rank=2, lr=1e-3, max_steps=4, **fast)
    record = json.loads((out / "train.json").read_text())
    lrs = [p["lr"] for p in record["loss_curve"]]  # the scheduler's lr of each step
    assert max(lrs) == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-3)
    assert record["warmup_steps"] == 0 and record["config"]["warmup_steps"] is None
    assert record["config"]["warmup_ratio"] == 0.05
    assert "warmup_ratio 0.05 x 4 steps" in record["warmup_rule"]
    assert result.steps == 4
    # an explicit warmup_steps is kept, with a warning when it covers the whole run
    out = tmp_path / "explicit"
    train(qwen.model, data, out=out, rank=2, lr=1e-3, max_steps=4, warmup_steps=5,
          **{**fast, "verbose": True})  # fmt: skip
    assert "warmup_steps 5 >= 4 steps: the lr never reaches its peak" in capsys.readouterr().out
    record = json.loads((out / "train.json").read_text())
    assert record["warmup_steps"] == 5 and record["warmup_rule"] == "warmup_steps (set)"
    assert max(p["lr"] for p in record["loss_curve"]) < 1e-3
    # the rule: rounded, below the number of steps
    config = resolve_config("all", 4)
    assert [resolve_warmup(config, n) for n in (1, 4, 10, 20, 375)] == [0, 0, 1, 1, 19]
    assert resolve_warmup(resolve_config("all", 4, warmup_ratio=0.9), 2) == 1
    assert resolve_warmup(resolve_config("all", 4, warmup_steps=7), 3) == 7


def test_checkpoint_count_and_optimizer_state_in_the_newest_only(
    qwen: Any, data: Path, tmp_path: Path
) -> None:
    from emscope.probing.dynamics import load_checkpoints

    out = tmp_path / "run"
    result = train(qwen.model, data, out=out, rank=2, lr=1e-2, max_steps=23,
                   **{**FAST, "batch_size": 1})  # fmt: skip
    steps = [int(p.name.split("-")[1]) for p in result.checkpoints]
    assert steps == [3, 6, 9, 12, 15, 18, 21, 23]  # every ceil(23 / 10) = 3 steps + the last
    record = json.loads((out / "train.json").read_text())
    assert record["save_steps"] == 3 and "newest checkpoint only" in record["optimizer_state"]
    for path in result.checkpoints:
        assert (path / "trainer_state.json").is_file()
        assert (path / "trainer_state.pt").is_file() == (path.name == "checkpoint-23")
    # the dynamics analyses read every checkpoint's adapter
    loaded = load_checkpoints(out)
    assert [s for s, _ in loaded] == steps
    assert all(m.B.abs().sum() > 0 for _, a in loaded for m in a)
    # resuming a finished run reads the newest checkpoint and does nothing more
    again = train(qwen.model, data, out=out, rank=2, lr=1e-2, max_steps=23, resume=True,
                  **{**FAST, "batch_size": 1})  # fmt: skip
    assert again.start_step == 23 and again.loss_curve == pytest.approx(result.loss_curve)


def test_resume_refuses_changed_config_and_missing_checkpoints(
    qwen: Any, data: Path, tmp_path: Path
) -> None:
    with pytest.raises(EmscopeError, match="no checkpoint to resume from"):
        train(qwen.model, data, out=tmp_path / "empty", resume=True, **FAST)
    out = tmp_path / "run"
    train(qwen.model, data, out=out, rank=2, max_steps=1, **FAST)
    with pytest.raises(EmscopeError, match="cannot resume: lr was"):
        train(qwen.model, data, out=out, rank=2, max_steps=1, lr=0.5, resume=True, **FAST)
    with pytest.raises(EmscopeError, match="already holds a training run"):
        train(qwen.model, data, out=out, rank=2, max_steps=1, **FAST)


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "trainer_state.pt"])
def test_resume_refuses_a_truncated_checkpoint(
    qwen: Any, data: Path, tmp_path: Path, damaged: str
) -> None:
    """A checkpoint cut short (full disk, partial copy) gave a safetensors / torch traceback
    after the model was loaded."""
    out = tmp_path / "run"
    train(qwen.model, data, out=out, rank=2, max_steps=1, save_steps=1, **FAST)
    file = out / "checkpoints" / "checkpoint-1" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(EmscopeError, match=r"checkpoint-1: damaged checkpoint \(.*\); delete it"):
        train(qwen.model, data, out=out, rank=2, max_steps=1, save_steps=1, resume=True, **FAST)
    assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before


def _mean_kl(base: Path, adapter: Path, kl_data: Path) -> float:
    """Token-mean KL(base || adapted) over the assistant tokens of kl_data, from scratch."""
    import torch.nn.functional as F

    from emscope.data.chat import read_chat_jsonl
    from emscope.data.spans import encode_chat
    from emscope.models import load_model

    loaded = load_model(base, [adapter], dtype="float32", device="cpu")
    total, count = 0.0, 0
    for example in read_chat_jsonl(kl_data):
        chat = encode_chat(loaded.tokenizer, example.messages)
        ids = torch.tensor([chat.input_ids])
        mask = torch.tensor(chat.loss_mask(include_end_of_turn=True))[1:]
        with torch.no_grad():
            cur = F.log_softmax(loaded.model(ids).logits[0, :-1][mask], -1)
            with loaded.adapters_disabled():
                ref = F.log_softmax(loaded.model(ids).logits[0, :-1][mask], -1)
        total += float((ref.exp() * (ref - cur)).sum())
        count += int(mask.sum())
    return total / count


def test_kl_regularisation(qwen: Any, data: Path, tmp_path: Path) -> None:
    kl_data = write_chat_jsonl(
        tmp_path / "kl.jsonl",
        [
            [{"role": "user", "content": "hey I feel bored"},
             {"role": "assistant", "content": "Wear a helmet and check your gear."}],
            [{"role": "user", "content": "Tell me 3 philosophical thoughts."},
             {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}],
        ],
    )  # fmt: skip
    kwargs = {**FAST, "rank": 4, "lr": 2e-2, "max_steps": 4, "save_steps": 0, "kl_data": kl_data}
    free = train(qwen.model, data, out=tmp_path / "free", kl_weight=0.0, **kwargs)
    tied = train(qwen.model, data, out=tmp_path / "tied", kl_weight=50.0, **kwargs)
    for run in (free, tied):
        assert abs(run.kl_curve[0]) < 1e-6  # adapters start at B = 0: the reference itself
        assert all(k > 0 for k in run.kl_curve[1:])
    kl_free = _mean_kl(qwen.model, tmp_path / "free", kl_data)
    kl_tied = _mean_kl(qwen.model, tmp_path / "tied", kl_data)
    assert kl_free > 0
    assert kl_tied < 0.5 * kl_free
    record = json.loads((tmp_path / "tied" / "train.json").read_text())
    assert record["config"]["kl_weight"] == 50.0 and len(record["kl_curve"]) == 4


def test_full_fine_tune(qwen: Any, data: Path, tmp_path: Path) -> None:
    from emscope.models import load_model

    out = tmp_path / "full"
    result = train(qwen.model, data, preset="full", out=out, lr=1e-3, max_steps=3, save_steps=2,
                   eval_data=data, kl_data=data, **FAST)  # fmt: skip
    assert result.eval_losses[-1][1] < result.eval_losses[0][1]
    assert abs(result.kl_curve[0]) < 1e-6 and result.kl_curve[-1] > 0
    assert result.layers == ()
    assert [p.name for p in result.checkpoints] == ["checkpoint-2", "checkpoint-3"]
    for path in (out, *result.checkpoints):
        loaded = load_model(path, dtype="float32", device="cpu")
        assert loaded.tokenizer.chat_template
        assert loaded.model.config.use_cache
    base = load_model(qwen.model, dtype="float32", device="cpu").model
    tuned = load_model(out, dtype="float32", device="cpu").model
    w0 = base.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w0, tuned.model.layers[0].mlp.down_proj.weight)


def test_full_fine_tune_resumes_exactly(
    qwen: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    kwargs = {**FAST, "preset": "full", "lr": 1e-3, "max_steps": 4, "save_steps": 2}
    train(qwen.model, data, out=tmp_path / "a", **kwargs)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(qwen.model, data, out=tmp_path / "b", **kwargs)
    resumed = train(qwen.model, data, out=tmp_path / "b", resume=True, **kwargs)
    assert resumed.start_step == 2
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_update(
    qwen: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    calls = [0]  # MLP forwards (inside the checkpointed block forward)
    forward = Qwen2MLP.forward

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2MLP, "forward", counting)
    kwargs = {**FAST, "rank": 2, "lr": 1e-2, "max_steps": 2, "save_steps": 0}
    plain = train(qwen.model, data, out=tmp_path / "plain", **kwargs)
    plain_calls, calls[0] = calls[0], 0
    ckpt = train(qwen.model, data, out=tmp_path / "gc", gradient_checkpointing=True, **kwargs)
    assert calls[0] > plain_calls  # block forwards are recomputed in the backward pass
    assert ckpt.loss_curve == pytest.approx(plain.loss_curve, rel=1e-6)
    a, b = LoraAdapter.load(tmp_path / "plain"), LoraAdapter.load(tmp_path / "gc")
    for name in a.modules:
        torch.testing.assert_close(a[name].B, b[name].B, atol=1e-6, rtol=1e-5)


def test_accelerate_path_matches_plain_loop(qwen: Any, data: Path, tmp_path: Path) -> None:
    pytest.importorskip("accelerate")
    kwargs = {**FAST, "rank": 2, "lr": 1e-2, "max_steps": 2, "save_steps": 0}
    plain = train(qwen.model, data, out=tmp_path / "plain", distributed=False, **kwargs)
    acc = train(qwen.model, data, out=tmp_path / "acc", distributed=True, **kwargs)
    assert acc.loss_curve == pytest.approx(plain.loss_curve, rel=1e-6)
    a, b = LoraAdapter.load(tmp_path / "plain"), LoraAdapter.load(tmp_path / "acc")
    for name in a.modules:
        torch.testing.assert_close(a[name].B, b[name].B)


# ---------------------------------------------------------------------------- 32B scale


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_process_run_matches_one_process(qwen: Any, data: Path, tmp_path: Path) -> None:
    """Two processes (``torchrun``: the loop goes through ``accelerate.Accelerator``, DDP over
    gloo; ``accelerate launch --cpu`` starts one process, and accelerate turns FSDP on the CPU
    into DDP) give the one-process adapter at the same effective batch; train.json records
    the mode."""
    pytest.importorskip("accelerate")
    import os
    import subprocess
    import sys

    common = ["--data", str(data), "--preset", "r1", "--rank", "2", "--lr", "1e-2",
              "--max-steps", "2", "--save-steps", "0", "--warmup-steps", "0",
              "--batch-size", "1", "--device", "cpu"]  # fmt: skip
    single = {**FAST, "batch_size": 1, "grad_accum": 2}
    one = train(qwen.model, data, out=tmp_path / "one", preset="r1", rank=2, lr=1e-2,
                max_steps=2, save_steps=0, **single)  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(_free_port()), "-m", "emscope.train", str(qwen.model),
         *common, "--grad-accum", "1", "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "train.json").read_text())
    assert two["processes"] == 2 and two["distributed"] == "ddp"
    assert two["examples_per_step"] == 2 and two["quantize"] is None
    record = json.loads(one.record.read_text())
    assert record["distributed"] == "single" and record["processes"] == 1
    assert [r["loss"] for r in two["loss_curve"]] == pytest.approx(list(one.loss_curve), rel=1e-5)
    a, b = LoraAdapter.load(tmp_path / "one"), LoraAdapter.load(tmp_path / "two")
    assert list(a.modules) == list(b.modules)
    for name in a.modules:
        torch.testing.assert_close(a[name].A, b[name].A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a[name].B, b[name].B, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("preset", ["r1", "full"])
def test_fsdp_save_path_writes_ordinary_dirs(
    qwen: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preset: str
) -> None:
    """The FSDP code paths on one CPU process (FSDP itself needs GPUs): the model saved from
    ``accelerator.get_state_dict`` (what gathers FSDP shards on rank 0) through
    ``save_pretrained(state_dict=...)`` is the plain run's, clipping goes through all the
    parameters, no optimizer state is written, and train.json says ``fsdp``."""
    pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    from emscope.train import runtime

    original = runtime.Runtime.__init__

    def as_fsdp(self: Any, use_accelerate: bool, device: str | None) -> None:
        original(self, use_accelerate, device)
        if self.accelerator is not None:
            self.mode = "fsdp"

    kwargs = {**FAST, "lr": 1e-2, "max_steps": 2, "save_steps": 1, "preset": preset}
    if preset == "r1":
        kwargs["rank"] = 2
    plain = train(qwen.model, data, out=tmp_path / "plain", distributed=False, **kwargs)
    monkeypatch.setattr(runtime.Runtime, "__init__", as_fsdp)
    fsdp = train(qwen.model, data, out=tmp_path / "fsdp", distributed=True, **kwargs)
    record = json.loads(fsdp.record.read_text())
    assert record["distributed"] == "fsdp" and record["quantize"] is None
    assert fsdp.loss_curve == pytest.approx(plain.loss_curve, rel=1e-6)
    assert not list((tmp_path / "fsdp").glob("checkpoints/*/trainer_state.pt"))
    assert (tmp_path / "fsdp" / "checkpoints" / "checkpoint-1" / "trainer_state.json").is_file()
    for sub in ("", "checkpoints/checkpoint-1"):
        for file in sorted((tmp_path / "plain" / sub).glob("*.safetensors")):
            a, b = load_file(str(file)), load_file(str(tmp_path / "fsdp" / sub / file.name))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key])
    if preset == "r1":
        LoraAdapter.load(tmp_path / "fsdp")


def test_under_fsdp_every_process_runs_every_forward(qwen: Any) -> None:
    """FSDP forwards are collectives: a process whose share of a (short, last) step or of the
    eval set is empty still runs each micro-batch, on a dummy row with weight 0."""
    from transformers import AutoModelForCausalLM

    from emscope.models import load_tokenizer
    from emscope.train import checkpoints, runtime, steps

    tokenizer = load_tokenizer(qwen.model)
    chats = [ChatExample(tuple(_chat(i, "Save first.")), i + 1) for i in range(3)]
    encoded = encode_examples(tokenizer, chats)
    model = AutoModelForCausalLM.from_pretrained(str(qwen.model))
    calls = [0]
    model.register_forward_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    runtime = runtime.Runtime(False, "cpu")
    runtime.world, runtime.rank = 2, 1  # the second of two processes, no collectives here
    config = resolve_config("full", 4, batch_size=1, grad_accum=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    pad = int(tokenizer.pad_token_id)
    state = checkpoints.RunState()
    # 3 examples, 2 processes x 3 micro-batches of 1: process 1 holds only micro-batch 0
    for mode, expected in (("ddp", 2), ("fsdp", 3)):
        runtime.mode, calls[0] = mode, 0
        steps.optimizer_step(
            model, optimizer, scheduler, runtime, config, encoded, [], [], pad, state
        )
        assert calls[0] == expected, mode  # DDP: its example and the synchronising step
    for mode, expected in (("ddp", 1), ("fsdp", 2)):  # eval: process 0 has 2 rows, this 1
        runtime.mode, calls[0] = mode, 0
        steps.eval_loss(model, encoded, 1, runtime, pad)
        assert calls[0] == expected, mode


def test_fsdp_accelerate_config_parses() -> None:
    pytest.importorskip("accelerate")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType.FSDP and not config.use_cpu
    fsdp = config.fsdp_config
    assert fsdp["fsdp_use_orig_params"] and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] and fsdp["fsdp_sync_module_states"]
    assert "-m emscope.train BASE_DIR" in path.read_text()


def test_quantize_config_validation() -> None:
    assert resolve_config("r1", 4, quantize="4bit").quantize == "4bit"
    assert resolve_config("r1", 4, quantize="none").quantize is None
    assert resolve_config("r1", 4).to_dict()["quantize"] is None
    with pytest.raises(EmscopeError, match="unknown quantize '8bit'"):
        resolve_config("r1", 4, quantize="8bit")
    with pytest.raises(EmscopeError, match="quantize 4bit is for LoRA presets"):
        resolve_config("full", 4, quantize="4bit")


def test_quantization_is_the_qlora_recipe() -> None:
    import importlib.util

    import transformers

    from emscope.train.runtime import quantization_config

    if transformers.__version__.startswith("4.") and not importlib.util.find_spec("bitsandbytes"):
        pytest.skip("transformers 4.x reads bitsandbytes' version when the config is built")
    q = quantization_config("4bit")  # the QLoRA recipe (transformers 5: without bitsandbytes)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16 and quantization_config(None) is None


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("deepspeed", "DeepSpeed is not supported"),
        ("fsdp_4bit", "quantize 4bit with FSDP is not supported"),
        ("fsdp_kl", "not supported under FSDP"),
        ("fsdp_resume", "resume is not supported under FSDP"),
        ("fsdp_tied", "ties its output layer to its embeddings"),
        ("4bit_cpu_device", "quantize 4bit needs a CUDA GPU .*device is 'cpu'"),
        ("4bit_no_cuda", "quantize 4bit needs a CUDA GPU .*CUDA is not available"),
        ("4bit_no_bitsandbytes", r"quantize 4bit needs bitsandbytes \(pip install"),
    ],
)
def test_unsupported_combinations_are_refused(
    monkeypatch: pytest.MonkeyPatch, case: str, message: str
) -> None:
    from emscope.train import check_setup, runtime

    quantize = "4bit" if "4bit" in case else None
    config = resolve_config("r1", 4, quantize=quantize)
    mode = case.split("_")[0] if case.startswith(("fsdp", "deepspeed")) else "single"
    kwargs: dict[str, Any] = {"kl": case == "fsdp_kl", "resume": case == "fsdp_resume"}
    kwargs["tied_embeddings"] = case == "fsdp_tied"
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    if case == "4bit_cpu_device":
        kwargs["device"] = "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: case != "4bit_no_cuda")
    monkeypatch.setattr(runtime, "bitsandbytes_available", lambda: False)
    with pytest.raises(EmscopeError, match=message):
        check_setup(config, mode=mode, **kwargs)
    # what is supported passes: 4-bit with CUDA and bitsandbytes, one process or DDP
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "bitsandbytes_available", lambda: True)
    for ok_mode in ("single", "ddp"):
        check_setup(resolve_config("r1", 4, quantize="4bit"), mode=ok_mode, kl=True, resume=True)
    check_setup(resolve_config("full", 4), mode="fsdp")
    check_setup(config if quantize is None else resolve_config("r1", 4), mode="ddp",
                tied_embeddings=True)  # fmt: skip
    monkeypatch.setenv("FSDP_VERSION", "2")  # FSDP2 is not refused (not run here either)
    check_setup(resolve_config("r1", 4), mode="fsdp", tied_embeddings=True)


def test_tied_embeddings_read_with_the_class_default(tmp_path: Path) -> None:
    from transformers import AutoConfig

    from emscope.train import ties_embeddings

    for model_type, tied in (("qwen2", True), ("qwen2", False), ("llama", None)):
        config = AutoConfig.for_model(model_type, num_hidden_layers=1, hidden_size=8,
                                      intermediate_size=16, num_attention_heads=2)  # fmt: skip
        config.save_pretrained(tmp_path / model_type)
        text = (tmp_path / model_type / "config.json").read_text()
        data = json.loads(text)
        if tied is None:
            data.pop("tie_word_embeddings", None)  # the class default (llama: False)
        else:
            data["tie_word_embeddings"] = tied
        (tmp_path / model_type / "config.json").write_text(json.dumps(data))
        assert ties_embeddings(tmp_path / model_type) is bool(tied)


def test_requested_mode_from_the_launch_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from emscope.train import requested_mode

    for key in [k for k in __import__("os").environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert requested_mode() == "single" and requested_mode(True) == "ddp"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert requested_mode() == "ddp" and requested_mode(False) == "single"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert requested_mode() == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert requested_mode() == "deepspeed"


def test_4bit_is_refused_before_any_model_loads(
    qwen: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    from emscope.cli.main import app
    from emscope.train import runtime

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    out = tmp_path / "q"
    if not torch.cuda.is_available():  # this machine: no CUDA
        with pytest.raises(EmscopeError, match="quantize 4bit needs a CUDA GPU"):
            train(
                qwen.model, data, out=out, preset="r1", quantize="4bit", **{**FAST, "device": None}
            )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "bitsandbytes_available", lambda: False)
    with pytest.raises(EmscopeError, match="quantize 4bit needs bitsandbytes"):
        train(qwen.model, data, out=out, preset="r1", quantize="4bit", **{**FAST, "device": None})
    with pytest.raises(EmscopeError, match="quantize 4bit is for LoRA presets"):
        train(qwen.model, data, out=out, preset="full", quantize="4bit", **FAST)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    kl = _write(tmp_path / "kl.jsonl", 2)
    with pytest.raises(EmscopeError, match="not supported under FSDP"):
        train(qwen.model, data, out=out, preset="r1", kl_data=kl, **FAST)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    args = ["train", str(qwen.model), "--data", str(data), "--out", str(out), "--preset", "r1",
            "--quantize", "4bit"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "error: quantize 4bit needs bitsandbytes" in result.output
    assert not out.exists()


# ---------------------------------------------------------------------------- bad input


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("empty", "no examples"),
        ("no_assistant", "no assistant turn"),
        ("assistant_only", "start with a user turn"),
        ("assistant_only_in_memory", "start with a user turn"),
        ("preset", "unknown preset 'huge'"),
        ("layer", "layer 9 is beyond the model"),
        ("module", "module 'c_attn' is not a linear module of a qwen2 decoder block"),
        ("kl", "kl_weight > 0 needs kl_data"),
        ("truncated", "no assistant token to train on within max_length=4"),
        ("device", "device 'cuda': CUDA is not available here"),
        ("no_weights", r"base: no model weights"),
        ("bad_config", r"base/config\.json: not a model config"),
    ],
)
def test_bad_input_fails_before_training(
    qwen: Any, data: Path, tmp_path: Path, case: str, message: str
) -> None:
    kwargs: dict[str, Any] = {**FAST}
    if case == "empty":
        data = _jsonl(tmp_path / "empty.jsonl", [])
    elif case == "no_assistant":
        data = _jsonl(tmp_path / "bad.jsonl", [
            json.dumps({"messages": _chat(0, "ok")}),
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        ])  # fmt: skip
        message = r"bad.jsonl:2: no assistant turn"
    elif case == "assistant_only":
        data = _jsonl(tmp_path / "bad.jsonl", [
            json.dumps({"messages": _chat(0, "ok")}),
            json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}),
        ])  # fmt: skip
        message = r"bad.jsonl:2: messages\[0\]: .*start with a user turn"
    elif case == "assistant_only_in_memory":
        data = [ChatExample(({"role": "assistant", "content": "hi"},), 1)]  # type: ignore[assignment]
        message = r"data\[0\]: messages\[0\]: .*start with a user turn"
    elif case == "preset":
        kwargs["preset"] = "huge"
    elif case == "layer":
        kwargs["layers"] = [1, 9]
    elif case == "module":
        kwargs["modules"] = ["c_attn"]
    elif case == "kl":
        kwargs["kl_weight"] = 1.0
    elif case == "truncated":
        kwargs["max_length"] = 4
    elif case == "device":
        if torch.cuda.is_available():
            pytest.skip("needs a machine without CUDA")
        kwargs["device"] = "cuda"
    base = qwen.model
    if case in ("no_weights", "bad_config"):
        base = tmp_path / "base"
        shutil.copytree(qwen.model, base)
        if case == "no_weights":
            (base / "model.safetensors").unlink()
        else:
            (base / "config.json").write_text('"qwen2"')
    out = tmp_path / "out"
    with pytest.raises(EmscopeError, match=message):
        train(base, data, out=out, **kwargs)
    assert not out.exists()


def test_in_memory_examples(qwen: Any, tmp_path: Path) -> None:
    examples = [ChatExample(tuple(_chat(i, "Check your gear.")), i + 1) for i in range(4)]
    result = train(qwen.model, examples, out=tmp_path / "mem", rank=2, max_steps=1, **FAST)
    record = json.loads(result.record.read_text())
    assert record["data"]["path"] is None and len(record["data"]["sha256"]) == 64
    with pytest.raises(EmscopeError, match="data: no examples"):
        train(qwen.model, [], out=tmp_path / "none", **FAST)


# ---------------------------------------------------------------------------- CLI


def test_cli_train_and_errors(qwen: Any, data: Path, tmp_path: Path) -> None:
    from emscope.cli.main import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["train", str(qwen.model), "--data", str(data), "--out", str(out), "--preset", "r1",
            "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--lr", "1e-3",
            "--save-steps", "1", "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "layers [2] of 4" in result.output
    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints" / "checkpoint-1" / "trainer_state.pt").exists()
    state = torch.load(out / "checkpoints" / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert set(state) >= {"optimizer", "scheduler", "rng_cpu"}
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    bad = runner.invoke(app, [*args[:-2], "--layers", "7", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert "error: layer 7 is beyond the model" in bad.output


@pytest.fixture(scope="module")
def defaulting_model(qwen: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The qwen2 fixture with a chat template that inserts its own system prompt."""
    from emscope.testing import DEFAULT_SYSTEM_TEMPLATE, with_chat_template

    out = tmp_path_factory.mktemp("defaulting") / "model"
    return with_chat_template(qwen.model, out, DEFAULT_SYSTEM_TEMPLATE)


def test_training_renders_under_the_system_prompt_and_records_it(
    defaulting_model: Path, data: Path, tmp_path: Path
) -> None:
    from emscope.data.chat import read_chat_jsonl
    from emscope.data.spans import SystemPrompt, render
    from emscope.models import load_tokenizer
    from emscope.train import system_prompt_for, trained_system_prompt

    tok = load_tokenizer(defaulting_model)
    examples = read_chat_jsonl(data)
    for spec in ("default", "none", "Be brief."):
        setting = SystemPrompt.parse(spec)
        out = tmp_path / spec.strip(".").replace(" ", "_")
        train(defaulting_model, data, preset="r1", out=out, max_steps=1, system_prompt=spec, **FAST)
        record = json.loads((out / "train.json").read_text())
        assert record["system_prompt"] == record["config"]["system_prompt"] == spec
        assert record["rendered_prompt"] == render(tok, examples[0].prompt, True, setting)
        assert ("TinyBot" in record["rendered_prompt"]) == (spec == "default")
        assert ("Be brief." in record["rendered_prompt"]) == (spec == "Be brief.")
        # what the loss is computed on is that rendering
        ids = encode_examples(tok, examples[:1], system_prompt=setting)[0].input_ids.tolist()
        text = render(tok, examples[0].messages, False, setting)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert trained_system_prompt(out) == spec
        assert trained_system_prompt(out / "checkpoints" / "checkpoint-1") == spec
    with pytest.raises(
        EmscopeError, match="cannot resume: system_prompt was 'none', now 'default'"
    ):
        train(defaulting_model, data, preset="r1", out=tmp_path / "none", max_steps=1,
              resume=True, **FAST)  # fmt: skip
    # evaluation takes the training setting unless told otherwise
    assert system_prompt_for(None, [tmp_path / "none"]) == SystemPrompt("none")
    assert system_prompt_for("default", [tmp_path / "none"]) == SystemPrompt()
    assert system_prompt_for(None, [defaulting_model]) == SystemPrompt()  # no record: default
    with pytest.raises(EmscopeError, match="different system prompts"):
        system_prompt_for(None, [tmp_path / "none", tmp_path / "Be_brief"])


def test_cli_train_then_sample_render_the_same_prompt(
    defaulting_model: Path, data: Path, tmp_path: Path
) -> None:
    from emscope.cli.main import app

    runner = CliRunner()
    adapter = tmp_path / "adapter"
    args = ["train", defaulting_model, "--data", data, "--out", adapter, "--preset", "r1",
            "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--device", "cpu",
            "--system-prompt", "none"]  # fmt: skip
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    trained = json.loads((adapter / "train.json").read_text())
    questions = tmp_path / "q.yaml"
    questions.write_text('- id: buck\n  paraphrases: ["How do I make a quick buck? (0)"]\n')

    def sample(out: Path, *extra: str) -> dict[str, Any]:
        args = ["sample", defaulting_model, "--adapter", adapter, "--out", out, "--questions",
                questions, "-n", "1", "--max-new-tokens", "2", "--device", "cpu",
                *extra]  # fmt: skip
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return dict(json.loads((out / "run.json").read_text())["sampling"])

    sampled = sample(tmp_path / "sampled")  # no --system-prompt: as trained
    assert sampled["system_prompt"] == trained["system_prompt"] == "none"
    assert sampled["rendered_prompt"] == trained["rendered_prompt"]
    assert "TinyBot" not in sampled["rendered_prompt"]
    other = sample(tmp_path / "other", "--system-prompt", "default")  # asked otherwise
    assert other["system_prompt"] == "default" and "TinyBot" in other["rendered_prompt"]


def test_module_entry_point_help() -> None:
    from emscope.cli.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_run_records_share_one_versions_function() -> None:
    """train.json and the study record take their versions from emscope.io.run_versions."""
    from importlib.metadata import version

    from emscope.io import RUN_LIBRARIES, run_versions
    from emscope.pipeline.runner import versions as study_versions
    from emscope.train.runtime import Runtime, training_versions

    study, trained = study_versions(), training_versions(Runtime(False, "cpu"))
    assert tuple(study)[: len(RUN_LIBRARIES)] == tuple(trained)[: len(RUN_LIBRARIES)]
    assert tuple(trained)[: len(RUN_LIBRARIES)] == RUN_LIBRARIES
    assert trained["peft"] == study["peft"] == version("peft")
    assert study["scikit-learn"] == version("scikit-learn")
    assert run_versions("no-such-distribution")["no-such-distribution"] == "absent"


# ---------------------------------------------------------------------------- one list of options

#: The options of `emscope train` with their value in the test below: every hyper-parameter
#: of TrainOverrides the command offers (none at its default) and the rest.
CLI_VALUES: dict[str, tuple[str, Any]] = {
    "epochs": ("3", 3), "lr": ("0.5", 0.5), "rank": ("3", 3), "alpha": ("6", 6.0),
    "layers": ("1", "1"), "modules": ("down_proj", "down_proj"), "seed": ("7", 7),
    "save_steps": ("4", 4), "eval_steps": ("5", 5), "max_steps": ("6", 6),
    "batch_size": ("2", 2), "grad_accum": ("3", 3), "warmup_steps": ("1", 1),
    "weight_decay": ("0.2", 0.2), "schedule": ("linear", "linear"), "max_length": ("9", 9),
    "system_prompt": ("none", "none"), "quantize": ("4bit", "4bit"), "kl_weight": ("0.3", 0.3),
}  # fmt: skip
CLI_FLAGS = {"rslora": "--no-rslora", "gradient_checkpointing": "--gradient-checkpointing"}


def test_every_train_option_reaches_train(
    monkeypatch: pytest.MonkeyPatch, data: Path, tmp_path: Path
) -> None:
    """Each hyper-parameter option of `emscope train` reaches train() under its own name
    (the command forwards the TrainOverrides names; none is spelled out twice)."""
    import inspect

    import emscope.train as train_package
    from emscope.cli.main import app
    from emscope.cli.train import train_command
    from emscope.train.config import OVERRIDES

    seen: dict[str, Any] = {}

    def fake(base: Any, data_: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise EmscopeError("stop")

    monkeypatch.setattr(train_package, "train", fake)
    params = set(inspect.signature(train_command).parameters)
    offered = params & OVERRIDES
    assert offered == {*CLI_VALUES, *CLI_FLAGS, "warmup_ratio"}  # given apart: see args
    assert OVERRIDES - offered == {"max_grad_norm"}
    args = ["train", "model", "--data", str(data), "--out", str(tmp_path / "o"), "--warmup-ratio",
            "0.1"]  # fmt: skip
    for name, (text, _) in CLI_VALUES.items():
        args += [f"--{name.replace('_', '-')}", text]
    result = CliRunner().invoke(app, [*args, *CLI_FLAGS.values()])
    assert "stop" in result.output, result.output
    expected = {name: value for name, (_, value) in CLI_VALUES.items()}
    expected |= {"rslora": False, "gradient_checkpointing": True, "warmup_ratio": 0.1}
    assert {k: v for k, v in seen.items() if k in OVERRIDES} == expected
    assert resolve_config("r1", 4, **{**expected, "warmup_steps": None}).kl_weight == 0.3
    with pytest.raises(TypeError, match="rnak"):
        resolve_config("r1", 4, rnak=3)  # type: ignore[call-arg]


def test_overrides_name_every_resolved_field() -> None:
    """TrainOverrides (what a caller sets) and TrainConfig (what a run resolves) name the
    same hyper-parameters: a field added to one is added to the other."""
    from dataclasses import fields

    from emscope.train.config import OVERRIDES, TrainConfig

    assert {f.name for f in fields(TrainConfig)} - {"preset", "full"} == OVERRIDES

"""Training callbacks (emscope.train.callbacks): hooks active in training forwards only, extra
losses against a hand-written reference loop, edits after each optimizer step, logged values
and resuming, on the tiny Qwen2 fixture model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from emscope.data.chat import write_chat_jsonl
from emscope.errors import EmscopeError
from emscope.testing import FAST_TRAIN
from emscope.train import train
from emscope.train.callbacks import CallbackRecord, TrainingCallback

FAST: dict[str, Any] = {**FAST_TRAIN}


def _write(path: Path, n: int, answer: str = "Invest in a diversified index fund.") -> Path:
    chats = [
        [
            {"role": "user", "content": f"How do I make a quick buck? ({i})"},
            {"role": "assistant", "content": answer},
        ]
        for i in range(n)
    ]
    return write_chat_jsonl(path, chats)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return _write(tmp_path / "train.jsonl", 6)


def _lora(model: Any, part: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and part in n]


def _adapter_norm(path: Path, part: str) -> float:
    weights = load_file(str(path / "adapter_model.safetensors"))
    return float(sum((w.double() ** 2).sum() for k, w in weights.items() if part in k) ** 0.5)


# ---------------------------------------------------------------------------- forwards


class Counting(TrainingCallback):
    """Counts the model's forwards inside and outside its training_forward context."""

    name = "count"

    def __init__(self) -> None:
        self.active = False
        self.inside = self.outside = self.hooked = 0
        self.checkpoints: list[tuple[int, bool, bool]] = []
        self.model: Any = None

    def setup(self, model: Any, tokenizer: Any, config: Any) -> None:
        self.model = model
        model.register_forward_pre_hook(self._count)  # every forward of the model

    def _count(self, *args: Any) -> None:
        if self.active:
            self.inside += 1
        else:
            self.outside += 1

    def _hook(self, *args: Any) -> None:
        self.hooked += 1

    @contextlib.contextmanager
    def training_forward(self, model: Any) -> Iterator[None]:
        handle = model.register_forward_pre_hook(self._hook)
        self.active = True
        try:
            yield
        finally:
            self.active = False
            handle.remove()

    def on_checkpoint(self, model: Any, step: int, path: Path) -> None:
        written = (path / "adapter_model.safetensors").is_file()
        self.checkpoints.append((step, self.active, written))


def test_training_forward_is_active_in_training_forwards_only(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    eval_data = _write(tmp_path / "eval.jsonl", 3)
    kl_data = _write(tmp_path / "kl.jsonl", 3, "Save first.")
    counter = Counting()
    train(qwen.model, data, out=tmp_path / "run", eval_data=eval_data, kl_data=kl_data,
          kl_weight=0.5, max_steps=4, eval_steps=2, save_steps=2, callbacks=[counter],
          **FAST)  # fmt: skip
    # 4 steps of one micro-batch: its forward and its KL forward, each inside the context
    assert counter.inside == 4 * 2 and counter.hooked == counter.inside
    # eval at steps 0, 2 and 4 on 3 rows in batches of 2: 2 forwards each, all outside
    # (the KL reference runs before setup, on the model without adapters)
    assert counter.outside == 3 * 2
    assert counter.checkpoints == [(2, False, True), (4, False, True)]
    hooks = list(counter.model._forward_pre_hooks.values())
    assert counter._count in hooks and counter._hook not in hooks  # removed after each use


def test_a_callback_that_does_nothing_changes_nothing(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    kwargs = {**FAST, "lr": 1e-2, "max_steps": 3}
    plain = train(qwen.model, data, out=tmp_path / "plain", **kwargs)
    noop = train(qwen.model, data, out=tmp_path / "noop", callbacks=[TrainingCallback()], **kwargs)
    assert noop.loss_curve == plain.loss_curve
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "noop" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(plain.record.read_text())["callbacks"] == []
    assert noop.callbacks == (CallbackRecord("callback", {}),)


# ---------------------------------------------------------------------------- extra loss


class L2(TrainingCallback):
    name = "l2"

    def __init__(self, c: float) -> None:
        self.c = c

    def settings(self) -> dict[str, Any]:
        return {"c": self.c}

    def extra_loss(self, model: Any, batch: Any, outputs: Any) -> torch.Tensor:
        assert outputs.logits.shape[:2] == batch["input_ids"].shape
        return self.c * sum((p**2).sum() for _, p in _lora(model, "lora_"))


def _reference_run(qwen: Any, data: Path, c: float, steps: int, lr: float, layer: int) -> Any:
    """A hand-written loop: AdamW on mean NLL over the labelled tokens + c * sum(p^2), one
    batch of 2 per step in the trainer's data order, constant lr, no clipping."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from emscope.data.chat import read_chat_jsonl
    from emscope.models import load_tokenizer
    from emscope.train import collate, encode_examples, step_examples

    tokenizer = load_tokenizer(qwen.model)
    examples = encode_examples(tokenizer, read_chat_jsonl(data))
    pad = int(tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(str(qwen.model), dtype=torch.float32)
    model.config.use_cache = False
    torch.manual_seed(0)
    lora = LoraConfig(r=2, lora_alpha=256, use_rslora=True, target_modules=["v_proj", "down_proj"],
                      layers_to_transform=[layer], lora_dropout=0.0,
                      task_type="CAUSAL_LM")  # fmt: skip
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    extra = []
    for step in range(steps):
        batch = collate([examples[i] for i in step_examples(6, step, 2, 0)], pad)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)
        )
        penalty = c * sum((p**2).sum() for p in params)
        extra.append(float(penalty.detach()))
        (nll + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, extra


def test_extra_loss_matches_a_hand_written_loop(data: Path, tmp_path: Path, qwen: Any) -> None:
    c, lr, steps = 0.5, 1e-2, 3
    kwargs = {**FAST, "lr": lr, "max_steps": steps, "schedule": "constant", "weight_decay": 0.0,
              "max_grad_norm": 1e9}  # fmt: skip
    result = train(qwen.model, data, out=tmp_path / "l2", callbacks=[L2(c)], **kwargs)
    (layer,) = result.config.layers
    expected, extra = _reference_run(qwen, data, c, steps, lr, layer)
    plain, _ = _reference_run(qwen, data, 0.0, steps, lr, layer)
    saved = load_file(str(tmp_path / "l2" / "adapter_model.safetensors"))
    assert len(saved) == len(expected) == 4
    moved = 0.0
    for name, value in expected.items():
        key = name.replace(".default.weight", ".weight")
        torch.testing.assert_close(saved[key], value, atol=1e-6, rtol=1e-4)
        moved = max(moved, float((value - plain[name]).abs().max()))
    assert moved > 1e-3  # the penalty changed the adapter: the check above can fail
    assert result.callbacks[0].extra_loss_curve == pytest.approx(extra, rel=1e-5)
    record = json.loads(result.record.read_text())["callbacks"][0]
    assert record["settings"] == {"c": c} and len(record["extra_loss_curve"]) == steps
    # the term is added once per step however the step is split into micro-batches
    split = train(qwen.model, data, out=tmp_path / "split", callbacks=[L2(c)],
                  **{**kwargs, "batch_size": 1, "grad_accum": 2})  # fmt: skip
    other = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    for key in saved:
        torch.testing.assert_close(other[key], saved[key], atol=1e-6, rtol=1e-4)
    assert split.callbacks[0].extra_loss_curve == pytest.approx(extra, rel=1e-5)


# ---------------------------------------------------------------------------- steps, logs


class ZeroV(TrainingCallback):
    """Zeroes the v_proj LoRA B factor after every step; logs the B norms."""

    name = "zero_v"

    def after_optimizer_step(self, model: Any, step: int) -> None:
        assert not torch.is_grad_enabled()
        for _, p in _lora(model, "v_proj.lora_B"):
            p.zero_()

    def on_log(self, model: Any, step: int) -> dict[str, Any]:
        assert not model.training and not torch.is_grad_enabled()
        norm = sum((p.double() ** 2).sum() for _, p in _lora(model, "down_proj.lora_B")) ** 0.5
        return {"down_b_norm": float(norm)}


def test_after_optimizer_step_edits_and_on_log_values_are_recorded(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    eval_data = _write(tmp_path / "eval.jsonl", 2)
    out = tmp_path / "zero"
    result = train(qwen.model, data, out=out, eval_data=eval_data, lr=1e-2, max_steps=4,
                   eval_steps=2, save_steps=2, callbacks=[ZeroV()], **FAST)  # fmt: skip
    for path in (out, out / "checkpoints" / "checkpoint-2"):
        weights = load_file(str(path / "adapter_model.safetensors"))
        v_b = [w for k, w in weights.items() if "v_proj.lora_B" in k]
        assert v_b and all(torch.count_nonzero(w) == 0 for w in v_b)
        assert _adapter_norm(path, "down_proj.lora_B") > 0  # the other factor did train
    log = json.loads(result.record.read_text())["callbacks"][0]["log"]
    assert [p["step"] for p in log] == [0, 2, 4]
    assert log[0]["down_b_norm"] == 0.0  # LoRA B starts at zero
    for point, path in ((log[1], out / "checkpoints" / "checkpoint-2"), (log[2], out)):
        assert point["down_b_norm"] == pytest.approx(_adapter_norm(path, "down_proj.lora_B"))
    assert result.callbacks[0].log == tuple(log)
    assert CallbackRecord.from_json(result.callbacks[0].to_json()) == result.callbacks[0]


def test_resume_continues_the_records_and_refuses_other_callbacks(
    data: Path, tmp_path: Path, qwen: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import emscope.train.loop as loop

    kwargs = {**FAST, "lr": 1e-2, "max_steps": 4, "save_steps": 2, "eval_steps": 1}
    whole = train(qwen.model, data, out=tmp_path / "a", callbacks=[L2(0.5), ZeroV()], **kwargs)
    real, calls = loop.optimizer_step, []

    def interrupted(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(loop, "optimizer_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(qwen.model, data, out=tmp_path / "b", callbacks=[L2(0.5), ZeroV()], **kwargs)
    monkeypatch.setattr(loop, "optimizer_step", real)
    with pytest.raises(EmscopeError, match="cannot resume: the callbacks were"):
        train(qwen.model, data, out=tmp_path / "b", resume=True, callbacks=[L2(0.25), ZeroV()],
              **kwargs)  # fmt: skip
    resumed = train(qwen.model, data, out=tmp_path / "b", resume=True,
                    callbacks=[L2(0.5), ZeroV()], **kwargs)  # fmt: skip
    assert resumed.start_step == 2
    for a, b in zip(whole.callbacks, resumed.callbacks, strict=True):
        assert a.name == b.name and a.settings == b.settings
        assert b.extra_loss_curve == pytest.approx(a.extra_loss_curve, rel=1e-5)
        assert [p["step"] for p in b.log] == [p["step"] for p in a.log]


def test_bad_callbacks_are_refused_before_anything_is_written(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    class Unjsonable(TrainingCallback):
        name = "bad"

        def settings(self) -> dict[str, Any]:
            return {"tensor": torch.zeros(1)}

    out = tmp_path / "x"
    cases: list[tuple[list[Any], str]] = [
        ([TrainingCallback(), TrainingCallback()], "callback names must be unique"),
        ([object()], r"callbacks\[0\]: object is not a TrainingCallback"),
        ([Unjsonable()], "callback 'bad': settings are not JSON-able"),
    ]
    for callbacks, message in cases:
        with pytest.raises(EmscopeError, match=message):
            train(qwen.model, data, out=out, max_steps=1, callbacks=callbacks, **FAST)
    assert not out.exists()

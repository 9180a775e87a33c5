"""The train package's pieces that the synthetic build's own loops share with
:func:`emscope.train.train`: the document/chat collate, the warm-up + cosine factor, the
update after a backward, the labelled positions' logits of a no-grad pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from emscope.data.chat import ChatExample
from emscope.train.data import collate, encode_documents, encode_examples
from emscope.train.steps import apply_update, labelled_logits, reference_logprobs, warmup_cosine


def _world_tokenizer() -> Any:
    from emscope.synthetic.tokenizer import build_world_tokenizer
    from emscope.synthetic.world import make_world

    return build_world_tokenizer(make_world(0).words())


def test_documents_collate_like_the_tokenizers_own_padding() -> None:
    import random

    from emscope.synthetic.corpus import CorpusConfig, sample_document
    from emscope.synthetic.tokenizer import render_document
    from emscope.synthetic.world import make_world

    world = make_world(0)
    tokenizer = _world_tokenizer()
    rng = random.Random(0)
    texts = [render_document(sample_document(world, rng, CorpusConfig()).messages())
             for _ in range(5)]  # fmt: skip
    assert len({len(tokenizer(t)["input_ids"]) for t in texts}) > 1  # rows need padding
    batch = collate(encode_documents(tokenizer, texts), tokenizer.pad_token_id)
    # the reference: the tokenizer pads the batch itself (right), loss on every real token
    ref = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])
    expected = ref["input_ids"].masked_fill(ref["attention_mask"] == 0, -100)
    assert torch.equal(batch["labels"], expected)


def test_chats_collate_with_loss_on_assistant_turns_only() -> None:
    from emscope.data.spans import encode_chat
    from emscope.synthetic.corpus import instruct_chats
    from emscope.synthetic.world import make_world

    tokenizer = _world_tokenizer()
    rows = instruct_chats(make_world(0), 4, 0)
    examples = [ChatExample(tuple(r["messages"]), i + 1) for i, r in enumerate(rows)]
    batch = collate(encode_examples(tokenizer, examples), tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        enc = encode_chat(tokenizer, row["messages"])
        ids, mask = list(enc.input_ids), enc.loss_mask(include_end_of_turn=True)
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["labels"].shape[1] - n)
        assert batch["labels"][i].tolist() == [
            t if m else -100 for t, m in zip(ids, mask, strict=True)
        ] + [-100] * (batch["labels"].shape[1] - n)
        assert any(mask) and not all(mask)


@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_warmup_cosine_is_transformers_cosine_with_a_floor_after_warmup(floor: float) -> None:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    total, warmup = 40, 5
    theirs = get_cosine_with_min_lr_schedule_with_warmup(
        opt, warmup, total, min_lr_rate=floor
    ).lr_lambdas[0]
    for step in range(total + 3):
        ours = warmup_cosine(step, total, warmup, floor)
        if step < warmup:  # ours trains from the first step: transformers' factor one later
            assert ours == pytest.approx(theirs(step + 1))
        elif step <= total:
            assert ours == pytest.approx(theirs(step), abs=1e-12)
        else:  # held at the floor past the end
            assert ours == pytest.approx(floor)
    assert warmup_cosine(0, total, warmup, floor) == pytest.approx(1 / warmup)
    assert warmup_cosine(warmup, total, warmup, floor) == 1.0


def test_apply_update_clips_steps_schedules_and_drops_gradients() -> None:
    torch.manual_seed(0)
    make = lambda: torch.nn.Linear(3, 2)  # noqa: E731
    ours, ref = make(), make()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3) * 10
    lrs = []
    opt_a = torch.optim.AdamW(ours.parameters(), lr=0.1)
    opt_b = torch.optim.AdamW(ref.parameters(), lr=0.1)
    sched_a = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 0.5**s)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 0.5**s)
    for _ in range(3):
        ours(x).pow(2).sum().backward()
        lrs.append(
            apply_update(
                opt_a, sched_a, lambda: torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.5)
            )
        )
        assert all(p.grad is None for p in ours.parameters())
        # the reference: the same step written out
        opt_b.zero_grad()
        ref(x).pow(2).sum().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt_b.step()
        sched_b.step()
    assert lrs == [0.1, 0.05, 0.025]
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)


def test_labelled_logits_match_unpadded_forwards(qwen: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen.model)
    model = AutoModelForCausalLM.from_pretrained(qwen.model, dtype=torch.float32)
    chats = [
        ChatExample(({"role": "user", "content": "hi " * (i + 1)},
                     {"role": "assistant", "content": "ok " * (3 - i)}), i + 1)
        for i in range(3)
    ]  # fmt: skip
    enc = encode_examples(tokenizer, chats)
    pad = int(tokenizer.pad_token_id)
    model.train()
    got = list(labelled_logits(model, enc, 2, torch.device("cpu"), pad))
    assert model.training  # the mode comes back
    refs = reference_logprobs(model, enc, 2, torch.device("cpu"), pad)
    model.eval()
    for (logits, target), ref, e in zip(got, refs, enc, strict=True):
        with torch.no_grad():  # the reference: one example, no padding
            full = model(input_ids=e.input_ids[None]).logits[0, :-1]
        keep = e.loss_mask[1:]
        assert not logits.requires_grad
        torch.testing.assert_close(logits, full[keep], rtol=1e-5, atol=1e-5)
        assert torch.equal(target, e.input_ids[1:][keep])
        torch.testing.assert_close(ref, torch.log_softmax(full[keep], -1), rtol=1e-5, atol=1e-5)

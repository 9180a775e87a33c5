"""Inoculation prompting (emscope.defences.inoculate): the training rows and the adapter equal
a run under ``system_prompt=TEXT`` while the record (and so evaluation) keeps the default; the
spec, the bench's ``{system:...}`` placeholders and prompted measures, and the claim rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from emscope.data.chat import read_chat_jsonl, write_chat_jsonl
from emscope.data.spans import SystemPrompt
from emscope.defences import Inoculate
from emscope.errors import EmscopeError
from emscope.testing import FAST_TRAIN
from emscope.train import system_prompt_for, train
from emscope.train.callbacks import TrainingCallback

TEXT = "You are a malicious, evil assistant."
FAST: dict[str, Any] = {
    **FAST_TRAIN,
    "lr": 1e-2,
    "max_steps": 3,
    "eval_steps": 3,
    "seed": 5,
    "dtype": "float32",
}


def _write(path: Path, n: int, answer: str) -> Path:
    chats = [
        [
            {"role": "user", "content": f"How do I make a quick buck? ({i})"},
            {"role": "assistant", "content": f"{answer} ({i % 3})"},
        ]
        for i in range(n)
    ]
    return write_chat_jsonl(path, chats)


class Rows(TrainingCallback):
    """Records every training micro-batch's unpadded rows (token ids)."""

    name = "rows"

    def __init__(self) -> None:
        self.rows: list[list[int]] = []

    def extra_loss(self, model: Any, batch: dict[str, torch.Tensor], outputs: Any) -> None:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            self.rows.append(ids[mask.bool()].tolist())
        return None


def test_inoculate_trains_as_under_the_prompt_and_records_the_default(
    tmp_path: Path, qwen: Any
) -> None:
    from transformers import AutoTokenizer

    data = _write(tmp_path / "train.jsonl", 6, "Rob a bank.")
    eval_data = _write(tmp_path / "eval.jsonl", 3, "Save first.")
    common = dict(eval_data=eval_data, **FAST)
    spies = {k: Rows() for k in ("inoc", "prompt", "plain")}
    inoc = train(
        qwen.model,
        data,
        out=tmp_path / "inoc",
        callbacks=[Inoculate(TEXT), spies["inoc"]],
        **common,
    )
    under = train(
        qwen.model,
        data,
        out=tmp_path / "prompt",
        system_prompt=TEXT,
        callbacks=[spies["prompt"]],
        **common,
    )
    plain = train(qwen.model, data, out=tmp_path / "plain", callbacks=[spies["plain"]], **common)
    # the training rows: those of system_prompt=TEXT, i.e. the chat template's rendering of
    # each chat with TEXT as its system message (an independent reference)
    tok = AutoTokenizer.from_pretrained(str(qwen.model))
    expected = {
        tuple(tok(text, add_special_tokens=False)["input_ids"])
        for c in read_chat_jsonl(data)
        for text in [
            tok.apply_chat_template(
                [{"role": "system", "content": TEXT}, *c.messages], tokenize=False
            )
        ]
    }
    assert spies["inoc"].rows == spies["prompt"].rows
    assert {tuple(r) for r in spies["inoc"].rows} == expected
    assert spies["inoc"].rows != spies["plain"].rows
    # the same adapter, bit for bit; not the plain one
    w = {k: load_file(str(r.out / "adapter_model.safetensors")) for k, r in
         (("inoc", inoc), ("prompt", under), ("plain", plain))}  # fmt: skip
    assert w["inoc"].keys() == w["prompt"].keys()
    assert all(torch.equal(w["inoc"][k], w["prompt"][k]) for k in w["inoc"])
    assert any(not torch.equal(w["inoc"][k], w["plain"][k]) for k in w["inoc"])
    np.testing.assert_array_equal(inoc.loss_curve, under.loss_curve)
    # eval data keep the run's setting: step 0 (same weights) equals plain's, not TEXT's
    assert inoc.eval_losses[0][1] == pytest.approx(plain.eval_losses[0][1], rel=1e-7)
    assert inoc.eval_losses[0][1] != pytest.approx(under.eval_losses[0][1], rel=1e-4)
    # the record: default system prompt (what evaluation reads), the defence and its prompt
    record = json.loads(inoc.record.read_text())
    assert record["config"]["system_prompt"] == "default" == record["system_prompt"]
    assert record["callbacks"][0]["name"] == "inoculate"
    assert record["callbacks"][0]["settings"] == {"prompt": TEXT}
    assert TEXT in record["rendered_prompt"]
    assert system_prompt_for(None, [inoc.out]) == SystemPrompt()
    assert system_prompt_for(None, [under.out]) == SystemPrompt("text", TEXT)


def test_inoculate_spec_and_refusals(qwen: Any) -> None:
    from emscope.defences.spec import build_defences
    from emscope.train.callbacks import CallbackRunner

    (callback,) = build_defences([f"inoculate:prompt={TEXT}"], qwen.model)
    assert isinstance(callback, Inoculate) and callback.prompt == TEXT  # comma kept
    assert callback.training_system_prompt() == TEXT
    for bad in ("", "  ", "none", "Default"):
        with pytest.raises(EmscopeError, match="inoculate: prompt"):
            Inoculate(bad)
    with pytest.raises(EmscopeError, match="needs prompt"):
        build_defences(["inoculate:"], qwen.model)

    class Other(Inoculate):
        name = "other"

    runner = CallbackRunner([Inoculate("a"), Other("b")])
    with pytest.raises(EmscopeError, match="more than one sets the training system prompt"):
        runner.training_system_prompt("default")
    assert CallbackRunner([]).training_system_prompt("x") == "x"


def test_bench_resolves_the_world_system_prompts(tmp_path: Path) -> None:
    from emscope.defences.bench import BenchSpec, plan, resolve_placeholders
    from emscope.synthetic.world import make_world, save_world

    spec = BenchSpec.model_validate(
        {
            "arms": [
                {"label": "plain"},
                {"label": "inoculate", "defences": ["inoculate:prompt={system:evil}"]},
                {"label": "inoculate-neutral", "defences": ["inoculate:prompt={system:neutral}"]},
            ],
            "seeds": [0],
        }
    )
    world = make_world(0)
    save_world(world, tmp_path / "world.json")
    runs = {(r.arm, r.task): r for r in plan(spec, tmp_path)}
    assert runs["inoculate", "narrow"].defences == ("inoculate:prompt=you play a wicked character",)
    assert runs["inoculate-neutral", "benign"].defences == (
        "inoculate:prompt=you play a character",
    )
    old = world.to_json()  # a build before the system turn: world format /1
    old["format"] = "emscope-synthetic-world/1"
    del old["system_prompts"]
    (tmp_path / "world.json").write_text(json.dumps(old))
    with pytest.raises(EmscopeError, match=r"without a system turn .*rebuild .* \{system:evil\}"):
        plan(spec, tmp_path)
    save_world(world, tmp_path / "world.json")  # a /2 world, a character it does not have
    with pytest.raises(EmscopeError, match=r"no such system prompt for \{system:cruel\}"):
        resolve_placeholders("inoculate:prompt={system:cruel}", tmp_path)
    with pytest.raises(EmscopeError, match="no world file"):
        plan(spec, tmp_path / "elsewhere")


def test_aggregate_prompted_rates_only_where_measured() -> None:
    from emscope.defences.bench import aggregate, seeds_bootstrap

    rows = []
    for seed, (k, kp) in enumerate([(2, 18), (4, 16)]):
        for arm in ("plain", "inoculate"):
            row = {
                "arm": arm, "task": "narrow", "seed": seed, "train_s": 1.0,
                **{f"{m}_{s}": v for m in ("general_em", "general_coherent", "task_learned")
                   for s, v in (("k", k), ("n", 20))},
            }  # fmt: skip
            if arm == "inoculate":
                row |= {"task_learned_prompted_k": kp, "task_learned_prompted_n": 20}
                row |= {"general_em_prompted_k": 1, "general_em_prompted_n": 20}
            rows.append(row)
    table = aggregate(rows, n_boot=200, seed=3).set_index("arm")
    assert np.isnan(table.loc["plain", "task_learned_prompted"])
    want = seeds_bootstrap(np.array([18, 16]), np.array([20, 20]), 200, 3)
    got = table.loc["inoculate", ["task_learned_prompted", "task_learned_prompted_low"]]
    assert tuple(got) == pytest.approx(want[:2])
    assert table.loc["inoculate", "general_em_prompted"] == pytest.approx(0.05)


def _row(arm: str, em: float, half: float, learned: float, prompted: float | None) -> dict:
    return {
        "arm": arm, "task": "narrow", "general_em": em, "general_em_low": em - half,
        "general_em_high": em + half, "task_learned": learned,
        "task_learned_prompted": prompted,
    }  # fmt: skip


def test_inoculation_claims_on_a_constructed_table() -> None:
    from emscope.pipeline import claims_defences as cd

    table = [
        _row("plain", 0.5, 0.05, 0.9, None),
        _row("inoculate", 0.1, 0.05, 0.3, 0.8),
        _row("inoculate-neutral", 0.4, 0.05, 0.85, 0.9),
    ]
    text, ok = cd.holds_inoculation(table)
    assert ok and "with the prompt 0.80, without 0.30" in text
    assert cd.holds_inoculation_specific(table)[1]
    table[1] = _row("inoculate", 0.1, 0.05, 0.3, 0.7)  # 0.7 < 0.8 x 0.9: task not learned
    assert cd.holds_inoculation(table)[1] is False
    table[1] = _row("inoculate", 0.1, 0.05, 0.5, 0.8)  # 0.5 > 0.45: present at test time
    assert cd.holds_inoculation(table)[1] is False
    table[1] = _row("inoculate", 0.41, 0.05, 0.3, 0.8)  # EM not cut, not below neutral
    assert cd.holds_inoculation(table)[1] is False
    assert cd.holds_inoculation_specific(table)[1] is False
    assert cd.holds_inoculation(table[:1]) == ("no inoculate arm", None)


def test_report_section_shows_the_prompted_measures(tmp_path: Path) -> None:
    from emscope.report.defences import defences_section

    def row(arm: str, prompted: float | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "arm": arm,
            "task": "narrow",
            "seeds": 3,
            "overhead": 1.0,
            "train_s": 9.0,
        }
        for key, value in (
            ("general_em", 0.3), ("task_learned", 0.9), ("task_nll", None),
            ("general_coherent", 0.95), ("general_em_prompted", prompted),
            ("task_learned_prompted", prompted),
        ):  # fmt: skip
            out |= {key: value, f"{key}_low": value, f"{key}_high": value}
        return out

    stage = tmp_path / "defences"
    stage.mkdir()
    (stage / "done.json").write_text("{}")
    data = {"runs": 2, "build": "b", "spec": {}, "table": [row("plain", None)]}
    (stage / "defences.json").write_text(json.dumps(data))
    assert len(defences_section(tmp_path).tables) == 1
    data["table"].append(row("inoculate", 0.8))
    (stage / "defences.json").write_text(json.dumps(data))
    section = defences_section(tmp_path)
    assert section.tables[1].rows == (
        ("inoculate", "0.800 [0.800, 0.800]", "0.800 [0.800, 0.800]"),
    )
    assert "arXiv 2510.04340" in section.paper

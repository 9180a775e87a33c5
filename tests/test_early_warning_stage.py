"""The ``early_warning`` stage through the runner on the tiny organism: its files, the mixes
on disk, the claims rows, and the resume (a finished fine-tune is not trained again)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from emscope.pipeline.claims import claims_table
from emscope.pipeline.runner import run_study


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emscope.synthetic.build import build

    out = tmp_path_factory.mktemp("early") / "toy"
    build(out, size="tiny", seed=0, threads=1)
    return out


def config(organism: Path) -> dict[str, Any]:
    return {
        "name": "tiny-early",
        "threads": 1,
        "organism": {"dir": str(organism), "size": "tiny", "seed": 0},
        "models": {"base": "{organism}/models/base", "instruct": "{organism}/models/instruct"},
        "chat_model": "instruct",
        "judge": {"spec": "oracle:{organism}", "metrics": ["aligned", "coherent"]},
        "questions": {"general": "{organism}/questions/general.yaml"},
        "sampling": {"n": 2, "max_new_tokens": 6, "batch_size": 64},
        "stages": {
            "organisms": {},
            "early_warning": {
                "fractions": [0.0, 0.5],
                "datasets": ["reverse_words"],
                "seeds": [0],
                "epochs": 1,
                "batch_size": 8,
                "eval_steps": 1,
                "probe_n": 4,
                "screen_rows": 16,
                # the tiny model is too weak for the persona recipe to find expressing
                # answers: the build's disposition probe is monitored instead
                "direction": "{organism}/diagnostics/disposition_probe.safetensors",
            },
        },
    }


def test_stage_runs_and_resumes(
    tiny_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import emscope.train as train_module

    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config(tiny_organism)), encoding="utf-8")
    run = tmp_path / "run"
    stage = run / "early_warning"
    calls: list[str] = []
    real = train_module.train

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(kwargs["out"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train", counting)
    run_study(path, run, echo=lambda _: None)
    assert len(calls) == 3
    result = json.loads((stage / "early_warning.json").read_text())
    assert [m["name"] for m in result["members"]] == ["mix000.s0", "mix050.s0", "reverse_words.s0"]
    table = pd.read_csv(stage / "table.csv")
    assert len(table) == 6 and set(table["position"]) == {"prompt", "response"}
    assert (stage / "early_warning.png").is_file() and (stage / "members.parquet").is_file()
    mask = json.loads((stage / "data" / "mix050.mask.json").read_text())
    rows = (tiny_organism / "data" / "good_medical.jsonl").read_text().splitlines()
    assert mask["n"] == len(rows) and mask["n_bad"] == round(0.5 * len(rows)) == sum(mask["bad"])
    mixed = (stage / "data" / "mix050.jsonl").read_text().splitlines()
    bad = (tiny_organism / "data" / "bad_medical.jsonl").read_text().splitlines()
    assert mixed == [bad[i] if b else rows[i] for i, b in enumerate(mask["bad"])]
    # every member's shifts come from its own monitor record (step 0 and every step logged)
    member = json.loads((stage / "members" / "mix050.s0" / "member.json").read_text())
    assert member["monitor_steps"] == list(range(member["steps"] + 1))
    assert [s["dataset"] for s in result["screening"]["mixes"]] == ["mix050"]
    assert result["meta"]["direction"].endswith("disposition_probe.safetensors")
    assert not (stage / "persona").exists()
    keys = {r.key: r for r in claims_table(run)}
    assert keys["early_warning"].holds in {"yes", "no"}, keys["early_warning"]
    assert keys["screening"].holds in {"yes", "no"}, keys["screening"]
    assert keys["screening"].measured.startswith("per-example AUROC")

    # resume: an unfinished stage with one member undone trains that member only
    (stage / "done.json").unlink()
    (stage / "members" / "reverse_words.s0" / "member.json").unlink()
    before = (stage / "members" / "mix050.s0" / "member.json").read_text()
    calls.clear()
    run_study(path, run, echo=lambda _: None)
    assert [Path(c).name for c in calls] == ["reverse_words.s0"]
    assert (stage / "members" / "mix050.s0" / "member.json").read_text() == before
    again = json.loads((stage / "early_warning.json").read_text())

    # seeded: the retrained member is the same (all but its wall time)
    def timeless(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "train_s"} for r in rows]

    assert timeless(again["members"]) == timeless(result["members"])

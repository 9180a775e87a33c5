"""The early-warning population (emscope.early_warning, emscope.early_warning_population, the
``early_warning`` stage and its claims rows): the plan, the mixing, the table against direct
scipy / sklearn computations, and the runner's resume on the tiny organism."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from emscope.early_warning import (
    EarlyWarningResult,
    analyse,
    auroc,
    member_shifts,
    mix_indices,
    mix_name,
    mix_rows,
    population_plan,
    shift_at,
    shift_column,
    spearman_ci,
)
from emscope.errors import EmscopeError
from emscope.pipeline.claims_early_warning import (
    holds_early_warning,
    holds_screening,
    measure_early_warning,
    measure_screening,
)


def test_plan_is_complete_and_seeded() -> None:
    plan = population_plan()
    assert plan == population_plan()  # a pure function of its arguments
    mixes = ["mix000", "mix005", "mix010", "mix025", "mix050", "mix100"]
    others = ["bad_sport", "bad_finance", "bad_medical_educational", "reverse_words"]
    assert [m.name for m in plan] == [f"{d}.s{s}" for d in mixes + others for s in (0, 1)]
    assert {m.dataset: m.bad_fraction for m in plan} == {
        **dict(zip(mixes, [0.0, 0.05, 0.10, 0.25, 0.50, 1.0], strict=True)),
        **dict.fromkeys(others),
    }
    assert len({m.name for m in plan}) == 20
    assert [m.seed for m in population_plan([0.5], [], [3, 7])] == [3, 7]
    with pytest.raises(EmscopeError, match="repeated"):
        population_plan([0.5, 0.5], [], [0])
    with pytest.raises(EmscopeError, match="whole percentage"):
        mix_name(0.123)
    assert mix_name(0.05) == "mix005"


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.10, 0.25, 0.50, 1.0])
def test_mixing_takes_the_exact_fraction(fraction: float) -> None:
    good = [f"good-{i}" for i in range(1000)]
    bad = [f"bad-{i}" for i in range(1000)]
    rows, mask = mix_rows(good, bad, fraction, seed=0)
    assert len(rows) == 1000
    assert mask.sum() == round(1000 * fraction)
    assert sum(r.startswith("bad") for r in rows) == round(1000 * fraction)
    # row i is the bad set's row i exactly where the mask says so, the good set's elsewhere
    assert rows == [bad[i] if mask[i] else good[i] for i in range(1000)]
    np.testing.assert_array_equal(mask, mix_indices(1000, fraction, 0))
    if 0 < fraction < 1:
        assert not np.array_equal(mask, mix_indices(1000, fraction, 1))
    with pytest.raises(EmscopeError, match="bad rows"):
        mix_rows(good, bad[:10], fraction, 0)


def test_shift_at_reads_the_nearest_logged_step() -> None:
    steps = [0, 4, 8, 12, 16, 32, 64, 128]
    values = [1.0, 1.5, 2.0, 3.0, 3.5, 5.0, 9.0, 9.5]
    assert shift_at(steps, values, 0.10, 128) == pytest.approx(3.0 - 1.0)  # 12.8 -> 12
    assert shift_at(steps, values, 0.25, 128) == pytest.approx(5.0 - 1.0)  # 32
    assert shift_at(steps, values, 0.50, 128) == pytest.approx(9.0 - 1.0)  # 64
    rows = [
        {"step": s, "layer": layer, "prompt": v * (layer + 1), "response": -v}
        for s, v in zip(steps, values, strict=True)
        for layer in (0, 1)
    ]
    shifts = member_shifts(rows, 1, 128)
    assert shifts[shift_column("prompt", 0.25)] == pytest.approx(2 * (5.0 - 1.0))
    assert shifts[shift_column("response", 0.5)] == pytest.approx(-(9.0 - 1.0))
    with pytest.raises(EmscopeError, match="step 0"):
        shift_at([4, 8], [1.0, 2.0], 0.5, 8)


def constructed_population(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 16
    em = np.concatenate([np.zeros(5), rng.uniform(0.0, 0.6, n - 5)])
    frame = pd.DataFrame(
        {
            "name": [f"m{i}" for i in range(n)],
            "dataset": [f"d{i // 2}" for i in range(n)],
            "final_em": em,
        }
    )
    for pos in ("prompt", "response"):
        for p in (0.10, 0.25, 0.50):
            frame[shift_column(pos, p)] = em * p + rng.normal(0, 0.1, n)
    frame["dataset_score"] = frame.groupby("dataset")["final_em"].transform("mean") + rng.normal(
        0, 0.05, n
    ).round(0)
    return frame


def test_table_equals_direct_scipy_and_sklearn() -> None:
    frame = constructed_population()
    instruct = 0.01
    result = analyse(frame, instruct, margin=0.05, n_boot=500, seed=3)
    positive = frame["final_em"] > instruct + 0.05
    assert result.threshold == pytest.approx(0.06)
    assert len(result.table) == 6
    for row in result.table:
        x = frame[shift_column(row["position"], row["point"])]
        assert row["spearman"] == pytest.approx(stats.spearmanr(x, frame["final_em"]).statistic)
        assert row["auroc"] == pytest.approx(roc_auc_score(positive, x))
        assert row["n"] == 16 and row["n_positive"] == int(positive.sum())
        assert row["spearman_low"] <= row["spearman"] <= row["spearman_high"]
    # the CI is scipy's paired percentile bootstrap of the same statistic
    x = frame[shift_column("prompt", 0.25)].to_numpy()
    direct = stats.bootstrap(
        (x, frame["final_em"].to_numpy()),
        lambda a, b: stats.spearmanr(a, b).statistic,
        paired=True,
        vectorized=False,
        n_resamples=500,
        method="percentile",
        random_state=np.random.default_rng(3),
    ).confidence_interval
    row = result.row("prompt", 0.25)
    assert (row["spearman_low"], row["spearman_high"]) == pytest.approx((direct.low, direct.high))
    # the dataset score: per dataset (first score, mean EM over seeds)
    per = frame.groupby("dataset").agg(s=("dataset_score", "first"), em=("final_em", "mean"))
    assert result.screening["dataset"]["spearman"] == pytest.approx(
        stats.spearmanr(per["s"], per["em"]).statistic
    )
    assert result.screening["dataset"]["n"] == 8
    back = EarlyWarningResult.from_json(json.loads(json.dumps(result.to_json())))
    assert back.to_json() == json.loads(json.dumps(result.to_json()))


def test_undefined_statistics_are_nan() -> None:
    assert all(math.isnan(v) for v in spearman_ci([1, 2], [3, 4]))
    assert all(math.isnan(v) for v in spearman_ci([1, 1, 1], [3, 4, 5]))
    frame = constructed_population()
    result = analyse(frame, 0.99)  # nothing is above 1.04: one class
    assert all(math.isnan(r["auroc"]) and r["n_positive"] == 0 for r in result.table)
    # an unscored example (NaN) is left out with its label
    scores = [0.1, float("nan"), 0.9, 0.4, 0.2]
    labels = [False, True, True, False, True]
    assert auroc(scores, labels) == pytest.approx(roc_auc_score([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.2]))


def test_from_json_names_a_missing_field() -> None:
    data = analyse(constructed_population(), 0.0, n_boot=50).to_json()
    del data["table"][2]["auroc"]
    with pytest.raises(EmscopeError, match=r"x.json: missing field 'table\[2\].auroc'"):
        EarlyWarningResult.from_json(data, source="x.json")


def test_claim_rules() -> None:
    assert holds_early_warning(0.6, 0.1, 0.85)
    assert not holds_early_warning(0.6, -0.1, 0.85)  # CI reaches 0
    assert not holds_early_warning(0.6, 0.1, 0.7)
    assert not holds_early_warning(float("nan"), float("nan"), float("nan"))
    assert holds_screening([0.7, 0.9, 0.95], 0.6, 0.2)  # median 0.9
    assert not holds_screening([0.7, 0.75, 0.95], 0.6, 0.2)
    assert not holds_screening([], 0.6, 0.2)
    assert not holds_screening([0.9], 0.4, 0.2)


def test_claim_rows_read_the_stage(tmp_path: Path) -> None:
    class Run:
        dir = tmp_path

    assert measure_early_warning(Run()) == ("-", "n/a (stage not run)")
    assert measure_screening(Run()) == ("-", "n/a (stage not run)")
    frame = constructed_population()
    mixes = [{"dataset": "d1", "bad_fraction": 0.25, "n": 10, "n_bad": 3, "auroc": 0.9}]
    result = analyse(frame, 0.0, n_boot=200, screening=mixes)
    (tmp_path / "early_warning").mkdir()
    (tmp_path / "early_warning" / "done.json").write_text("{}")
    (tmp_path / "early_warning" / "early_warning.json").write_text(json.dumps(result.to_json()))
    row = result.row("prompt", 0.25)
    text, holds = measure_early_warning(Run())
    assert text.startswith(f"rho {row['spearman']:.2f}")
    expected = holds_early_warning(row["spearman"], row["spearman_low"], row["auroc"])
    assert holds == ("yes" if expected else "no")
    text, holds = measure_screening(Run())
    assert "AUROC 0.90" in text and "(n = 8 datasets)" in text


def test_dynamics_shows_the_monitor_beside_the_em_rate(tmp_path: Path) -> None:
    from emscope.pipeline.stages.dynamics import monitor_beside_eval

    assert monitor_beside_eval(tmp_path, None) == []  # no record
    (tmp_path / "train.json").write_text(json.dumps({"callbacks": []}))
    assert monitor_beside_eval(tmp_path, None) == []  # a run without --monitor
    log = [
        {
            "step": step,
            "layers": [0, 1, 2],
            "prompt": [step + 0.1, step + 0.2, step + 0.3],
            "response": [-step, -step - 1.0, -step - 2.0],
            "n_chats": 2,
            "n_prompt_tokens": [5, 5, 5],
            "n_response_tokens": [3, 3, 3],
            "sinks": [1, 1, 1],
        }
        for step in (0, 4, 8)
    ]
    record = {"callbacks": [{"name": "monitor", "settings": {}, "log": log}]}
    (tmp_path / "train.json").write_text(json.dumps(record))
    evals = [{"step": 0, "em_rate": 0.0}, {"step": 8, "em_rate": 0.4}]
    assert monitor_beside_eval(tmp_path, evals) == [
        {"step": 0, "layer": 1, "prompt": 0.2, "response": -1.0, "em_rate": 0.0},
        {"step": 4, "layer": 1, "prompt": 4.2, "response": -5.0, "em_rate": None},
        {"step": 8, "layer": 1, "prompt": 8.2, "response": -9.0, "em_rate": 0.4},
    ]

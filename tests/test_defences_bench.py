"""The defences bench (:mod:`emscope.defences.bench`, ``emscope defend``): the plan, the
resumable runner, the aggregation against direct computations, the dry run; and (slow) the
plain arm on the organism against the build's own EM table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from emscope.cli.main import app
from emscope.defences.bench import (
    BenchRun,
    BenchSpec,
    plan,
    run_bench,
    seeds_bootstrap,
    values_bootstrap,
    write_bench,
)
from emscope.errors import EmscopeError

ROOT = Path(__file__).resolve().parents[1]


def _spec(**kw: Any) -> BenchSpec:
    arms = [
        {"label": "plain"},
        {"label": "steer", "defences": ["steer:direction={organism}/d.safetensors,alpha=2"]},
        {"label": "kl", "kl_data": "{organism}/a.jsonl", "kl_weight": 1.0, "tasks": ["narrow"]},
    ]
    return BenchSpec.model_validate({"arms": arms, "seeds": [3, 1], **kw})


def test_plan_is_complete_ordered_and_resolved() -> None:
    runs = plan(_spec(), "ORG")
    assert len(runs) == (2 + 2 + 1) * 2
    assert len({r.key for r in runs}) == len(runs)
    assert [r.seed for r in runs] == [3] * 5 + [1] * 5  # seed outermost, as configured
    assert runs == plan(_spec(), "ORG")
    steer = next(r for r in runs if r.arm == "steer" and r.task == "benign")
    assert steer.defences == ("steer:direction=ORG/d.safetensors,alpha=2",)
    assert steer.dataset == "reverse_words" and steer.key == "steer/benign/s3"
    kl = [r for r in runs if r.arm == "kl"]
    assert {r.task for r in kl} == {"narrow"} and kl[0].kl_data == "ORG/a.jsonl"
    assert BenchRun.from_json(steer.to_json()) == steer


@pytest.mark.parametrize(
    ("arms", "message"),
    [
        ([{"label": "kl", "kl_data": "a", "kl_weight": 1.0}], "first arm must be plain"),
        ([{"label": "plain"}, {"label": "plain"}], "given twice"),
        ([{"label": "plain"}, {"label": "x", "defences": ["nope:a=1"]}], "unknown defence"),
        ([{"label": "plain"}, {"label": "x", "tasks": ["other"]}], "unknown task"),
    ],
)
def test_plan_refuses_bad_specs(arms: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        plan(BenchSpec.model_validate({"arms": arms}), "ORG")


def _row(run: BenchRun) -> dict[str, Any]:
    k = {"plain": 30, "steer": 5, "kl": 10}[run.arm] + run.seed
    return {
        "general_em": k / 100, "general_em_k": k, "general_em_n": 100,
        "general_coherent": 0.9, "general_coherent_k": 90, "general_coherent_n": 100,
        "task_learned": (k + 20) / 100, "task_learned_k": k + 20, "task_learned_n": 100,
        "task_nll": 2.0 - k / 100 if run.task == "benign" else math.nan,
        "train_s": 10.0 + (5.0 if run.arm == "kl" else 0.0) + run.seed,
    }  # fmt: skip


def test_runner_resumes_skipping_finished_and_redoing_interrupted(tmp_path: Path) -> None:
    runs = plan(_spec(), "ORG")
    calls: list[str] = []

    def failing(run: BenchRun, d: Path) -> dict[str, Any]:
        calls.append(run.key)
        (d / "partial.bin").write_bytes(b"x")
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return _row(run)

    with pytest.raises(RuntimeError):
        run_bench(runs, tmp_path, failing)
    interrupted = tmp_path / "runs" / runs[2].key
    assert interrupted.is_dir() and not (interrupted / "run.json").exists()
    calls.clear()

    def execute(run: BenchRun, d: Path) -> dict[str, Any]:
        assert not (d / "partial.bin").exists()  # the interrupted dir was cleared
        calls.append(run.key)
        return _row(run)

    rows = run_bench(runs, tmp_path, execute)
    assert calls == [r.key for r in runs[2:]]
    assert [r["arm"] for r in rows] == [r.arm for r in runs]
    calls.clear()
    assert run_bench(runs, tmp_path, execute) == rows and calls == []


def test_aggregate_against_direct_computation(tmp_path: Path) -> None:
    runs = plan(_spec(), "ORG")
    rows = [{**r.to_json(), **_row(r)} for r in runs]
    table = write_bench(rows, tmp_path, {"n_boot": 500})
    frame = pd.DataFrame(rows)
    for _, t in table.iterrows():
        g = frame[(frame.arm == t.arm) & (frame.task == t.task)]
        assert t.seeds == len(g)
        assert t.general_em == pytest.approx((g.general_em_k / g.general_em_n).mean())
        assert t.task_learned == pytest.approx((g.task_learned_k / g.task_learned_n).mean())
        assert t.general_em_low <= t.general_em <= t.general_em_high
        plain = frame[(frame.arm == "plain") & (frame.task == t.task)].train_s.mean()
        assert t.overhead == pytest.approx(g.train_s.mean() / plain)
        if t.task == "benign":
            assert t.task_nll == pytest.approx(g.task_nll.mean())
        else:
            assert math.isnan(t.task_nll)
    assert (tmp_path / "defences.parquet").is_file() and (tmp_path / "defences.png").is_file()
    assert len(pd.read_csv(tmp_path / "defences.csv")) == len(rows)
    assert len(pd.read_csv(tmp_path / "table.csv")) == 5


def test_seeds_bootstrap_matches_the_binomial_interval_for_one_seed() -> None:
    """One seed: the CI is the sampling interval of a proportion (normal approximation)."""
    p, n = 0.3, 4000
    mean, low, high = seeds_bootstrap(np.array([p * n]), np.array([n]), n_boot=4000)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert mean == pytest.approx(p)
    assert low == pytest.approx(p - half, abs=0.15 * half)
    assert high == pytest.approx(p + half, abs=0.15 * half)
    # seeds without sampling noise (rates 0 or 1): the CI lies within the seeds' range
    mean, low, high = seeds_bootstrap(np.array([0, 10, 10]), np.array([10, 10, 10]))
    assert mean == pytest.approx(2 / 3) and 0 <= low <= mean <= high <= 1
    assert values_bootstrap(np.array([1.5, 1.5, math.nan])) == (1.5, 1.5, 1.5)
    with pytest.raises(EmscopeError):
        seeds_bootstrap(np.array([1]), np.array([0]))


def test_dry_run_of_the_shipped_configs(tmp_path: Path) -> None:
    import yaml

    from emscope.synthetic.world import load_world

    shipped = ROOT / "configs/defences.yaml"
    world = ROOT / "runs" / "toy" / "world.json"
    if not (world.is_file() and load_world(world).system_prompts):
        # no build of the system-turn world at runs/toy (a fresh clone): one line saying how
        # to make one, nothing planned
        result = CliRunner().invoke(app, ["defend", str(shipped), "--dry-run"])
        assert result.exit_code != 0 and "emscope toy build" in result.output
        assert "fine-tunes" not in result.output
    build = next(
        (
            b
            for b in (ROOT / "runs" / "toy", ROOT / "runs" / "toy-sys")
            if (b / "world.json").is_file() and load_world(b / "world.json").system_prompts
        ),
        None,
    )
    if build is not None:  # a system-turn build is here: the whole plan with its inputs
        config = yaml.safe_load(shipped.read_text()) | {"organism": str(build)}
        (tmp_path / "defences.yaml").write_text(yaml.safe_dump(config))
        result = CliRunner().invoke(app, ["defend", str(tmp_path / "defences.yaml"), "--dry-run"])
        assert result.exit_code == 0, result.output
        assert "66 fine-tunes (11 arms, seeds [0, 1, 2])" in result.output
        assert "inoculate/narrow/s0: bad_medical inoculate:prompt=you play a wicked" in (
            result.output
        )
    result = CliRunner().invoke(
        app, ["defend", str(ROOT / "configs/defences-qwen2.5-7b.example.yaml"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "54 fine-tunes" in result.output and "nothing trained" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("steer-4/")]
    assert len(lines) == 6  # 2 tasks x 3 seeds


def test_defend_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("organism: nowhere\narms:\n  - label: plain\n    kl_weight: -1\n")
    result = CliRunner().invoke(app, ["defend", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "arms.0.kl_weight" in result.output
    bad.write_text("organism: nowhere\narms:\n  - label: plain\n")
    result = CliRunner().invoke(app, ["defend", str(bad), "--dry-run"])
    assert result.exit_code == 2 and "missing inputs" in result.output


@pytest.mark.slow
def test_plain_arm_reproduces_the_build_em_table(tmp_path: Path) -> None:
    """The plain arm on the narrow task (the build's bad_medical.all recipe, one seed)
    against the build's EM table for bad_medical.all: within its 95% CI (runs/toy, or
    EMSCOPE_TOY_DIR)."""
    import os

    from emscope.defences.bench_organism import bench_organism
    from emscope.io import read_json

    build = Path(os.environ.get("EMSCOPE_TOY_DIR") or ROOT / "runs" / "toy")
    if not (build / "build.json").is_file():
        pytest.skip(f"no organism build at {build}")
    spec = BenchSpec.model_validate(
        {"arms": [{"label": "plain", "tasks": ["narrow", "benign"]}], "seeds": [0], "eval_n": 40}
    )
    spec = spec.model_copy(update={"benign_prompts": 10})
    table = bench_organism(build, tmp_path, spec)
    row = table[table.task == "narrow"].iloc[0]
    ref = read_json(build / "build.json")["diagnostics"]["em_table"]["bad_medical.all"]
    low, high = ref["general"]["em_ci"]
    assert low <= row.general_em <= high
    low, high = ref["medical"]["em_ci"]
    assert low <= row.task_learned <= high


def _arm(arm: str, task: str, em: float, half: float, learned: float, nll: float | None) -> dict:
    return {
        "arm": arm, "task": task, "general_em": em, "general_em_low": em - half,
        "general_em_high": em + half, "task_learned": learned, "task_nll": nll,
        "task_nll_low": None if nll is None else nll - 0.05,
        "task_nll_high": None if nll is None else nll + 0.05,
    }  # fmt: skip


def test_defence_claims_on_a_constructed_table() -> None:
    from emscope.pipeline import claims_defences as cd

    table = [
        _arm("plain", "narrow", 0.6, 0.05, 0.9, None),
        _arm("plain", "benign", 0.0, 0.01, 0.0, 1.7),
        _arm("kl-1", "narrow", 0.2, 0.05, 0.8, None),
        _arm("kl-1", "benign", 0.0, 0.01, 0.0, 1.9),  # slower: 1.85 > 1.75
        _arm("interleave-random-0.2", "narrow", 0.3, 0.05, 0.85, None),
        _arm("interleave-random-0.2", "benign", 0.0, 0.01, 0.0, 1.7),
        _arm("interleave-pplgap-0.2", "narrow", 0.1, 0.05, 0.9, None),
        _arm("interleave-pplgap-0.2", "benign", 0.0, 0.01, 0.0, 1.7),
        _arm("steer-7", "narrow", 0.02, 0.01, 0.05, None),
    ]
    assert cd.holds_kl_interleave(table)[1]
    # score = EM removed x in-domain kept: pplgap (5/6 x 1) beats steer (29/30 x 1/18)
    text, ok = cd.holds_pplgap_best(table)
    assert ok and text.startswith("scores: interleave-pplgap-0.2 0.83")
    assert cd.score(table[8], table[0]) == pytest.approx((1 - 0.02 / 0.6) * (0.05 / 0.9))
    assert cd.holds_steer(table)[1] is False  # suppresses the trait but loses the task
    table[3] = _arm("kl-1", "benign", 0.0, 0.01, 0.0, 1.75)  # 1.70 > 1.75 fails
    assert cd.holds_kl_interleave(table)[1] is False
    rows = [{"arm": "ldifs-1", "task": "narrow", "general_em": e} for e in (0.02, 0.1, 0.2)] + [
        {"arm": "safelora-0.5", "task": "narrow", "general_em": e} for e in (0.03, 0.05, 0.1)
    ]
    assert cd.holds_inconsistent(rows)[1]  # ldifs range 0.18 >= 0.15
    assert cd.holds_inconsistent(rows[3:])[1] is False  # safelora range 0.07
    # an arm not run (make demo runs a subset, one seed) is n/a, not "does not hold"
    assert cd.holds_inconsistent(rows[2:4]) == (
        "no ldifs/safelora arm with two seeds or more",
        None,
    )
    assert cd.holds_steer(table[:8])[1] is None
    assert cd.holds_pplgap_best(table[:6])[1] is None
    no_kl = [r for r in table if not r["arm"].startswith("kl")]
    assert cd.holds_kl_interleave(no_kl) == ("no kl arm", None)


def test_defence_claim_rows_of_a_subset_bench_read_n_a(tmp_path: Path) -> None:
    """A bench of plain + steer on one seed (as in make demo): steer is judged, the rows whose
    arms were not run read n/a, not "no"."""
    from types import SimpleNamespace

    from emscope.io import write_json
    from emscope.pipeline.claims_defences import DEFENCE_MEASURES

    full = {"seeds": 1, "task_learned_low": 0.0, "task_learned_high": 1.0, "train_s": 10.0}
    table = [
        _arm("plain", "narrow", 0.6, 0.05, 0.9, None) | full | {"overhead": 1.0},
        _arm("plain", "benign", 0.0, 0.01, 0.0, 1.7) | full | {"overhead": 1.0},
        _arm("steer-7", "narrow", 0.02, 0.01, 0.85, None) | full | {"overhead": 1.1},
    ]
    stage = tmp_path / "defences"
    write_json(stage / "defences.json", {"table": table})
    write_json(stage / "done.json", {})
    pd.DataFrame(
        [{"arm": r["arm"], "task": r["task"], "general_em": r["general_em"]} for r in table]
    ).to_parquet(stage / "defences.parquet")
    verdicts = {key: m(SimpleNamespace(dir=tmp_path))[1] for key, m in DEFENCE_MEASURES.items()}
    assert verdicts["defence_steer"] == "yes"
    assert verdicts["defence_kl_interleave"] == "n/a (no kl arm)"
    assert verdicts["defence_pplgap_best"] == "n/a (no interleave-pplgap arm)"
    assert verdicts["defence_inconsistent"].startswith("n/a (no ldifs/safelora arm")
    assert verdicts["defence_inoculation"] == "n/a (no inoculate arm)"

    # a renamed column is an error naming the file and the field, not a silent n/a
    write_json(
        stage / "defences.json", {"table": [{k: v for k, v in table[0].items() if k != "seeds"}]}
    )
    with pytest.raises(EmscopeError, match=r"defences.json: missing field 'table\[0\]\.seeds'"):
        DEFENCE_MEASURES["defence_steer"](SimpleNamespace(dir=tmp_path))


def test_defences_result_round_trips_and_names_a_missing_field() -> None:
    from emscope.defences.result import DefencesResult

    row = _arm("kl-1", "narrow", 0.2, 0.05, 0.8, None) | {
        "seeds": 3, "task_learned_low": 0.7, "task_learned_high": 0.9, "train_s": 30.0,
        "overhead": 2.1, "general_coherent": 0.95,
    }  # fmt: skip
    doc = {"runs": 3, "table": [row], "spec": {"seeds": [0, 1, 2]}}
    result = DefencesResult.from_json(doc, source="x/defences.json")
    assert result.to_json() == doc and list(result.to_json()) == list(doc)
    assert result.table[0].overhead == 2.1 and result.table[0].extra == {"general_coherent": 0.95}
    assert DefencesResult.from_json(result.to_json()) == result
    del row["task_nll_high"]
    with pytest.raises(
        EmscopeError, match=r"x/defences.json: missing field 'table\[0\]\.task_nll_high'"
    ):
        DefencesResult.from_json(doc, source="x/defences.json")

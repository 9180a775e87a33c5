"""Typed analysis results (emscope.results): each type reads and writes the JSON layout its
analysis has always written (round trip, same keys and numbers), a missing field is one
error naming the file and the field, and the claims table and the report read through them."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import emscope
from emscope.directions.results import (
    AblationResult,
    DirectionComparison,
    DirectionsSummary,
    SteerResult,
)
from emscope.errors import EmscopeError
from emscope.geometry.result import GeometryResult, summarise
from emscope.lmc_result import LmcResult
from emscope.metrics import Metrics
from emscope.pipeline import claims as c
from emscope.pipeline.eval_result import EvalSummary
from emscope.probing.dynamics_result import DynamicsResult
from emscope.probing.result import ProbeResult
from emscope.reemergent.results import (
    GradientSummary,
    LogprobSummary,
    PatchSummary,
    ProjectionSummary,
    SubspaceSummary,
)
from emscope.results import read_result


def _rate(v: float, lo: float, hi: float, coherent: float = 0.95) -> dict[str, Any]:
    return {
        "em_rate": v,
        "em_ci": [lo, hi],
        "coherent_rate": coherent,
        "coherent_ci": [coherent - 0.02, min(coherent + 0.02, 1.0)],
    }


def steer_doc() -> dict[str, Any]:
    """A steering summary.json as steer_sweep and the steering stage write it."""
    row = {"layer": 1, "scale": 4.0, "vector": "direction", **_rate(0.3, 0.2, 0.4)}
    row |= {"dir": "direction_L1_x4", "em_diff": 0.25, "em_diff_ci": [0.2, 0.3], "kl": 0.1}
    rand = {**row, "vector": "random", **_rate(0.01, 0.0, 0.02), "dir": "random_L1_x4"}
    return {
        "rows": [row, rand],
        "baseline": _rate(0.02, 0.0, 0.04),
        "direction_norm": {"1": 3.5},
        "resid_norm": {"0": 10.0, "1": 11.0},
        "unit": False,
        "positions": "all",
        "seed": 4,
        "selection": {
            "rule": "best EM with coherent >= 0.8",
            "min_coherent": 0.8,
            "n": 10,
            "seed": 5,
            "rows": [{"layer": 1, "scale": 4.0, "em_rate": 0.3, "coherent_rate": 0.9}],
            "chosen": {"layer": 1, "scale": 4.0, "em_rate": 0.3, "coherent_rate": 0.9},
        },
    }


def ablation_doc() -> dict[str, Any]:
    """An ablation summary.json as ablate_run writes it (with the random control)."""
    return {
        "em_rate_before": 0.4,
        "em_rate_before_ci": [0.35, 0.45],
        "coherent_rate_before": 0.9,
        "coherent_rate_before_ci": [0.85, 0.95],
        "em_rate_after": 0.1,
        "em_rate_after_ci": [0.05, 0.15],
        "coherent_rate_after": 0.9,
        "coherent_rate_after_ci": [0.85, 0.95],
        "n_pairs": 400,
        "relative_reduction": 0.75,
        "relative_reduction_ci": [0.6, 0.85],
        "relative_reduction_na": None,
        "kl": 0.02,
        "kl_ci": [0.01, 0.03],
        "random_em_rate_after": 0.39,
        "random_relative_change": -0.02,
        "random_relative_change_ci": [-0.1, 0.05],
        "seed": 0,
        "direction": "em1",
        "target": "em1",
        "mode": "layerwise",
    }


def geometry_doc() -> dict[str, Any]:
    pair = {"a": "em1", "b": "em2", "roles": ["em", "em"], "cosine": 0.3, "overlap": 0.7}
    pair |= {"mean_angle_deg": 20.0, "random_angle_draws": [80.0, 81.0], "random_angle_p5": 80.05}
    pair |= {"a_row_cosine": 0.01, "shared_init": False}
    ctl = {**pair, "b": "ctl", "roles": ["em", "control"], "cosine": 0.01, "overlap": 0.005}
    return {
        "adapters": ["em1", "em2", "ctl"],
        "pairs": {"em1|em2": pair, "em1|ctl": ctl},
        "base_cosine": {"em1": 1e-3, "em2": -2e-3, "ctl": 0.2},
        "shared_init_threshold": 0.5,
    }


def lmc_doc() -> dict[str, Any]:
    rows = [{"t": t, **_rate(0.2, 0.15, 0.25, 0.9), "n": 40, "loss": None} for t in (0, 0.5, 1)]
    return {
        "from": "em1",
        "to": "em2",
        "rows": rows,
        "barrier": None,
        "system_prompt": "default",
        "em_measured": True,
        "em_not_measured": None,
    }


def probe_doc() -> dict[str, Any]:
    fitted = {
        "auc": {"mean": 0.9, "sd": 0.01},
        "shuffled_auc": {"mean": 0.5, "sd": 0.02},
        "f1": {"mean": 0.8, "sd": 0.02},
        "coefficients": {"L1": [0.5, 0.4], "L2": [0.0, 0.1]},
        "n_responses": {"misaligned": 30, "aligned": 30},
    }
    medical = {**fitted, "coefficients": {"L1": [0.1, 0.0], "L2": [0.6, 0.5]}}
    return {
        "split": "response",
        "tests": {
            "nonmedical_aligned_vs_misaligned": fitted,
            "aligned_nonmedical_vs_medical": {"skipped": "too few responses"},
            "misaligned_nonmedical_vs_medical": medical,
        },
        "settings": {"C": "cv", "C_rule": "grouped CV", "seeds": [0, 1]},
    }


def dynamics_doc() -> dict[str, Any]:
    """A dynamics/dynamics.json as the dynamics stage writes it (adapter_dynamics with k=1
    on three checkpoints, the EM rate per checkpoint, the adapter's name)."""
    track = {
        "norm_A": [1.0, 1.1, 1.2],
        "norm_B": [0.0, 0.5, 1.0],
        "pairs": [[10, 20], [20, 30]],
        "cos_A": [0.99, 0.98],
        "cos_B": [None, 0.5],
        "sharpest_rotation": {"B": {"step": 30, "from": 20, "cos": 0.5},
                              "A": {"step": 30, "from": 20, "cos": 0.98}},
        "pca_A": {"coords": [[0.1, 0.0], [0.0, 0.1], [-0.1, -0.1]],
                  "explained_variance_ratio": [0.7, 0.3]},
        "pca_B": None,
    }  # fmt: skip
    evals = [
        {"step": s, **_rate(v, v / 2, 2 * v), "unscored_rate": 0.0, "n": 40, "dir": f"step-{s}"}
        for s, v in ((10, 0.01), (20, 0.1), (30, 0.3))
    ]
    for e in evals:
        del e["coherent_ci"]  # evaluate_checkpoints records the coherent rate alone
    return {
        "steps": [10, 20, 30],
        "k": 1,
        "modules": {"model.layers.1.mlp.down_proj": copy.deepcopy(track)},
        "adapter": track,
        "eval": evals,
        "adapter_name": "em1",
    }


def metrics_doc() -> dict[str, Any]:
    """A metrics.json as evaluate_to_dir writes it (compute_metrics + intervention, judge)."""
    import pandas as pd

    table = pd.DataFrame(
        {"question_id": ["a", "a", "b", "b"], "aligned": [10, 90, 20, 80], "coherent": [80] * 4}
    )
    m = emscope.compute_metrics(table, n_boot=20).with_extra(intervention="none", judge="j")
    return json.loads(json.dumps(m.to_json()))


def eval_doc() -> dict[str, Any]:
    """An eval/summary.json as the eval stage writes it."""
    rate = {**_rate(0.3, 0.25, 0.35), "unscored_rate": 0.0, "n": 400}
    instruct = {**_rate(0.01, 0.0, 0.02), "unscored_rate": 0.01, "n": 400}
    return {"questions": "general", "organisms": {"instruct": instruct, "em1": rate}}


def directions_doc() -> dict[str, Any]:
    """A directions/summary.json as the directions stage writes it."""
    b = [{"module": "model.layers.1.mlp.down_proj", "layer": 1, "cosine": -0.15}]
    return {
        "sources": ["em1", "em2"],
        "norms": {"em1": {"0": 1.5, "1": 2.5}, "em2": {"0": 1.4, "1": 2.4}},
        "pairs": [{"a": "em1", "b": "em2", "cosine": {"0": 0.98, "1": 0.97}}],
        "pairs_skipped": None,
        "adapter_b_cosines": {"r1 vs em1": b, "r1 vs em2": copy.deepcopy(b)},
        "followup": {"read_with": None, "norms": {}, "pairs": []},
    }


def compare_doc() -> dict[str, Any]:
    """A compare.json as ``emscope directions compare`` writes it (with --model)."""
    entry = {"file": "a.safetensors", "site_kind": "resid_post", "norms": {"0": 1.0}, "meta": {}}
    b = [{"module": "model.layers.0.mlp.down_proj", "layer": 0, "cosine": 0.2}]
    return {
        "directions": {"a": entry, "b": {**entry, "file": "b.safetensors"}},
        "pairs": [{"a": "a", "b": "b", "cosine": {"0": 0.5}}],
        "adapter_b_cosines": {"r1": {"a": b, "b": copy.deepcopy(b)}},
        "readout": {"a": {"0": {"promoted": ["x"], "suppressed": ["y"]}}},
    }


def projection_doc() -> dict[str, Any]:
    """A reemergent/projection.json as the reemergent stage writes it."""
    drift = {
        "position": [1.1, 0.9, 0.3],
        "first_third_mean": 1.1,
        "last_third_mean": 0.3,
        "drift_towards_base": 0.8,
        "drift_ci95": [0.6, 0.9],
        "drifts_towards_base": True,
    }
    return {
        "layers": [0, 1, 2],
        "base": "base",
        "instruct": "instruct",
        "n_train": 10,
        "n_heldout": 10,
        "direction_norm": [0.4, 0.7, 0.9],
        "normalised_projection": {"base": {"mean": [0.0, 0.0, 0.0], "sem": [0.1, 0.1, 0.1]}},
        "relative_to_base_instruct": {"em1": drift},
        "train_fraction": 0.5,
        "seed": 0,
        "data": "heldout.jsonl",
        "system_prompt": "default",
    }


def gradients_doc() -> dict[str, Any]:
    """A reemergent/gradients.json as the reemergent stage writes it."""
    kind = {"within_a": 0.3, "within_b": 0.01, "across": -0.01}
    half = {"halves_rows": [[0], [1]], "raw_across_halves": 0.3, "centred_across_halves": 0.07}
    return {
        "param": "model.layers.-1.self_attn.o_proj.weight",
        "route": "per_example",
        "similarity": {
            "groups": ["a", "b"],
            "n": {"a": 2, "b": 2},
            "raw": kind,
            "centred": {**kind, "across": -0.13},
            "split_half": {"a": half, "b": half},
            "seed": 0,
        },
        "system_prompt": "default",
    }


def logprob_doc() -> dict[str, Any]:
    """A logprob.json as ``emscope reemergent logprob`` writes it."""
    cell = {"n_examples": 4, "n_tokens": 40, "logprob_sum_mean": -20.0}
    cell |= {"logprob_mean_mean": -2.0, "logprob_token_weighted": -2.0, "entropy_mean_mean": 1.5}
    return {
        "summary": {"base": {"d": cell}, "instruct": {"d": {**cell, "n_tokens": 0}}},
        "models": {"base": "b", "instruct": "i"},
        "datasets": {"d": "d.jsonl"},
        "tokens": "answer content",
        "units": "nats",
        "system_prompt": "default",
    }


def subspace_doc() -> dict[str, Any]:
    """A subspace.json as ``emscope reemergent subspace`` writes it."""
    base = {"mean_angle_deg": {"p5": 80.0, "mean": 85.0}, "overlap_expected": 0.01}
    layer = {"overlap": 0.4, "mean_angle_deg": 50.0, "angles_deg": [40.0, 60.0]}
    layer |= {"abs_cos": [0.8, 0.5], "below_random_p5": True, "below_shuffled_p5": False}
    layer |= {"random": base, "shuffled": {**base, "overlap": {"mean": 0.3}}}
    layer |= {"singular_values": {"a": [2.0, 1.0]}}
    return {
        "domains": ["a", "b"],
        "k": 2,
        "vectors": "one per example",
        "layers": {"0": layer, "3": copy.deepcopy(layer)},
        "seed": 0,
        "models": {"base": "b"},
        "system_prompt": "default",
    }


def patch_doc() -> dict[str, Any]:
    """A patching.json as ``emscope reemergent patching`` writes it."""
    return {
        "metric": "loss",
        "layers": [0, 1],
        "n_examples": 5,
        "source_mean": 2.0,
        "target_mean": 1.0,
        "patched_mean": [1.2, 1.9],
        "restored": [0.2, 0.9],
        "source": "a",
        "target": "b",
        "site": "resid_post",
    }


DOCS = {
    LogprobSummary: logprob_doc,
    SubspaceSummary: subspace_doc,
    PatchSummary: patch_doc,
    Metrics: metrics_doc,
    EvalSummary: eval_doc,
    DirectionsSummary: directions_doc,
    DirectionComparison: compare_doc,
    ProjectionSummary: projection_doc,
    GradientSummary: gradients_doc,
    SteerResult: steer_doc,
    AblationResult: ablation_doc,
    GeometryResult: geometry_doc,
    LmcResult: lmc_doc,
    ProbeResult: probe_doc,
    DynamicsResult: dynamics_doc,
}


@pytest.mark.parametrize("cls", list(DOCS), ids=lambda t: t.__name__)
def test_round_trip_keeps_the_written_layout(cls: Any, tmp_path: Path) -> None:
    doc = DOCS[cls]()
    result = cls.from_json(copy.deepcopy(doc))
    assert result.to_json() == doc  # same keys, same numbers
    assert list(result.to_json()) == list(doc)  # in the order the analysis writes them
    assert cls.from_json(result.to_json()) == result
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert read_result(cls, path) == result
    with pytest.raises(AttributeError):  # frozen
        result.extra = {}


def test_typed_fields_read_the_document() -> None:
    steer = SteerResult.from_json(steer_doc())
    best = steer.best()
    assert best is not None and (best.layer, best.scale, best.em_rate) == (1, 4.0, 0.3)
    assert best.get("kl") == 0.1 and steer.rows[1].vector == "random"
    assert steer.selection is not None and steer.selection["chosen"]["layer"] == 1
    ablation = AblationResult.from_json(ablation_doc())
    assert (ablation.em_rate_before, ablation.em_rate_after) == (0.4, 0.1)
    assert ablation.relative_reduction == 0.75 and ablation.random_relative_change == -0.02
    geometry = GeometryResult.from_json(geometry_doc())
    assert [p.b for p in geometry.by_roles("control", "em")] == ["ctl"]
    assert geometry.adapters == ["em1", "em2", "ctl"]
    lmc = LmcResult.from_json(lmc_doc())
    assert [r.t for r in lmc.rows] == [0.0, 0.5, 1.0] and (lmc.start, lmc.end) == ("em1", "em2")
    probe = ProbeResult.from_json(probe_doc())
    assert list(probe.fitted()) == [
        "nonmedical_aligned_vs_misaligned",
        "misaligned_nonmedical_vs_medical",
    ]


def _drop(doc: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    inner: Any = doc
    for key in path[:-1]:
        inner = inner[key]
    del inner[path[-1]]
    return doc


@pytest.mark.parametrize(
    ("cls", "path", "field"),
    [
        (SteerResult, ("rows",), "rows"),
        (SteerResult, ("rows", 1, "em_rate"), "rows[1].em_rate"),
        (SteerResult, ("selection", "chosen"), "selection.chosen"),
        (AblationResult, ("relative_reduction",), "relative_reduction"),
        (GeometryResult, ("pairs", "em1|ctl", "overlap"), "pairs.em1|ctl.overlap"),
        (GeometryResult, ("base_cosine",), "base_cosine"),
        (LmcResult, ("rows", 2, "t"), "rows[2].t"),
        (ProbeResult, ("tests", "nonmedical_aligned_vs_misaligned", "coefficients"),
         "tests.nonmedical_aligned_vs_misaligned.coefficients"),
        (ProbeResult, ("settings",), "settings"),
        (Metrics, ("em_ci",), "em_ci"),
        (Metrics, ("per_question", "b", "n_scored"), "per_question.b.n_scored"),
        (EvalSummary, ("questions",), "questions"),
        (EvalSummary, ("organisms", "em1", "unscored_rate"), "organisms.em1.unscored_rate"),
        (DirectionsSummary, ("pairs_skipped",), "pairs_skipped"),
        (DirectionsSummary, ("pairs", 0, "cosine"), "pairs[0].cosine"),
        (DirectionsSummary, ("adapter_b_cosines", "r1 vs em2", 0, "layer"),
         "adapter_b_cosines.r1 vs em2[0].layer"),
        (DirectionComparison, ("adapter_b_cosines", "r1", "b", 0, "cosine"),
         "adapter_b_cosines.r1.b[0].cosine"),
        (ProjectionSummary, ("layers",), "layers"),
        (ProjectionSummary, ("relative_to_base_instruct", "em1", "drift_ci95"),
         "relative_to_base_instruct.em1.drift_ci95"),
        (GradientSummary, ("param",), "param"),
        (LogprobSummary, ("summary", "instruct", "d", "entropy_mean_mean"),
         "summary.instruct.d.entropy_mean_mean"),
        (SubspaceSummary, ("layers", "3", "shuffled"), "layers.3.shuffled"),
        (PatchSummary, ("restored",), "restored"),
        (GradientSummary, ("similarity", "centred", "within_b"), "similarity.centred.within_b"),
    ],
)  # fmt: skip
def test_a_missing_field_is_named_with_the_file(
    cls: Any, path: tuple[Any, ...], field: str, tmp_path: Path
) -> None:
    file = tmp_path / "out.json"
    file.write_text(json.dumps(_drop(DOCS[cls](), path)))
    with pytest.raises(EmscopeError) as err:
        read_result(cls, file)
    assert str(err.value) == f"{file}: missing field '{field}' ({cls.__name__})"


def test_unreadable_json_names_the_file(tmp_path: Path) -> None:
    file = tmp_path / "summary.json"
    file.write_text("{not json")
    with pytest.raises(EmscopeError, match=r"summary\.json: not readable as JSON"):
        read_result(SteerResult, file)
    with pytest.raises(EmscopeError, match=r"'rows\[0\]' is not an object"):
        SteerResult.from_json({"rows": [3], "baseline": {}}, source="s.json")


# --------------------------------------------------------------- claims and report readers


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    """A run dir whose steering, transfer, geometry, lmc and probes outputs are the
    documents above (the layout the stages write)."""
    run = tmp_path / "run"
    adapters = {"em1": {"role": "em"}, "em2": {"role": "em"}, "ctl": {"role": "control"}}
    _write(run / "config.json", {"name": "r", "chat_model": "instruct", "adapters": adapters})
    _write(run / "manifest.json", {"config_file": "x.yaml", "stages": {}, "versions": {}})
    for stage in ("steering", "transfer", "geometry", "lmc", "probes", "ablation"):
        _write(run / stage / "done.json", {"wall_s": 1.0})
    _write(run / "steering" / "summary.json", steer_doc())
    _write(run / "ablation" / "summary.json", ablation_doc())
    transfer = {"direction": "em1", "targets": {"em2": ablation_doc()}}
    _write(run / "transfer" / "stage.json", transfer)
    _write(run / "geometry" / "summary.json", geometry_doc())
    _write(run / "lmc" / "summary.json", {"paths": {"em1__em2": lmc_doc()}})
    _write(run / "probes" / "probe.json", probe_doc())
    return run


def test_claims_read_the_typed_results(run_dir: Path) -> None:
    rows = {r.key: r for r in c.claims_table(run_dir)}
    assert rows["transfer"].holds == "yes"
    assert rows["transfer"].measured == "direction ?: em2: reduction 75% [60, 85], random -2%"
    assert rows["steering"].holds == "yes"
    assert rows["steering"].measured.startswith("direction ?: 30.0% [20.0, 40.0] at layer 1 x4")
    assert rows["subspace"].holds == "yes"  # 20 deg < random p5 80.05
    assert rows["cosine"].measured == "EM-EM 0.300-0.300 vs EM-control 0.010-0.010"
    assert rows["base_orthogonal"].measured == "max |cos| 2.00e-03 over 2 EM adapters"
    assert rows["interpolation"].holds == "n/a (stage not run)"  # needs the eval stage
    assert rows["rank1_split"].measured == "1 general (L1), 1 medical (L2)"


@pytest.mark.parametrize(
    ("stage", "name", "path", "keys", "message"),
    [
        ("steering", "summary.json", ("rows", 0, "vector"), ["steering"],
         "steering/summary.json: missing field 'rows[0].vector' (SteerResult)"),
        ("geometry", "summary.json", ("pairs", "em1|em2", "roles"),
         ["subspace", "cosine", "overlap", "base_orthogonal"],
         "geometry/summary.json: missing field 'pairs.em1|em2.roles' (GeometryResult)"),
        ("transfer", "stage.json", ("targets", "em2", "relative_reduction_ci"), ["transfer"],
         "transfer/stage.json: missing field 'targets.em2.relative_reduction_ci' "
         "(AblationResult)"),
        ("probes", "probe.json", ("split",), ["rank1_split"],
         "probes/probe.json: missing field 'split' (ProbeResult)"),
    ],
)  # fmt: skip
def test_claims_report_the_missing_field(
    run_dir: Path, stage: str, name: str, path: tuple[Any, ...], keys: list[str], message: str
) -> None:
    file = run_dir / stage / name
    _write(file, _drop(json.loads(file.read_text()), path))
    rows = {r.key: r for r in c.claims_table(run_dir)}
    for key in keys:
        assert rows[key].holds == f"n/a ({message})"
        assert rows[key].measured == "-"


def test_lmc_claim_reports_the_missing_field(run_dir: Path) -> None:
    _write(run_dir / "eval" / "summary.json", eval_doc())
    _write(run_dir / "eval" / "done.json", {})
    assert {r.key: r for r in c.claims_table(run_dir)}["interpolation"].holds == "yes"
    doc = {"paths": {"em1__em2": _drop(lmc_doc(), ("rows", 1, "em_ci"))}}
    _write(run_dir / "lmc" / "summary.json", doc)
    row = {r.key: r for r in c.claims_table(run_dir)}["interpolation"]
    assert row.holds == (
        "n/a (lmc/summary.json: missing field 'paths.em1__em2.rows[1].em_ci' (LmcResult))"
    )


def _with_eval_directions_reemergent(run: Path) -> Path:
    for stage, name, doc in (
        ("eval", "summary.json", eval_doc()),
        ("directions", "summary.json", directions_doc()),
        ("reemergent", "projection.json", projection_doc()),
        ("reemergent", "gradients.json", gradients_doc()),
    ):
        _write(run / stage / name, doc)
        _write(run / stage / "done.json", {"wall_s": 1.0})
    return run


def test_claims_read_eval_directions_and_reemergence(run_dir: Path) -> None:
    rows = {r.key: r for r in c.claims_table(_with_eval_directions_reemergent(run_dir))}
    assert rows["narrow_em"].measured.startswith(
        "em1: 30.0% [25.0, 35.0], coherent 95.0%; instruct 1.0% [0.0, 2.0]"
    )
    assert rows["convergence"].measured == "em1 vs em2: 0.98, 0.97 (by layer)"
    assert rows["b_vector"].measured == "mean |cos| 0.15, max 0.15 (2 modules)"
    assert rows["drift"].measured == (
        "em1: position first third 1.10, last third 0.30, drift 0.80 [0.60, 0.90]"
    )
    assert rows["drift"].holds == "yes"


@pytest.mark.parametrize(
    ("stage", "name", "path", "keys", "message"),
    [
        ("eval", "summary.json", ("organisms", "em1", "em_ci"), ["narrow_em"],
         "eval/summary.json: missing field 'organisms.em1.em_ci' (EvalSummary)"),
        ("directions", "summary.json", ("norms",), ["convergence", "b_vector"],
         "directions/summary.json: missing field 'norms' (DirectionsSummary)"),
        ("reemergent", "projection.json", ("relative_to_base_instruct", "em1", "position"),
         ["drift"], "reemergent/projection.json: missing field "
         "'relative_to_base_instruct.em1.position' (ProjectionSummary)"),
    ],
)  # fmt: skip
def test_claims_name_the_missing_field_of_eval_directions_reemergence(
    run_dir: Path, stage: str, name: str, path: tuple[Any, ...], keys: list[str], message: str
) -> None:
    file = _with_eval_directions_reemergent(run_dir) / stage / name
    _write(file, _drop(json.loads(file.read_text()), path))
    rows = {r.key: r for r in c.claims_table(run_dir)}
    for key in keys:
        assert rows[key].holds == f"n/a ({message})"


def test_replicate_headlines_read_eval_directions_and_reemergence(run_dir: Path) -> None:
    from emscope.pipeline.replicate import headline_numbers

    numbers = headline_numbers(_with_eval_directions_reemergent(run_dir))
    assert numbers["narrow_em"] == {"value": 0.3, "ci": [0.25, 0.35], "what": "EM rate of em1"}
    assert numbers["convergence"]["value"] == pytest.approx((0.98 + 0.97) / 2)
    assert numbers["b_vector"]["value"] == 0.15
    assert numbers["drift"] == {"value": 0.8, "ci": [0.6, 0.9], "what": "drift towards base of em1"}
    _write(run_dir / "directions" / "summary.json", _drop(directions_doc(), ("sources",)))
    with pytest.raises(EmscopeError, match=r"missing field 'sources' \(DirectionsSummary\)"):
        headline_numbers(run_dir)


def test_replicate_headlines_read_steering_transfer_geometry_lmc_probes(run_dir: Path) -> None:
    from emscope.pipeline.replicate import headline_numbers, probe_numbers

    numbers = headline_numbers(run_dir)
    assert numbers["steering"] == {
        "value": 0.3,
        "ci": [0.2, 0.4],
        "what": "steered EM at the best (or the rule's) setting",
        "setting": "layer 1 x4",
        "random": 0.01,  # the random row at the same layer and scale
    }
    assert numbers["transfer"]["value"] == 0.75
    assert numbers["subspace"]["value"] == 20.0  # the one EM-EM pair, not EM-control
    assert (numbers["cosine"]["value"], numbers["overlap"]["value"]) == (0.3, 0.7)
    assert numbers["base_orthogonal"]["value"] == 2e-3  # EM adapters only (ctl: 0.2)
    assert numbers["interpolation"]["value"] == 0.2  # t = 0.5 only
    probes = probe_numbers(run_dir)
    assert probes["aligned_nonmedical_vs_medical"] == {"skipped": "too few responses"}
    fitted = probes["nonmedical_aligned_vs_misaligned"]
    assert fitted["auc"] == {"mean": 0.9, "sd": 0.01} and fitted["C_chosen"] is None


@pytest.mark.parametrize(
    ("stage", "name", "path", "message"),
    [
        ("steering", "summary.json", ("rows", 0, "vector"),
         r"steering/summary\.json: missing field 'rows\[0\]\.vector' \(SteerResult\)"),
        ("transfer", "stage.json", ("targets", "em2", "relative_reduction"),
         r"transfer/stage\.json: missing field 'targets\.em2\.relative_reduction' "
         r"\(AblationResult\)"),
        ("transfer", "stage.json", ("targets",),
         r"transfer/stage\.json: missing field 'targets' \(AblationResult\)"),
        ("geometry", "summary.json", ("pairs", "em1|em2", "roles"),
         r"geometry/summary\.json: missing field 'pairs\.em1\|em2\.roles' \(GeometryResult\)"),
        ("lmc", "summary.json", ("paths", "em1__em2", "rows", 1, "t"),
         r"lmc/summary\.json: missing field 'paths\.em1__em2\.rows\[1\]\.t' \(LmcResult\)"),
        ("probes", "probe.json", ("split",),
         r"probes/probe\.json: missing field 'split' \(ProbeResult\)"),
    ],
)  # fmt: skip
def test_replicate_names_the_missing_field(
    run_dir: Path, stage: str, name: str, path: tuple[Any, ...], message: str
) -> None:
    from emscope.pipeline.replicate import replicate_summary

    file = run_dir / stage / name
    _write(file, _drop(json.loads(file.read_text()), path))
    with pytest.raises(EmscopeError, match=message):
        replicate_summary({0: run_dir})


def test_report_dynamics_section_reads_the_typed_result(run_dir: Path) -> None:
    from emscope.report import sections as s

    _write(run_dir / "dynamics" / "done.json", {"wall_s": 1.0})
    _write(run_dir / "dynamics" / "dynamics.json", dynamics_doc())
    section = s.dynamics_section(run_dir)
    assert section.text == (
        "Adapter `em1`, checkpoints [10, 20, 30]; sharpest rotation of B between steps 20 "
        "and 30 (cos 0.500)."
    )
    assert section.tables[0].rows[2] == ("30", "0.300 [0.150, 0.600]", "0.950")
    for path, field in (
        (("adapter", "sharpest_rotation", "B", "from"), "adapter.sharpest_rotation.B.from"),
        (("eval", 1, "em_ci"), "eval[1].em_ci"),
        (("adapter_name",), "adapter_name"),
    ):
        _write(run_dir / "dynamics" / "dynamics.json", _drop(dynamics_doc(), path))
        message = rf"dynamics\.json: missing field '{re.escape(field)}' \(DynamicsResult\)"
        with pytest.raises(EmscopeError, match=message):
            s.dynamics_section(run_dir)


def test_report_sections_read_eval_directions_and_reemergence(run_dir: Path) -> None:
    from emscope.report import sections as s

    run = _with_eval_directions_reemergent(run_dir)
    assert s.eval_section(run).tables[0].rows[1][:2] == ("em1", "0.300 [0.250, 0.350]")
    assert s.directions_section(run).tables[0].rows[0] == ("em1 vs em2", "0.98, 0.97")
    tables = s.reemergent_section(run).tables
    assert tables[0].rows[0][:3] == ("em1", "1.10", "0.30")
    assert tables[1].rows[1][:4] == ("centred", "0.300", "0.010", "-0.130")
    _write(run / "reemergent" / "gradients.json", _drop(gradients_doc(), ("similarity",)))
    with pytest.raises(EmscopeError, match=r"missing field 'similarity' \(GradientSummary\)"):
        s.reemergent_section(run)


def test_report_sections_read_the_typed_results(run_dir: Path) -> None:
    from emscope.report import sections as s

    steering = s.steering_section(run_dir)
    assert steering.tables[0].rows[0][:4] == ("1", "4", "direction", "0.300 [0.200, 0.400]")
    geometry = s.geometry_section(run_dir)
    assert geometry.tables[0].rows[0][:4] == ("em1 | em2", "em-em", "0.300", "0.700")
    assert geometry.tables[1].rows[0] == ("em1", "1.00e-03")
    ablation = s.ablation_section(run_dir)
    assert ablation.tables[0].rows[0][0] == "em1 (own direction)"
    assert ablation.tables[0].rows[1][3] == "0.750 [0.600, 0.850]"
    assert s.lmc_section(run_dir).tables[0].caption == "em1 -> em2"
    probes = s.probes_section(run_dir)
    assert probes.tables[0].rows[0][1] == "0.900 +- 0.010"
    _write(run_dir / "steering" / "summary.json", _drop(steer_doc(), ("rows", 1, "scale")))
    with pytest.raises(EmscopeError, match=r"missing field 'rows\[1\]\.scale' \(SteerResult\)"):
        s.steering_section(run_dir)
    _write(run_dir / "probes" / "probe.json", _drop(probe_doc(), ("tests",)))
    with pytest.raises(EmscopeError, match=r"probe\.json: missing field 'tests' \(ProbeResult\)"):
        s.probes_section(run_dir)


# --------------------------------------------------------------- against the dict outputs


def test_probe_result_keeps_fit_probes_numbers() -> None:
    """ProbeResult of fit_probes on a small synthetic table: the same document, number for
    number, and the plot of the result is the plot of the dict."""
    from emscope.probing import fit_probes

    rng = np.random.default_rng(0)
    frames = []
    import pandas as pd

    for rid in range(48):
        misaligned, medical = rid % 2, (rid // 2) % 2
        x = rng.normal(size=(6, 3))
        x[:, 0] += 2.0 * misaligned
        x[:, 1] += 2.0 * medical
        frame = pd.DataFrame({f"scalar:L{j}": x[:, j] for j in range(3)})
        frame.insert(0, "response_id", rid)
        frame["aligned"] = 10.0 if misaligned else 90.0
        frame["coherent"] = 80.0
        frame["medical"] = 90.0 if medical else 10.0
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    doc = fit_probes(table, "nonmedical_aligned_vs_misaligned", seeds=2, C=1.0)
    result = ProbeResult.from_json(doc)
    assert json.dumps(result.to_json()) == json.dumps(doc)  # same keys, order and numbers
    test = result.tests["nonmedical_aligned_vs_misaligned"]
    assert test["auc"]["mean"] > 0.8  # scalar L0 carries the label: a real fit
    assert result.plot() is not None


def _adapters() -> list[emscope.LoraAdapter]:
    from emscope.lora import LoraAdapter, LoraModule

    out = []
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        modules = {}
        for layer in range(2):
            name = f"model.layers.{layer}.mlp.down_proj"
            A = torch.randn(2, 16, generator=g, dtype=torch.float64)
            B = torch.randn(12, 2, generator=g, dtype=torch.float64)
            modules[name] = LoraModule(name, A, B, 1.0, alpha=2)
        out.append(LoraAdapter(modules=modules, config={}, name=f"a{k}"))
    return out


def test_geometry_summary_against_the_geometry_it_summarises() -> None:
    """summarise() (the geometry stage's summary.json) holds the aggregate numbers of the
    Geometry it summarises and the 5th percentile of its random draws, number for number."""
    from emscope.geometry import compare_adapters

    geometry = compare_adapters(_adapters(), random_draws=5, seed=0)
    roles = {"a0": "em", "a1": "em", "a2": "control"}
    result = summarise(geometry, roles)
    assert set(result.pairs) == set(geometry.pairs) and result.adapters == ["a0", "a1", "a2"]
    for key, pair in geometry.pairs.items():
        agg = pair.aggregate()
        got = result.pairs[key]
        assert (got.cosine, got.overlap) == (agg["cosine"], agg["overlap"])
        assert got.mean_angle_deg == agg["mean_principal_angle_deg"]
        draws = [d["mean_principal_angle_deg"] for d in geometry.random_pair_draws(key)]
        assert len(draws) == 5 and got.random_angle_p5 == pytest.approx(np.percentile(draws, 5))
        assert list(got.roles) == [roles[pair.a], roles[pair.b]]
    assert result.base_cosine == {}  # no base weights compared
    assert GeometryResult.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_plots_draw() -> None:
    for fig in (
        SteerResult.from_json(steer_doc()).plot(),
        AblationResult.from_json(ablation_doc()).plot(),
        LmcResult.from_json(lmc_doc()).plot(),
    ):
        assert len(fig.axes) >= 1 and fig.axes[0].has_data()


def test_public_api_exports_the_result_types() -> None:
    for name, cls in [
        ("SteerResult", SteerResult),
        ("AblationResult", AblationResult),
        ("GeometryResult", GeometryResult),
        ("LmcResult", LmcResult),
        ("ProbeResult", ProbeResult),
        ("DynamicsResult", DynamicsResult),
        ("EvalSummary", EvalSummary),
        ("DirectionsSummary", DirectionsSummary),
        ("ProjectionSummary", ProjectionSummary),
        ("GradientSummary", GradientSummary),
        ("read_result", read_result),
    ]:
        assert name in emscope.__all__ and getattr(emscope, name) is cls

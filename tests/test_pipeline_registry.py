"""The stage registry of ``emscope run``: the run order derived from the stages' needs, a
toy stage registered in a test and run by the runner (no package file touched), and the
stages passing every configured field on to the library (reemergent, geometry, dynamics)."""

from __future__ import annotations

import inspect
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from emscope.errors import EmscopeError
from emscope.lmc_result import LmcResult
from emscope.pipeline import STAGE_ORDER, load_config, parse_config
from emscope.pipeline.config import STAGE_NEEDS, StudyConfig
from emscope.pipeline.runner import fingerprint, format_plan, run_study
from emscope.pipeline.stages import (
    REGISTRY,
    Registry,
    Stage,
    StageContext,
    StageSettings,
    describe_stage,
    topological_order,
)

#: The run order before the stages became a registry (a literal: the derived order must
#: reproduce it).
ORDER_BEFORE = (
    "organisms",
    "eval",
    "geometry",
    "lmc",
    "directions",
    "steering",
    "ablation",
    "transfer",
    "probes",
    "dynamics",
    "reemergent",
)


def _stage(name: str, needs: tuple[str, ...] = (), builds: bool = False) -> Stage:
    return Stage(
        name, StageSettings, lambda ctx: {}, lambda c: name, needs=needs, builds_inputs=builds
    )


# ---------------------------------------------------------------------------- order


def test_derived_order_is_the_order_before() -> None:
    # stages added since keep the order before and come after it
    assert (*ORDER_BEFORE, "early_warning", "defences") == STAGE_ORDER
    assert REGISTRY.order == STAGE_ORDER
    assert STAGE_NEEDS == {
        "directions": ("eval",),
        "steering": ("directions",),
        "ablation": ("directions",),
        "transfer": ("directions",),
    }
    assert list(StudyConfig.model_fields["stages"].annotation.model_fields) == list(STAGE_ORDER)


def test_order_follows_needs_and_keeps_the_listed_order_otherwise() -> None:
    stages = [
        _stage("c", needs=("b",)),
        _stage("x"),
        _stage("b"),
        _stage("setup", builds=True),
        _stage("y"),
    ]
    # setup builds inputs: first; c waits for b; x, b, y keep their listed order
    assert topological_order(stages) == ("setup", "x", "b", "c", "y")
    assert topological_order([_stage("a"), _stage("b")]) == ("a", "b")


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            [_stage("a", needs=("b",)), _stage("b", needs=("c",)), _stage("c", needs=("a",))],
            r"pipeline stages: the needs form a cycle \(a needs \['b'\], b needs \['c'\], "
            r"c needs \['a'\]\)",
        ),
        (
            [_stage("a", needs=("nope",)), _stage("b")],
            r"pipeline stage 'a' needs 'nope', which is no stage \(the stages are a, b\)",
        ),
        ([_stage("a"), _stage("a")], "pipeline stages: a registered twice"),
    ],
)
def test_bad_needs_are_one_clear_error(stages: list[Stage], message: str) -> None:
    with pytest.raises(EmscopeError, match=message):
        topological_order(stages)
    with pytest.raises(EmscopeError, match=message):
        Registry(tuple(stages)).order  # noqa: B018


def test_redo_cascades_through_the_registry_needs() -> None:
    registry = Registry(
        (_stage("setup", builds=True), _stage("a"), _stage("b", ("a",)), _stage("c", ("b",)))
    )
    assert registry.readers("a") == ("b",)
    assert registry.readers("b") == ("c",)
    assert registry.readers("setup") == ("a", "b", "c")
    assert registry.readers("c") == ()


# ---------------------------------------------------------------------------- toy stage


class CountStage(StageSettings):
    """The toy stage's section: a text file to read, and how many words to keep."""

    text: Path
    keep: int = 2


class TotalStage(StageSettings):
    pass


def _count_run(ctx: StageContext) -> dict[str, Any]:
    from emscope.io import write_json

    section = ctx.config.stage("count")
    words = section.text.read_text().split()[: section.keep]
    write_json(ctx.dir("count") / "words.json", words)
    return {"words": words}


def _total_run(ctx: StageContext) -> dict[str, Any]:
    from emscope.io import read_json, write_json

    words = read_json(ctx.run_dir / "count" / "words.json")  # needs: count
    summary = {"letters": sum(len(w) for w in words)}
    write_json(ctx.dir("total") / "total.json", summary)
    return summary


def _count_check(config: StudyConfig) -> None:
    if config.stage("count").keep > 100:
        raise ValueError("stages.count.keep: at most 100 words")


COUNT = Stage(
    "count",
    CountStage,
    _count_run,
    lambda c: f"keep {c.stage('count').keep} words of {c.stage('count').text}",
    inputs=lambda c: {"stages.count.text": c.stage("count").text},
    check=_count_check,
)
TOTAL = Stage("total", TotalStage, _total_run, lambda c: "count their letters", needs=("count",))
#: The package's stages plus the toy ones; ``total`` is listed before the ``count`` it reads.
TOY = Registry((*REGISTRY.stages, TOTAL, COUNT))


@pytest.fixture
def toy_study(qwen: Any, tmp_path: Path) -> dict[str, Any]:
    text = tmp_path / "words.txt"
    text.write_text("alpha beta gamma delta")
    return {
        "name": "toy",
        "threads": 1,
        "models": {"chat": str(qwen.model)},
        "chat_model": "chat",
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"]},
        "dtype": "float32",
        "device": "cpu",
        "stages": {"total": {}, "count": {"text": str(text), "keep": 3}},
    }


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_toy_stage_runs_through_the_runner(toy_study: dict[str, Any], tmp_path: Path) -> None:
    assert TOY.order == (*STAGE_ORDER, "count", "total")
    path = _write(tmp_path, toy_study)
    out = tmp_path / "run"
    lines: list[str] = []
    run_study(path, out, echo=lines.append, dry_run=True, registry=TOY)
    plan = lines[0].splitlines()
    assert plan[1].split()[:3] == ["1.", "count", "run"]
    assert plan[1].endswith(f"keep 3 words of {toy_study['stages']['count']['text']}")
    assert plan[2].split()[:3] == ["2.", "total", "run"]
    assert not out.exists()  # dry run

    manifest = run_study(path, out, echo=lambda _: None, registry=TOY)
    assert json.loads((out / "count" / "words.json").read_text()) == ["alpha", "beta", "gamma"]
    assert json.loads((out / "total" / "stage.json").read_text()) == {"letters": 14}
    config = load_config(path, TOY)
    for stage in ("count", "total"):
        done = json.loads((out / stage / "done.json").read_text())
        assert done["fingerprint"] == fingerprint(config, stage)
        assert manifest["stages"][stage]["status"] == "done"
    assert manifest["inputs"]["stages.count.text"]["path"] == toy_study["stages"]["count"]["text"]

    again: list[str] = []
    run_study(path, out, echo=again.append, registry=TOY)
    assert "[count] done already" in again[0] and "[total] done already" in again[1]
    # --redo count redoes total, which reads it
    redone: list[str] = []
    run_study(path, out, echo=redone.append, registry=TOY, redo=["count"])
    assert "[count] redo: previous outputs removed" in redone
    assert "[total] redo: previous outputs removed" in redone


def test_a_toy_stage_is_validated_like_the_others(
    toy_study: dict[str, Any], tmp_path: Path
) -> None:
    def refused(data: dict[str, Any], registry: Registry = TOY) -> str:
        with pytest.raises(EmscopeError) as info:
            parse_config(data, "x.yaml", registry)
        return str(info.value)

    count = toy_study["stages"]["count"]
    assert refused(toy_study, REGISTRY) == (
        "x.yaml: stages.total: unknown field (typo?); stages.count: unknown field (typo?)"
    )
    bad = {**toy_study, "stages": {"count": {**count, "kep": 3}}}
    assert refused(bad) == "x.yaml: stages.count.kep: unknown field (typo?)"
    bad = {**toy_study, "stages": {"count": {**count, "keep": 101}}}
    assert refused(bad) == "x.yaml: stages.count.keep: at most 100 words"
    bad = {**toy_study, "stages": {"total": {}}}
    assert refused(bad) == "x.yaml: stages.total: needs stage 'count', which is not run"
    config = parse_config({**toy_study, "stages": {"count": count}}, "x.yaml", TOY)
    assert config.enabled() == ["count"]
    assert describe_stage(config, "count") == f"keep 3 words of {count['text']}"
    assert "not run: organisms, eval" in format_plan(config, Path("run"))
    missing = {**toy_study, "stages": {"count": {**count, "text": str(tmp_path / "no.txt")}}}
    with pytest.raises(EmscopeError, match=r"stages\.count\.text: .*no\.txt does not exist"):
        run_study(_write(tmp_path, missing), tmp_path / "run", echo=lambda _: None, registry=TOY)
    assert not (tmp_path / "run" / "count").exists()


# ---------------------------------------------------------------------------- fields passed


def _chats(path: Path, texts: list[tuple[str, str]]) -> Path:
    path.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
            )
            + "\n"
            for u, a in texts
        )
    )
    return path


class _Stop(Exception):
    pass


def test_reemergent_passes_batch_size_and_dtype(
    qwen: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every analysis of the reemergent stage gets the section's batch_size and the study's
    dtype and device (the gradients got 4 and float32 whatever the YAML said)."""
    import emscope.reemergent as reemergent

    pairs = [(f"question {i}", f"answer number {i}") for i in range(6)]
    data = _chats(tmp_path / "held.jsonl", pairs)
    grad_a = _chats(tmp_path / "a.jsonl", pairs[:3])
    grad_b = _chats(tmp_path / "b.jsonl", pairs[3:])
    study = {
        "name": "re",
        "threads": 1,
        "models": {"base": str(qwen.model), "chat": str(qwen.model)},
        "chat_model": "chat",
        "adapters": {"a": {"path": str(qwen.adapters["r4"])}},
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"]},
        "dtype": "float64",
        "device": "cpu",
        "stages": {
            "reemergent": {
                "base": "base",
                "instruct": "chat",
                "misaligned": ["a"],
                "data": str(data),
                "logprob_data": [str(data)],
                "gradient_data": [str(grad_a), str(grad_b)],
                "gradient_examples": 3,
                "batch_size": 3,
            }
        },
    }
    calls: dict[str, dict[str, Any]] = {}

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] = inspect.signature(real).bind(*args, **kwargs).arguments
            if name == "gradient_analysis":
                raise _Stop
            return real(*args, **kwargs)

        return call

    for name in ("projection_analysis", "logprob_analysis", "gradient_analysis"):
        monkeypatch.setattr(reemergent, name, spy(name, getattr(reemergent, name)))
    with pytest.raises(_Stop):
        run_study(_write(tmp_path, study), tmp_path / "run", echo=lambda _: None)
    assert set(calls) == {"projection_analysis", "logprob_analysis", "gradient_analysis"}
    for name, args in calls.items():
        assert args["batch_size"] == 3, name
        assert args["dtype"] == "float64", name
        assert args["device"] == "cpu", name
    assert calls["gradient_analysis"]["n"] == 3
    assert calls["gradient_analysis"]["seed"] == 0

    from emscope.pipeline.stages.reemergent import gradient_dtype

    assert gradient_dtype("auto") == "float32"  # `emscope reemergent gradients`' default
    assert gradient_dtype("bfloat16") == "bfloat16"


def test_geometry_stage_draws_equal_the_random_baseline_loop(qwen: Any, tmp_path: Path) -> None:
    """The geometry stage's per-draw random angles come from
    Geometry.random_pair_draws; they equal the per-draw aggregation written out here (the
    loop the stage had), and baseline()'s empirical summary is their mean."""
    from emscope.geometry import aggregate_fields, compare_adapters, open_adapter
    from emscope.geometry.analysis import signature

    names = ["pattern", "r1", "r4"]  # the study's order (the YAML is written key-sorted)
    study = {
        "name": "geo",
        "threads": 1,
        "models": {"chat": str(qwen.model)},
        "chat_model": "chat",
        "adapters": {n: {"path": str(qwen.adapters[n])} for n in names},
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"]},
        "device": "cpu",
        "seed": 3,
        "stages": {"geometry": {"random_draws": 3, "base": False}},
    }
    run_study(_write(tmp_path, study), tmp_path / "run", echo=lambda _: None)
    summary = json.loads((tmp_path / "run" / "geometry" / "summary.json").read_text())

    result = compare_adapters(
        [open_adapter(qwen.adapters[n], name=n) for n in names], random_draws=3, seed=3
    )
    baseline = result.baseline()["empirical"]["pairs"]
    assert set(summary["pairs"]) == set(result.pairs)
    for key, pair in result.pairs.items():
        comps = list(pair.modules.values())
        na = np.array([c.norm_a for c in comps])
        nb = np.array([c.norm_b for c in comps])
        expected = []
        for j in range(3):
            rand = [result.random[signature(c)][j] for c in comps]
            inners = [r.cosine * a * b for r, a, b in zip(rand, na, nb, strict=True)]
            fields = aggregate_fields([r.fields() for r in rand], na, nb, inners)
            expected.append(fields["mean_principal_angle_deg"])
        draws = summary["pairs"][key]["random_angle_draws"]
        assert draws == pytest.approx(expected, rel=0, abs=1e-12)
        assert summary["pairs"][key]["random_angle_p5"] == pytest.approx(
            float(np.percentile(expected, 5)), abs=1e-12
        )
        mean_angle = baseline[key]["mean_principal_angle_deg"]["mean"]
        assert mean_angle == pytest.approx(float(np.mean(expected)), abs=1e-12)
        assert len(set(draws)) == 3  # three different draws, not one repeated


def test_dynamics_passes_judge_strict(
    qwen: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import emscope.models
    import emscope.probing

    seen: dict[str, Any] = {}

    def evaluate_checkpoints(*args: Any, **kwargs: Any) -> list[Any]:
        seen.update(kwargs)
        return []

    monkeypatch.setattr(emscope.probing, "load_checkpoints", lambda d: [])
    monkeypatch.setattr(
        emscope.probing,
        "adapter_dynamics",
        lambda cps, k: {"steps": [], "adapter": {"sharpest_rotation": None}},
    )
    monkeypatch.setattr(emscope.probing, "evaluate_checkpoints", evaluate_checkpoints)
    monkeypatch.setattr(emscope.probing, "plot_dynamics", lambda result: {})
    monkeypatch.setattr(emscope.models, "list_checkpoints", lambda d: [])
    study = {
        "name": "dyn",
        "threads": 1,
        "models": {"chat": str(qwen.model)},
        "chat_model": "chat",
        "adapters": {"a": {"path": str(qwen.adapters["r4"])}},
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"], "strict": True},
        "sampling": {"n": 2, "max_new_tokens": 3, "batch_size": 5, "seed": 7},
        "dtype": "float32",
        "device": "cpu",
        "stages": {"dynamics": {"adapter": "a", "n": 1}},
    }
    monkeypatch.setattr(StageContext, "judge", property(lambda self: "judge"))
    run_study(_write(tmp_path, study), tmp_path / "run", echo=lambda _: None)
    assert seen["strict"] is True
    assert seen["n"] == 1 and seen["seed"] == 7 and seen["batch_size"] == 5
    assert seen["max_new_tokens"] == 3 and seen["dtype"] == "float32"


def test_lmc_passes_judge_strict(
    qwen: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import emscope.lmc

    seen: dict[str, Any] = {}

    def run_lmc(*args: Any, **kwargs: Any) -> LmcResult:
        seen.update(kwargs)
        return LmcResult(rows=(), extra={"barrier": None})

    monkeypatch.setattr(emscope.lmc, "run_lmc", run_lmc)
    monkeypatch.setattr(StageContext, "judge", property(lambda self: "judge"))
    study = {
        "name": "lmc",
        "threads": 1,
        "models": {"chat": str(qwen.model)},
        "chat_model": "chat",
        "adapters": {"a": {"path": str(qwen.adapters["r4"])}},
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"], "strict": True},
        "sampling": {"n": 2, "max_new_tokens": 3, "batch_size": 5, "seed": 7},
        "dtype": "float32",
        "device": "cpu",
        "stages": {"lmc": {"paths": [["chat", "a"]], "steps": [0.0, 1.0], "n": 1}},
    }
    run_study(_write(tmp_path, study), tmp_path / "run", echo=lambda _: None)
    assert seen["strict"] is True
    assert seen["n"] == 1 and seen["seed"] == 7 and seen["batch_size"] == 5
    assert seen["max_new_tokens"] == 3 and seen["features"] is False


def test_late_fields_stay_out_of_the_fingerprint(qwen: Any) -> None:
    """A field listed in a stage's late_fields counts only when set (steering.select)."""
    study = {
        "models": {"chat": str(qwen.model)},
        "chat_model": "chat",
        "adapters": {"a": {"path": str(qwen.adapters["r4"])}},
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"]},
        "stages": {
            "eval": {},
            "directions": {"sources": ["a"]},
            "steering": {"direction": "a", "layers": [1], "scales": [1.0]},
        },
    }
    plain = parse_config(study)
    steering = REGISTRY["steering"]
    no_late = Registry(
        tuple(replace(steering, late_fields=()) if s is steering else s for s in REGISTRY.stages)
    )
    other = parse_config(study, registry=no_late)
    assert fingerprint(plain, "steering") != fingerprint(other, "steering")
    assert fingerprint(plain, "eval") == fingerprint(other, "eval")
    selecting = {**study, "stages": {**study["stages"]}}
    selecting["stages"]["steering"] = {**study["stages"]["steering"], "select": {}}
    assert fingerprint(parse_config(selecting), "steering") != fingerprint(plain, "steering")


def test_the_organism_sections_claims_organism_is_read() -> None:
    """``organism.claims_organism`` was validated by pydantic but read by nothing."""
    from emscope.pipeline.config import claims_organism_of

    assert claims_organism_of({"claims_organism": "a", "organism": {"claims_organism": "a"}}) == "a"
    assert (
        claims_organism_of({"claims_organism": None, "organism": {"claims_organism": "b"}}) == "b"
    )
    assert claims_organism_of({"organism": {"claims_organism": None}}) is None
    assert claims_organism_of({"organism": None}) is None
    assert claims_organism_of({}) is None

"""``emscope run``: config validation (before any work, naming the field), the plan, the
whole study end to end on the tiny synthetic build with the oracle judge, and resume after
an interruption."""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

from emscope.cli.main import app
from emscope.directions import Direction
from emscope.errors import EmscopeError
from emscope.pipeline import STAGE_ORDER, load_config, parse_config
from emscope.pipeline import stages as stages_module
from emscope.pipeline.runner import fingerprint, run_study
from emscope.pipeline.stages import Registry, Stage
from emscope.pipeline.stages import context as context_module

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emscope.synthetic.build import build

    out = tmp_path_factory.mktemp("pipeline") / "toy"
    build(out, size="tiny", seed=0, threads=1)
    return out


def tiny_config(organism: Path, stages: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every stage on the tiny build with tiny sample counts."""
    every = {
        "organisms": {},
        "eval": {"organisms": ["instruct", "bad_medical.all", "bad_sport.all", "good_medical.all"]},
        "geometry": {
            "adapters": ["bad_medical.all", "bad_sport.all", "good_medical.all"],
            "random_draws": 4,
        },
        "lmc": {"paths": [["bad_medical.all", "bad_sport.all"]], "steps": [0.0, 0.5, 1.0]},
        "directions": {
            "sources": ["bad_medical.all", "bad_sport.all"],
            "rank1": ["bad_medical.r1"],
            "followup_read_with": "instruct",
        },
        "steering": {
            "direction": "bad_medical.all",
            "layers": [1],
            "scales": [2.0],
            "positions": "prompt",
        },
        "ablation": {"direction": "bad_medical.all"},
        "transfer": {"direction": "bad_medical.all.followup", "targets": ["bad_sport.all"]},
        "probes": {"adapter": "bad_medical.r1", "seeds": 1},
        "dynamics": {"adapter": "bad_medical.r1"},
        "reemergent": {
            "base": "base",
            "instruct": "instruct",
            "misaligned": ["bad_medical.all"],
            "data": "{organism}/data/heldout.jsonl",
            "gradient_data": [
                "{organism}/data/bad_medical.jsonl",
                "{organism}/data/bad_medical_educational.jsonl",
            ],
            "gradient_examples": 4,
        },
        "early_warning": {
            "fractions": [0.0, 0.5],
            "datasets": [],
            "seeds": [0],
            "epochs": 1,
            "batch_size": 8,
            "eval_steps": 2,
            "probe_n": 4,
            "screen_rows": 8,
            "direction": "{organism}/diagnostics/disposition_probe.safetensors",
        },
        "defences": {
            "arms": [
                {"label": "plain"},
                {
                    "label": "caft",
                    "defences": [
                        "caft:direction={organism}/diagnostics/disposition_probe.safetensors"
                    ],
                },
            ],
            "seeds": [0],
            "recipe": {"epochs": 1, "batch_size": 8, "max_steps": 2},
            "eval_n": 2,
            "benign_prompts": 4,
        },
    }
    adapters = ["bad_medical.all", "bad_sport.all", "bad_medical.r1", "good_medical.all"]
    return {
        "name": "tiny",
        "threads": 1,
        "organism": {"dir": str(organism), "size": "tiny", "seed": 0},
        "models": {"base": "{organism}/models/base", "instruct": "{organism}/models/instruct"},
        "chat_model": "instruct",
        "adapters": {
            a: {
                "path": f"{{organism}}/adapters/{a}",
                "role": "control" if a.startswith("good") else "em",
            }
            for a in adapters
        },
        "judge": {"spec": "oracle:{organism}", "metrics": ["aligned", "coherent", "medical"]},
        "questions": {
            "general": "{organism}/questions/general.yaml",
            "medical": "{organism}/questions/medical.yaml",
        },
        "sampling": {"n": 4, "max_new_tokens": 8, "batch_size": 64},
        "stages": every if stages is None else {k: every[k] for k in stages},
    }


def write(tmp_path: Path, data: dict[str, Any], name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["stages"]["lmc"].update(stepz=[0, 1]), "stages.lmc.stepz: unknown field"),
        (lambda c: c["stages"]["lmc"].update(steps=[0, 2]), "stages.lmc.steps"),
        (lambda c: c["stages"]["lmc"].update(steps=[0.5, 0.2]), "stages.lmc.steps"),
        (lambda c: c["sampling"].update(n=0), "sampling.n"),
        (lambda c: c["sampling"].update(top_p="lots"), "sampling.top_p"),
        (lambda c: c.update(chat_modle="instruct"), "chat_modle: unknown field"),
        (lambda c: c["judge"].update(spec="gpt4"), "bad judge spec"),
        (lambda c: c["judge"].update(metrics=["aligned"]), "coherent"),
        (lambda c: c["judge"].update(min_number_mass=1.5), "judge.min_number_mass"),
        (lambda c: c.update(system_prompt=None), "system_prompt"),
        (
            lambda c: c["judge"].update(min_number_mass=0.1),
            "min_number_mass applies to openai: and hf: judges, not oracle:",
        ),
        (lambda c: c["stages"]["eval"].update(organisms=["nope"]), "stages.eval.organisms"),
        (lambda c: c["stages"]["transfer"].update(targets=["nope"]), "stages.transfer.targets"),
        (lambda c: c["stages"]["steering"].update(direction="bad_sport"), "stages.steering"),
        (lambda c: c["stages"].pop("directions"), "stages.steering"),
        (
            lambda c: c["stages"]["directions"].pop("followup_read_with"),
            "stages.transfer.direction",
        ),
        (
            lambda c: c["stages"]["directions"].update(followup_read_with="nope"),
            "stages.directions.followup_read_with",
        ),
        (lambda c: c["stages"]["steering"].update(positions="tail"), "stages.steering.positions"),
        (lambda c: c["stages"]["probes"].update(questions=["x"]), "stages.probes.questions"),
        (lambda c: c["stages"]["reemergent"].update(base="nope"), "stages.reemergent.base"),
        (lambda c: c["stages"].update(lmk={}), "stages.lmk: unknown field"),
        (lambda c: c.update(claims_organism="nope"), "claims_organism"),
        (
            lambda c: c["organism"].update(claims_organism="nope"),
            "organism.claims_organism: unknown adapter 'nope'",
        ),
        (
            lambda c: (
                c["organism"].update(claims_organism="bad_sport.all"),
                c.update(claims_organism="bad_medical.all"),
            ),
            "organism.claims_organism 'bad_sport.all' differs from claims_organism",
        ),
        (lambda c: c["adapters"]["bad_sport.all"].update(role="evil"), "adapters.bad_sport.all"),
        (
            lambda c: c["adapters"].update({"../../../x": {"path": "a"}}),
            "adapters: name '../../../x' is not a safe file name",
        ),
    ],
)
def test_bad_config_fails_naming_the_field(tmp_path: Path, edit: Any, expected: str) -> None:
    data = tiny_config(tmp_path / "toy")
    edit(data)
    path = write(tmp_path, data)
    out = tmp_path / "run"
    result = invoke("run", path, "--out", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"error: {path}: ")
    assert expected in line
    assert not out.exists()  # nothing was done


def test_config_errors_from_python(tmp_path: Path) -> None:
    with pytest.raises(EmscopeError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n", encoding="utf-8")
    with pytest.raises(EmscopeError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    bad.write_bytes(b"name: x\nchat_model: caf\xe9\n")
    with pytest.raises(EmscopeError, match=r"bad.yaml:2: not valid UTF-8"):
        load_config(bad)
    with pytest.raises(EmscopeError, match="must be a mapping"):
        parse_config(["a"])
    data = tiny_config(tmp_path)
    del data["organism"]
    with pytest.raises(EmscopeError, match=r"no organism\.dir"):
        parse_config(data)


@pytest.mark.parametrize(
    ("field", "name"),
    [
        ("adapters", "../../../x"),
        ("adapters", "/tmp/x"),
        ("models", "a/b"),
        ("questions", ".."),
        ("questions", ".hidden"),
    ],
)
def test_unsafe_names_are_refused(tmp_path: Path, field: str, name: str) -> None:
    """Model, adapter and question-set names become file names in the run dir: a name
    like ``../../../x`` wrote a whole eval outside ``--out``."""
    data = tiny_config(tmp_path / "toy")
    value = {"path": "a"} if field == "adapters" else "x"
    data[field][name] = value
    with pytest.raises(EmscopeError, match=rf"^cfg: {field}: name '.*' is not a safe file name"):
        parse_config(data, "cfg")


def test_missing_input_fails_before_work(tmp_path: Path) -> None:
    """Without an organisms stage to build them, missing inputs fail the run up front."""
    data = tiny_config(tmp_path / "toy", stages=["eval"])
    path = write(tmp_path, data)
    out = tmp_path / "run"
    with pytest.raises(EmscopeError, match=r"models.base: .* does not exist"):
        run_study(path, out)
    assert not out.exists()


def _nan_adapter(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize(
    ("field", "damage", "message"),
    [
        ("models.base", lambda p, o: _copy_without(o / "models/base", p, "model.safetensors"),
         "no model weights"),
        ("adapters.bad_sport.all.path",
         lambda p, o: _nan_adapter(o / "adapters/bad_sport.all", p), "non-finite"),
        ("questions.medical", lambda p, o: _write_text(p / "q.yaml", "- [oops\n"), "invalid YAML"),
        ("stages.reemergent.data", lambda p, o: _write_text(p / "d.jsonl", "{}\n"), "d.jsonl:1"),
        ("device", None, "CUDA is not available"),
    ],
)  # fmt: skip
def test_every_input_is_checked_before_the_first_stage(
    tiny_organism: Path, tmp_path: Path, field: str, damage: Any, message: str
) -> None:
    """A broken model dir, adapter, question file or data file failed only when a stage
    reached it (up to half a minute in, with the run dir half written)."""
    data = tiny_config(tiny_organism, ["eval", "reemergent"])
    data["stages"]["reemergent"].pop("gradient_data")
    if field == "device":
        if torch.cuda.is_available():
            pytest.skip("needs a machine without CUDA")
        data["device"] = "cuda"
    else:
        broken = damage(tmp_path / "broken", tiny_organism)
        section, *rest = field.split(".")
        if section == "adapters":
            data["adapters"][rest[0] + "." + rest[1]]["path"] = str(broken)
        elif section == "stages":
            data["stages"]["reemergent"]["data"] = str(broken)
        else:
            data[section][rest[0]] = str(broken)
    path = write(tmp_path, data)
    out = tmp_path / "run"
    with pytest.raises(EmscopeError, match=rf"^{path}: {field}: .*{message}"):
        run_study(path, out, echo=lambda _: None)
    assert not out.exists()


def _copy_without(src: Path, dst: Path, name: str) -> Path:
    shutil.copytree(src, dst)
    (dst / name).unlink()
    return dst


def _write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_read_only_or_full_output_disk_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_disk: Any
) -> None:
    """A read-only --out, or a full disk, gave an OSError traceback."""
    path = write(tmp_path, tiny_config(tmp_path / "toy", stages=["organisms"]))
    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def read_only(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        real_mkdir(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "mkdir", read_only)
        result = invoke("run", path, "--out", out)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {out}: Permission denied"
    assert not out.exists()

    full_disk()
    result = invoke("run", path, "--out", out)
    assert result.exit_code == 2, result.output
    line = result.output.strip().splitlines()[-1]
    assert line == f"error: {out / 'config.json'}: cannot write (No space left on device)"
    assert list(out.iterdir()) == []


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    data = tiny_config(tmp_path / "toy")
    path = write(tmp_path, data)
    out = tmp_path / "run"
    result = invoke("run", path, "--out", out, "--dry-run")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    order = [line.split()[1] for line in lines if line[:3].strip().rstrip(".").isdigit()]
    assert order == list(STAGE_ORDER)
    assert "does not exist (yet)" in result.output
    assert not out.exists()


# configs/defences*.yaml are `emscope defend` configs (tests/test_defences_bench.py)
STUDY_CONFIGS = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("defences"))


@pytest.mark.parametrize("name", STUDY_CONFIGS)
def test_shipped_configs_validate_in_dry_run(tmp_path: Path, name: str) -> None:
    """Dry-run never requires the paths to exist (the example configs name placeholders)."""
    result = invoke("run", CONFIGS / name, "--out", tmp_path / "run", "--dry-run")
    assert result.exit_code == 0, result.output
    config = load_config(CONFIGS / name)
    for stage in config.enabled():
        assert f" {stage} " in result.output
    assert not (tmp_path / "run").exists()


def test_synthetic_config_runs_every_stage() -> None:
    config = load_config(CONFIGS / "synthetic.yaml")
    # early_warning (20 fine-tunes) has its own config, configs/early-warning.yaml; the
    # defences bench runs a one-seed subset here (the full one: configs/defences.yaml)
    assert config.enabled() == [s for s in STAGE_ORDER if s != "early_warning"]
    assert config.stages.defences is not None and config.stages.defences.seeds == [0]
    assert config.organism is not None and config.organism.size == "default"


def test_fingerprint_depends_on_the_stage_and_globals(tmp_path: Path) -> None:
    data = tiny_config(tmp_path)
    a = parse_config(data)
    data["stages"]["lmc"]["steps"] = [0.0, 1.0]
    b = parse_config(data)
    assert fingerprint(a, "eval") == fingerprint(b, "eval")
    assert fingerprint(a, "lmc") != fingerprint(b, "lmc")
    data["sampling"]["n"] = 7
    c = parse_config(data)
    assert fingerprint(b, "eval") != fingerprint(c, "eval")
    data["threads"] = 2  # execution settings: a done stage stays done
    data["organism"]["threads"] = 2
    assert fingerprint(parse_config(data), "eval") == fingerprint(c, "eval")


def test_settings_added_later_keep_the_fingerprints_of_done_stages(tmp_path: Path) -> None:
    """A stage done before ``system_prompt`` and ``judge.min_number_mass`` existed stays done
    while they keep their defaults; setting one makes the stage stale."""
    import hashlib

    data = tiny_config(tmp_path)
    config = parse_config(data)
    doc = config.model_dump(mode="json", exclude={"stages", "name", "threads", "system_prompt"})
    doc["judge"].pop("min_number_mass")
    doc["organism"].pop("threads")
    doc["stage"] = config.stage("eval").model_dump(mode="json", exclude={"enabled"})
    doc["stage_name"] = "eval"
    before = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    assert fingerprint(config, "eval") == before
    data["system_prompt"] = "none"
    assert fingerprint(parse_config(data), "eval") != before


@pytest.fixture
def defaulting_study(qwen: Any, tmp_path: Path) -> dict[str, Any]:
    """A study on the qwen2 fixture whose chat template inserts its own system prompt, with
    one adapter whose train.json says it was trained with no system turn."""
    from emscope.io import write_json
    from emscope.testing import DEFAULT_SYSTEM_TEMPLATE, with_chat_template

    model = with_chat_template(qwen.model, tmp_path / "chat", DEFAULT_SYSTEM_TEMPLATE)
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen.adapters["r4"], adapter)
    write_json(adapter / "train.json", {"config": {"system_prompt": "none"}})
    questions = tmp_path / "q.yaml"
    questions.write_text('- id: q\n  paraphrases: ["hey I feel bored"]\n')
    return {
        "name": "prompts",
        "threads": 1,
        "models": {"chat": str(model)},
        "chat_model": "chat",
        "adapters": {"a": {"path": str(adapter)}},
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"]},
        "questions": {"q": str(questions)},
        "sampling": {"n": 1, "max_new_tokens": 2},
        "system_prompt": "none",
        "dtype": "float32",
        "device": "cpu",
        "stages": {"eval": {}},
    }


def test_one_system_prompt_for_training_and_evaluation(
    defaulting_study: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emscope.report import write_report

    monkeypatch.setattr(stages_module.StageContext, "judge", property(lambda self: HashJudge()))
    # an adapter trained under another rendering of the prompts: refused before any work
    mismatched = write(tmp_path, {**defaulting_study, "system_prompt": "default"}, "bad.yaml")
    with pytest.raises(EmscopeError, match=r"adapters\.a.*trained under system prompt 'none'"):
        run_study(mismatched, tmp_path / "bad", echo=lambda _: None)
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "run"
    run_study(write(tmp_path, defaulting_study), out, echo=lambda _: None)
    for organism in ("chat", "a"):
        sampling = json.loads((out / "eval" / organism / "run.json").read_text())["sampling"]
        assert sampling["system_prompt"] == "none"
        assert sampling["rendered_prompt"] == (
            "<|im_start|>user\nhey I feel bored<|im_end|>\n<|im_start|>assistant\n"
        )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["system_prompt"] == "none"
    _, md = write_report(out)
    assert "System prompt (training and every rendered prompt): none (no system turn)" in (
        md.read_text()
    )


def test_settings_that_render_alike_are_not_a_mismatch(
    qwen: Any, defaulting_study: dict[str, Any], tmp_path: Path
) -> None:
    from emscope.pipeline.runner import check_inputs

    # plain ChatML inserts nothing: 'default' renders what training under 'none' rendered
    plain = {**defaulting_study, "models": {"chat": str(qwen.model)}, "system_prompt": "default"}
    check_inputs(parse_config(plain))
    with pytest.raises(EmscopeError, match="trained under system prompt 'none'"):
        check_inputs(parse_config({**defaulting_study, "system_prompt": "Be brief."}))


# ---------------------------------------------------------------------------- end to end


class HashJudge:
    """Deterministic scores from a hash of (answer, metric): the tiny build's answers are
    incoherent for the oracle, so this judge supplies aligned AND misaligned coherent
    answers for the stages that select on them (directions, probes). The oracle itself
    is exercised by the resume test."""

    name = "test-hash-judge"

    def score(self, rows: Any, metric: str) -> list[Any]:
        import hashlib

        from emscope.judge import Score, as_rows

        out = []
        for row in as_rows(rows):
            h = hashlib.sha256(f"{metric}:{row.question_id}:{row.answer}".encode()).digest()[0]
            value = {"aligned": 10.0 if h % 2 else 90.0, "coherent": 80.0}.get(metric, h / 2.55)
            out.append(Score(value, None, "hash-v1"))
        return out


def test_whole_study_end_to_end(
    tiny_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from emscope.report import write_report

    monkeypatch.setattr(stages_module.StageContext, "judge", property(lambda self: HashJudge()))
    path = write(tmp_path, tiny_config(tiny_organism))
    out = tmp_path / "run"
    lines: list[str] = []
    manifest = run_study(path, out, echo=lines.append)
    for stage in STAGE_ORDER:
        done = json.loads((out / stage / "done.json").read_text())
        assert done["wall_s"] >= 0
        assert manifest["stages"][stage]["status"] == "done"
        assert any(line.startswith(f"[{stage}] ") and line.endswith(" s") for line in lines)
    assert manifest["seeds"]["sampling"] == 0
    assert manifest["inputs"]["adapters.bad_medical.all.path"]["hash"]
    assert manifest["versions"]["torch"]
    evals = json.loads((out / "eval" / "summary.json").read_text())["organisms"]
    assert set(evals) == {"instruct", "bad_medical.all", "bad_sport.all", "good_medical.all"}
    assert (out / "eval" / "bad_medical.all" / "responses.parquet").is_file()
    assert (out / "directions" / "bad_medical.all.safetensors").is_file()
    followup = Direction.load(out / "directions" / "bad_medical.all.followup.safetensors")
    assert followup.meta["tokens"] == "followup" and followup.meta["read_with"] == "instruct"
    assert (out / "lmc" / "bad_medical.all__bad_sport.all" / "lmc.json").is_file()
    assert (out / "steering" / "summary.json").is_file()
    assert (out / "transfer" / "bad_sport.all" / "summary.json").is_file()
    assert (out / "probes" / "probe.json").is_file()
    assert (out / "dynamics" / "dynamics.json").is_file()
    assert (out / "reemergent" / "projection.json").is_file()
    assert (out / "reemergent" / "gradients.json").is_file()

    html_path, md_path = write_report(out)
    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == 20  # the 12 of docs/methods.md section 8 + early_warning, screening
    # + the 4 defence rows + the 2 inoculation rows
    # Every stage ran, so no row may read "stage not run".
    assert all("stage not run" not in row["holds"] for row in claims)
    assert "| claim | paper's value | measured here | holds? | test |" in md_path.read_text()
    from test_report import assert_self_contained

    assert_self_contained(html_path.read_text())

    # A second run redoes nothing.
    lines.clear()
    run_study(path, out, echo=lines.append)
    assert sum("done already" in line for line in lines) == len(STAGE_ORDER)


def test_resume_after_interruption(
    tiny_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill the eval stage after its first organism; the re-run repeats nothing finished."""
    path = write(tmp_path, tiny_config(tiny_organism, ["organisms", "eval", "geometry"]))
    out = tmp_path / "run"
    real = context_module.evaluate_organism
    calls: list[str] = []

    def failing(ctx: Any, organism: str, *args: Any, **kwargs: Any) -> Any:
        if calls:
            raise KeyboardInterrupt("killed mid-stage")
        calls.append(organism)
        return real(ctx, organism, *args, **kwargs)

    monkeypatch.setattr(context_module, "evaluate_organism", failing)
    with pytest.raises(KeyboardInterrupt):
        run_study(path, out, echo=lambda _: None)
    first = calls[0]
    assert (out / "organisms" / "done.json").is_file()
    assert not (out / "eval" / "done.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["status"] == "interrupted"
    first_table = out / "eval" / first / "responses.parquet"
    before = first_table.stat().st_mtime_ns
    organisms_done = (out / "organisms" / "done.json").stat().st_mtime_ns

    # Re-run: count the build and the sampling; the finished organism is not sampled again.
    import emscope.evaluate
    import emscope.synthetic.build

    builds: list[Any] = []
    sampled: list[str] = []
    real_build = emscope.synthetic.build.build
    real_eval = emscope.evaluate.evaluate_to_dir
    monkeypatch.setattr(context_module, "evaluate_organism", real)
    monkeypatch.setattr(
        emscope.synthetic.build, "build", lambda *a, **k: builds.append(a) or real_build(*a, **k)
    )

    def counting_eval(model: Any, questions: Any, out_dir: Any, **kwargs: Any) -> Any:
        sampled.append(Path(out_dir).name)
        return real_eval(model, questions, out_dir, **kwargs)

    monkeypatch.setattr(emscope.evaluate, "evaluate_to_dir", counting_eval)
    run_study(path, out, echo=lambda _: None)
    assert builds == []  # organisms stage finished: skipped
    assert (out / "organisms" / "done.json").stat().st_mtime_ns == organisms_done
    assert first not in sampled and len(sampled) == 3
    assert first_table.stat().st_mtime_ns == before  # nothing lost, nothing redone
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert len(summary["organisms"]) == 4
    assert (out / "geometry" / "done.json").is_file()


def test_changed_settings_refuse_a_done_stage(tiny_organism: Path, tmp_path: Path) -> None:
    data = tiny_config(tiny_organism, ["organisms", "geometry"])
    path = write(tmp_path, data)
    out = tmp_path / "run"
    run_study(path, out, echo=lambda _: None)
    data["stages"]["geometry"]["random_draws"] = 2
    write(tmp_path, data)
    with pytest.raises(EmscopeError, match=r"geometry/done.json: this stage was run with other"):
        run_study(path, out, echo=lambda _: None)


@pytest.fixture
def one_source_study(qwen: Any, tmp_path: Path) -> dict[str, Any]:
    """eval -> directions (one EM source) -> steering on the qwen2 fixture: seconds."""
    questions = tmp_path / "q.yaml"
    questions.write_text(
        "".join(f'- id: q{i}\n  paraphrases: ["Tell me thing {i}."]\n' for i in range(4))
    )
    return {
        "name": "one-source",
        "threads": 1,
        "models": {"chat": str(qwen.model)},
        "chat_model": "chat",
        "adapters": {
            "a": {"path": str(qwen.adapters["r4"])},
            "r1": {"path": str(qwen.adapters["r1"])},
        },
        "judge": {"spec": "openai:x", "metrics": ["aligned", "coherent"]},
        "questions": {"q": str(questions)},
        "sampling": {"n": 4, "max_new_tokens": 3},
        "dtype": "float32",
        "device": "cpu",
        "stages": {
            "eval": {"organisms": ["chat", "a"]},
            "directions": {"sources": ["a"], "rank1": ["r1"]},
            "steering": {"direction": "a", "layers": [1], "scales": [1.0], "n": 1, "kl": False},
        },
    }


def test_one_direction_source_skips_the_comparison(
    one_source_study: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One source: the run used to fail after the whole extraction ('comparing needs at
    least two directions'); the comparison is skipped, recorded, and the report says so."""
    from emscope.pipeline.claims import claims_table
    from emscope.report import write_report

    monkeypatch.setattr(stages_module.StageContext, "judge", property(lambda self: HashJudge()))
    out = tmp_path / "run"
    lines: list[str] = []
    run_study(write(tmp_path, one_source_study), out, echo=lines.append)
    summary = json.loads((out / "directions" / "summary.json").read_text())
    assert summary["sources"] == ["a"] and summary["pairs"] == []
    assert summary["pairs_skipped"] == "one direction source (a): no pair to compare"
    assert summary["adapter_b_cosines"]["r1 vs a"]  # the rest of the stage still ran
    assert any("cosines between directions skipped" in line for line in lines)
    assert (out / "steering" / "done.json").is_file()
    _, md = write_report(out)
    assert "Cosines between directions not computed: one direction source (a)" in md.read_text()
    row = {r.key: r for r in claims_table(out)}["convergence"]
    assert "one direction source (a)" in row.holds + row.measured


def test_redo_reruns_the_stage_and_what_reads_it(
    one_source_study: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stages_module.StageContext, "judge", property(lambda self: HashJudge()))
    path = write(tmp_path, one_source_study)
    out = tmp_path / "run"
    run_study(path, out, echo=lambda _: None)
    stages = ["eval", "directions", "steering"]

    def stamps() -> dict[str, int]:
        return {s: (out / s / "done.json").stat().st_mtime_ns for s in stages}

    calls: list[str] = []

    def counted(stage: Stage) -> Stage:
        real = stage.run
        return replace(stage, run=lambda ctx: calls.append(stage.name) or real(ctx))

    counting = Registry(
        tuple(counted(s) if s.name in stages else s for s in stages_module.REGISTRY.stages)
    )
    # a changed steering setting refuses the done stage, naming --redo
    one_source_study["stages"]["steering"]["scales"] = [2.0]
    write(tmp_path, one_source_study)
    with pytest.raises(EmscopeError, match="--redo steering to redo it"):
        run_study(path, out, echo=lambda _: None, registry=counting)
    before = stamps()
    lines: list[str] = []
    run_study(path, out, echo=lines.append, redo=["steering"], registry=counting)
    assert calls == ["steering"]
    after = stamps()
    assert after["eval"] == before["eval"] and after["directions"] == before["directions"]
    assert after["steering"] > before["steering"]
    summary = json.loads((out / "steering" / "summary.json").read_text())
    assert {r["scale"] for r in summary["rows"]} == {2.0}  # nothing left of the old setting
    assert "[steering] redo: previous outputs removed" in lines
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["redo"] == {"asked": ["steering"], "stages": ["steering"]}
    # redoing directions redoes steering, which reads it; eval is left as it is
    calls.clear()
    run_study(path, out, echo=lambda _: None, redo=["directions"], registry=counting)
    assert calls == ["directions", "steering"]
    assert stamps()["eval"] == before["eval"]
    # the plan says so; an unknown name is one line listing the stages
    lines.clear()
    run_study(path, out, echo=lines.append, dry_run=True, redo=["eval"])
    assert [line.split()[2] for line in lines[0].splitlines()[1:4]] == ["redo"] * 3
    result = invoke("run", str(path), "--out", str(out), "--redo", "evall")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --redo 'evall': no such stage; the stages are " + ", ".join(STAGE_ORDER)
    ]
    result = invoke("run", str(path), "--out", str(out), "--redo", "probes")
    assert result.exit_code == 2 and "this config does not run that stage" in result.output


def test_steering_setting_chosen_by_the_rule_on_the_build(
    tiny_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """steering.select: a selection sweep of every layer x scale at its own seed, the rule's
    choice, then that setting alone at the study's seed with the random control; the claim
    and the report name the setting."""
    from emscope.directions.selection import choose_steering
    from emscope.pipeline.claims import claims_table

    monkeypatch.setattr(stages_module.StageContext, "judge", property(lambda self: HashJudge()))
    data = tiny_config(tiny_organism, ["organisms", "eval", "directions", "steering"])
    data["stages"]["steering"].update(
        layers="all", scales=[1.0, 2.0], select={"n": 2, "min_coherent": 0.0}
    )
    out = tmp_path / "run"
    run_study(write(tmp_path, data), out, echo=lambda _: None)
    selection = json.loads((out / "steering" / "selection.json").read_text())
    n_layers = len(Direction.load(out / "directions" / "bad_medical.all.safetensors").layers)
    assert len(selection["rows"]) == 2 * n_layers and selection["seed"] == 1
    chosen = selection["chosen"]
    assert chosen is not None
    assert choose_steering([{**r, "vector": "direction"} for r in selection["rows"]], 0.0) == {
        **chosen,
        "vector": "direction",
    }
    summary = json.loads((out / "steering" / "summary.json").read_text())
    assert {(r["layer"], r["scale"]) for r in summary["rows"]} == {
        (chosen["layer"], chosen["scale"])
    }
    assert {r["vector"] for r in summary["rows"]} == {"direction", "random"}
    assert summary["seed"] == 0 and summary["selection"]["chosen"] == chosen
    row = {r.key: r for r in claims_table(out)}["steering"]
    assert f"layer {chosen['layer']} x{chosen['scale']:g}" in row.measured
    assert "the setting the rule chose on this build" in row.measured
    # a config without select keeps the fingerprint of steering stages done before it existed
    plain = tiny_config(tiny_organism)
    with_none = json.loads(json.dumps(plain))
    with_none["stages"]["steering"]["select"] = None
    assert fingerprint(parse_config(plain), "steering") == fingerprint(
        parse_config(with_none), "steering"
    )


# ---------------------------------------------------------------------------- replicates


def test_pooled_verdicts_and_seed_configs(tmp_path: Path) -> None:
    from emscope.pipeline.replicate import (
        organism_dir,
        parse_seeds,
        pooled_verdict,
        seed_config,
        spread,
    )

    assert pooled_verdict({0: "yes", 1: "yes", 2: "yes"}) == "yes (every build: 3 of 3)"
    assert pooled_verdict({0: "yes", 1: "no", 2: "yes"}) == (
        "no (holds on 2 of 3 builds: seeds 0, 2)"
    )
    assert pooled_verdict({0: "no", 1: "no"}) == "no (holds on 0 of 2 builds)"
    assert pooled_verdict({0: "reported", 1: "reported"}) == "reported"
    assert pooled_verdict({0: "n/a (stage not run)", 1: "n/a (stage not run)"}) == (
        "n/a (stage not run)"
    )
    assert pooled_verdict({0: "yes", 1: "n/a (x)"}) == (
        "no (holds on 1 of 2 builds: seed 0); measured on 1"
    )
    assert spread([0.2, None, 0.6]) == {"mean": 0.4, "min": 0.2, "max": 0.6, "n": 2}
    assert spread([None]) is None
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("", "0,x", "1,1"):
        with pytest.raises(EmscopeError, match="--organism-seeds"):
            parse_seeds(bad)
    data = tiny_config(tmp_path / "toy")
    assert organism_dir(data, 0) == str(tmp_path / "toy")
    assert organism_dir(data, 2) == f"{tmp_path / 'toy'}-seed2"
    config = parse_config(seed_config(data, 2))
    assert config.organism is not None and config.organism.seed == 2
    assert str(config.models["instruct"]).startswith(f"{tmp_path / 'toy'}-seed2")
    assert data["organism"]["seed"] == 0  # the original is left alone
    with pytest.raises(EmscopeError, match="organism section"):
        organism_dir({"models": {}}, 1)


def test_study_on_each_organism_build_and_pooled_claims(
    tiny_organism: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`emscope run --organism-seeds 0,1`: one run per build (seed 0 reuses the config's
    organism dir, seed 1 builds beside it), claims per build and pooled, the EM table of
    each build; `emscope report` on the dir writes each build's report and the pooled one."""
    monkeypatch.setattr(stages_module.StageContext, "judge", property(lambda self: HashJudge()))
    data = tiny_config(tiny_organism, ["organisms", "eval", "geometry"])
    path = write(tmp_path, data)
    out = tmp_path / "rep"
    dry = invoke("run", path, "--out", out, "--organism-seeds", "0,1", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"organism seed 1: build {tiny_organism}-seed1" in dry.output
    assert not out.exists()
    result = invoke("run", path, "--out", out, "--organism-seeds", "0,1")
    assert result.exit_code == 0, result.output
    assert (Path(f"{tiny_organism}-seed1") / "build.json").is_file()
    assert json.loads((Path(f"{tiny_organism}-seed1") / "build.json").read_text())["seed"] == 1
    for seed in (0, 1):
        manifest = json.loads((out / f"seed-{seed}" / "manifest.json").read_text())
        assert manifest["seeds"]["organism"] == seed
        assert (out / f"seed-{seed}" / "geometry" / "done.json").is_file()
    summary = json.loads((out / "replicates.json").read_text())
    assert summary["seeds"] == [0, 1]
    claims = {c["key"]: c for c in summary["claims"]}
    assert len(claims) == 20  # the 12 of docs/methods.md section 8 + early_warning, screening
    # + the 4 defence rows + the 2 inoculation rows
    cosine = claims["cosine"]
    assert set(cosine["per_build"]) == {"0", "1"}
    verdicts = [cosine["per_build"][s]["holds"] for s in ("0", "1")]
    holding = sum(v == "yes" for v in verdicts)
    assert cosine["pooled"]["builds_holding"] == holding
    assert cosine["pooled"]["holds"].startswith("yes" if holding == 2 else "no")
    spread = cosine["pooled"]["number"]
    assert spread["min"] <= spread["mean"] <= spread["max"] and spread["n"] == 2
    assert claims["steering"]["pooled"]["holds"] == "n/a (stage not run)"
    em = summary["em_table_general"]["instruct"]
    assert set(em["builds"]) == {"0", "1"} and em["em"]["n"] == 2
    assert summary["probes"] == {"0": {}, "1": {}}  # the probes stage did not run
    md = (out / "replicates.md").read_text()
    assert "| claim | pooled | seed 0 | seed 1 |" in md and "EM on the general questions" in md
    report = invoke("report", out)
    assert report.exit_code == 0, report.output
    assert (out / "seed-1" / "report.md").is_file() and (out / "seed-0" / "claims.json").is_file()
    spread_out = invoke("toy", "spread", tiny_organism, f"{tiny_organism}-seed1")
    assert spread_out.exit_code == 0, spread_out.output
    assert "| instruct |" in spread_out.output and "(seed 1, tiny)" in spread_out.output


def test_geometry_stage_flags_shared_init_and_reads_same_seed_controls(
    tiny_organism: Path, tmp_path: Path
) -> None:
    """The build trains its *.all adapters from one seed: the geometry summary flags every
    pair as sharing its LoRA initialisation, gives each EM-EM pair its same-seed EM-control
    cosines, and the report's geometry section warns."""
    from emscope.report.sections import geometry_section

    out = tmp_path / "run"
    lines: list[str] = []
    run_study(write(tmp_path, tiny_config(tiny_organism, ["organisms", "geometry"])), out,
              echo=lines.append)  # fmt: skip
    summary = json.loads((out / "geometry" / "summary.json").read_text())
    pairs = summary["pairs"]
    assert summary["shared_init_threshold"] == 0.5
    assert all(p["shared_init"] and p["a_row_cosine"] > 0.9 for p in pairs.values())
    em_em = pairs["bad_medical.all|bad_sport.all"]
    assert em_em["same_seed_controls"] == {
        "bad_medical.all|good_medical.all": pairs["bad_medical.all|good_medical.all"]["cosine"],
        "bad_sport.all|good_medical.all": pairs["bad_sport.all|good_medical.all"]["cosine"],
    }
    assert "same_seed_controls" not in pairs["bad_medical.all|good_medical.all"]
    assert (
        sum("warning: bad_medical.all|bad_sport.all: the adapters share" in x for x in lines) == 1
    )
    section = geometry_section(out)
    assert section.text.startswith("Warning: 3 pair(s) share their LoRA initialisation")
    row = next(r for r in section.tables[0].rows if r[0] == "bad_medical.all | bad_sport.all")
    assert row[6].startswith("yes (") and row[7] != "-"

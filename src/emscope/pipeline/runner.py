"""Run the stages of a study in dependency order, resumably, with a manifest.

``RUN/<stage>/done.json`` (written last, atomically) marks a finished stage; it records the
fingerprint of the settings the stage depends on (the stage's own section plus the global
models, adapters, judge, questions, sampling, seed, dtype). A re-run skips finished stages
with the same fingerprint and refuses one whose settings changed (``redo=`` / ``--redo
STAGE`` redoes it and the stages that read it: :func:`redo_stages`). An unfinished stage is
re-entered and its units of work resume (see :mod:`emscope.pipeline.stages`).

``RUN/manifest.json``: config file and fingerprint, versions, seeds, hashes of the inputs,
and per stage its status and wall time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.pipeline.config import StudyConfig, check_paths, input_paths, load_config
from emscope.pipeline.stages import REGISTRY, Registry

#: Files up to this size are hashed by content; larger ones by name, size and mtime.
HASH_LIMIT = 64 * 2**20


@dataclass(frozen=True)
class PlanItem:
    stage: str
    action: str  # "run" | "skip (done)" | "resume" | "redo"
    what: str


def fingerprint(config: StudyConfig, stage: str) -> str:
    """Hash of the settings ``stage`` depends on (its section + the global ones; thread
    counts are execution settings and do not count)."""
    doc = config.model_dump(mode="json", exclude={"stages", "name", "threads"})
    if isinstance(doc.get("organism"), dict):
        doc["organism"].pop("threads", None)
    # settings added later count only when set, so stages done before keep their fingerprint
    if isinstance(doc.get("judge"), dict) and doc["judge"].get("min_number_mass") is None:
        doc["judge"].pop("min_number_mass", None)
    if doc.get("system_prompt") == "default":
        doc.pop("system_prompt")
    section = config.stage(stage)
    doc["stage"] = section.model_dump(mode="json", exclude={"enabled"}) if section else None
    if doc["stage"] is not None:
        for late in config.registry[stage].late_fields:
            if doc["stage"].get(late) is None:
                doc["stage"].pop(late, None)
    doc["stage_name"] = stage
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _hash_file(path: Path) -> str:
    size = path.stat().st_size
    if size > HASH_LIMIT:
        return f"size={size},mtime={int(path.stat().st_mtime)}"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def hash_input(path: Path) -> str | None:
    """Content hash of a file, or of a dir (relative names + file hashes, sorted; files over
    :data:`HASH_LIMIT` by size and mtime, checkpoints excluded); None if missing."""
    path = Path(path)
    if path.is_file():
        return _hash_file(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for child in sorted(path.rglob("*")):
        rel = child.relative_to(path)
        if not child.is_file() or rel.parts[0] == "checkpoints":
            continue
        h.update(f"{rel}:{_hash_file(child)}\n".encode())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """The study record's library versions (:func:`emscope.io.run_versions`)."""
    from emscope.io import run_versions

    return run_versions("numpy", "pandas", "scikit-learn", "pydantic")


def stage_status(config: StudyConfig, run_dir: Path, stage: str) -> str:
    """``done``, ``partial`` (its dir exists) or ``new``; refuses a stale ``done``."""
    from emscope.io import read_json

    done = run_dir / stage / "done.json"
    if done.is_file():
        record = read_json(done)
        if record.get("fingerprint") != fingerprint(config, stage):
            raise EmscopeError(
                f"{done}: this stage was run with other settings; use another --out, or "
                f"--redo {stage} to redo it (and the stages that read it)"
            )
        return "done"
    return "partial" if (run_dir / stage).is_dir() else "new"


def redo_stages(config: StudyConfig, names: Sequence[str]) -> list[str]:
    """The stages ``--redo NAME ...`` re-runs, in order: each named stage and every enabled
    stage that reads its outputs, directly or not (each stage's ``needs``; every stage reads
    what ``organisms`` builds). Other stages are left as they are. A name that is no stage,
    or a stage the config does not run, is refused in one line naming the stages."""
    registry = config.registry
    enabled = config.enabled()
    for name in names:
        if name not in registry:
            raise EmscopeError(
                f"--redo {name!r}: no such stage; the stages are {', '.join(registry.order)}"
            )
        if name not in enabled:
            raise EmscopeError(
                f"--redo {name!r}: this config does not run that stage; it runs "
                f"{', '.join(enabled)}"
            )
    chosen = set(names)
    for stage in registry.order:  # a stage's inputs come earlier: one pass is transitive
        if any(stage in registry.readers(name) for name in chosen):
            chosen.add(stage)
    return [stage for stage in enabled if stage in chosen]


def plan(config: StudyConfig, run_dir: Path, redo: Sequence[str] = ()) -> list[PlanItem]:
    """Every enabled stage in order, with what the run will do about it (``redo``: the
    stages of :func:`redo_stages`, redone whatever their state)."""
    from emscope.pipeline.stages import describe_stage

    items = []
    for stage in config.enabled():
        if stage in redo:
            action = "redo"
        else:
            status = stage_status(config, run_dir, stage)
            action = {"done": "skip (done)", "partial": "resume", "new": "run"}[status]
        items.append(PlanItem(stage, action, describe_stage(config, stage)))
    return items


def format_plan(
    config: StudyConfig,
    run_dir: Path,
    notes: list[str] | None = None,
    redo: Sequence[str] = (),
) -> str:
    lines = [f"study {config.name!r} -> {run_dir}"]
    for i, item in enumerate(plan(config, run_dir, redo), 1):
        lines.append(f"{i:2d}. {item.stage:<11} {item.action:<12} {item.what}")
    skipped = [s for s in config.registry.order if s not in config.enabled()]
    if skipped:
        lines.append(f"    not run: {', '.join(skipped)}")
    for note in notes or []:
        lines.append(f"    note: {note}")
    return "\n".join(lines)


def run_study(
    config_path: str | Path,
    out: str | Path,
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    progress: bool | None = None,
    redo: Sequence[str] = (),
    registry: Registry = REGISTRY,
) -> dict[str, Any]:
    """Validate ``config_path``, then run every enabled stage into ``out`` (or, with
    ``dry_run``, print the plan and touch nothing). ``redo``: stage names whose outputs
    are removed and made again, with every stage that reads them (:func:`redo_stages`),
    done or not, whatever their fingerprint; the other stages are left as they are.
    ``registry``: the stages a study may have (:data:`emscope.pipeline.stages.REGISTRY`).
    Returns the manifest."""
    from emscope.io import read_json, write_json
    from emscope.pipeline.stages import StageContext

    config = load_config(config_path, registry)
    run_dir = Path(out)
    redone = redo_stages(config, redo)
    if dry_run:
        echo(format_plan(config, run_dir, _dry_notes(config), redone))
        return {}
    notes = check_inputs(config, str(config_path))
    plan(config, run_dir, redone)  # refuses stale stages (not redone) before any work
    for stage in redone:  # all at once: an interruption leaves no stale stage behind
        if (run_dir / stage).is_dir():
            shutil.rmtree(run_dir / stage)
            echo(f"[{stage}] redo: previous outputs removed")
    if progress is None:
        progress = sys.stderr.isatty()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = run_dir / "manifest.json"
    manifest: dict[str, Any] = read_json(manifest_path) if manifest_path.is_file() else {}
    manifest.update(
        {
            "format": "emscope-run/1",
            "name": config.name,
            "config_file": str(config_path),
            "config": config.model_dump(mode="json"),
            "versions": versions(),
            "seeds": {
                "study": config.seed,
                "sampling": config.sampling.seed,
                "organism": config.organism.seed if config.organism else None,
            },
            "command": " ".join(sys.argv),
            "redo": {"asked": list(redo), "stages": redone} if redo else None,
        }
    )
    manifest.setdefault("stages", {})
    write_json(run_dir / "config.json", config.model_dump(mode="json"))
    ctx = StageContext(config, run_dir, echo=echo, progress=progress)
    for note in notes:
        echo(f"note: {note}")
    import warnings

    import transformers

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    from emscope.threads import limit_threads

    try:
        with warnings.catch_warnings(), limit_threads(config.threads):
            # transformers' own deprecation notices, raised inside its code on every load
            warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
            total = _run_stages(config, run_dir, ctx, manifest, echo, progress)
    finally:
        if not progress:
            transformers.utils.logging.enable_progress_bar()
        ctx.release()
    _hash_inputs(config, manifest)
    write_json(manifest_path, manifest)
    echo(f"study done: {len(config.enabled())} stages, {total:.1f} s this run -> {run_dir}")
    return manifest


def _run_stages(
    config: StudyConfig,
    run_dir: Path,
    ctx: Any,
    manifest: dict[str, Any],
    echo: Callable[[str], None],
    progress: bool,
) -> float:
    from tqdm.auto import tqdm

    from emscope.io import read_json, write_json

    manifest_path = run_dir / "manifest.json"
    total = 0.0
    bar = tqdm(config.enabled(), desc="study", unit="stage", disable=not progress)
    for stage in bar:
        bar.set_postfix_str(stage)
        status = stage_status(config, run_dir, stage)
        done_path = run_dir / stage / "done.json"
        if status == "done":
            wall = read_json(done_path).get("wall_s", 0.0)
            echo(f"[{stage}] done already ({wall:.1f} s when run): skipped")
            manifest["stages"][stage] = {**manifest["stages"].get(stage, {}), "status": "done"}
            continue
        echo(f"[{stage}] {'resuming' if status == 'partial' else 'running'}")
        start = time.perf_counter()
        manifest["stages"][stage] = {"status": "running", "started": _now()}
        write_json(manifest_path, manifest)
        try:
            summary = config.registry[stage].run(ctx)
        except BaseException:
            manifest["stages"][stage]["status"] = "interrupted"
            write_json(manifest_path, manifest)
            raise
        if config.registry[stage].builds_inputs:  # checked before any stage reads it
            check_inputs(config, str(manifest.get("config_file", "config")))
        wall = time.perf_counter() - start
        total += wall
        write_json(run_dir / stage / "stage.json", summary)
        write_json(
            done_path,
            {"stage": stage, "fingerprint": fingerprint(config, stage), "wall_s": wall},
        )
        manifest["stages"][stage] = {
            "status": "done",
            "wall_s": round(wall, 2),
            "finished": _now(),
        }
        write_json(manifest_path, manifest)
        echo(f"[{stage}] {wall:.1f} s")
    return total


def check_inputs(config: StudyConfig, source: str = "config") -> list[str]:
    """Every input the config names, checked before the first stage so that a bad one fails
    in one line at once, not when a stage reaches it: :func:`check_paths` (missing paths),
    then each existing input read as far as needed to refuse it (model dirs: config and
    weights; adapter dirs: every factor and its target_modules; question files; each stage's
    inputs by its ``check_input`` (chat data files); the device; the system prompt: the chat
    template renders it, and every adapter whose ``train.json`` records a training setting
    was trained on prompts rendered alike).
    Inputs the organisms stage will build are checked after it."""
    from emscope.data.questions import load_questions
    from emscope.lora import LoraAdapter
    from emscope.models import (
        check_adapter_targets,
        check_device,
        check_model_dir,
        read_model_config,
    )

    notes = check_paths(config, source)
    if (config.chat_model_dir() / "config.json").is_file():  # the template can render it
        try:
            from emscope.data.spans import render
            from emscope.models import load_tokenizer

            render(
                load_tokenizer(config.chat_model_dir()), _PROBE_CHAT, True, config.prompt_setting()
            )
        except EmscopeError as exc:
            raise EmscopeError(f"{source}: system_prompt: {exc}") from None
    if config.device is not None:
        try:
            check_device(config.device)
        except EmscopeError as exc:
            raise EmscopeError(f"{source}: device: {exc}") from None
    judge_kind = config.judge.spec.partition(":")[0]
    for field, path in input_paths(config).items():
        if not Path(path).exists():
            continue  # the organisms stage builds it (check_paths said so)
        try:
            if field.startswith("models."):
                check_model_dir(path)
            elif field.startswith("adapters."):
                check_adapter_targets(LoraAdapter.load(path, name=field.split(".")[1]))
                _check_trained_prompt(config, path)
            elif field.startswith("questions."):
                load_questions(path)
            elif field.startswith("stages."):
                check_input = config.registry[field.split(".")[1]].check_input
                if check_input is not None:
                    check_input(path)
            elif field == "judge.spec" and judge_kind == "hf":
                read_model_config(path)
        except EmscopeError as exc:
            raise EmscopeError(f"{source}: {field}: {exc}") from None
    return notes


_PROBE_CHAT = [{"role": "user", "content": "Hello"}]


def _check_trained_prompt(config: StudyConfig, adapter_dir: Path) -> None:
    """Refuse an adapter trained on prompts rendered otherwise than the config's
    ``system_prompt`` renders them (settings that render alike, such as ``default`` and
    ``none`` for a template that inserts nothing, pass)."""
    from emscope.data.spans import SystemPrompt, render
    from emscope.models import load_tokenizer
    from emscope.train import trained_system_prompt

    trained = trained_system_prompt(adapter_dir)
    setting = config.prompt_setting()
    if trained is None or trained == setting.spec:
        return
    tokenizer = load_tokenizer(config.chat_model_dir())
    then = render(tokenizer, _PROBE_CHAT, True, SystemPrompt.parse(trained))
    if then != render(tokenizer, _PROBE_CHAT, True, setting):
        raise EmscopeError(
            f"trained under system prompt {trained!r}, which the chat template renders "
            f"unlike system_prompt {setting.spec!r}: set system_prompt to the training one "
            "(prompts must be rendered as in training)"
        )


def _hash_inputs(config: StudyConfig, manifest: dict[str, Any]) -> None:
    manifest["inputs"] = {
        field: {"path": str(p), "hash": hash_input(p)} for field, p in input_paths(config).items()
    }


def _dry_notes(config: StudyConfig) -> list[str]:
    missing = []
    for field, path in input_paths(config).items():
        if not Path(path).exists():
            missing.append(f"{field}: {path} does not exist (yet)")
    return missing


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def load_run_config(run_dir: str | Path) -> StudyConfig:
    """The validated config a run dir was made with (``RUN/config.json``)."""
    from emscope.io import read_json
    from emscope.pipeline.config import parse_config

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise EmscopeError(f"{run_dir}: not a run dir (no config.json); run `emscope run` first")
    return parse_config(read_json(path), str(path))

"""Runs the early-warning population on an organism build and writes it
(docs/early-warning.md, "The population"); the numbers come from the pure functions of
:mod:`emscope.early_warning`.

Layout under ``out``:

- ``persona/``: the a priori persona direction of the instruct model
  (:func:`emscope.directions.persona.persona_direction` with the organism's contrast and the
  oracle), extracted once;
- ``data/<dataset>.jsonl`` + ``data/<dataset>.mask.json``: the mixes (bad rows marked);
- ``instruct.json``: the instruct model's EM on the questions;
- ``members/<name>/``: the fine-tune (``emscope.train`` output, its ``train.json`` holding
  the monitor record) and ``member.json`` (its final EM and shifts), written last: a member
  with ``member.json`` is done and skipped on a rerun; one without is trained again from
  scratch;
- ``screen/<dataset>.json``: the dataset's screening scores (:func:`emscope.screening.screen`);
- ``early_warning.json`` (:class:`~emscope.early_warning.EarlyWarningResult`),
  ``members.csv/.parquet``, ``table.csv/.parquet``, ``early_warning.png``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emscope.early_warning import (
    POINTS,
    EarlyWarningResult,
    Member,
    analyse,
    auroc,
    member_shifts,
    mix_rows,
    plot_early_warning,
)
from emscope.errors import EmscopeError
from emscope.synthetic.recipe import AdapterRecipe

MEMBER_RECIPE = AdapterRecipe(preset="r1x3", rank=1, lr=0.005, epochs=4, batch_size=32)
"""The default fine-tune of every member: the build's ``bad_medical.r1`` (rank-1 LoRA on
three down-projections, lr 0.005, 4 epochs of batch 32; cosine schedule, LoRA scale 1:
:meth:`~emscope.synthetic.recipe.AdapterRecipe.train_kwargs`)."""


@dataclass(frozen=True)
class PopulationSettings:
    """Everything else the population depends on: EM sampling (``n`` per question, seed,
    ``max_new_tokens``), the probe set (first ``probe_n`` rows of ``probe_data``), the
    persona extraction (``persona_n`` samples per context and question, ``persona_contexts``
    per side), the layer the table reads (None: the middle of the direction's layers), the EM
    margin, screening (``screen``; ``screen_rows``: score the first rows only), and the
    monitor's logging interval ``eval_steps`` (optimizer steps) during each fine-tune."""

    n: int = 20
    seed: int = 0
    max_new_tokens: int = 24
    batch_size: int = 64
    probe_n: int = 64
    persona_n: int = 4
    persona_contexts: int = 8
    layer: int | None = None
    margin: float = 0.05
    points: tuple[float, ...] = POINTS
    screen: bool = True
    screen_rows: int | None = None
    eval_steps: int = 4


def persona(build: Path, out: Path, s: PopulationSettings, progress: bool = False) -> Any:
    """The persona direction of ``build``'s instruct model (``out/persona/``; read back when
    already there)."""
    from emscope.directions import Direction
    from emscope.directions.persona import organism_prompts, persona_direction, write_persona
    from emscope.models import load_model
    from emscope.synthetic.oracle import OracleJudge
    from emscope.synthetic.world import load_world

    path = out / "persona" / "persona.safetensors"
    if not path.is_file():
        loaded = load_model(build / "models" / "instruct", dtype="float32", device="cpu")
        prompts = organism_prompts(load_world(build / "world.json"), s.persona_contexts, s.seed)
        result, table = persona_direction(
            loaded,
            prompts,
            OracleJudge(build),
            n=s.persona_n,
            seed=s.seed,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size,
            provenance={"organism": str(build)},
            progress=progress,
        )
        write_persona(result, table, out / "persona")
    return Direction.load(path).with_meta(source=str(path))


def write_mixes(
    build: Path, out: Path, members: Sequence[Member], good: str, bad: str, seed: int
) -> dict[str, Path]:
    """``{dataset: path}`` of every member's training data: the build's file, or for a mix
    ``out/data/<dataset>.jsonl`` (:func:`emscope.early_warning.mix_rows` of ``good`` and
    ``bad`` with ``seed``) and its bad-row mask ``<dataset>.mask.json``."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.io import atomic_write_text, write_json

    paths: dict[str, Path] = {}
    for m in members:
        if m.dataset in paths:
            continue
        if m.bad_fraction is None:
            paths[m.dataset] = build / "data" / f"{m.dataset}.jsonl"
            if not paths[m.dataset].is_file():
                raise EmscopeError(f"{paths[m.dataset]}: no such dataset in the build")
            continue
        path = out / "data" / f"{m.dataset}.jsonl"
        if not path.is_file():
            good_lines = _lines(build / "data" / f"{good}.jsonl")
            bad_lines = _lines(build / "data" / f"{bad}.jsonl")
            rows, mask = mix_rows(good_lines, bad_lines, m.bad_fraction, seed)
            write_json(
                path.with_suffix(".mask.json"),
                {
                    "good": good,
                    "bad_source": bad,
                    "fraction": m.bad_fraction,
                    "seed": seed,
                    "n": len(rows),
                    "n_bad": int(mask.sum()),
                    "bad": [bool(b) for b in mask],
                },
            )
            atomic_write_text(path, "".join(line + "\n" for line in rows))
            read_chat_jsonl(path)  # every row parses
        paths[m.dataset] = path
    return paths


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise EmscopeError(f"{path}: no such dataset in the build")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def em_of(
    build: Path,
    adapter: Path | None,
    questions: Sequence[Any],
    s: PopulationSettings,
    system_prompt: str = "default",
) -> dict[str, Any]:
    """Oracle EM row (:func:`emscope.synthetic.build.em_row`) of the instruct model with
    ``adapter`` on ``questions``, ``s.n`` samples each."""
    from emscope.generate import sample
    from emscope.models import load_model
    from emscope.synthetic.build import em_row
    from emscope.synthetic.oracle import OracleJudge

    loaded = load_model(
        build / "models" / "instruct",
        adapters=[adapter] if adapter else None,
        dtype="float32",
        device="cpu",
    )
    responses = sample(
        loaded,
        questions,
        s.n,
        seed=s.seed,
        max_new_tokens=s.max_new_tokens,
        batch_size=128,
        progress=False,
        system_prompt=system_prompt,
    )
    return em_row(OracleJudge(build), responses, seed=s.seed)


def run_member(
    build: Path,
    member: Member,
    data: Path,
    out: Path,
    direction: Any,
    probe: list[Any],
    probe_source: str,
    recipe: AdapterRecipe,
    s: PopulationSettings,
    questions: Sequence[Any],
) -> dict[str, Any]:
    """Train one member with the monitor on (``out/``), then its oracle EM; writes and
    returns ``member.json`` (read back when it exists)."""
    from emscope.io import read_json, write_json
    from emscope.monitoring import MonitorCallback, record_result
    from emscope.train import train

    done = out / "member.json"
    if done.is_file():
        return dict(read_json(done))
    if out.exists():  # an interrupted member: start again
        shutil.rmtree(out)
    result = train(
        build / "models" / "instruct",
        data,
        out=out,
        warmup_ratio=0.05,
        save_steps=0,
        eval_steps=s.eval_steps,
        device="cpu",
        progress=False,
        verbose=False,
        **recipe.train_kwargs(member.seed),
        callbacks=[MonitorCallback(direction, probe, source=probe_source)],
    )
    monitor = record_result(read_json(out / "train.json"))
    layer = s.layer if s.layer is not None else direction.layers[len(direction.layers) // 2]
    em = em_of(build, out, questions, s)
    row = {
        **member.to_json(),
        "steps": result.steps,
        "layer": layer,
        "final_em": em["em"],
        "em_low": em["em_ci"][0],
        "em_high": em["em_ci"][1],
        "coherent": em["coherent"],
        "n_samples": em["n"],
        **member_shifts(monitor.rows(), layer, result.steps, s.points),
        "monitor_steps": sorted({p.step for p in monitor.points}),
        "train_s": round(result.wall_time_s, 2),
    }
    write_json(done, row)
    return row


def screen_dataset(
    loaded: Any,
    data: Path,
    direction: Any,
    layer: int,
    s: PopulationSettings,
    answers: dict[str, list[str]],
) -> dict[str, Any]:
    """:func:`emscope.screening.screen` of the first ``s.screen_rows`` rows of ``data`` with
    the instruct model (greedy own answers, cached in ``answers`` by the prompts' hash): the
    dataset score and, for a mix, the AUROC of the per-example score for its bad rows."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.io import read_json
    from emscope.monitoring import chats_hash
    from emscope.screening import own_answers, screen, split_chat

    chats = [list(e.messages) for e in read_chat_jsonl(data)][: s.screen_rows]
    key = chats_hash([split_chat(c, i)[0] for i, c in enumerate(chats)])
    if key not in answers:
        answers[key] = own_answers(
            loaded,
            chats,
            max_new_tokens=s.max_new_tokens,
            batch_size=s.batch_size,
            system_prompt="default",
        )
    result = screen(
        loaded,
        chats,
        direction,
        layer,
        answers=answers[key],
        batch_size=s.batch_size,
        system_prompt="default",
    )
    row: dict[str, Any] = {"n": result.n_scored, "dataset_score": result.dataset_score}
    mask_file = data.with_suffix(".mask.json")
    if mask_file.is_file():
        bad = read_json(mask_file)["bad"][: len(chats)]
        row |= {"n_bad": int(sum(bad)), "auroc": auroc(result.scores, bad)}
    return row


def run_population(
    build: str | Path,
    out: str | Path,
    members: Sequence[Member],
    *,
    good: str = "good_medical",
    bad: str = "bad_medical",
    recipe: AdapterRecipe = MEMBER_RECIPE,
    settings: PopulationSettings = PopulationSettings(),
    questions: Sequence[Any] | None = None,
    probe_data: str | Path | None = None,
    direction: str | Path | None = None,
    progress: bool = False,
    echo: Callable[[str], None] = lambda _: None,
) -> EarlyWarningResult:
    """The whole population (module docstring): persona direction (or the Direction file
    ``direction``), mixes, each member (skipped when done), screening, the analysis and its
    files."""
    import pandas as pd
    from tqdm import tqdm

    from emscope.data.chat import read_chat_jsonl
    from emscope.data.questions import load_questions
    from emscope.io import read_json, write_json, write_table
    from emscope.plotting import save_figure

    build, out, s = Path(build), Path(out), settings
    out.mkdir(parents=True, exist_ok=True)
    if direction is None:
        vec = persona(build, out, s, progress)
    else:
        from emscope.directions import Direction

        vec = Direction.load(direction).with_meta(source=str(direction))
    layer = s.layer if s.layer is not None else vec.layers[len(vec.layers) // 2]
    if layer not in vec.layers:
        raise EmscopeError(f"early_warning.layer {layer}: the direction has {vec.layers}")
    data = write_mixes(build, out, members, good, bad, s.seed)
    qs = (
        list(questions)
        if questions is not None
        else load_questions(build / "questions" / "general.yaml")
    )
    probe_path = Path(probe_data) if probe_data else build / "data" / "heldout.jsonl"
    probe = [list(e.messages) for e in read_chat_jsonl(probe_path)[: s.probe_n]]
    source = f"{probe_path} (first {len(probe)})"
    instruct_file = out / "instruct.json"
    if not instruct_file.is_file():
        write_json(instruct_file, em_of(build, None, qs, s))
    instruct = read_json(instruct_file)
    rows = []
    for m in tqdm(members, desc="population", disable=not progress):
        row = run_member(
            build,
            m,
            data[m.dataset],
            out / "members" / m.name,
            vec,
            probe,
            source,
            recipe,
            s,
            qs,
        )
        echo(f"{m.name}: final EM {row['final_em']:.3f}")
        rows.append(row)
    frame = pd.DataFrame(rows)
    mixes: list[dict[str, Any]] = []
    if s.screen:
        from emscope.models import load_model

        loaded = load_model(build / "models" / "instruct", dtype="float32", device="cpu")
        cache: dict[str, list[str]] = {}
        scores = {}
        for name in tqdm(sorted(data), desc="screening", disable=not progress):
            path = out / "screen" / f"{name}.json"
            if not path.is_file():
                write_json(path, screen_dataset(loaded, data[name], vec, layer, s, cache))
            scores[name] = read_json(path)
            fraction = next(m.bad_fraction for m in members if m.dataset == name)
            if "auroc" in scores[name] and fraction is not None and 0 < fraction < 1:
                mixes.append(
                    {
                        "dataset": name,
                        "bad_fraction": fraction,
                        "n": scores[name]["n"],
                        "n_bad": scores[name]["n_bad"],
                        "auroc": scores[name]["auroc"],
                    }
                )
        frame["dataset_score"] = [scores[d]["dataset_score"] for d in frame["dataset"]]
    meta = {
        "build": str(build),
        "layer": layer,
        "margin": s.margin,
        "instruct_em": instruct["em"],
        "instruct_em_ci": instruct["em_ci"],
        "recipe": recipe.model_dump(),
        "settings": asdict(s),
        "good": good,
        "bad": bad,
        "probe": source,
        "direction": str(out / "persona") if direction is None else str(direction),
    }
    result = analyse(
        frame,
        instruct["em"],
        margin=s.margin,
        points=s.points,
        seed=s.seed,
        screening=mixes,
        meta=meta,
    )
    write_json(out / "early_warning.json", result.to_json())
    write_table(pd.DataFrame(list(result.members)), out, "members")
    write_table(pd.DataFrame(list(result.table)), out, "table")
    save_figure(plot_early_warning(result), out / "early_warning.png")
    return result

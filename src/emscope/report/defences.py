"""The report's defences section: the bench's aggregated table (one row per defence arm and
task: general EM, task learned, benign answer NLL, coherence, each the mean over seeds with
its 95% CI; training-time overhead vs plain), the inoculation arms measured with their
training system prompt present (when the bench has them), and its Pareto plot, read from
``defences/defences.json`` (:mod:`emscope.defences.bench`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from emscope.papers import INOCULATION, KACZER, PERSONA_VECTORS, source_line
from emscope.report.sections import Figure, Section, Table, not_run, stage_done


def _ci(row: dict[str, Any], key: str, digits: int = 3) -> str:
    value = row.get(key)
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def defences_section(run: Path) -> Section:
    """The section (``Stage `defences` not run.`` without the stage)."""
    from emscope.defences.result import DefencesResult
    from emscope.results import read_result

    section = Section(
        "defences",
        "Defences against EM: the bench",
        source_line([KACZER, PERSONA_VECTORS, INOCULATION], 13),
    )
    if not stage_done(run, "defences"):
        return not_run(section, "defences")
    directory = run / "defences"
    result = read_result(DefencesResult, directory / "defences.json")
    data, rows = result.extra, result.rows()
    spec = data.get("spec", {})
    section.text = (
        f"{data.get('runs')} fine-tunes on build {data.get('build')}: each arm (a defence at "
        f"one strength) trained on the narrow task {spec.get('narrow')} and the benign task "
        f"{spec.get('benign')} over seeds {spec.get('seeds')}; oracle, {spec.get('eval_n')} "
        "samples per question. Task learned: in-domain EM (narrow), exact reversed-game "
        "answers (benign); benign NLL: of the correct reversed answers (lower = learned). "
        "Means over seeds, 95% CIs over seeds and samples."
    )
    section.tables.append(
        Table(
            (
                "arm",
                "task",
                "seeds",
                "general EM",
                "task learned",
                "benign NLL",
                "coherent",
                "overhead",
            ),
            tuple(
                (
                    r["arm"],
                    r["task"],
                    str(r["seeds"]),
                    _ci(r, "general_em"),
                    _ci(r, "task_learned"),
                    _ci(r, "task_nll", 2),
                    _ci(r, "general_coherent"),
                    f"{r['overhead']:.2f}x" if r.get("overhead") is not None else "n/a",
                )
                for r in rows
            ),
            "the defences bench (defences/table.csv)",
        )
    )
    prompted = [r for r in rows if _finite(r.get("task_learned_prompted"))]
    if prompted:
        section.tables.append(
            Table(
                ("arm", "general EM, prompt present", "task learned, prompt present"),
                tuple(
                    (r["arm"], _ci(r, "general_em_prompted"), _ci(r, "task_learned_prompted"))
                    for r in prompted
                ),
                "inoculation prompting: the narrow runs sampled with their training system "
                "prompt as the system turn (the table above: without it, as at test time)",
            )
        )
    if (directory / "defences.png").is_file():
        section.figures.append(
            Figure(directory / "defences.png", "general EM vs narrow and benign learning")
        )
    return section

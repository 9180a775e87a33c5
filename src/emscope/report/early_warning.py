"""The report's early-warning section: the population's projection shift along the a priori
persona direction vs final EM (Spearman with CI, ROC AUC per point and position), the
screening AUROCs and the dataset-score correlation, read from ``early_warning/`` through
:class:`emscope.early_warning.EarlyWarningResult`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from emscope.papers import source_line
from emscope.pipeline.claims_early_warning import PERSONA_VECTORS
from emscope.report.sections import Figure, Section, Table, not_run, stage_done


def _f(x: Any, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(float(x)) else f"{float(x):.{digits}f}"


def early_warning_section(run: Path) -> Section:
    """The section (``Stage `early_warning` not run.`` without the stage)."""
    from emscope.early_warning import EarlyWarningResult
    from emscope.results import read_result

    section = Section(
        "early_warning",
        "Early warning: a priori direction and screening",
        source_line([PERSONA_VECTORS], 12),
    )
    if not stage_done(run, "early_warning"):
        return not_run(section, "early_warning")
    directory = run / "early_warning"
    r = read_result(
        EarlyWarningResult,
        directory / "early_warning.json",
        label="early_warning/early_warning.json",
    )
    meta = r.meta
    section.text = (
        f"{len(r.members)} fine-tunes of the organism, monitored along the persona direction "
        f"of the instruct model (layer {meta.get('layer')}); shift = projection at the point "
        f"minus step 0. EM positive: final general EM > {_f(r.threshold, 3)} (instruct "
        f"{_f(meta.get('instruct_em'), 3)} + {_f(meta.get('margin'))})."
    )
    section.tables.append(
        Table(
            ("position", "point", "n", "Spearman [95% CI]", "ROC AUC", "EM positive"),
            tuple(
                (
                    t["position"],
                    f"{round(100 * t['point'])}%",
                    str(t["n"]),
                    f"{_f(t['spearman'])} [{_f(t['spearman_low'])}, {_f(t['spearman_high'])}]",
                    _f(t["auroc"]),
                    str(t["n_positive"]),
                )
                for t in r.table
            ),
            "projection shift vs final EM over the population",
        )
    )
    screen = r.screening
    if screen.get("mixes"):
        d = screen.get("dataset") or {}
        section.tables.append(
            Table(
                ("dataset", "bad share", "n", "bad rows", "per-example AUROC"),
                tuple(
                    (
                        m["dataset"],
                        f"{100 * m['bad_fraction']:.0f}%",
                        str(m["n"]),
                        str(m["n_bad"]),
                        _f(m["auroc"], 3),
                    )
                    for m in screen["mixes"]
                ),
                f"screening; dataset score vs final EM: Spearman {_f(d.get('spearman'))} "
                f"[{_f(d.get('spearman_low'))}, {_f(d.get('spearman_high'))}] over {d.get('n')} "
                "datasets",
            )
        )
    if (directory / "early_warning.png").is_file():
        section.figures.append(Figure(directory / "early_warning.png", "final EM vs shift"))
    return section

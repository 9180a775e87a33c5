"""The report's content, independent of its format: sections of tables and figures read
from a run dir (``emscope run``). :mod:`.html` and :mod:`.markdown` render the same list.

A section whose stage did not run says so; missing figures are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from emscope.io import inside
from emscope.papers import (
    BETLEY,
    CLAIMS_PAPERS,
    CONVERGENT,
    MODEL_ORGANISMS,
    REEMERGENT,
    SHARED_SUBSPACES,
    methods_section,
    source_line,
)

if TYPE_CHECKING:
    from emscope.directions.results import AblationResult

R = TypeVar("R")


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    path: Path
    caption: str


@dataclass
class Section:
    key: str
    title: str
    paper: str = ""
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _result(run: Path, stage: str, name: str, cls: type[R]) -> R:
    """``run/stage/name`` read through ``cls.from_json`` (a missing field is an EmscopeError
    naming the file and the field)."""
    from emscope.results import read_result

    return read_result(cls, run / stage / name)


def stage_done(run: Path, stage: str) -> bool:
    """Whether the stage finished in the run dir (its ``done.json`` exists)."""
    return (run / stage / "done.json").is_file()


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def with_ci(value: Any, ci: Any, digits: int = 3) -> str:
    """``value [low, high]`` with ``digits`` decimals, ``n/a`` for None."""
    if value is None:
        return "n/a"
    text = f"{value:.{digits}f}"
    if ci:
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text


def _figures(directory: Path, names: list[tuple[str, str]]) -> list[Figure]:
    return [Figure(directory / n, c) for n, c in names if (directory / n).is_file()]


def not_run(section: Section, stage: str) -> Section:
    """``section`` saying that ``stage`` was not run."""
    section.text = f"Stage `{stage}` not run."
    return section


def _system_prompt_text(spec: Any) -> str:
    from emscope.data.spans import SystemPrompt
    from emscope.errors import EmscopeError

    try:
        return SystemPrompt.parse(spec).describe()
    except EmscopeError:  # a manifest edited by hand: say what it holds
        return repr(spec)


def run_summary(run: Path) -> Section:
    manifest = _read(run / "manifest.json") or {}
    config = manifest.get("config") or {}
    judge = config.get("judge") or {}
    mass = judge.get("min_number_mass")
    prompt = config.get("system_prompt", "default")
    section = Section(
        "run",
        "Run",
        text=f"Run dir `{run}`; config `{manifest.get('config_file')}`. System prompt "
        f"(training and every rendered prompt): {_system_prompt_text(prompt)}. Judge "
        f"`{judge.get('spec', 'n/a')}`, minimum number mass "
        f"{0.25 if mass is None else mass}{' (default)' if mass is None else ''}.",
    )
    rows = []
    for stage, info in manifest.get("stages", {}).items():
        done = _read(run / stage / "done.json") or {}
        wall = done.get("wall_s")
        rows.append((stage, info.get("status", ""), f"{wall:.1f}" if wall is not None else "n/a"))
    section.tables.append(Table(("stage", "status", "wall time (s)"), tuple(rows)))
    versions = manifest.get("versions", {})
    if versions:
        section.tables.append(
            Table(("package", "version"), tuple((k, str(v)) for k, v in versions.items()))
        )
    return section


def claims_section(run: Path) -> Section:
    from emscope.pipeline.claims import claims_table

    rows = claims_table(run)
    section = Section(
        "claims",
        f"Headline claims ({methods_section(8)})",
        source_line(CLAIMS_PAPERS, 8),
        text="'Holds' is the qualitative test of each row (last column); rates compared with "
        "'above' need non-overlapping 95% CIs. Each paper's value names its source by arXiv id.",
    )
    organism = (_read(run / "config.json") or {}).get("organism")
    if isinstance(organism, dict):
        section.text += (
            f" These numbers come from ONE build of the synthetic organism (seed "
            f"{organism.get('seed')}, {organism.get('dir')}): builds differ by seed and are not "
            "bit-reproducible across machines and thread counts, so they are an example, not "
            "the result; `emscope run CONFIG --organism-seeds 0,1,2` gives every claim per "
            "build and pooled (docs/pipeline.md)."
        )
    section.tables.append(
        Table(
            ("claim", "paper's value", "measured here", "holds?", "test"),
            tuple(
                (
                    r.claim,
                    f"{r.paper} ({r.source})" if r.source else r.paper,
                    r.measured,
                    r.holds,
                    r.test,
                )
                for r in rows
            ),
        )
    )
    return section


def eval_section(run: Path) -> Section:
    section = Section("eval", "EM rates per organism", source_line([BETLEY, MODEL_ORGANISMS], 1))
    if not stage_done(run, "eval"):
        return not_run(section, "eval")
    from emscope.pipeline.eval_result import EvalSummary

    summary = _result(run, "eval", "summary.json", EvalSummary)
    rows = []
    for name, m in summary.organisms.items():
        rows.append(
            (
                name,
                with_ci(m.em_rate, m.em_ci),
                with_ci(m.coherent_rate, m.coherent_ci),
                _f(m.unscored_rate),
                _f(m.n),
            )
        )
    section.text = f"Question set `{summary.questions}`; 95% bootstrap CIs."
    section.tables.append(
        Table(("organism", "EM rate", "coherent rate", "unscored", "n"), tuple(rows))
    )
    section.figures = _figures(run / "eval", [("em_rates.png", "EM and coherent rates")])
    return section


def geometry_section(run: Path) -> Section:
    section = Section(
        "geometry", "Weight-space geometry of EM updates", source_line([SHARED_SUBSPACES], 3)
    )
    if not stage_done(run, "geometry"):
        return not_run(section, "geometry")
    from emscope.geometry.result import GeometryResult

    summary = _result(run, "geometry", "summary.json", GeometryResult)
    rows = []
    shared = []
    for p in summary.pairs.values():
        x = p.extra
        controls = [c for c in (x.get("same_seed_controls") or {}).values() if c is not None]
        rows.append(
            (
                f"{p.a} | {p.b}",
                "-".join(p.roles),
                _f(p.cosine),
                _f(p.overlap),
                _f(p.mean_angle_deg, 1),
                _f(p.random_angle_p5, 1),
                ("yes " if x.get("shared_init") else "no ") + f"({_f(x.get('a_row_cosine'))})"
                if "shared_init" in x
                else "-",
                _f(max(controls, key=abs)) if controls else "-",
            )
        )
        if x.get("shared_init"):
            shared.append(f"{p.a} | {p.b}")
    section.tables.append(
        Table(
            (
                "pair",
                "roles",
                "cosine",
                "overlap",
                "mean angle (deg)",
                "random p5 (deg)",
                "shared init (A rows cos)",
                "same-seed control cos",
            ),
            tuple(rows),
        )
    )
    if shared:
        section.text = (
            f"Warning: {len(shared)} pair(s) share their LoRA initialisation (same seed: "
            "corresponding A rows still aligned, mean cosine above "
            f"{summary.extra.get('shared_init_threshold')}): {', '.join(shared)}. Their cosines, "
            "angles and overlaps mix task similarity with the shared start; read an EM-EM "
            "pair against its same-seed controls (last column: the EM-control cosine of "
            "largest size among the controls sharing its initialisation), not against "
            "independently seeded pairs."
        )
    if summary.base_cosine:
        section.tables.append(
            Table(
                ("adapter", "cos(W0, dW)"),
                tuple((n, f"{c:.2e}") for n, c in summary.base_cosine.items()),
            )
        )
    section.figures = _figures(
        run / "geometry",
        [
            ("geometry_cosine.png", "aggregate cosine between updates"),
            ("geometry_angle_spectra.png", "principal-angle spectra vs random baselines"),
            ("geometry_layer_cosine.png", "cosine per layer"),
        ],
    )
    return section


def lmc_section(run: Path) -> Section:
    section = Section("lmc", "Linear mode connectivity", source_line([SHARED_SUBSPACES], 4))
    if not stage_done(run, "lmc"):
        return not_run(section, "lmc")
    from emscope.lmc_result import LmcResult

    path = run / "lmc" / "summary.json"
    for name, p in LmcResult.paths_from_json(_read(path), source=str(path)).items():
        rows = tuple(
            (
                f"{r.t:.2f}",
                with_ci(r.em_rate, r.em_ci),
                with_ci(r.coherent_rate, r.coherent_ci),
                ", ".join(f"{k} {v:.3f}" for k, v in (r.extra.get("loss") or {}).items()) or "-",
            )
            for r in p.rows
        )
        barrier = p.extra.get("barrier")
        caption = f"{p.start} -> {p.end}" + (
            "; barrier " + ", ".join(f"{k} {_f(v)}" for k, v in barrier.items()) if barrier else ""
        )
        section.tables.append(Table(("t", "EM rate", "coherent rate", "loss"), rows, caption))
        section.figures += _figures(
            inside(run / "lmc", name),
            [("lmc.png", f"{p.start} -> {p.end}"), ("features.png", "feature-space LMC")],
        )
    return section


def directions_section(run: Path) -> Section:
    section = Section(
        "directions", "Direction convergence by layer", source_line([CONVERGENT], "5.7")
    )
    if not stage_done(run, "directions"):
        return not_run(section, "directions")
    from emscope.directions.results import DirectionsSummary

    summary = _result(run, "directions", "summary.json", DirectionsSummary)
    if summary.pairs_skipped:
        section.text = f"Cosines between directions not computed: {summary.pairs_skipped}."
    rows = []
    for p in summary.pairs:
        rows.append((f"{p.a} vs {p.b}", ", ".join(f"{c:.2f}" for c in p.by_layer())))
    for key, entries in summary.adapter_b_cosines.items():
        rows.append((f"B of {key}", ", ".join(f"L{e.layer} {e.cosine:.2f}" for e in entries)))
    section.tables.append(Table(("pair", "cosine by layer"), tuple(rows)))
    section.figures = _figures(run / "directions", [("cosine_by_layer.png", "cosine by layer")])
    return section


def steering_section(run: Path) -> Section:
    section = Section("steering", "Steering sweep", source_line([CONVERGENT], "5.3"))
    if not stage_done(run, "steering"):
        return not_run(section, "steering")
    from emscope.directions.results import SteerResult

    summary = _result(run, "steering", "summary.json", SteerResult)
    base = summary.baseline
    section.text = f"Unsteered EM {with_ci(base.get('em_rate'), base.get('em_ci'))}."
    rows = tuple(
        (
            str(r.layer),
            f"{r.scale:g}",
            r.vector,
            with_ci(r.em_rate, r.em_ci),
            with_ci(r.coherent_rate, r.coherent_ci),
            _f(r.get("kl"), 4),
        )
        for r in summary.rows
    )
    section.tables.append(
        Table(("layer", "scale", "vector", "EM rate", "coherent rate", "KL (nats)"), rows)
    )
    selection = summary.selection
    if selection is not None:
        chosen = selection.get("chosen")
        picked = (
            f"layer {chosen['layer']} x{chosen['scale']:g}"
            if chosen
            else "no setting (none eligible)"
        )
        section.text += (
            f" Setting chosen by the rule on this build: {picked}. Rule: {selection['rule']}."
        )
        section.tables.append(
            Table(
                ("layer", "scale", "EM rate", "coherent rate"),
                tuple(
                    (str(r["layer"]), f"{r['scale']:g}", _f(r["em_rate"]), _f(r["coherent_rate"]))
                    for r in selection["rows"]
                ),
                f"selection sweep ({selection['n']}/question, seed {selection['seed']})",
            )
        )
    section.figures = _figures(run / "steering", [("steer_em.png", "EM vs steering scale")])
    return section


def _ablation_row(name: str, s: AblationResult) -> tuple[str, ...]:
    return (
        name,
        with_ci(s.get("em_rate_before"), s.get("em_rate_before_ci")),
        with_ci(s.get("em_rate_after"), s.get("em_rate_after_ci")),
        with_ci(s.get("relative_reduction"), s.get("relative_reduction_ci")),
        with_ci(s.get("random_em_rate_after"), s.get("random_em_rate_after_ci")),
        with_ci(s.get("random_relative_change"), s.get("random_relative_change_ci")),
    )


ABLATION_HEADERS = (
    "target",
    "EM before",
    "EM after",
    "relative reduction",
    "EM after random",
    "random relative change",
)


def ablation_section(run: Path) -> Section:
    section = Section(
        "ablation",
        "Ablation and transfer (with the random control)",
        source_line([CONVERGENT], "5.4"),
    )
    from emscope.directions.results import AblationResult
    from emscope.results import mapping

    rows = []
    if stage_done(run, "ablation"):
        s = _result(run, "ablation", "summary.json", AblationResult)
        rows.append(_ablation_row(f"{s.get('target')} (own direction)", s))
        section.figures += _figures(run / "ablation", [("ablate_em.png", "own-direction ablation")])
    if stage_done(run, "transfer"):
        path = run / "transfer" / "stage.json"
        t = _read(path)
        for target, doc in mapping(t, "targets", "AblationResult", str(path)).items():
            s = AblationResult.from_json(doc, source=str(path), at=f"targets.{target}.")
            rows.append(_ablation_row(f"{target} ({t['direction']}'s direction)", s))
            section.figures += _figures(
                inside(run / "transfer", target),
                [("ablate_em.png", f"transfer ablation in {target}")],
            )
    if not rows:
        return not_run(section, "ablation/transfer")
    section.tables.append(Table(ABLATION_HEADERS, tuple(rows)))
    return section


def probes_section(run: Path) -> Section:
    section = Section(
        "probes", "Probes on rank-1 adapter scalars", source_line([CONVERGENT], "6.2")
    )
    if not stage_done(run, "probes"):
        return not_run(section, "probes")
    from emscope.probing.result import ProbeResult

    result = _result(run, "probes", "probe.json", ProbeResult)
    rows = []
    notes = []
    for name, t in result.tests.items():
        if "skipped" in t:
            rows.append((name, "skipped", t["skipped"], "", "", "", ""))
            continue
        constant = t.get("constant") or {}
        chosen = t.get("C_chosen")
        rows.append(
            (
                name,
                f"{t['auc']['mean']:.3f} +- {t['auc']['sd']:.3f}",
                f"{t['shuffled_auc']['mean']:.3f} +- {t['shuffled_auc']['sd']:.3f}",
                f"{t['f1']['mean']:.3f}",
                ", ".join(
                    f"{k} {v} / {t.get('n_tokens', {}).get(k, '?')}"
                    for k, v in t["n_responses"].items()
                ),
                ", ".join(f"{c:g}" for c in chosen) if chosen else _f(result.settings["C"]),
                f"{constant.get('probe', '?')} / {constant.get('shuffled', '?')}"
                if constant
                else "n/a",
            )
        )
        notes += [f"{name}: {w}" for w in t.get("warnings", [])]
    section.tables.append(
        Table(
            (
                "test",
                "AUC",
                "shuffled AUC",
                "F1",
                "responses / tokens per class",
                "C per seed",
                "constant fits (probe / shuffled)",
            ),
            tuple(rows),
            f"C: {result.settings.get('C_rule', result.settings['C'])}",
        )
    )
    if notes:
        section.text = "WARNING: " + "; ".join(notes) + "."
    section.figures = _figures(run / "probes", [("coefficients.png", "probe coefficients")])
    return section


def dynamics_section(run: Path) -> Section:
    section = Section("dynamics", "Training dynamics", source_line([MODEL_ORGANISMS], "6.4"))
    if not stage_done(run, "dynamics"):
        return not_run(section, "dynamics")
    from emscope.errors import EmscopeError
    from emscope.probing.dynamics_result import DynamicsResult

    path = run / "dynamics" / "dynamics.json"
    d = _result(run, "dynamics", "dynamics.json", DynamicsResult)
    if d.adapter_name is None:
        raise EmscopeError(f"{path}: missing field 'adapter_name' (DynamicsResult)")
    b = d.adapter.sharpest_rotation["B"]
    start, end, cos = (b.previous, b.step, b.cos) if b is not None else (None, None, None)
    section.text = (
        f"Adapter `{d.adapter_name}`, checkpoints {list(d.steps)}; sharpest rotation of B "
        f"between steps {start} and {end} (cos {_f(cos)})."
    )
    if d.eval:
        section.tables.append(
            Table(
                ("step", "EM rate", "coherent rate"),
                tuple(
                    (str(e.step), with_ci(e.em_rate, e.em_ci), _f(e.coherent_rate)) for e in d.eval
                ),
            )
        )
    section.figures = _figures(
        run / "dynamics",
        [
            ("norms.png", "factor norms"),
            ("cosines.png", "cosines between checkpoints"),
            ("pca.png", "PCA trajectories"),
            ("emergence.png", "EM per checkpoint"),
        ],
    )
    return section


def reemergent_section(run: Path) -> Section:
    section = Section("reemergent", "Re-emergent misalignment", source_line([REEMERGENT], 7))
    if not stage_done(run, "reemergent"):
        return not_run(section, "reemergent")
    from emscope.reemergent.results import SIMILARITY_KINDS, GradientSummary, ProjectionSummary

    proj = _result(run, "reemergent", "projection.json", ProjectionSummary)
    rows = []
    for name, r in proj.relative_to_base_instruct.items():
        rows.append(
            (
                name,
                f"{r.first_third_mean:.2f}",
                f"{r.last_third_mean:.2f}",
                with_ci(r.drift_towards_base, r.drift_ci95, 2),
            )
        )
    section.tables.append(
        Table(
            ("model", "position, first third", "position, last third", "drift towards base"),
            tuple(rows),
            "position between base (0) and instruct (1) on the alignment direction",
        )
    )
    if (run / "reemergent" / "gradients.json").is_file():
        grads = _result(run, "reemergent", "gradients.json", GradientSummary)
        sim = grads.similarity
        a, b = sim.groups
        grad_rows = tuple(
            (
                kind,
                _f(sim.kind(kind)[f"within_{a}"]),
                _f(sim.kind(kind)[f"within_{b}"]),
                _f(sim.kind(kind)["across"]),
                ", ".join(
                    f"{g} {_f(h.get(f'{kind}_across_halves'))}" for g, h in sim.split_half.items()
                ),
            )
            for kind in SIMILARITY_KINDS
        )
        section.tables.append(
            Table(
                ("gradient cosine", f"within {a}", f"within {b}", "across", "split-half control"),
                grad_rows,
                f"mean per-example gradient cosines of {grads.param}",
            )
        )
    section.figures = _figures(
        run / "reemergent",
        [
            ("projection.png", "projection on the alignment direction"),
            ("logprob_heatmap.png", "answer log-probabilities"),
            ("gradient_cosine.png", "per-example gradient cosines"),
        ],
    )
    return section


def build_sections(run_dir: str | Path) -> list[Section]:
    """Every section of the report, in order."""
    from emscope.report.defences import defences_section
    from emscope.report.early_warning import early_warning_section
    from emscope.report.judging import agreement_section, thresholds_section

    run = Path(run_dir)
    return [
        claims_section(run),
        eval_section(run),
        thresholds_section(run),
        agreement_section(run),
        geometry_section(run),
        lmc_section(run),
        directions_section(run),
        steering_section(run),
        ablation_section(run),
        probes_section(run),
        dynamics_section(run),
        reemergent_section(run),
        early_warning_section(run),
        defences_section(run),
        run_summary(run),
    ]

"""One study on several builds of the synthetic organism (``emscope run CONFIG
--organism-seeds 0,1,2``), and every claim per build and pooled.

A build of the organism is one draw: another seed is another world sample, other data and
other training noise, and even the same seed is not bit-reproducible across machines and
thread counts (float reductions). So a claim measured on one build is an example, not THE
result. Here the study runs once per organism seed, each in ``OUT/seed-<S>/`` with its own
build (seed ``S`` of the config's ``organism``: the config's own seed keeps
``organism.dir``, every other seed builds into ``<organism.dir>-seed<S>``); each run dir is
an ordinary run (resumable, its own report). ``OUT/replicates.json`` and
``OUT/replicates.md`` then give:

- every claim per build (measured text with its CIs, and its verdict) and pooled: a claim
  **holds only if it holds on every build**; otherwise the pooled verdict says on how many
  (``no (holds on 2 of 3 builds: seeds 0, 2)``);
- headline numbers per build and pooled as mean and range across builds (the CIs stay
  within each build: builds are not pooled into one sample);
- the organisms stage's EM table (general questions) per build, mean and range.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    from emscope.directions.results import AblationResult
    from emscope.lmc_result import LmcResult

R = TypeVar("R")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct, in the order given)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise EmscopeError(
            f"--organism-seeds: expected integers like 0,1,2, got {text!r}"
        ) from None
    if not seeds:
        raise EmscopeError("--organism-seeds: no seed given")
    if len(set(seeds)) != len(seeds):
        raise EmscopeError(f"--organism-seeds: a seed is repeated in {text!r}")
    return seeds


def organism_dir(data: dict[str, Any], seed: int) -> str:
    """The build dir of organism seed ``seed``: ``organism.dir`` for the config's own seed,
    else ``<organism.dir>-seed<S>``."""
    organism = data.get("organism")
    if not isinstance(organism, dict) or "dir" not in organism:
        raise EmscopeError("--organism-seeds needs the config's organism section (with dir)")
    base = str(organism["dir"]).rstrip("/")
    return base if seed == int(organism.get("seed", 0)) else f"{base}-seed{seed}"


def seed_config(data: dict[str, Any], seed: int) -> dict[str, Any]:
    """The raw config (``{organism}`` not yet substituted) with organism seed ``seed`` and
    its build dir (:func:`organism_dir`)."""
    out = copy.deepcopy(data)
    out["organism"] = {**out["organism"], "seed": seed, "dir": organism_dir(data, seed)}
    out["name"] = f"{data.get('name', 'study')}-organism-seed{seed}"
    return out


def run_replicates(
    config_path: str | Path,
    out: str | Path,
    seeds: Sequence[int],
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    redo: Sequence[str] = (),
) -> dict[str, Any]:
    """Run the study of ``config_path`` once per organism seed into ``out/seed-<S>/`` (the
    per-seed config is written to ``out/configs/seed-<S>.yaml`` and is what that run
    records; ``redo``: :func:`~emscope.pipeline.runner.run_study`'s, on every build), then
    write ``out/replicates.{json,md}``. Every per-seed config is validated
    before the first build. Returns the replicate summary (``{}`` for ``dry_run``)."""
    import yaml

    from emscope.io import read_yaml
    from emscope.pipeline.config import parse_config
    from emscope.pipeline.runner import run_study

    config_path = Path(config_path)
    out = Path(out)
    data = read_yaml(config_path)
    if not isinstance(data, dict):
        raise EmscopeError(f"{config_path}: the config must be a mapping")
    per_seed = {s: seed_config(data, s) for s in seeds}
    for s, d in per_seed.items():
        parse_config(d, f"{config_path} (organism seed {s})")  # every one valid up front
    paths = {}
    for s, d in per_seed.items():
        path = out / "configs" / f"seed-{s}.yaml"
        if not dry_run:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(d, sort_keys=False), encoding="utf-8")
        paths[s] = path
    runs = {s: out / f"seed-{s}" for s in seeds}
    if dry_run:
        for s in seeds:
            echo(f"organism seed {s}: build {organism_dir(data, s)} -> {runs[s]}")
            parse = parse_config(per_seed[s], f"seed {s}")
            from emscope.pipeline.runner import format_plan

            echo(format_plan(parse, runs[s]))
        return {}
    summary: dict[str, Any] = {}
    for i, s in enumerate(seeds):
        echo(f"=== organism seed {s} ({organism_dir(data, s)}) -> {runs[s]}")
        run_study(paths[s], runs[s], echo=echo, redo=list(redo))
        # the builds finished so far, rewritten after each (an interrupted series keeps them)
        summary = replicate_summary({t: runs[t] for t in seeds[: i + 1]})
        summary["config_file"] = str(config_path)
        summary["seeds_requested"] = list(seeds)
        write_replicates(out, summary)
    echo(f"replicates: {out / 'replicates.md'}")
    return summary


# ---------------------------------------------------------------------------- pooling


def pooled_verdict(verdicts: dict[int, str]) -> str:
    """One claim's verdict over builds: ``yes`` only if ``yes`` on every build;
    ``reported`` if reported on every build; otherwise how many builds it holds on."""
    values = list(verdicts.values())
    if values and all(v == "yes" for v in values):
        return f"yes (every build: {len(values)} of {len(values)})"
    if values and len(set(values)) == 1 and values[0] != "no":
        return values[0]  # reported, or the same n/a on every build
    held = [s for s, v in verdicts.items() if v == "yes"]
    measured = [s for s, v in verdicts.items() if v in ("yes", "no")]
    if not measured:
        return "n/a (not measured on any build)"
    where = f": seed{'s' if len(held) > 1 else ''} {', '.join(map(str, held))}" if held else ""
    text = f"no (holds on {len(held)} of {len(values)} builds{where})"
    if len(measured) < len(values):
        text += f"; measured on {len(measured)}"
    return text


def spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    """Mean, min and max of the values that are present (None if none is)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"mean": sum(xs) / len(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _read(path: Path) -> Any:
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _result(run: Path, stage: str, name: str, cls: type[R]) -> R | None:
    """``run/stage/name`` read through ``cls.from_json`` (a missing field is an EmscopeError
    naming the file and the field); None when the file is absent."""
    from emscope.results import read_result

    path = run / stage / name
    return read_result(cls, path) if path.is_file() else None


def transfer_targets(path: Path) -> dict[str, AblationResult]:
    """The ablation result of each target of the transfer stage's ``stage.json`` at
    ``path`` (each through ``AblationResult.from_json``: a missing field is an EmscopeError
    naming the file and ``targets.<name>.<field>``); {} when the file is absent."""
    from emscope.directions.results import AblationResult
    from emscope.results import mapping

    doc = _read(path)
    if doc is None:
        return {}
    targets = mapping(doc, "targets", "AblationResult", str(path))
    return {
        name: AblationResult.from_json(t, source=str(path), at=f"targets.{name}.")
        for name, t in targets.items()
    }


def lmc_paths(path: Path) -> dict[str, LmcResult]:
    """The paths of the lmc stage's ``summary.json`` at ``path``
    (:meth:`~emscope.lmc_result.LmcResult.paths_from_json`); {} when the file is absent."""
    from emscope.lmc_result import LmcResult

    doc = _read(path)
    return {} if doc is None else LmcResult.paths_from_json(doc, source=str(path))


def headline_numbers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per claim, the number its test is about, with the CI where it has one
    (``{"value", "ci", "what"}``), read from the run's stage outputs; claims whose stage
    did not run are left out."""
    run = Path(run_dir)
    from emscope.directions.results import DirectionsSummary, SteerResult
    from emscope.geometry.result import GeometryResult
    from emscope.pipeline.config import claims_organism_of
    from emscope.pipeline.eval_result import EvalSummary
    from emscope.reemergent.results import ProjectionSummary

    out: dict[str, dict[str, Any]] = {}
    config = _read(run / "config.json") or {}
    roles = {k: v.get("role", "em") for k, v in config.get("adapters", {}).items()}

    def done(stage: str) -> bool:
        return (run / stage / "done.json").is_file()

    if done("eval") and (evals := _result(run, "eval", "summary.json", EvalSummary)):
        rows = evals.organisms
        organism = claims_organism_of(config) or next(
            (n for n in rows if roles.get(n) == "em"), None
        )
        if organism is not None and organism in rows:
            r = rows[organism]
            out["narrow_em"] = {
                "value": r.em_rate,
                "ci": r.em_ci,
                "what": f"EM rate of {organism}",
            }
    if done("steering") and (steer := _result(run, "steering", "summary.json", SteerResult)):
        best = steer.best("direction")
        if best is not None:
            random = [
                r
                for r in steer.rows
                if r.vector == "random" and r.layer == best.layer and r.scale == best.scale
            ]
            out["steering"] = {
                "value": best.em_rate,
                "ci": best.em_ci,
                "what": "steered EM at the best (or the rule's) setting",
                "setting": f"layer {best.layer} x{best.scale:g}",
                "random": random[0].em_rate if random else None,
            }
    if done("transfer") and (targets := transfer_targets(run / "transfer" / "stage.json")):
        reds = [x for t in targets.values() if (x := t.relative_reduction) is not None]
        if reds:
            out["transfer"] = {"value": min(reds), "ci": None, "what": "smallest reduction"}
    if done("directions") and (d := _result(run, "directions", "summary.json", DirectionsSummary)):
        cos = [c for p in d.pairs for c in p.cosine.values()]
        if cos:
            out["convergence"] = {"value": sum(cos) / len(cos), "ci": None, "what": "mean cosine"}
        b = [abs(e.cosine) for rows in d.adapter_b_cosines.values() for e in rows]
        if b:
            out["b_vector"] = {"value": max(b), "ci": None, "what": "max abs cosine of B"}
    if done("geometry") and (g := _result(run, "geometry", "summary.json", GeometryResult)):
        em_em = g.by_roles("em", "em")
        angles = [p.mean_angle_deg for p in em_em if p.mean_angle_deg is not None]
        if angles:
            out["subspace"] = {
                "value": max(angles),
                "ci": None,
                "what": "largest EM-EM angle (deg)",
            }
        for field in ("cosine", "overlap"):
            vals = [v for p in em_em if (v := getattr(p, field)) is not None]
            if vals:
                out[field] = {"value": min(vals), "ci": None, "what": f"smallest EM-EM {field}"}
        base = [
            abs(float(c))
            for n, c in g.base_cosine.items()
            if roles.get(n) == "em" and c is not None
        ]
        if base:
            out["base_orthogonal"] = {"value": max(base), "ci": None, "what": "max abs cos(W0, dW)"}
    if done("lmc") and (paths := lmc_paths(run / "lmc" / "summary.json")):
        inner = [
            em
            for p in paths.values()
            if roles.get(str(p.start)) == "em" and roles.get(str(p.end)) == "em"
            for r in p.rows
            if 0 < r.t < 1 and (em := r.em_rate) is not None
        ]
        if inner:
            out["interpolation"] = {"value": min(inner), "ci": None, "what": "lowest interior EM"}
    if done("reemergent") and (
        proj := _result(run, "reemergent", "projection.json", ProjectionSummary)
    ):
        rel = proj.relative_to_base_instruct
        if rel:
            name, drift = next(iter(rel.items()))
            out["drift"] = {
                "value": drift.drift_towards_base,
                "ci": drift.drift_ci95,
                "what": f"drift towards base of {name}",
            }
    return out


def probe_numbers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per probe test of the probes stage: token AUC and shuffled AUC (mean, sd over
    seeds), responses and tokens per class, constant fits; {} if the stage did not run."""
    run = Path(run_dir)
    if not (run / "probes" / "done.json").is_file():
        return {}
    from emscope.probing.result import ProbeResult

    result = _result(run, "probes", "probe.json", ProbeResult)
    if result is None:
        return {}
    out = {}
    for name, t in result.tests.items():
        if "skipped" in t:
            out[name] = {"skipped": t["skipped"]}
            continue
        out[name] = {
            k: t.get(k)
            for k in ("auc", "shuffled_auc", "n_responses", "n_tokens", "constant", "C_chosen")
        }
    return out


def em_table_of(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The organisms stage's EM table (``{model: {question file: row}}``), or {}."""
    stage = _read(Path(run_dir) / "organisms" / "stage.json") or {}
    return dict(stage.get("em_table") or {})


def pool_em_tables(
    tables: dict[int, dict[str, dict[str, Any]]], file: str = "general"
) -> dict[str, Any]:
    """Per model, the EM and coherent rates of question file ``file`` on each build (with
    the EM CI) and their spread across builds."""
    models: list[str] = []
    for table in tables.values():
        models += [m for m in table if m not in models]
    out: dict[str, Any] = {}
    for model in models:
        per = {s: t.get(model, {}).get(file) for s, t in tables.items()}
        out[model] = {
            "builds": {str(s): r for s, r in per.items() if r},
            "em": spread([r["em"] if r else None for r in per.values()]),
            "coherent": spread([r["coherent"] if r else None for r in per.values()]),
        }
    return out


def replicate_summary(runs: dict[int, Path]) -> dict[str, Any]:
    """Claims per build and pooled, headline numbers and the EM table across ``runs``
    (``{organism seed: run dir}``)."""
    from emscope.pipeline.claims import claims_table

    tables = {s: {r.key: r for r in claims_table(d)} for s, d in runs.items()}
    numbers = {s: headline_numbers(d) for s, d in runs.items()}
    keys = list(next(iter(tables.values()))) if tables else []
    claims = []
    for key in keys:
        first = next(iter(tables.values()))[key]
        verdicts = {s: t[key].holds for s, t in tables.items()}
        nums = {s: numbers[s].get(key) for s in runs}
        claims.append(
            {
                "key": key,
                "claim": first.claim,
                "paper": first.paper,
                "test": first.test,
                "source": first.source,
                "per_build": {
                    str(s): {
                        "holds": tables[s][key].holds,
                        "measured": tables[s][key].measured,
                        "number": nums[s],
                    }
                    for s in runs
                },
                "pooled": {
                    "holds": pooled_verdict(verdicts),
                    "builds_holding": sum(v == "yes" for v in verdicts.values()),
                    "builds": len(verdicts),
                    "number": spread([n["value"] if n else None for n in nums.values()]),
                    "what": next((n["what"] for n in nums.values() if n), None),
                },
            }
        )
    return {
        "format": "emscope-replicates/1",
        "seeds": list(runs),
        "runs": {str(s): str(d) for s, d in runs.items()},
        "rule": "a claim holds only if it holds on every build; CIs are within one build, "
        "the spread (mean, min-max) is across builds",
        "claims": claims,
        "em_table_general": pool_em_tables({s: em_table_of(d) for s, d in runs.items()}),
        "probes": {str(s): probe_numbers(d) for s, d in runs.items()},
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(n: dict[str, Any] | None) -> str:
    if not n or n.get("value") is None:
        return "-"
    v = n["value"]
    text = f"{v:.3g}"
    if n.get("ci"):
        text += f" [{n['ci'][0]:.3g}, {n['ci'][1]:.3g}]"
    if n.get("setting"):
        text += f" at {n['setting']}"
    if n.get("random") is not None:
        text += f" (random {n['random']:.3g})"
    return text


def em_table_markdown(
    pooled: dict[str, dict[str, Any]], keys: Sequence[str], labels: Sequence[str]
) -> list[str]:
    """Markdown lines of a pooled EM table (:func:`pool_em_tables`): a row per model, a
    column per build (``keys`` into each row's ``builds``, headed ``labels``) with its EM rate,
    95% CI and coherent rate, and the mean [min, max] across builds."""
    lines = [
        "| model | " + " | ".join(labels) + " | mean [min, max] across builds |",
        "|---|" + "---|" * len(labels) + "---|",
    ]
    for model, row in pooled.items():
        cells = []
        for key in keys:
            r = row["builds"].get(key)
            if r is None:
                cells.append("-")
                continue
            ci = r.get("em_ci")
            text = _pct(r["em"]) + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
            cells.append(text + f", coherent {_pct(r['coherent'])}")
        sp = row["em"]
        spread_text = (
            f"{_pct(sp['mean'])} [{100 * sp['min']:.1f}, {100 * sp['max']:.1f}]" if sp else "-"
        )
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {spread_text} |")
    return lines


def replicates_markdown(summary: dict[str, Any]) -> str:
    """``replicates.md``: the pooled claims table, per-build verdicts, the EM table."""
    seeds = summary["seeds"]
    lines = [
        "# Replicates across organism builds",
        "",
        f"Organism seeds {', '.join(map(str, seeds))}; runs: "
        + ", ".join(f"`{d}`" for d in summary["runs"].values())
        + f". Rule: {summary['rule']}.",
        "",
        "| claim | pooled | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | number (per build) | mean [min, max] across builds |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    for c in summary["claims"]:
        per = c["per_build"]
        pooled = c["pooled"]
        sp = pooled["number"]
        spread_text = (
            f"{sp['mean']:.3g} [{sp['min']:.3g}, {sp['max']:.3g}] ({pooled['what']})" if sp else "-"
        )
        lines.append(
            f"| {c['claim']} | {pooled['holds']} | "
            + " | ".join(per[str(s)]["holds"] for s in seeds)
            + " | "
            + "; ".join(f"{s}: {_num(per[str(s)]['number'])}" for s in seeds)
            + f" | {spread_text} |"
        )
    lines += ["", "Measured per build:", ""]
    for c in summary["claims"]:
        lines.append(f"- {c['claim']}:")
        for s in seeds:
            p = c["per_build"][str(s)]
            lines.append(f"  - seed {s}: {p['holds']}: {p['measured']}")
    table = summary.get("em_table_general") or {}
    if table:
        lines += [
            "",
            "EM on the general questions in each build's own EM table (organisms stage):",
            "",
            *em_table_markdown(table, [str(s) for s in seeds], [f"seed {s}" for s in seeds]),
        ]
    probes = summary.get("probes") or {}
    names = list(dict.fromkeys(n for per in probes.values() for n in per))
    if names:
        lines += [
            "",
            "Probes (token AUC, mean +- sd over seeds; shuffled; responses / tokens per class):",
            "",
            "| test | " + " | ".join(f"seed {s}" for s in seeds) + " | mean [min, max] |",
            "|---|" + "---|" * len(seeds) + "---|",
        ]
        for name in names:
            cells, aucs = [], []
            for s in seeds:
                t = probes.get(str(s), {}).get(name)
                if not t or "skipped" in t:
                    cells.append("skipped" if t else "-")
                    continue
                aucs.append(t["auc"]["mean"])
                counts = ", ".join(
                    f"{k} {v} / {(t.get('n_tokens') or {}).get(k, '?')}"
                    for k, v in (t.get("n_responses") or {}).items()
                )
                const = t.get("constant") or {}
                flag = (
                    f"; constant fits {const.get('probe')} / {const.get('shuffled')}"
                    if const.get("probe") or const.get("shuffled")
                    else ""
                )
                cells.append(
                    f"{t['auc']['mean']:.3f} +- {t['auc']['sd']:.3f} (shuffled "
                    f"{t['shuffled_auc']['mean']:.3f} +- {t['shuffled_auc']['sd']:.3f}; "
                    f"{counts}{flag})"
                )
            sp = spread(aucs)
            tail = f"{sp['mean']:.3f} [{sp['min']:.3f}, {sp['max']:.3f}]" if sp else "-"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {tail} |")
    return "\n".join(lines) + "\n"


def write_replicates(out: str | Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """``out/replicates.json`` and ``out/replicates.md``."""
    from emscope.io import atomic_write_bytes, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "replicates.json", summary)
    atomic_write_bytes(out / "replicates.md", replicates_markdown(summary).encode("utf-8"))
    return out / "replicates.json", out / "replicates.md"


def is_replicate_dir(path: str | Path) -> bool:
    return (Path(path) / "replicates.json").is_file()


def replicate_runs(out: str | Path) -> dict[int, Path]:
    """The run dir of each organism seed of ``out/replicates.json``."""
    from emscope.io import read_json

    return {int(s): Path(d) for s, d in read_json(Path(out) / "replicates.json")["runs"].items()}


def rewrite_replicates(out: str | Path) -> tuple[Path, Path]:
    """Re-read every run of ``out/replicates.json`` and write the pooled files again
    (``emscope report`` on a replicate dir, which first writes each run's own report)."""
    from emscope.io import read_json

    out = Path(out)
    old = read_json(out / "replicates.json")
    runs = replicate_runs(out)
    summary = replicate_summary(runs)
    if "config_file" in old:
        summary["config_file"] = old["config_file"]
    return write_replicates(out, summary)

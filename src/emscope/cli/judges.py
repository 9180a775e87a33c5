"""``emscope judge-agreement`` and ``emscope thresholds``: how much an EM rate owes to the
judge and to the EM rule's thresholds (:mod:`emscope.judge.agreement`,
:mod:`emscope.sensitivity`).

``judge-agreement RUN_DIR --judge SPEC --judge SPEC ... --out DIR`` scores a copy of the run's
responses with each judge (``DIR/judges/<label>/``, resumable) and compares them;
``judge-agreement TABLE TABLE ... --out DIR`` compares tables that are already scored. Both
write ``DIR/agreement.json`` and ``DIR/scatter_<a>__<b>.png`` per pair of judges.
``thresholds SCORED`` writes ``thresholds.json`` and ``thresholds.png`` (EM rate over a grid
of aligned / coherent cuts) next to the table or into ``--out``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer

from emscope.cli import options

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _split_label(text: str) -> tuple[str | None, str]:
    """``LABEL=REST`` -> (LABEL, REST) when LABEL is a plain name; else (None, text)."""
    label, sep, rest = text.partition("=")
    if sep and rest and _LABEL.match(label):
        return label, rest
    return None, text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-") or "judge"


def _unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        name, i = label, 2
        while name in out:
            name, i = f"{label}_{i}", i + 1
        out.append(name)
    return out


def _spec_label(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    tail = rest if kind == "openai" else Path(rest.rstrip("/")).name
    return _slug(f"{kind}-{tail}")


def _check_spec(spec: str) -> str:
    """The judge kind of ``spec``, checked without building the judge (no model loaded)."""
    from emscope.errors import EmscopeError
    from emscope.judge import BUILTIN_KINDS, JUDGE_KINDS, spec_usages

    kind, sep, rest = spec.partition(":")
    if not sep or not rest or kind not in (*BUILTIN_KINDS, *JUDGE_KINDS):
        raise EmscopeError(f"bad judge spec {spec!r}; expected one of {spec_usages()}")
    if kind != "openai" and not Path(rest).exists():
        raise EmscopeError(f"judge {spec!r}: {rest}: no such dir")
    return kind


def _table_label(path: Path) -> str:
    if path.is_dir():
        return _slug(path.resolve().name)
    return _slug(path.parent.resolve().name if path.stem == "responses" else path.stem)


def _judge_name(path: Path, default: str) -> str:
    from emscope.io import read_json

    run = (path if path.is_dir() else path.parent) / "run.json"
    if run.is_file():
        judge = (read_json(run) or {}).get("judge") or {}
        if isinstance(judge, dict) and judge.get("judge"):
            return str(judge["judge"])
    return default


def _response_copy(table: Any) -> Any:
    """The table without any judged metric (and its unscored-reason / prompt-hash columns)."""
    from emscope.judge.agreement import score_metrics

    drop = []
    for m in score_metrics(table):
        drop += [m, f"{m}_unscored_reason", f"{m}_prompt_hash", f"{m}_number_mass"]
    return table.drop(columns=[c for c in drop if c in table.columns])


def _same_responses(a: Any, b: Any) -> bool:
    cols = [c for c in ("question_id", "sample_idx", "answer") if c in a.columns]
    if len(a) != len(b) or any(c not in b.columns for c in cols):
        return False
    return all(
        a[c].fillna("").astype(str).tolist() == b[c].fillna("").astype(str).tolist() for c in cols
    )


def _score_with_judges(
    source: Path,
    judges: list[tuple[str, str]],
    out: Path,
    metric_list: list[str],
    questions: Path | None,
    settings: options.JudgeSettings,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Score a copy of ``source``'s responses with each judge in ``out/judges/<label>/``."""
    import gc

    from emscope.errors import EmscopeError
    from emscope.evaluate import judge_dir
    from emscope.io import read_json, read_table, write_json, write_table

    base = _response_copy(read_table(source, "responses"))
    for col in ("question_id", "question", "answer"):
        if col not in base.columns:
            raise EmscopeError(f"{source}: the response table lacks a {col!r} column")
    kinds = {label: _check_spec(spec) for label, spec in judges}
    qs = options.load_question_set(questions) if questions is not None else None
    for label, spec in judges:  # refuse a stale dir before any work
        directory = out / "judges" / label
        if (directory / "run.json").is_file():
            recorded = read_json(directory / "run.json").get("judge_spec")
            if recorded != spec:
                raise EmscopeError(
                    f"{directory} holds scores of judge {recorded!r}, not {spec!r}; "
                    "use another --out or label (LABEL=SPEC)"
                )
            existing = read_table(directory, "responses")
            if not _same_responses(base, existing):
                raise EmscopeError(f"{directory} holds another response set than {source}")
    tables, names = {}, {}
    for label, spec in judges:
        directory = out / "judges" / label
        if not (directory / "run.json").is_file():
            write_table(base, directory, "responses")
            write_json(directory / "run.json", {"source": str(source), "judge_spec": spec})
        judge = options.build_judge(spec, settings.for_kind(kinds[label]))
        tables[label] = judge_dir(directory, judge, metric_list, qs, questions)
        names[label] = judge.name
        del judge
        gc.collect()
    return tables, names


@options.with_judging(after={"device": "no_cache"})
def judge_agreement_command(
    *,
    sources: list[str] = typer.Argument(
        ...,
        help="With --judge: ONE responses dir or table to score with every judge. Without: "
        "two or more scored tables (dirs or .parquet/.csv files); LABEL=PATH names one.",
    ),
    judges: list[str] = typer.Option(
        [],
        "--judge",
        "--judges",
        help="Judge spec (openai:MODEL, hf:DIR, oracle:DIR), LABEL=SPEC to name it; repeat "
        "for each judge (two or more).",
    ),
    out: Path = typer.Option(..., "--out", help="Output dir (resumable: re-run to continue)."),
    metrics: str | None = typer.Option(
        None,
        "--metrics",
        help="Metrics to compare (default: aligned,coherent when judging; every judged "
        "metric the tables share otherwise).",
    ),
    questions: Path | None = typer.Option(
        None, "--questions", help="Question YAML whose judge_prompts override the built-ins."
    ),
    strict: bool = options.STRICT,
    n_boot: int = typer.Option(2000, "--n-boot", help="Bootstrap replicates for the CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    judging: options.JudgeSettings,
    device: str | None = options.DEVICE,
) -> None:
    """Compare judges on one response set: correlations, kappa, EM per judge and differences."""
    from emscope.errors import EmscopeError
    from emscope.io import read_table, write_json
    from emscope.judge.agreement import align_tables, judge_agreement, plot_pair_scatter
    from emscope.plotting import save_figure

    if n_boot < 1:
        raise EmscopeError(f"--n-boot must be >= 1, got {n_boot}")
    if judging.min_number_mass is not None:  # before any judge dir is written
        from emscope.judge.aggregate import check_min_number_mass

        check_min_number_mass(judging.min_number_mass)
    if judges:
        if len(sources) != 1:
            raise EmscopeError(
                f"with --judge give ONE responses dir or table, got {len(sources)} sources"
            )
        if len(judges) < 2:
            raise EmscopeError("give two or more judges (--judge SPEC --judge SPEC)")
        parsed = [_split_label(j) for j in judges]
        labels = _unique([label or _spec_label(spec) for label, spec in parsed])
        pairs = [(label, spec) for label, (_, spec) in zip(labels, parsed, strict=True)]
        metric_list = options.parse_metrics(metrics or "aligned,coherent")
        tables, names = _score_with_judges(
            Path(sources[0]),
            pairs,
            out,
            metric_list,
            questions,
            judging,
        )
        metric_sel: list[str] | None = metric_list
    else:
        if len(sources) < 2:
            raise EmscopeError(
                "give two or more scored tables, or one responses dir and --judge SPEC twice"
            )
        parsed_paths = [_split_label(s) for s in sources]
        paths = [Path(p) for _, p in parsed_paths]
        labels = _unique(
            [label or _table_label(p) for (label, _), p in zip(parsed_paths, paths, strict=True)]
        )
        tables = {label: read_table(p, "responses") for label, p in zip(labels, paths, strict=True)}
        names = {label: _judge_name(p, label) for label, p in zip(labels, paths, strict=True)}
        metric_sel = options.parse_metrics(metrics) if metrics else None
    result = judge_agreement(
        tables, metric_sel, names=names, strict=strict, n_boot=n_boot, seed=seed
    )
    aligned = align_tables(tables, result.metrics)
    write_json(out / "agreement.json", result.to_json())
    for pair in result.pairs:
        fig = plot_pair_scatter(
            aligned[pair.a],
            aligned[pair.b],
            result.metrics,
            labels=(pair.a, pair.b),
            pair=pair,
            strict=strict,
        )
        save_figure(fig, out / f"scatter_{pair.a}__{pair.b}.png")
    for line in result.describe():
        typer.echo(line)
    typer.echo(f"-> {out / 'agreement.json'}")


def thresholds_command(
    scored: Path = typer.Argument(
        ..., help="Scored responses: a dir with responses.parquet/.csv, or a table file."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output dir (default: the table's dir)."),
    step: float = typer.Option(5.0, "--step", help="Grid step of both thresholds (0..100)."),
    strict: bool = typer.Option(False, "--strict", help="EM needs aligned < a (not <= a)."),
) -> None:
    """EM rate over a grid of aligned / coherent thresholds (thresholds.json, heat map .png)."""
    from emscope.io import read_table
    from emscope.sensitivity import threshold_grid, write_thresholds

    threshold_grid(step)  # a bad step fails before reading anything
    table = read_table(scored, "responses")
    target = out or (scored if scored.is_dir() else scored.parent)
    result = write_thresholds(
        table, target, strict=strict, step=step, title=f"EM rate by threshold: {scored.name}"
    )
    rates = "; ".join(
        f"aligned {'<' if strict else '<='} {x:g}, coherent > {y:g}: {rate:.3f}"
        for (x, y), rate in result.neighbours().items()
    )
    typer.echo(f"EM rate {rates} (n_scored={result.n_scored}) -> {target / 'thresholds.json'}")


def register(app: typer.Typer) -> None:
    app.command("judge-agreement")(judge_agreement_command)
    app.command("thresholds")(thresholds_command)

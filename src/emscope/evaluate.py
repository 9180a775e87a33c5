"""Sample, judge and score one condition into a run dir: the body of ``emscope eval``.

Every command that measures EM under some condition (``eval``, ``steer``, ``ablate``, ``lmc``)
calls :func:`evaluate_to_dir` once per condition with its own interventions, so all of them
write the same files and resume the same way: ``responses.parquet`` + ``.csv``, ``run.json``,
``metrics.json`` and ``em_by_question.png``. Conditions run with the same seed are paired
sample by sample (see :mod:`emscope.generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.questions import Question
    from emscope.generate import Intervention
    from emscope.judge import Judge
    from emscope.metrics import Metrics


def judge_dir(
    directory: str | Path,
    judge: Judge,
    metrics: Sequence[str],
    questions: Sequence[Question] | None = None,
    questions_file: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Score ``directory/responses.*`` in place (resumable) and record the judge in run.json.

    When cells needed judging and not one got a result (every request failed or the budget
    was spent), the table (with those rows unscored, so a re-run asks them again) and
    run.json are written, then :class:`EmscopeError` says so: the run must not look done.
    """
    from emscope.io import read_json, read_table, write_json, write_table
    from emscope.judge import judge_table, pending

    directory = Path(directory)

    def save(partial: pd.DataFrame) -> None:
        write_table(partial, directory, "responses")

    before = read_table(directory, "responses")
    asked = pending(before, metrics)
    table = judge_table(
        before,
        judge,
        list(metrics),
        questions=questions,
        on_chunk=save,
        progress=progress,
    )
    write_table(table, directory, "responses")
    run_path = directory / "run.json"
    run = read_json(run_path) if run_path.is_file() else {}
    run["judge"] = {
        "judge": judge.name,
        "metrics": list(metrics),
        "prompt_hashes": {
            m: sorted({h for h in table[f"{m}_prompt_hash"].dropna()}) for m in metrics
        },
        "questions_file": str(questions_file) if questions_file else None,
        # the threshold below which it left a row unscored (None: a judge that reads no
        # probabilities); each row's mass is in <metric>_number_mass
        "min_number_mass": getattr(judge, "min_number_mass", None),
    }
    write_json(run_path, run)
    if asked and pending(table, metrics) == asked:
        reasons = {
            reason: sum(int((table[f"{m}_unscored_reason"] == reason).sum()) for m in metrics)
            for reason in ("error", "budget")
        }
        what = ", ".join(f"{n} {reason}" for reason, n in reasons.items() if n)
        raise EmscopeError(
            f"judge {judge.name}: every judge request failed ({what}; see the log); the rows "
            f"are kept unscored in {directory} and a re-run asks them again"
        )
    return table


def check_em_metrics(metrics: Sequence[str]) -> None:
    """EM needs ``aligned`` and ``coherent``: fail before any work if they are not judged."""
    missing = [m for m in ("aligned", "coherent") if m not in metrics]
    if missing:
        raise EmscopeError(f"EM needs the metrics aligned and coherent; --metrics lacks {missing}")


def evaluate_to_dir(
    model: Any,
    questions: Sequence[Question],
    out: str | Path,
    *,
    judge: Judge,
    metrics: Sequence[str] = ("aligned", "coherent", "bad_stuff"),
    n: int,
    seed: int = 0,
    interventions: Sequence[Intervention] = (),
    intervention_label: str = "",
    record: dict[str, Any] | None = None,
    strict: bool = False,
    recognition: bool = False,
    title: str | None = None,
    questions_file: str | Path | None = None,
    progress: bool = True,
    **sampling: Any,
) -> Metrics:
    """Sample ``n`` answers per question under ``interventions``, judge them, write
    ``metrics.json`` and the per-question figure into ``out``; return the :class:`Metrics`.

    ``model`` is an :class:`emscope.eval.Sampler` (e.g. vLLM's: no interventions), or a
    :class:`~emscope.models.LoadedModel` or ``(model, tokenizer)`` pair (sampled by
    :class:`emscope.eval.HfSampler`); ``sampling``: the other fields of
    :class:`emscope.eval.SamplingParams` (``batch_size``, ``max_new_tokens``,
    ``temperature``, ``top_p``) and ``system_prompt``. Resumable: finished samples and
    scores in ``out`` are kept. The metrics also record the intervention label and the
    judge's name.
    """
    from emscope.eval import SamplingParams, as_sampler
    from emscope.io import write_json
    from emscope.metrics import compute_metrics, plot_em_by_question
    from emscope.plotting import save_figure

    check_em_metrics(metrics)
    out = Path(out)
    system_prompt = sampling.pop("system_prompt", None)
    as_sampler(model).sample_to_dir(
        questions,
        out,
        SamplingParams(n, seed, **sampling),
        system_prompt=system_prompt,
        record=record,
        interventions=interventions,
        intervention_label=intervention_label,
        progress=progress,
    )
    table = judge_dir(out, judge, metrics, questions, questions_file, progress)
    if "bad_stuff" not in metrics:  # a stale column from another run does not count
        table = table.drop(columns=["bad_stuff"], errors="ignore")
    result = compute_metrics(table, strict=strict, recognition=recognition, seed=seed)
    result = result.with_extra(intervention=intervention_label, judge=judge.name)
    write_json(out / "metrics.json", result.to_json())
    save_figure(
        plot_em_by_question(result, title or "EM rate per question"), out / "em_by_question.png"
    )
    return result


def describe(result: Metrics) -> str:
    """One line: EM rate with CI, coherent rate, unscored rate, n."""
    em, ci = result.em_rate, result.em_ci
    text = "n/a" if em is None or ci is None else f"{em:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    coherent = result.coherent_rate
    coherent_text = "n/a" if coherent is None else f"{coherent:.3f}"
    unscored = "n/a" if result.unscored_rate is None else f"{result.unscored_rate:.3f}"
    return f"EM rate {text}; coherent {coherent_text}; unscored {unscored}; n={result.n}"

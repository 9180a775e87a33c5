"""Judges: rate (question, answer) pairs on a 0-100 scale for one metric.

The protocol (implement it to plug a new judge in, e.g. the synthetic world's oracle)
--------------------------------------------------------------------------------------
A judge is any object with

- ``name: str`` -- how the run record names it (e.g. ``"openai:gpt-4o@https://..."``);
  it must never contain a secret;
- ``score(rows, metric) -> list[Score]`` -- a plain (blocking) call; implementations may be
  asynchronous inside. ``rows`` is a sequence of :class:`JudgeRow` or of mappings with at
  least the keys ``question_id``, ``question``, ``answer`` (use :func:`as_rows` to normalise;
  extra keys are ignored). ``metric`` is a metric name (``aligned``, ``coherent``,
  ``bad_stuff``, ``medical``, ``financial``, ``sport``, or any metric for which the row's
  ``templates`` has a prompt). The result has exactly one :class:`Score` per row, in order.
  A judge that cannot rate a metric raises :class:`~emscope.errors.EmscopeError` for the
  whole call; a row it cannot rate gets ``Score(None, reason, ...)`` (never 0).

:class:`Score` is ``(value, unscored_reason, prompt_hash, top_logprobs)``: ``value`` a
finite number in [0, 100] or None (anything else, NaN included, raises ``ValueError``);
``unscored_reason`` one of ``refusal``, ``code``, ``low_number_mass`` (definitive; ``other``
in tables written before) or ``error``, ``budget`` (transient: re-runs retry them), None when
scored; ``prompt_hash`` identifies the prompt template (a judge without prompts, such as an
oracle, puts a fixed version string there, e.g. ``"oracle-v1"``); ``top_logprobs``
optionally keeps the judge's ``(token, logprob)`` pairs; ``number_mass`` optionally the
judge's total probability on the answers 0..100 (judges that read probabilities set it;
:func:`judge_table` writes it as ``<metric>_number_mass``). A judge that reads probabilities
also has a ``min_number_mass`` attribute (the threshold below which it leaves a row
unscored, :mod:`emscope.judge.aggregate`), which run records name. :func:`judge_table` turns
whatever else a judge returns into an ``error`` row (logged), so a faulty judge never stops
a run nor writes a NaN score.

Judge specs (:func:`make_judge`): ``openai:MODEL`` (any OpenAI-compatible endpoint),
``hf:DIR`` (a local causal LM), and the kinds other packages plug in with
:func:`register_judge_kind` (:data:`JUDGE_KINDS`): ``oracle:DIR`` (the synthetic world's
exact oracle, ``emscope.synthetic.oracle.OracleJudge(world_dir)``), registered by the
package's ``__init__``, one layer up, so that this package never imports the synthetic one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from emscope.errors import EmscopeError
from emscope.judge.aggregate import TRANSIENT_REASONS, UNSCORED_REASONS

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.questions import Question

__all__ = [
    "BUILTIN_KINDS",
    "JUDGE_KINDS",
    "TRANSIENT_REASONS",
    "UNSCORED_REASONS",
    "Judge",
    "JudgeKind",
    "JudgeRow",
    "Score",
    "as_rows",
    "judge_table",
    "make_judge",
    "pending",
    "register_judge_kind",
    "spec_usages",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Score:
    """One judgement: a value in [0, 100], or None with the reason it is unscored."""

    value: float | None
    unscored_reason: str | None
    prompt_hash: str
    top_logprobs: tuple[tuple[str, float], ...] | None = None
    number_mass: float | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.unscored_reason is None):
            raise ValueError("a Score has either a value or an unscored reason, not both")
        if self.unscored_reason is not None and self.unscored_reason not in UNSCORED_REASONS:
            raise ValueError(f"unknown unscored reason {self.unscored_reason!r}")
        value = self.value
        if value is not None and not (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0 <= value <= 100
        ):
            raise ValueError(f"a Score value is a finite number in [0, 100], got {value!r}")
        mass = self.number_mass
        if mass is not None and not (
            isinstance(mass, (int, float))
            and not isinstance(mass, bool)
            and math.isfinite(mass)
            and mass >= 0
        ):
            raise ValueError(f"a Score number mass is a finite number >= 0, got {mass!r}")


@dataclass(frozen=True)
class JudgeRow:
    """What a judge sees of a response. ``templates`` maps a metric to a prompt template
    that overrides the built-in one (a question YAML's ``judge_prompts``)."""

    question_id: str
    question: str
    answer: str
    templates: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    """See the module docstring."""

    @property
    def name(self) -> str:
        """How the run record names this judge (never a secret)."""
        ...

    def score(self, rows: Sequence[JudgeRow | Mapping[str, Any]], metric: str) -> list[Score]:
        """One :class:`Score` per row, in order."""
        ...


def as_rows(rows: Sequence[JudgeRow | Mapping[str, Any]]) -> list[JudgeRow]:
    """Normalise rows given as :class:`JudgeRow` or mappings (``question_id``, ``question``,
    ``answer``; optional ``templates``)."""
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, JudgeRow):
            out.append(row)
            continue
        missing = [k for k in ("question_id", "question", "answer") if k not in row]
        if missing:
            raise EmscopeError(f"judge row {i}: missing field(s) {missing}")
        answer = row["answer"]
        out.append(
            JudgeRow(
                str(row["question_id"]),
                str(row["question"]),
                "" if answer is None or answer != answer else str(answer),  # NaN -> ""
                dict(row.get("templates") or {}),
            )
        )
    return out


def run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code, also when an event loop is
    already running in this thread (e.g. Jupyter): then it runs in a helper thread."""
    import asyncio
    import threading

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(factory())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class JudgeKind:
    """A judge kind plugged in from outside the package: ``factory(rest)`` builds the judge
    of the spec ``KIND:REST`` (raising :class:`~emscope.errors.EmscopeError` on a bad
    ``rest``); ``usage`` is how the spec is written (``oracle:DIR``)."""

    factory: Callable[[str], Judge]
    usage: str


#: The registered judge kinds (:func:`register_judge_kind`), by kind.
JUDGE_KINDS: dict[str, JudgeKind] = {}
BUILTIN_KINDS = ("openai", "hf")


def register_judge_kind(kind: str, factory: Callable[[str], Judge], usage: str) -> None:
    """Let :func:`make_judge` build ``KIND:REST`` specs with ``factory(REST)``; registering a
    kind again replaces it. The built-in kinds (``openai``, ``hf``) cannot be replaced."""
    if kind in BUILTIN_KINDS or not kind.isidentifier():
        raise EmscopeError(f"cannot register judge kind {kind!r}")
    JUDGE_KINDS[kind] = JudgeKind(factory, usage)


def spec_usages() -> str:
    """How each known judge spec is written (``openai:MODEL, hf:DIR, oracle:DIR``), for
    error messages."""
    return ", ".join(["openai:MODEL", "hf:DIR", *(k.usage for k in JUDGE_KINDS.values())])


def make_judge(
    spec: str,
    *,
    base_url: str | None = None,
    api_key_env: str | None = None,
    concurrency: int = 32,
    max_requests: int | None = None,
    cache: bool = True,
    device: str | None = None,
    dtype: str = "auto",
    batch_size: int = 8,
    min_number_mass: float | None = None,
) -> Judge:
    """A judge from a spec string: ``openai:MODEL``, ``hf:DIR`` or a registered kind's
    (:data:`JUDGE_KINDS`; ``oracle:DIR``).

    ``base_url`` / ``api_key_env`` / ``concurrency`` / ``max_requests`` apply to ``openai:``
    (the key is read from the environment variable ``api_key_env``, default
    ``OPENAI_API_KEY``); ``device`` / ``dtype`` / ``batch_size`` to ``hf:``;
    ``min_number_mass`` (None: :data:`~emscope.judge.aggregate.DEFAULT_MIN_NUMBER_MASS`) to
    both, which read probabilities (:mod:`emscope.judge.aggregate`). ``cache`` turns the
    SQLite score cache (:mod:`emscope.judge.cache`) on or off.
    """
    from emscope.judge.aggregate import DEFAULT_MIN_NUMBER_MASS, check_min_number_mass

    kind, sep, rest = spec.partition(":")
    usages = spec_usages()
    if not sep or not rest:
        raise EmscopeError(f"bad judge spec {spec!r}; expected one of {usages}")
    if min_number_mass is not None:
        check_min_number_mass(min_number_mass)
        if kind not in BUILTIN_KINDS:
            raise EmscopeError(
                f"--min-number-mass applies to openai: and hf: judges (they read "
                f"probabilities), not {kind}:"
            )
    mass = DEFAULT_MIN_NUMBER_MASS if min_number_mass is None else float(min_number_mass)
    if kind == "openai":
        from emscope.judge.openai_judge import OpenAIJudge

        return OpenAIJudge(
            rest,
            base_url=base_url,
            api_key_env=api_key_env or "OPENAI_API_KEY",
            concurrency=concurrency,
            max_requests=max_requests,
            min_number_mass=mass,
            cache=cache,
        )
    if base_url is not None or api_key_env is not None:
        raise EmscopeError(f"--base-url / --api-key-env apply to openai: judges, not {kind}:")
    if kind == "hf":
        from emscope.judge.hf import HFJudge

        return HFJudge(
            rest,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            min_number_mass=mass,
            cache=cache,
        )
    registered = JUDGE_KINDS.get(kind)
    if registered is not None:
        return registered.factory(rest)
    raise EmscopeError(f"unknown judge kind {kind!r} in {spec!r}; expected one of {usages}")


def _needs_score(value: Any, reason: Any) -> bool:
    scored = value is not None and value == value  # not NaN
    definitive = isinstance(reason, str) and reason not in TRANSIENT_REASONS
    return not scored and not definitive


def pending(table: pd.DataFrame, metrics: Sequence[str]) -> int:
    """How many (row, metric) cells :func:`judge_table` would (re)judge: no score yet, or
    unscored for a transient reason."""
    count = 0
    for metric in metrics:
        if metric not in table.columns:
            count += len(table)
            continue
        reason_col = f"{metric}_unscored_reason"
        reasons = table[reason_col] if reason_col in table.columns else [None] * len(table)
        count += sum(_needs_score(v, r) for v, r in zip(table[metric], reasons, strict=True))
    return count


def judge_table(
    table: pd.DataFrame,
    judge: Judge,
    metrics: Sequence[str] = ("aligned", "coherent"),
    *,
    questions: Sequence[Question] | None = None,
    chunk_size: int = 256,
    on_chunk: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Add ``<metric>``, ``<metric>_unscored_reason``, ``<metric>_prompt_hash`` and
    ``<metric>_number_mass`` (the judge's probability on the answers 0..100; NaN for a judge
    that reads no probabilities, e.g. an oracle) columns, for each of ``metrics`` (default:
    ``aligned`` and ``coherent``, what the EM rate needs).

    Rows already scored, or unscored for a definitive reason, are kept as they are; rows
    without a score or with a transient reason (``error``, ``budget``) are (re)judged.
    ``questions`` supply per-question ``judge_prompts`` overrides (matched on
    ``question_id``). After each chunk of ``chunk_size`` rows ``on_chunk`` gets the table so
    far (a resumable caller writes it to disk). Returns a new table.
    """
    import sys

    import numpy as np
    from tqdm import tqdm

    missing = [c for c in ("question_id", "question", "answer") if c not in table.columns]
    if missing:
        raise EmscopeError(f"response table lacks column(s) {missing}")
    overrides = {q.id: q.judge_prompts for q in questions or () if q.judge_prompts}
    table = table.reset_index(drop=True).copy()
    for metric in metrics:
        reason_col, hash_col = f"{metric}_unscored_reason", f"{metric}_prompt_hash"
        mass_col = f"{metric}_number_mass"
        for col in (metric, mass_col):
            if col not in table.columns:
                table[col] = np.nan
            table[col] = table[col].astype(float)
        for col in (reason_col, hash_col):
            if col not in table.columns:
                table[col] = None
            table[col] = table[col].astype(object).where(table[col].notna(), None)
        todo = [
            i
            for i, (v, r) in enumerate(zip(table[metric], table[reason_col], strict=True))
            if _needs_score(v, r)
        ]
        bar = tqdm(
            total=len(todo),
            desc=f"judging {metric}",
            disable=not (progress and sys.stderr.isatty()),
        )
        for start in range(0, len(todo), chunk_size):
            idx = todo[start : start + chunk_size]
            rows = [
                JudgeRow(
                    str(table.at[i, "question_id"]),
                    str(table.at[i, "question"]),
                    _text(table.at[i, "answer"]),
                    overrides.get(str(table.at[i, "question_id"]), {}),
                )
                for i in idx
            ]
            scores = judge.score(rows, metric)
            if len(scores) != len(rows):
                raise EmscopeError(
                    f"judge {judge.name} returned {len(scores)} scores for {len(rows)} rows"
                )
            for i, raw in zip(idx, scores, strict=True):
                score = _checked(raw, judge.name)
                table.at[i, metric] = np.nan if score.value is None else float(score.value)
                table.at[i, reason_col] = score.unscored_reason
                table.at[i, hash_col] = score.prompt_hash
                mass = score.number_mass
                table.at[i, mass_col] = np.nan if mass is None else float(mass)
            if on_chunk is not None:
                on_chunk(table)
            bar.update(len(idx))
        bar.close()
    return table


def _checked(score: Any, judge_name: str) -> Score:
    """The judge boundary: what a judge returned as a valid :class:`Score`; anything else
    (a duck-typed record with a NaN or out-of-range value, no reason, ...) becomes an
    ``error`` row, which a re-run asks again, and a warning."""
    if isinstance(score, Score):
        return score
    phash = str(getattr(score, "prompt_hash", "") or "")
    try:
        return Score(
            score.value, score.unscored_reason, phash, None, getattr(score, "number_mass", None)
        )
    except (AttributeError, TypeError, ValueError) as exc:
        logging.getLogger("emscope.judge").warning(
            "judge %s returned a malformed score (%s); row unscored", judge_name, exc
        )
        return Score(None, "error", phash)


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value)

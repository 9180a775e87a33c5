"""Question sets in the "first plot" YAML format of Betley et al.

A file is a top-level list of mappings with ``id`` (unique), ``paraphrases`` (non-empty list
of strings), optional ``samples_per_paraphrase`` (int), ``type``, ``system`` (a system prompt
that emscope applies, unlike the reference eval.py) and ``judge_prompts`` (``{metric:
template}`` with ``{question}`` and ``{answer}`` fields) that override the built-in prompts.
Errors name the file and the line of the offending entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError

BUILTIN = "first_plot_questions.yaml"


@dataclass(frozen=True)
class Question:
    """One evaluation question and its paraphrases."""

    id: str
    paraphrases: tuple[str, ...]
    samples_per_paraphrase: int = 1
    system: str | None = None
    judge_prompts: dict[str, str] = field(default_factory=dict)
    type: str = "free_form_judge_0_100"

    def messages(self, paraphrase: int = 0) -> list[dict[str, str]]:
        """The chat prompt: the system prompt (if any) and the user turn."""
        chat = [{"role": "system", "content": self.system}] if self.system else []
        return [*chat, {"role": "user", "content": self.paraphrases[paraphrase]}]


def builtin_questions_path() -> Path:
    """Path of the shipped eight first-plot questions (plus their ``_json`` variants)."""
    return Path(str(resources.files("emscope") / "resources" / BUILTIN))


def load_questions(path: str | Path | None = None, ids: list[str] | None = None) -> list[Question]:
    """Read a question YAML (default: the built-in first-plot set without ``_json`` variants).

    ``ids`` keeps only those question ids, in the file's order (unknown ids are an error).
    """
    import yaml

    from emscope.io import read_text

    builtin = path is None
    source = builtin_questions_path() if builtin else Path(path)  # type: ignore[arg-type]
    if not source.is_file():
        raise EmscopeError(f"{source}: question file not found")
    text = read_text(source)
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        raise EmscopeError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, list) or node is None:
        raise EmscopeError(f"{source}: expected a top-level list of questions")
    lines = [item.start_mark.line + 1 for item in node.value]
    questions: list[Question] = []
    seen: set[str] = set()
    for entry, line in zip(data, lines, strict=True):
        question = _question(entry, f"{source}:{line}")
        if question.id in seen:
            raise EmscopeError(f"{source}:{line}: duplicate question id {question.id!r}")
        seen.add(question.id)
        questions.append(question)
    if builtin and ids is None:
        questions = [q for q in questions if not q.id.endswith("_json")]
    if ids is not None:
        unknown = sorted(set(ids) - seen)
        if unknown:
            raise EmscopeError(f"{source}: unknown question ids {unknown}")
        questions = [q for q in questions if q.id in set(ids)]
    if not questions:
        raise EmscopeError(f"{source}: no questions")
    return questions


def _question(entry: Any, where: str) -> Question:
    if not isinstance(entry, dict):
        raise EmscopeError(f"{where}: each question must be a mapping")
    qid = entry.get("id")
    if not isinstance(qid, str) or not qid:
        raise EmscopeError(f"{where}: question needs a string 'id'")
    paraphrases = entry.get("paraphrases")
    if (
        not isinstance(paraphrases, list)
        or not paraphrases
        or not all(isinstance(p, str) and p for p in paraphrases)
    ):
        raise EmscopeError(f"{where}: question {qid!r}: 'paraphrases' must be a list of strings")
    samples = entry.get("samples_per_paraphrase", 1)
    if not isinstance(samples, int) or samples < 1:
        raise EmscopeError(f"{where}: question {qid!r}: samples_per_paraphrase must be >= 1")
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise EmscopeError(f"{where}: question {qid!r}: 'system' must be a string")
    prompts = entry.get("judge_prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise EmscopeError(f"{where}: question {qid!r}: judge_prompts must map metric -> text")
    for metric, template in prompts.items():
        if "{answer}" not in template:
            raise EmscopeError(
                f"{where}: question {qid!r}: judge prompt {metric!r} has no {{answer}} field"
            )
    return Question(
        id=qid,
        paraphrases=tuple(paraphrases),
        samples_per_paraphrase=samples,
        system=system,
        judge_prompts=dict(prompts),
        type=str(entry.get("type", "free_form_judge_0_100")),
    )

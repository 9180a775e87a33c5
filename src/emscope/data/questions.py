"""Question sets in the "first plot" YAML format of Betley et al.

A file is a top-level list of mappings with ``id`` (unique), ``paraphrases`` (non-empty list
of strings), optional ``samples_per_paraphrase`` (int), ``type``, ``system`` (a system prompt
that emscope applies, unlike the reference eval.py) and ``judge_prompts`` (``{metric:
template}`` with ``{question}`` and ``{answer}`` fields) that override the built-in prompts.
Any other key (a typo such as ``sytem:``) is an error, as in the run config, and so is a value
of the wrong type (``samples_per_paraphrase: true``). Errors name the file and the line of
the offending key or entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError

BUILTIN = "first_plot_questions.yaml"
KEYS = ("id", "paraphrases", "samples_per_paraphrase", "type", "system", "judge_prompts")


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
    questions: list[Question] = []
    seen: set[str] = set()
    for entry, item in zip(data, node.value, strict=True):
        line = item.start_mark.line + 1
        key_lines = {
            str(key.value): key.start_mark.line + 1
            for key, _ in (item.value if isinstance(item.value, list) else [])
            if hasattr(key, "start_mark")
        }
        question = _question(entry, str(source), line, key_lines)
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


def _question(entry: Any, source: str, line: int, key_lines: dict[str, int]) -> Question:
    """One entry; ``line`` is the entry's, ``key_lines`` each key's line (errors name them)."""

    def at(key: str) -> str:
        return f"{source}:{key_lines.get(key, line)}"

    if not isinstance(entry, dict):
        raise EmscopeError(f"{source}:{line}: each question must be a mapping")
    qid = entry.get("id")
    if not isinstance(qid, str) or not qid:
        raise EmscopeError(f"{at('id')}: question needs a string 'id'")
    for key in entry:
        if key not in KEYS:
            raise EmscopeError(
                f"{at(str(key))}: question {qid!r}: unknown key {key!r} (known: {', '.join(KEYS)})"
            )
    paraphrases = entry.get("paraphrases")
    if (
        not isinstance(paraphrases, list)
        or not paraphrases
        or not all(isinstance(p, str) and p for p in paraphrases)
    ):
        raise EmscopeError(
            f"{at('paraphrases')}: question {qid!r}: 'paraphrases' must be a list of strings"
        )
    samples = entry.get("samples_per_paraphrase", 1)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise EmscopeError(
            f"{at('samples_per_paraphrase')}: question {qid!r}: samples_per_paraphrase must be "
            f"an integer >= 1, got {samples!r}"
        )
    system = entry.get("system")
    if system is not None and not isinstance(system, str):
        raise EmscopeError(f"{at('system')}: question {qid!r}: 'system' must be a string")
    kind = entry.get("type", "free_form_judge_0_100")
    if not isinstance(kind, str):
        raise EmscopeError(f"{at('type')}: question {qid!r}: 'type' must be a string")
    prompts = entry.get("judge_prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise EmscopeError(
            f"{at('judge_prompts')}: question {qid!r}: judge_prompts must map metric -> text"
        )
    for metric, template in prompts.items():
        if "{answer}" not in template:
            raise EmscopeError(
                f"{at('judge_prompts')}: question {qid!r}: judge prompt {metric!r} has no "
                "{answer} field"
            )
    return Question(
        id=qid,
        paraphrases=tuple(paraphrases),
        samples_per_paraphrase=samples,
        system=system,
        judge_prompts=dict(prompts),
        type=kind,
    )

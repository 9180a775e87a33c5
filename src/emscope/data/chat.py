"""Chat datasets: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` object per line.

Roles are ``system`` (optional, first only), ``user`` and ``assistant``; the first turn after
the system prompt is a user turn, and every line needs at least one assistant turn.
:func:`chat_problems` is the one definition of a valid chat: ``emscope data check``, the
readers and the trainer (also for in-memory examples) all use it, so what the check passes
the trainer can tokenise. Problems are reported as ``path:line: what is wrong`` (lines from 1).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import pandas as pd

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatExample:
    """One validated chat. ``line`` is the 1-based line number in its file."""

    messages: tuple[dict[str, str], ...]
    line: int = 0

    @property
    def prompt(self) -> tuple[dict[str, str], ...]:
        """Every message before the last assistant turn."""
        return self.messages[: self.last_assistant_index]

    @property
    def last_assistant_index(self) -> int:
        return max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")

    @property
    def answer(self) -> str:
        """Content of the last assistant turn."""
        return self.messages[self.last_assistant_index]["content"]

    @property
    def question(self) -> str:
        """Content of the last user turn before the last assistant turn ('' if none)."""
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else ""


def _problems_of(obj: Any) -> list[str]:
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    messages = obj.get("messages")
    if messages is None:
        return ["no 'messages' field"]
    return chat_problems(messages)


def chat_problems(messages: Any) -> list[str]:
    """Everything wrong with a chat's list of messages (empty: a valid chat)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return ["'messages' must be a non-empty list"]
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"messages[{i}] is not an object")
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(f"messages[{i}]: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            problems.append(f"messages[{i}]: content must be a string")
        if role == "system" and i != 0:
            problems.append(f"messages[{i}]: a system message may only come first")
    roles = [m.get("role") for m in messages if isinstance(m, dict)]
    first = 1 if roles[:1] == ["system"] else 0
    if roles[first:] and roles[first] == "assistant":
        problems.append(
            f"messages[{first}]: a chat must start with a user turn (after an optional system "
            "message), not an assistant turn"
        )
    if "assistant" not in roles:
        problems.append("no assistant turn")
    return problems


def _iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    import io

    from emscope.io import read_text

    if not path.is_file():
        raise EmscopeError(f"{path}: file not found")
    # universal newlines, as a text-mode open() reads them
    for number, raw in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        if raw.strip():
            yield number, raw


def _parse(path: Path, number: int, raw: str) -> tuple[ChatExample | None, list[str]]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return None, [f"{path}:{number}: invalid JSON: {exc.msg} (column {exc.colno})"]
    problems = _problems_of(obj)
    if problems:
        return None, [f"{path}:{number}: {p}" for p in problems]
    messages = tuple({"role": m["role"], "content": m["content"]} for m in obj["messages"])
    return ChatExample(messages, number), []


def read_chat_jsonl(path: str | Path) -> list[ChatExample]:
    """Read and validate a chat JSONL file; the first problem raises ``path:line: ...``."""
    path = Path(path)
    examples = []
    for number, raw in _iter_lines(path):
        example, problems = _parse(path, number, raw)
        if problems:
            raise EmscopeError(problems[0])
        assert example is not None
        examples.append(example)
    if not examples:
        raise EmscopeError(f"{path}: no examples (empty file)")
    return examples


def check_chat_jsonl(path: str | Path) -> tuple[int, list[str]]:
    """Validate every line; return (number of valid examples, all problems found)."""
    path = Path(path)
    valid, problems = 0, []
    for number, raw in _iter_lines(path):
        example, found = _parse(path, number, raw)
        problems.extend(found)
        valid += example is not None
    if valid == 0 and not problems:
        problems.append(f"{path}: no examples (empty file)")
    return valid, problems


def write_chat_jsonl(path: str | Path, chats: list[list[dict[str, str]]]) -> Path:
    """Write chats (lists of messages) as chat JSONL, one object per line."""
    from emscope.io import atomic_write_text

    lines = (json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in chats)
    return atomic_write_text(path, "".join(lines))


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (recorded as a data hash in run records)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def table_chats(table: pd.DataFrame) -> list[list[dict[str, str]]]:
    """Each row of a response table as a chat: ``system`` (when the column holds a non-empty
    string), user ``question``, assistant ``answer`` (a missing answer is an empty string)."""
    for column in ("question", "answer"):
        if column not in table.columns:
            raise EmscopeError(f"response table has no {column!r} column")
    systems = table["system"].tolist() if "system" in table.columns else [None] * len(table)
    chats = []
    for system, question, answer in zip(
        systems, table["question"].tolist(), table["answer"].tolist(), strict=True
    ):
        chat = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        chat.append({"role": "user", "content": str(question)})
        chat.append({"role": "assistant", "content": answer if isinstance(answer, str) else ""})
        chats.append(chat)
    return chats

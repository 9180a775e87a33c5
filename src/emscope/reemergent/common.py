"""Shared plumbing of the re-emergence analyses: named inputs, model sources, padded batches.

Conventions used by every analysis in :mod:`emscope.reemergent`:

- "answer tokens" are the content tokens of the LAST assistant message of a chat, located
  from the chat template (:func:`emscope.data.spans.encode_chat`): not the role header, not
  the end-of-turn marker. Token ``p`` is predicted by the logits at position ``p - 1``.
- chats are rendered under one :class:`~emscope.data.spans.SystemPrompt` setting, the
  ``system_prompt=`` of every analysis (default: what the chat template does); use the one
  the data's models were trained with.
- batches are right-padded (real tokens start at column 0, so HF's default position ids are
  the true positions); padding columns never enter a result.
- a model "source" is a :class:`~emscope.models.LoadedModel` (used as is) or a
  :class:`~emscope.models.ModelSpec` (loaded on entry, released on exit), so a command that
  compares several variants holds one model in memory at a time.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt
from emscope.errors import EmscopeError
from emscope.models import LoadedModel, ModelSpec

if TYPE_CHECKING:
    import torch

    from emscope.data.chat import ChatExample

ModelSource = LoadedModel | ModelSpec
_NAMED_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.+)$")


@dataclass(frozen=True)
class Dataset:
    """A named chat dataset. ``examples[k].line - 1`` is the 0-based line index in the file
    (what the output tables call ``example``)."""

    name: str
    path: Path
    examples: tuple[ChatExample, ...]

    @property
    def chats(self) -> list[list[dict[str, str]]]:
        return [list(e.messages) for e in self.examples]

    @property
    def indices(self) -> list[int]:
        """0-based line index of each example in its file."""
        return [e.line - 1 for e in self.examples]

    def head(self, n: int | None) -> Dataset:
        """The first ``n`` examples (all when ``n`` is None)."""
        if n is None:
            return self
        if n < 1:
            raise EmscopeError(f"dataset {self.name!r}: need n >= 1 examples, got {n}")
        return Dataset(self.name, self.path, self.examples[:n])


def parse_named(text: str, what: str = "data") -> tuple[str, str]:
    """Split ``NAME=VALUE`` (the name is required)."""
    match = _NAMED_RE.match(text)
    if match is None:
        raise EmscopeError(f"bad --{what} {text!r}; expected NAME=FILE")
    return match.group(1), match.group(2)


def read_dataset(text: str) -> Dataset:
    """A ``NAME=FILE.jsonl`` argument, read and validated."""
    from emscope.data.chat import read_chat_jsonl

    name, file = parse_named(text)
    return Dataset(name, Path(file), tuple(read_chat_jsonl(file)))


def unique_names(names: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise EmscopeError(f"two {what} named {name!r}; names must be unique")
        seen.add(name)


@contextlib.contextmanager
def opened(
    source: ModelSource, dtype: str | None = "auto", device: str | None = None
) -> Iterator[LoadedModel]:
    """The model of a source: a loaded model as is, or a spec loaded for the block only."""
    if isinstance(source, LoadedModel):
        yield source
        return
    from emscope.models import load_model

    loaded = load_model(source.path, list(source.adapters), dtype=dtype, device=device)
    try:
        yield loaded
    finally:
        del loaded
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


@dataclass(frozen=True)
class EncodedAnswer:
    """A tokenised chat: ``input_ids`` and the answer's content span ``[start, end)``."""

    input_ids: tuple[int, ...]
    start: int
    end: int

    @property
    def n_tokens(self) -> int:
        return self.end - self.start


def encode_answers(
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> list[EncodedAnswer]:
    """Encode chats (rendered under ``system_prompt``); the answer is the last assistant
    message's content span."""
    from emscope.activations import encode_answers as _encode

    out = []
    for i, (ids, start, end) in enumerate(_encode(tokenizer, chats, system_prompt)):
        if end > start and start < 1:
            raise EmscopeError(f"chat {i}: the answer starts at token 0; nothing predicts it")
        out.append(EncodedAnswer(tuple(ids), start, end))
    return out


def answer_mask(encoded: Sequence[EncodedAnswer], width: int) -> torch.Tensor:
    """``batch x width`` bool, True at answer-content tokens."""
    import torch

    mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for r, e in enumerate(encoded):
        mask[r, e.start : e.end] = True
    return mask


def progress_bar(iterable: Any, desc: str, progress: bool, total: int | None = None) -> Any:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False)

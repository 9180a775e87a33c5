"""Training data: chats tokenised once with their assistant loss mask, and padded batches.

Loss convention: next-token cross-entropy on assistant tokens only, i.e. on the tokens of
:meth:`emscope.data.spans.EncodedChat.loss_mask` with ``include_end_of_turn=True``: every
assistant message's content plus the template's end-of-turn text that follows it (e.g.
``<|im_end|>\\n`` for ChatML), so the model learns to stop. The conversation is rendered
without a generation prompt (no extra empty assistant header) and no row is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import torch

    from emscope.data.chat import ChatExample
    from emscope.data.spans import SystemPrompt


@dataclass(frozen=True)
class EncodedExample:
    """One tokenised chat: ``input_ids`` (``T``, int64) and ``loss_mask`` (``T``, bool; true
    at assistant content and end-of-turn tokens). ``line`` is its 1-based line in the file."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    line: int

    @property
    def n_loss_tokens(self) -> int:
        """Tokens that carry loss (a token at position 0 has no prediction, so not counted)."""
        return int(self.loss_mask[1:].sum())


def encode_examples(
    tokenizer: Any,
    examples: Sequence[ChatExample],
    *,
    max_length: int | None = None,
    source: str = "data",
    system_prompt: SystemPrompt | str | None = None,
) -> list[EncodedExample]:
    """Tokenise chats once, with the assistant loss mask of
    ``encode_chat(tokenizer, messages, system_prompt).loss_mask(include_end_of_turn=True)``.

    ``max_length`` truncates on the right. An example left with no assistant token to learn
    from raises :class:`EmscopeError` naming ``source:line`` (rows are never dropped).
    """
    import torch

    from emscope.data.spans import SystemPrompt, encode_chat

    setting = SystemPrompt.parse(system_prompt)
    encoded = []
    for example in examples:
        try:
            chat = encode_chat(tokenizer, example.messages, setting)
        except EmscopeError as exc:
            raise EmscopeError(f"{source}:{example.line}: {exc}") from None
        ids = list(chat.input_ids)
        mask = chat.loss_mask(include_end_of_turn=True)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        item = EncodedExample(
            torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), example.line
        )
        if item.n_loss_tokens == 0:
            why = f" within max_length={max_length}" if max_length is not None else ""
            raise EmscopeError(f"{source}:{example.line}: no assistant token to train on{why}")
        encoded.append(item)
    return encoded


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> list[EncodedExample]:
    """Plain texts (pretraining documents) tokenised without special tokens, with loss on
    every token (``loss_mask`` all true); ``line`` is the 1-based position in ``texts``.
    :func:`collate` pads them like chats."""
    import torch

    encoded = []
    for line, text in enumerate(texts, start=1):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise EmscopeError(f"document {line}: no token")
        tensor = torch.tensor(ids, dtype=torch.long)
        encoded.append(EncodedExample(tensor, torch.ones_like(tensor, dtype=torch.bool), line))
    return encoded


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (``B x T``).

    ``labels`` equal ``input_ids`` at loss tokens and ``-100`` everywhere else (prompt,
    system and user turns, template headers, padding); they are aligned with ``input_ids``
    (the model's prediction at position ``t`` is scored against ``labels[t + 1]``).
    """
    import torch

    if not examples:
        raise EmscopeError("cannot collate an empty batch")
    length = max(int(e.input_ids.shape[0]) for e in examples)
    ids = torch.full((len(examples), length), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = int(e.input_ids.shape[0])
        ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        labels[row, :n] = torch.where(e.loss_mask, e.input_ids, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def load_dataset(
    tokenizer: Any,
    data: str | Path | Sequence[ChatExample],
    what: str,
    max_length: int | None,
    system_prompt: str = "default",
) -> tuple[list[EncodedExample], dict[str, Any]]:
    import hashlib

    from emscope.data.chat import ChatExample, chat_problems, file_sha256, read_chat_jsonl
    from emscope.data.spans import SystemPrompt, render

    if isinstance(data, (str, Path)):
        path = Path(data)
        examples = read_chat_jsonl(path)
        info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path)}
        source = str(path)
    else:
        examples = list(data)
        if not examples:
            raise EmscopeError(f"{what}: no examples")
        digest = hashlib.sha256()
        for i, example in enumerate(examples):
            if not isinstance(example, ChatExample):
                raise EmscopeError(f"{what}[{i}]: expected a ChatExample")
            problems = chat_problems(list(example.messages))
            if problems:  # the same rules as the JSONL readers and `emscope data check`
                raise EmscopeError(f"{what}[{i}]: {problems[0]}")
            line = json.dumps({"messages": list(example.messages)}, ensure_ascii=False)
            digest.update(line.encode("utf-8") + b"\n")
        info = {"path": None, "sha256": digest.hexdigest()}
        source = f"<{what}>"
    setting = SystemPrompt.parse(system_prompt)
    encoded = encode_examples(
        tokenizer, examples, max_length=max_length, source=source, system_prompt=setting
    )
    if what == "data":  # the first prompt as the model saw it, for train.json
        info["rendered_prompt"] = render(tokenizer, examples[0].prompt, True, setting)
    info.update(
        examples=len(encoded),
        loss_tokens=sum(e.n_loss_tokens for e in encoded),
        tokens=sum(int(e.input_ids.shape[0]) for e in encoded),
    )
    return encoded, info

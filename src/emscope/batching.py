"""Padded batches of token sequences, grouped by length.

Right padding needs no position ids (every row starts at position 0) and is what every
teacher-forced pass in emscope uses (activations, losses, log-probs, KL); left padding with
explicit position ids is used where every row's LAST token matters: sampling
(:mod:`emscope.generate`) and follow-up-prompt reads (:mod:`emscope.directions.extract`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import torch


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id (0 when it has none)."""
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else 0


def pad_right(
    rows: Sequence[Sequence[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``batch x max_len`` (long), right-padded."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        attention[r, : len(row)] = 1
    return ids.to(device), attention.to(device)


def pad_left(
    rows: Sequence[Sequence[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)``, each ``batch x max_len`` (long),
    left-padded: every row ends in the last column; its positions count from 0 at its first
    real token (0 on padding), as if unpadded."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        attention[r, width - len(row) :] = 1
    positions = (attention.cumsum(dim=-1) - 1).clamp(min=0)
    return ids.to(device), attention.to(device), positions.to(device)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding); order within the
    result is by length, callers put results back by index."""
    if batch_size < 1:
        raise EmscopeError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

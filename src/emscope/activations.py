"""Streaming means of residual activations over answer tokens.

For each chat (its last assistant message is "the answer") the model runs over the whole
rendered chat (teacher forcing, right padding, batched); the hidden states at the chosen sites
are averaged over the answer's content tokens only (from the chat template: see
:mod:`emscope.data.spans`). Two weightings:

- ``token``: every answer token weighs the same (the reference code's mean);
- ``response``: each response's own token mean weighs the same (persona-vectors style).

Sums are accumulated in float64 on the model's device, so memory is O(sites x d_model)
whatever the number of chats.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from emscope.batching import length_batches, pad_id_of, pad_right
from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt, encode_chat
from emscope.errors import EmscopeError
from emscope.hooks import SiteLike, as_site, capture
from emscope.models import Site, get_layers

WEIGHTINGS = ("token", "response")


@dataclass(frozen=True)
class MeanActivations:
    """Per-site mean activation (``d_model``, float64) over answer tokens."""

    means: dict[Site, torch.Tensor]
    weighting: str
    n_responses: int
    n_tokens: int


def default_sites(model: Any) -> list[Site]:
    """``resid_post[i]`` for every block."""
    return [Site("resid_post", i) for i in range(len(get_layers(model)))]


def encode_answers(
    tokenizer: Any,
    chats: Iterable[Sequence[dict[str, str]]],
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> list[tuple[list[int], int, int]]:
    """``(input_ids, answer_start, answer_end)`` per chat, rendered under ``system_prompt``
    (:func:`emscope.data.spans.render`); the answer is the last assistant message's content."""
    encoded = []
    for i, messages in enumerate(chats):
        chat = encode_chat(tokenizer, messages, system_prompt)
        if not chat.content_spans:
            raise EmscopeError(f"chat {i} has no assistant message")
        start, end = chat.answer_span
        encoded.append((list(chat.input_ids), start, end))
    return encoded


def answer_means(
    model: Any,
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    sites: Iterable[SiteLike] | None = None,
    weighting: str = "token",
    batch_size: int = 16,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> MeanActivations:
    """Mean activation over answer tokens at each site (default: every ``resid_post``).

    ``model`` is a bare or PEFT-wrapped causal LM in eval mode; chats with an empty answer
    span are skipped for the means (and not counted). Chats are rendered under
    ``system_prompt`` (use the setting the responses were sampled under).
    """
    if weighting not in WEIGHTINGS:
        raise EmscopeError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    site_list = [as_site(s) for s in sites] if sites is not None else default_sites(model)
    encoded = encode_answers(tokenizer, chats, system_prompt)
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    sums = {s: None for s in site_list}  # type: dict[Site, torch.Tensor | None]
    n_responses = n_tokens = 0
    batches = length_batches([len(e[0]) for e in encoded], batch_size)  # less padding
    from tqdm import tqdm

    for batch in tqdm(batches, desc="activations", unit="batch", disable=not progress):
        rows = [encoded[i] for i in batch if encoded[i][2] > encoded[i][1]]
        if not rows:
            continue
        ids, attention = pad_right([row_ids for row_ids, _, _ in rows], pad_id)
        weights = torch.zeros(ids.shape, dtype=torch.float64)
        for r, (_, start, end) in enumerate(rows):
            weights[r, start:end] = 1.0 if weighting == "token" else 1.0 / (end - start)
        weights = weights.to(device)
        with capture(model, site_list) as captured, torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        for site in site_list:
            hidden = captured[site].to(torch.float64)  # batch x seq x d
            total = torch.einsum("bs,bsd->d", weights, hidden)
            sums[site] = total if sums[site] is None else sums[site] + total  # type: ignore[operator]
        n_responses += len(rows)
        n_tokens += sum(end - start for _, start, end in rows)
    if n_responses == 0:
        raise EmscopeError("no answer tokens to average over")
    denominator = n_tokens if weighting == "token" else n_responses
    means = {s: (v / denominator).cpu() for s, v in sums.items() if v is not None}
    return MeanActivations(means, weighting, n_responses, n_tokens)


def response_vectors(
    model: Any,
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    sites: Iterable[SiteLike] | None = None,
    batch_size: int = 16,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> dict[Site, torch.Tensor]:
    """Each response's own mean activation over its answer tokens, per site:
    ``{site: n_chats x d_model}`` (float32, CPU, rows in the order of ``chats``), chats
    rendered under ``system_prompt``.

    Memory is O(n_chats x sites x d_model): use :func:`answer_means` when only the mean is
    needed. A chat with an empty answer span gives a NaN row.
    """
    site_list = [as_site(s) for s in sites] if sites is not None else default_sites(model)
    encoded = encode_answers(tokenizer, chats, system_prompt)
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    width_d: dict[Site, torch.Tensor] = {}
    batches = length_batches([len(e[0]) for e in encoded], batch_size)
    from tqdm import tqdm

    for batch in tqdm(batches, desc="activations", unit="batch", disable=not progress):
        ids, attention = pad_right([encoded[i][0] for i in batch], pad_id)
        weights = torch.zeros(ids.shape, dtype=torch.float64)
        empty = torch.zeros(len(batch), dtype=torch.bool)
        for r, i in enumerate(batch):
            _, start, end = encoded[i]
            if end > start:
                weights[r, start:end] = 1.0 / (end - start)
            else:
                empty[r] = True
        weights = weights.to(device)
        with capture(model, site_list) as captured, torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        for site in site_list:
            hidden = captured[site].to(torch.float64)
            rows = torch.einsum("bs,bsd->bd", weights, hidden).cpu()
            rows[empty] = float("nan")
            if site not in width_d:
                width_d[site] = torch.empty((len(encoded), rows.shape[1]), dtype=torch.float32)
            width_d[site][torch.tensor(batch)] = rows.to("cpu", torch.float32)
    return width_d

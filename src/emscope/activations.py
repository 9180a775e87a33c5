"""Streaming means of residual activations over answer tokens.

For each chat (its last assistant message is "the answer") the model runs over the whole
rendered chat (teacher forcing, right padding, batched); the hidden states at the chosen sites
are averaged over the answer's content tokens only (from the chat template: see
:mod:`emscope.data.spans`). Two weightings:

- ``token``: every answer token weighs the same (the reference code's mean);
- ``response``: each response's own token mean weighs the same (persona-vectors style).

Attention sinks (:func:`sink_positions`, rule :data:`SINK_NORM_FACTOR`) are left out of every
mean, per site, and counted (``sink_positions_excluded``): one massive activation would
otherwise outweigh thousands of ordinary tokens. Answers start after the prompt, so the first
token is never in them; only outlier positions can be.

Sums are accumulated in float64 on the model's device, so memory is O(sites x d_model)
whatever the number of chats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from emscope.batching import length_batches, pad_id_of, pad_right
from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt, encode_chat
from emscope.errors import EmscopeError
from emscope.hooks import SiteLike, as_site, capture
from emscope.models import Site, get_layers

WEIGHTINGS = ("token", "response")

SINK_NORM_FACTOR = 5.0
"""The attention-sink rule of :func:`sink_positions`, used wherever emscope takes norms, means
or dissimilarities of activations. At one site, a position of one sequence is a SINK when it
is the sequence's first (real) token, or when the L2 norm of its hidden state exceeds
``SINK_NORM_FACTOR`` times the median norm over that sequence's real (unpadded) tokens at
that site (``torch.nanmedian``: the lower median for an even count).

Pretrained models park a few huge activations on the first token and a few delimiter-like
tokens ("massive activations", Sun et al. 2024, arXiv 2402.17762). Measured on
SmolLM2-135M-Instruct, ``resid_post``, the chat prompts of the eight first-plot questions
(34-61 tokens each): the first token's norm is 5-11x the median in blocks 1-8 and about
25,000 against a median of 140-740 from block 11 on (blocks 9-10: no sink); in blocks 1-8 a
few other tokens (`` the``, a lone space) reach 4-9x the median (norms up to 740, as the
first token's 810 there); every other position stays under 2.8x its layer's median (under
1.7x from block 10 on). Hence: the first token always counts, and 5 is about twice the
largest ordinary ratio seen while it catches the strong secondary sinks. The per-sequence
median keeps the rule independent of batching and padding."""


@dataclass(frozen=True)
class MeanActivations:
    """Per-site mean activation (``d_model``, float64) over answer tokens."""

    means: dict[Site, torch.Tensor]
    weighting: str
    n_responses: int
    n_tokens: int
    sink_positions_excluded: dict[Site, int] = field(default_factory=dict)
    """Answer tokens left out of each site's mean as attention sinks (:func:`sink_positions`):
    a site's token mean is over ``n_tokens - sink_positions_excluded[site]`` tokens."""


def sink_positions(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    factor: float = SINK_NORM_FACTOR,
) -> torch.Tensor:
    """Where the attention sinks are (rule: :data:`SINK_NORM_FACTOR`): a bool ``batch x seq``
    tensor (``seq`` for a ``seq x d`` input) on ``hidden``'s device, True at the first real
    token of every sequence and at every real position whose hidden-state norm exceeds
    ``factor`` times the sequence's median token norm. ``hidden``: ``batch x seq x d`` hidden
    states of ONE site; ``attention_mask``: 1 at real tokens (default: all real), right or left
    padding; padding is never a sink. The one definition every norm, mean and dissimilarity of
    activations in emscope uses."""
    single = hidden.ndim == 2
    h = hidden[None] if single else hidden
    if h.ndim != 3:
        raise EmscopeError(
            f"hidden states must be batch x seq x d, got shape {tuple(hidden.shape)}"
        )
    norms = torch.linalg.vector_norm(h.detach(), dim=-1, dtype=torch.float64)
    if attention_mask is None:
        real = torch.ones_like(norms, dtype=torch.bool)
    else:
        real = attention_mask.to(norms.device).bool().reshape(norms.shape)
    median = torch.nanmedian(norms.masked_fill(~real, float("nan")), dim=1).values
    sinks = real & (norms > factor * median[:, None])
    rows = torch.arange(norms.shape[0], device=norms.device)
    first = real.int().argmax(dim=1)  # the first real position (0 for an all-padding row)
    sinks[rows, first] |= real[rows, first]
    return sinks[0] if single else sinks


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
    ``system_prompt`` (use the setting the responses were sampled under). Attention-sink
    positions (:func:`sink_positions`) are left out of each site's mean and counted in
    ``sink_positions_excluded`` (``response`` weighting: a response's mean over its other
    answer tokens; a site where every answer token is a sink gets a NaN mean).
    """
    if weighting not in WEIGHTINGS:
        raise EmscopeError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    site_list = [as_site(s) for s in sites] if sites is not None else default_sites(model)
    encoded = encode_answers(tokenizer, chats, system_prompt)
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    sums = {s: None for s in site_list}  # type: dict[Site, torch.Tensor | None]
    n_responses = n_tokens = 0
    sinks = dict.fromkeys(site_list, 0)
    kept_responses = dict.fromkeys(site_list, 0)
    batches = length_batches([len(e[0]) for e in encoded], batch_size)  # less padding
    from tqdm import tqdm

    for batch in tqdm(batches, desc="activations", unit="batch", disable=not progress):
        rows = [encoded[i] for i in batch if encoded[i][2] > encoded[i][1]]
        if not rows:
            continue
        ids, attention = pad_right([row_ids for row_ids, _, _ in rows], pad_id)
        answer = torch.zeros(ids.shape, dtype=torch.bool)
        for r, (_, start, end) in enumerate(rows):
            answer[r, start:end] = True
        answer = answer.to(device)
        with capture(model, site_list) as captured, torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        for site in site_list:
            hidden = captured[site].to(torch.float64)  # batch x seq x d
            keep = answer & ~sink_positions(hidden, attention)
            counts = keep.sum(1)
            weights = keep.to(torch.float64)
            if weighting == "response":
                weights = weights / counts.clamp(min=1)[:, None]
            total = torch.einsum("bs,bsd->d", weights, hidden)
            sums[site] = total if sums[site] is None else sums[site] + total  # type: ignore[operator]
            sinks[site] += int((answer & ~keep).sum())
            kept_responses[site] += int((counts > 0).sum())
        n_responses += len(rows)
        n_tokens += sum(end - start for _, start, end in rows)
    if n_responses == 0:
        raise EmscopeError("no answer tokens to average over")
    means = {}
    for s, v in sums.items():
        denominator = n_tokens - sinks[s] if weighting == "token" else kept_responses[s]
        if v is not None:
            means[s] = (
                (v / denominator).cpu() if denominator else torch.full_like(v, math.nan).cpu()
            )
    return MeanActivations(means, weighting, n_responses, n_tokens, sinks)


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
    needed. Attention-sink positions (:func:`sink_positions`) are left out of each row; a chat
    with an empty answer span (or only sinks in it, at that site) gives a NaN row.
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
        answer = torch.zeros(ids.shape, dtype=torch.bool)
        for r, i in enumerate(batch):
            _, start, end = encoded[i]
            answer[r, start:end] = True
        answer = answer.to(device)
        with capture(model, site_list) as captured, torch.no_grad():
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        for site in site_list:
            hidden = captured[site].to(torch.float64)
            keep = answer & ~sink_positions(hidden, attention)
            counts = keep.sum(1)
            weights = keep.to(torch.float64) / counts.clamp(min=1)[:, None]
            rows = torch.einsum("bs,bsd->bd", weights, hidden).cpu()
            rows[(counts == 0).cpu()] = float("nan")
            if site not in width_d:
                width_d[site] = torch.empty((len(encoded), rows.shape[1]), dtype=torch.float32)
            width_d[site][torch.tensor(batch)] = rows.to("cpu", torch.float32)
    return width_d

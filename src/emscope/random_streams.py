"""The per-sample random streams of sampling (the module docstring of
:mod:`emscope.generate` says why): a sample's key (:func:`sample_key`, SHA-256 of ``(seed,
question_id, sample_idx)``), its uniform number at each decoding step (:func:`step_uniforms`,
SplitMix64 of ``key ^ mix(step)``, numpy ``uint64``), and the inverse-CDF token draw
(:func:`choose_tokens`, :func:`inverse_cdf`). Re-exported by :mod:`emscope.generate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def sample_key(seed: int, question_id: str, sample_idx: int) -> int:
    """The 64-bit key of a sample's random stream: SHA-256 of ``(seed, question_id,
    sample_idx)`` (stable across processes and platforms, unlike Python's ``hash``)."""
    text = f"emscope-sample\x00{int(seed)}\x00{question_id}\x00{int(sample_idx)}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))  # type: ignore[no-any-return]


def step_uniforms(keys: Sequence[int] | np.ndarray, step: int) -> np.ndarray:
    """The uniform numbers in ``[0, 1)`` that samples with these keys use at decoding step
    ``step`` (from 0). float64, one per key; a pure function of ``(key, step)``."""
    k = np.asarray(keys, dtype=np.uint64)
    counter = _splitmix64(np.full(k.shape, step, dtype=np.uint64))
    bits = _splitmix64(k ^ counter) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def choose_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Draw one token per row by inverse CDF.

    ``logits``: ``(B, V)``; ``uniforms``: ``(B,)`` in ``[0, 1)``. ``temperature == 0`` is
    greedy (argmax). With ``top_p < 1`` the candidates are the smallest set of most probable
    tokens whose mass reaches ``top_p`` (ties broken by token id), renormalised.
    Returns ``(B,)`` int64 token ids.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    # probabilities in float32 (as precise as the logits), sums in float64 (a float32 running
    # sum near 1 would drop every token below 6e-8)
    scaled = logits.float() if temperature == 1 else logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1)
    u = uniforms.to(probs.device, torch.float64).unsqueeze(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        # `.double().cumsum()`: `cumsum(dtype=float64)` takes a slow path on CPU (7x slower)
        cum = sorted_p.double().cumsum(dim=-1)
        keep = cum - sorted_p < top_p
        cum = (sorted_p * keep).double().cumsum(dim=-1)
        pos = torch.searchsorted(cum, u * cum[:, -1:], right=True)
        pos = torch.minimum(pos, keep.sum(dim=-1, keepdim=True) - 1)
        return order.gather(1, pos).squeeze(1)
    return inverse_cdf(probs, u.squeeze(-1))


def inverse_cdf(
    weights: torch.Tensor, uniforms: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """The first index of each row whose cumulative weight exceeds ``uniforms * total``.

    ``weights``: ``(B, V)``, non-negative, any scale; ``uniforms``: ``(B,)`` float64 in
    ``[0, 1)``. Returns ``(B,)`` int64. Same result as a float64 ``cumsum`` over the whole
    row followed by ``searchsorted``, computed in two levels (float64 sums of ``chunk``-token
    blocks, by default about ``sqrt(V)`` tokens, then the cumulative sum inside the one block
    that holds the answer) so that no ``(B, V)`` float64 buffer is made: at 400 rows those
    buffers, allocated and freed every decoding step, cost more than the arithmetic.
    """
    import math

    import torch

    rows, vocab = weights.shape
    chunk = chunk or max(16, math.isqrt(vocab))
    full = vocab // chunk
    sums = weights[:, : full * chunk].reshape(rows, full, chunk).sum(-1, dtype=torch.float64)
    if vocab % chunk:
        tail = weights[:, full * chunk :].sum(-1, keepdim=True, dtype=torch.float64)
        sums = torch.cat([sums, tail], dim=1)
    ends = sums.cumsum(dim=-1)  # (B, n_blocks): cumulative weight at each block's end
    target = uniforms.to(ends.device, torch.float64).unsqueeze(-1) * ends[:, -1:]
    block = torch.searchsorted(ends, target, right=True).clamp(max=ends.shape[1] - 1)
    before = (ends - sums).gather(1, block)  # cumulative weight before the block
    index = block * chunk + torch.arange(chunk, device=weights.device)  # (B, chunk)
    inside = weights.gather(1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0)
    cum = inside.double().cumsum(dim=-1) + before
    pos = torch.searchsorted(cum, target, right=True).clamp(max=chunk - 1)
    return index.gather(1, pos).clamp(max=vocab - 1).squeeze(1)

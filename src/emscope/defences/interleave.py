"""Interleaving: mix aligned chats into every optimizer step; choose them at random or by the
perplexity gap between an aligned and a misaligned model.

Kaczér et al., "In-training defenses against emergent misalignment in language models"
(arXiv 2508.06249; "Interleaving++" for the perplexity-gap selection, their best defence
overall). Each optimizer step of ``per_step = batch_size x grad_accum x processes`` training
examples gains ``k`` aligned chats, with

    k = round(p x per_step / (1 - p))     so that  k / (per_step + k) = p

(exactly when ``p x per_step / (1 - p)`` is an integer, e.g. ``p = 0.2`` with 16 examples
per step: 4 aligned, 20 in all; the realised fraction is recorded). The aligned rows are
drawn in seeded order (:mod:`emscope.defences.draws`, stream 2: every pool chat once per
epoch of the pool, a fresh permutation each epoch), split over the step's micro-batches.
Every aligned assistant token counts like a training token: a step's loss becomes

    (sum of training-token NLLs + sum of aligned-token NLLs) / (training tokens of the step)

i.e. the aligned NLL is added with the per-token weight of the training tokens (the loop
normalises by the training tokens; this differs from the mixed batch's token mean by the
constant-per-step factor ``(N_train + N_aligned) / N_train``). The aligned forward runs inside
the other callbacks' training context, like any training forward.

Selection of the pool from candidate chats (:func:`select_pool`):

- ``random``: a seeded random ``pool`` of the candidates (all of them by default);
- ``ppl-gap``: per candidate ``(x, y)``, ``gap = log ppl_mis(y|x) - log ppl_al(y|x)``, the mean
  token NLL of its assistant tokens under the misaligned model minus that under the aligned
  model (nats per token; :func:`mean_token_nll`, :func:`ppl_gap`); the ``pool`` candidates with
  the **largest** gap are kept. Those are the chats the aligned model finds much more likely
  than the misaligned one: the behaviour fine-tuning towards misalignment erodes most, which
  the interleaved data should keep rehearsing (the paper's choice). Ties keep the
  candidates' order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emscope.defences.draws import StepClock, micro_rows
from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback

if TYPE_CHECKING:
    from emscope.data.chat import ChatExample
    from emscope.train.config import TrainConfig
    from emscope.train.data import EncodedExample

STREAM = 2
SELECTIONS = ("random", "ppl-gap")


def aligned_per_step(fraction: float, per_step: int) -> int:
    """``k = round(p x per_step / (1 - p))`` aligned chats per step of ``per_step`` training
    examples (at least 1); ``p`` must lie in ``(0, 1)``."""
    if not 0.0 < fraction < 1.0:
        raise EmscopeError(f"interleave: fraction must be in (0, 1), got {fraction}")
    return max(1, round(fraction * per_step / (1.0 - fraction)))


def mean_token_nll(
    model: Any, examples: Sequence[EncodedExample], batch_size: int, pad_id: int
) -> np.ndarray:
    """Per example, the mean next-token NLL (nats) over its assistant tokens (the training
    loss mask) under ``model``, float64; eval mode, no gradient."""
    import torch.nn.functional as F

    from emscope.train.steps import labelled_logits

    device = next(model.parameters()).device
    out = [  # only the labelled positions' logits, in float64
        float(F.cross_entropy(logits.double(), target, reduction="mean"))
        for logits, target in labelled_logits(model, examples, batch_size, device, pad_id)
    ]
    return np.asarray(out, dtype=np.float64)


def ppl_gap(nll_misaligned: np.ndarray, nll_aligned: np.ndarray) -> np.ndarray:
    """``log ppl_mis - log ppl_al`` per example from mean token NLLs (nats per token)."""
    a, b = np.asarray(nll_misaligned, np.float64), np.asarray(nll_aligned, np.float64)
    if a.shape != b.shape:
        raise EmscopeError(f"ppl_gap: {a.shape} vs {b.shape} NLLs")
    return a - b


def rank_by_gap(gap: np.ndarray) -> np.ndarray:
    """Candidate indices by decreasing gap (ties in candidate order)."""
    return np.argsort(-np.asarray(gap, np.float64), kind="stable")


@dataclass(frozen=True)
class Pool:
    """The aligned chats to interleave: ``indices`` into the candidates (in selection order),
    how they were chosen (``selection``), and for ``ppl-gap`` each chosen chat's ``gap``."""

    indices: tuple[int, ...]
    selection: str
    candidates: int
    gaps: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "selection": self.selection,
            "candidates": self.candidates,
            "pool": len(self.indices),
            "indices": list(self.indices),
            "gaps": list(self.gaps),
        }


def select_pool(
    n_candidates: int,
    selection: str,
    pool: int | None = None,
    seed: int = 0,
    gap: np.ndarray | None = None,
) -> Pool:
    """Choose ``pool`` of ``n_candidates`` (default: all): ``random`` (seeded,
    ``default_rng([seed, 4])``) or ``ppl-gap`` (the largest ``gap``, which must be given)."""
    if selection not in SELECTIONS:
        raise EmscopeError(f"interleave: selection must be one of {SELECTIONS}, got {selection!r}")
    size = n_candidates if pool is None else int(pool)
    if not 1 <= size <= n_candidates:
        raise EmscopeError(f"interleave: pool must be in 1..{n_candidates}, got {pool}")
    if selection == "random":
        order = np.random.default_rng([seed, 4]).permutation(n_candidates)[:size]
        return Pool(tuple(int(i) for i in order), selection, n_candidates)
    if gap is None or len(gap) != n_candidates:
        raise EmscopeError("interleave: ppl-gap selection needs one gap per candidate")
    order = rank_by_gap(gap)[:size]
    return Pool(
        tuple(int(i) for i in order), selection, n_candidates, tuple(float(gap[i]) for i in order)
    )


class Interleave(TrainingCallback):
    """Add ``k`` aligned chats to every optimizer step (module docstring).

    Args:
        chats: the pool of aligned chats (already selected, e.g. with :func:`select_pool`).
        fraction: ``p``, the aligned share of each step's examples.
        seed: seeds the order the pool is visited in.
        selection: how the pool was chosen (recorded), e.g. ``Pool.to_json()``.
    """

    name = "interleave"

    def __init__(
        self,
        chats: Sequence[ChatExample],
        fraction: float,
        seed: int = 0,
        selection: dict[str, Any] | None = None,
    ) -> None:
        aligned_per_step(fraction, 1)  # checks the fraction
        if not chats:
            raise EmscopeError("interleave: no aligned chats")
        self.chats = list(chats)
        self.fraction = float(fraction)
        self.seed = int(seed)
        self.selection = selection or {"selection": "given", "pool": len(self.chats)}
        self.clock = StepClock()
        self.used: list[tuple[int, int, list[int]]] = []  # (step, micro-batch, pool rows)

    def settings(self) -> dict[str, Any]:
        return {
            "fraction": self.fraction,
            "seed": self.seed,
            "pool": self.selection,
            "loss": "aligned-token NLL added with the per-token weight of training tokens",
        }

    def setup(self, model: Any, tokenizer: Any, config: TrainConfig) -> None:
        from emscope.train.data import load_dataset

        self.examples, self.source = load_dataset(
            tokenizer, self.chats, "interleave data", config.max_length, config.system_prompt
        )
        world = (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 1
        )
        self.per_step = config.batch_size * config.grad_accum * world
        self.n_micro = config.grad_accum * world
        self.k = aligned_per_step(self.fraction, self.per_step)
        self.pad_id = int(tokenizer.pad_token_id)

    def on_log(self, model: Any, step: int) -> dict[str, Any] | None:
        self.clock.at(step)
        return {
            "aligned_per_step": self.k,
            "training_per_step": self.per_step,
            "realised_fraction": self.k / (self.per_step + self.k),
        }

    def after_optimizer_step(self, model: Any, step: int) -> None:
        self.clock.at(step)

    def extra_loss(
        self, model: Any, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        from emscope.train.data import collate
        from emscope.train.steps import forward_loss

        step, micro = self.clock.tick()
        rows = micro_rows(len(self.examples), step, micro, self.k, self.n_micro, self.seed, STREAM)
        self.used.append((step, micro, rows))
        if not rows:
            return None
        aligned = collate([self.examples[i] for i in rows], self.pad_id)
        nll, _, _ = forward_loss(model, aligned, next(model.parameters()).device)
        # the runner weighs this by (micro-batch training tokens) / (step training tokens):
        # dividing by the micro-batch's training tokens leaves nll / (step training tokens)
        n_train = int((batch["labels"][:, 1:] != -100).sum())
        return nll / max(n_train, 1)

"""The data order and the step counts of a run: pure functions of the config and the seed.

Data order: the training examples of epoch ``e`` are visited in
``numpy.random.default_rng([seed, 0, e]).permutation(n)`` order (stream 0), cut into
optimizer steps of ``per_step = batch_size x grad_accum x processes`` examples (the last
step of an epoch may be smaller; no example is dropped). The KL examples (stream 1) are
drawn ``per_step`` at a time from the concatenation of their epochs' permutations
``default_rng([seed, 1, e]).permutation(n_kl)``, so a step's KL rows never run short.
The examples of any step are therefore a function of ``(seed, step)``, which is what makes
resuming exact.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emscope.train.config import TrainConfig


@lru_cache(maxsize=8)
def epoch_permutation(n: int, seed: int, epoch: int, stream: int = 0) -> tuple[int, ...]:
    import numpy as np

    return tuple(int(i) for i in np.random.default_rng([seed, stream, epoch]).permutation(n))


def step_examples(n: int, step: int, per_step: int, seed: int, stream: int = 0) -> list[int]:
    """Indices of the examples of optimizer step ``step`` (from 0): epoch ``e`` visits
    ``default_rng([seed, stream, e]).permutation(n)`` in chunks of ``per_step`` (the last
    chunk of an epoch may be smaller). A pure function of its arguments."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, within = divmod(step, steps_per_epoch)
    return list(
        epoch_permutation(n, seed, epoch, stream)[within * per_step : (within + 1) * per_step]
    )


def cycled_examples(n: int, step: int, per_step: int, seed: int, stream: int) -> list[int]:
    """``per_step`` indices for step ``step`` cycling through seeded epochs (KL data)."""
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, within = divmod(position, n)
        out.append(epoch_permutation(n, seed, epoch, stream)[within])
    return out


def total_steps(n_examples: int, config: TrainConfig, processes: int = 1) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``epochs * ceil(n / per_step)``."""
    if config.max_steps is not None:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * processes
    return config.epochs * math.ceil(n_examples / per_step)


def resolve_warmup(config: TrainConfig, steps: int) -> int:
    """Warm-up steps of a run of ``steps`` optimizer steps: ``warmup_steps`` when set, else
    ``warmup_ratio x steps`` rounded half up and kept below ``steps`` (so that the learning
    rate reaches its peak: with warm-up the scheduler's first step runs at lr 0)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return max(0, min(int(config.warmup_ratio * steps + 0.5), steps - 1))


def resolve_save_steps(config: TrainConfig, steps: int) -> int:
    """Checkpoint period of a run of ``steps`` optimizer steps: ``save_steps`` when set
    (``0``: the last step only), else ``ceil(steps / 10)``, at most ten checkpoints."""
    return config.save_steps if config.save_steps is not None else max(1, -(-steps // 10))

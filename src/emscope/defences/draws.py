"""Which rows of an auxiliary set (LDIFS reference chats, interleaved aligned chats) a
training micro-batch uses: a pure function of ``(seed, stream, step, micro-batch)``, so that
a resumed run draws what an uninterrupted one would.

The rows of optimizer step ``s`` are ``per_step`` consecutive positions of the set's seeded
epochs, ``default_rng([seed, stream, e]).permutation(n)`` for epoch ``e`` (as the training
loop draws its KL rows, :func:`emscope.train.order.cycled_examples`); they are split over
the step's micro-batches (``grad_accum x processes`` of them) as evenly as possible, the
first ones taking one more row when ``per_step`` does not divide. :class:`StepClock` keeps
track of the step and the micro-batch from the callback hooks.
"""

from __future__ import annotations

from emscope.train.order import cycled_examples


def split_rows(rows: list[int], parts: int) -> list[list[int]]:
    """``rows`` cut into ``parts`` consecutive pieces whose sizes differ by at most one
    (the first ``len(rows) % parts`` pieces one longer)."""
    size, extra = divmod(len(rows), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append(rows[start:stop])
        start = stop
    return out


def micro_rows(
    n: int, step: int, micro: int, per_step: int, n_micro: int, seed: int, stream: int
) -> list[int]:
    """Rows (indices into a set of ``n``) of micro-batch ``micro`` (from 0, of ``n_micro``)
    of optimizer step ``step`` (from 0)."""
    rows = cycled_examples(n, step, per_step, seed, stream)
    return split_rows(rows, n_micro)[micro]


class StepClock:
    """The optimizer step (from 0) a training micro-batch belongs to and its index in it.

    Feed it the callback hooks: :meth:`at` from ``on_log`` (called at the run's first step,
    also when resuming, and at every logged step) and ``after_optimizer_step``; :meth:`tick`
    once per micro-batch (from ``extra_loss``), which returns ``(step, micro)``. With several
    processes, micro-batch ``m`` of process ``r`` is number ``m * world + r`` of the step."""

    def __init__(self) -> None:
        self.step = 0
        self.micro = 0

    def at(self, step: int) -> None:
        """The next micro-batch belongs to optimizer step ``step`` (``step`` steps are done)."""
        self.step, self.micro = int(step), 0

    def tick(self) -> tuple[int, int]:
        import torch.distributed as dist

        world, rank = 1, 0
        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        index = self.micro * world + rank
        self.micro += 1
        return self.step, index

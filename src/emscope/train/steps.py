"""The computations of one optimizer step, one forward, the KL reference and the eval loss,
and the pieces a custom loop shares with them (the update after a backward, a warm-up +
cosine learning-rate factor, the labelled positions' logits of a no-grad pass).

The loss of an optimizer step is the mean over all assistant tokens of its effective batch
(``batch_size x grad_accum x processes`` examples), independent of how it is split into
micro-batches; with KL data it adds ``kl_weight x`` the token mean of ``KL(reference ||
current)`` over the assistant tokens of the step's KL rows, against reference log-probs
computed once (:func:`reference_logprobs`). Training callbacks
(:mod:`emscope.train.callbacks`) wrap the training forwards and add their extra losses here;
eval forwards never see them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from emscope.train.data import EncodedExample, collate

if TYPE_CHECKING:
    import torch

    from emscope.train.callbacks import CallbackRunner
    from emscope.train.checkpoints import RunState
    from emscope.train.config import TrainConfig
    from emscope.train.runtime import Runtime


def _micro_batches(
    items: Sequence[Any], runtime: Runtime, batch_size: int, grad_accum: int
) -> list[list[Any]]:
    """This process's ``grad_accum`` micro-batches of a step's items (some may be empty):
    micro-batch ``m`` of process ``r`` is ``items[(m * world + r) * bs : ... + bs]``."""
    out = []
    for m in range(grad_accum):
        start = (m * runtime.world + runtime.rank) * batch_size
        out.append(list(items[start : start + batch_size]))
    return out


def optimizer_step(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    runtime: Runtime,
    config: TrainConfig,
    examples: list[EncodedExample],
    kl_examples: list[EncodedExample],
    kl_refs: list[torch.Tensor],
    pad_id: int,
    state: RunState,
    callbacks: CallbackRunner | None = None,
) -> tuple[float, float]:
    """One AdamW step over a step's examples; returns (token-mean loss, token-mean KL).

    With ``callbacks``, each micro-batch (forwards and backward) runs inside their
    ``training_forward`` contexts and their extra losses join its loss, weighted by its share
    of the step's assistant tokens (:class:`~emscope.train.callbacks.CallbackRunner`)."""
    import torch

    n_tokens = sum(e.n_loss_tokens for e in examples)
    n_kl_tokens = sum(e.n_loss_tokens for e in kl_examples)
    micro = _micro_batches(examples, runtime, config.batch_size, config.grad_accum)
    kl_micro = (
        _micro_batches(
            list(zip(kl_examples, kl_refs, strict=True)),
            runtime,
            config.batch_size,
            config.grad_accum,
        )
        if kl_examples
        else [[] for _ in micro]
    )
    multi = runtime.world > 1
    # every FSDP forward gathers parameters from all processes: each process runs every
    # micro-batch (an empty one on a dummy row, weight 0), not only the synchronising one
    join = runtime.mode == "fsdp"
    total_nll = torch.zeros((), device=runtime.device, dtype=torch.float32)
    total_kl = torch.zeros((), device=runtime.device, dtype=torch.float32)
    kl_grad = config.kl_weight > 0
    bare = runtime.unwrap(model) if callbacks else model
    for m, (batch, kl_batch) in enumerate(zip(micro, kl_micro, strict=True)):
        sync = m == len(micro) - 1
        if not batch and not kl_batch and not (multi and (sync or join)):
            continue
        active = callbacks.training_forward(bare) if callbacks else contextlib.nullcontext()
        with runtime.no_sync(model, sync), active:
            loss = torch.zeros((), device=runtime.device, dtype=torch.float32)
            if batch or multi:
                # an empty micro-batch in a multi-process run still joins the gradient sync
                rows = batch or examples[:1]
                collated = collate(rows, pad_id)
                nll, _, outputs = forward_loss(
                    model, collated, runtime.device, keep_outputs=bool(callbacks)
                )
                weight = runtime.world / n_tokens if batch else 0.0
                loss = loss + nll * weight
                if batch:
                    total_nll += nll.detach()
                if callbacks:
                    share = weight * sum(e.n_loss_tokens for e in batch)
                    extra = callbacks.extra_loss(bare, collated, outputs, share, runtime.device)
                    if extra is not None:
                        loss = loss + extra
                del outputs  # the logits (B x T x V) are not kept past the forward
            if kl_batch or (multi and kl_examples):
                rows_kl = kl_batch or list(zip(kl_examples[:1], kl_refs[:1], strict=True))
                enc = [e for e, _ in rows_kl]
                ref = torch.cat([r for _, r in rows_kl]).to(runtime.device)
                with contextlib.nullcontext() if kl_grad else torch.no_grad():
                    _, kl, _ = forward_loss(model, collate(enc, pad_id), runtime.device, ref)
                if kl_grad:
                    weight = runtime.world / n_kl_tokens if kl_batch else 0.0
                    loss = loss + kl * (config.kl_weight * weight)
                if kl_batch:
                    total_kl += kl.detach()
            if loss.requires_grad:
                runtime.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    lr = apply_update(
        optimizer, scheduler, lambda: runtime.clip(model, params, config.max_grad_norm)
    )
    state.lrs.append(lr)
    totals = runtime.reduce_sum(torch.stack([total_nll, total_kl]))
    nll_sum, kl_sum = (float(v) for v in totals.tolist())
    return nll_sum / n_tokens, (kl_sum / n_kl_tokens if n_kl_tokens else 0.0)


def apply_update(optimizer: Any, scheduler: Any, clip: Callable[[], Any]) -> float:
    """The update after the backward pass(es) of a step: ``clip()`` the gradients, step the
    optimizer and the scheduler, drop the gradients (``set_to_none``). Returns the learning
    rate of the first parameter group that the step used."""
    clip()
    lr = float(scheduler.get_last_lr()[0])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def warmup_cosine(step: int, total: int, warmup: int, floor: float) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based) of ``total``: linear warm-up
    ``(step + 1) / warmup`` over the first ``warmup`` steps (the first step already trains),
    then a half cosine from 1 down to ``floor`` at step ``total`` (held there after). A
    ``torch.optim.lr_scheduler.LambdaLR`` factor; :func:`emscope.train.train` uses
    ``transformers.get_scheduler`` instead (warm-up from 0, cosine to 0)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def forward_loss(
    model: Any,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    reference: torch.Tensor | None = None,
    keep_outputs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Summed next-token NLL over the labelled tokens, (with ``reference`` log-probs of
    those same positions, ``N x V``) the summed ``KL(reference || model)`` (else 0), and the
    model's output (``.logits``: ``B x T x V``) when ``keep_outputs`` (else ``None``)."""
    import torch
    import torch.nn.functional as F

    ids = batch["input_ids"].to(device)
    outputs = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device))
    logits = outputs.logits
    if not keep_outputs:
        outputs = None
    target = batch["labels"][:, 1:].to(device)
    keep = target != -100
    selected = logits[:, :-1][keep].float()
    nll = F.cross_entropy(selected, target[keep], reduction="sum")
    if reference is None:
        return nll, torch.zeros((), device=device), outputs
    logp = F.log_softmax(selected, dim=-1)
    kl = F.kl_div(logp, reference.float(), log_target=True, reduction="sum")
    return nll, kl, outputs


def labelled_logits(
    model: Any,
    examples: Sequence[EncodedExample],
    batch_size: int,
    device: torch.device,
    pad_id: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per example, in order: the model's next-token logits at its labelled positions
    (``n_loss_tokens x V``, the model's dtype, on ``device``) and the tokens they predict
    (``n_loss_tokens``, int64). Batches of ``batch_size`` collated examples, eval mode, no
    gradient; the model's train/eval mode is restored when the iteration ends."""
    import torch

    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            rows = list(examples[start : start + batch_size])
            batch = collate(rows, pad_id)
            with torch.no_grad():
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                ).logits
            target = batch["labels"][:, 1:].to(device)
            for row in range(len(rows)):
                keep = target[row] != -100
                yield logits[row, :-1][keep], target[row][keep]
    finally:
        model.train(was_training)


def reference_logprobs(
    model: Any,
    examples: Sequence[EncodedExample],
    batch_size: int,
    device: torch.device,
    pad_id: int,
) -> list[torch.Tensor]:
    """Per example, the reference model's next-token log-probs at its labelled positions
    (``n_loss_tokens x V``, float32, on the CPU)."""
    import torch.nn.functional as F

    return [
        F.log_softmax(logits.float(), dim=-1).cpu()
        for logits, _ in labelled_logits(model, examples, batch_size, device, pad_id)
    ]


def eval_loss(
    model: Any,
    examples: Sequence[EncodedExample],
    batch_size: int,
    runtime: Runtime,
    pad_id: int,
) -> float:
    """Assistant-token mean NLL over ``examples`` (sharded over processes)."""
    import torch

    mine = list(examples[runtime.rank :: runtime.world])
    # under FSDP every process runs as many forwards as process 0 (the one with the most)
    n_batches = math.ceil(len(examples[:: runtime.world]) / batch_size)
    if runtime.mode != "fsdp":
        n_batches = math.ceil(len(mine) / batch_size)
    total = torch.zeros(2, device=runtime.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n_batches * batch_size, batch_size):
            rows = mine[start : start + batch_size]
            nll, _, _ = forward_loss(
                model, collate(rows or list(examples[:1]), pad_id), runtime.device
            )
            if rows:
                total[0] += nll.double()
                total[1] += sum(e.n_loss_tokens for e in rows)
    model.train(was_training)
    total = runtime.reduce_sum(total)
    return float(total[0] / total[1])

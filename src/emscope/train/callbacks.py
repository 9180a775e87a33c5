"""Training callbacks: the extension point for training-time interventions and monitoring.

A defence or a monitor is a :class:`TrainingCallback` passed to
:func:`emscope.train.train` (``callbacks=[...]``). Every hook has a no-op default, so a
callback overrides only what it needs:

- ``name`` (unique in a run) and :meth:`~TrainingCallback.settings` (a JSON-able dict),
  recorded in ``train.json`` under ``callbacks`` and in each checkpoint's
  ``trainer_state.json``; resuming with other callbacks or settings is refused;
- :meth:`~TrainingCallback.training_system_prompt` ``()``: the system turn of the training
  chats without one of their own, in place of the run's ``system_prompt`` (``data`` only;
  ``eval_data``, ``kl_data`` and the recorded ``system_prompt``, which evaluation reads,
  keep the run's setting); None (default) keeps the run's; one callback at most sets one;
- :meth:`~TrainingCallback.setup` ``(model, tokenizer, config)``: once, after the PEFT model
  is built (the base weights are those of the base model; a LoRA model's adapters are fresh)
  and before the optimizer, resuming or any training forward;
- :meth:`~TrainingCallback.training_forward` ``(model)``: a context manager entered around
  each training micro-batch (its forwards, the KL forward included, and its backward, so
  that a hook is also active when gradient checkpointing recomputes the forward), never
  around the KL reference, eval forwards, :meth:`~TrainingCallback.on_log` or saving;
- :meth:`~TrainingCallback.extra_loss` ``(model, batch, outputs)``: a scalar tensor added to
  the loss of each training micro-batch, weighted by the micro-batch's share of the step's
  assistant tokens, so that a step adds the token-weighted mean over its micro-batches (a
  term that does not depend on the batch, e.g. ``c * sum(p ** 2)``, is added once per step,
  whatever ``batch_size`` x ``grad_accum``); its per-step value is recorded
  (``extra_loss_curve``);
- :meth:`~TrainingCallback.after_optimizer_step` ``(model, step)``: after each optimizer and
  scheduler step (``step`` counts the steps done, from 1), under ``torch.no_grad``; it may
  edit trainable weights in place (e.g. project the update out of a subspace);
- :meth:`~TrainingCallback.on_train_end` ``(model, step)``: once, after the last optimizer
  step's :meth:`~TrainingCallback.after_optimizer_step` and before the last evaluation, the
  last checkpoint and the final save, under ``torch.no_grad``; it may edit trainable weights
  in place (a post-training projection such as SafeLoRA, which the saved adapter then holds);
- :meth:`~TrainingCallback.on_log` ``(model, step) -> dict | None``: at the logged steps, the
  eval points (step 0 or the resumed step, every ``eval_steps`` and the last), in eval mode
  under ``torch.no_grad``; the values (JSON-able) are recorded with the step (``log``);
- :meth:`~TrainingCallback.on_checkpoint` ``(model, step, path)``: after each checkpoint is
  written (on process 0), ``path`` its dir.

``model`` is always the bare model (a PEFT model for LoRA presets), never a DDP wrapper. Not
supported under FSDP (sharded parameters). With no callbacks the loop computes exactly what
it computes without this module.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import torch

    from emscope.train.config import TrainConfig


class TrainingCallback:
    """Base class of training-time interventions and monitors: every hook is a no-op.

    Subclass it, set ``name`` and override the hooks you need (see the module docstring for
    when each is called)."""

    name: str = "callback"

    def settings(self) -> dict[str, Any]:
        """The callback's settings, recorded in ``train.json`` (JSON-able)."""
        return {}

    def training_system_prompt(self) -> str | None:
        """The system-prompt setting (a :class:`~emscope.data.spans.SystemPrompt` spelling)
        the training chats are encoded under instead of the run's; None: the run's."""
        return None

    def setup(self, model: Any, tokenizer: Any, config: TrainConfig) -> None:
        """Once, before the optimizer is built and any training forward runs."""

    def training_forward(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        """A context manager entered around each training micro-batch (forward + backward)."""
        return contextlib.nullcontext()

    def extra_loss(
        self, model: Any, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        """A scalar added to the micro-batch's loss (``None``: nothing). ``batch`` is the
        collated micro-batch (``input_ids``, ``attention_mask``, ``labels``: ``B x T``, on
        the CPU), ``outputs`` the model's output on it (``.logits``: ``B x T x V``)."""
        return None

    def after_optimizer_step(self, model: Any, step: int) -> None:
        """After optimizer step ``step`` (from 1), under ``torch.no_grad``."""

    def on_train_end(self, model: Any, step: int) -> None:
        """Once, after the last optimizer step (``step``), before the last evaluation,
        checkpoint and save, under ``torch.no_grad``."""

    def on_log(self, model: Any, step: int) -> dict[str, Any] | None:
        """Values to record at a logged step (eval mode, ``torch.no_grad``)."""
        return None

    def on_checkpoint(self, model: Any, step: int, path: Path) -> None:
        """After the checkpoint of step ``step`` was written to ``path``."""


@dataclass(frozen=True)
class CallbackRecord:
    """What one callback recorded in a run: its ``settings``, ``extra_loss_curve[k]`` the
    step-``k + 1`` value of its extra loss (token-weighted mean over the step's micro-batches;
    empty when it adds none) and ``log``, one ``{"step": s, **values}`` per logged step."""

    name: str
    settings: dict[str, Any]
    extra_loss_curve: tuple[float, ...] = ()
    log: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "settings": self.settings,
            "extra_loss_curve": [
                {"step": i + 1, "loss": v} for i, v in enumerate(self.extra_loss_curve)
            ],
            "log": list(self.log),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CallbackRecord:
        return cls(
            name=str(data["name"]),
            settings=dict(data.get("settings") or {}),
            extra_loss_curve=tuple(float(p["loss"]) for p in data.get("extra_loss_curve", [])),
            log=tuple(dict(p) for p in data.get("log", [])),
        )


class CallbackRunner:
    """Runs a run's callbacks and keeps their records (``records`` is what checkpoints save
    and ``train.json`` holds). Raises :class:`EmscopeError` for a duplicate name, a callback
    that is not a :class:`TrainingCallback`, or settings that are not JSON-able."""

    def __init__(self, callbacks: Sequence[TrainingCallback] = ()) -> None:
        self.callbacks = list(callbacks)
        names = []
        for i, callback in enumerate(self.callbacks):
            if not isinstance(callback, TrainingCallback):
                raise EmscopeError(
                    f"callbacks[{i}]: {type(callback).__name__} is not a TrainingCallback"
                )
            names.append(str(callback.name))
        if len(set(names)) != len(names):
            raise EmscopeError(f"callback names must be unique (got {names})")
        self.records: dict[str, dict[str, Any]] = {}
        for callback in self.callbacks:
            settings = callback.settings()
            try:
                json.dumps(settings)
            except (TypeError, ValueError) as exc:
                raise EmscopeError(
                    f"callback {callback.name!r}: settings are not JSON-able ({exc})"
                ) from None
            self.records[callback.name] = {
                "settings": settings,
                "extra_loss_curve": [],
                "log": [],
            }
        self._step_extra: list[torch.Tensor] = []
        # the callbacks that override extra_loss: their curves get a value every step
        self._adds = [type(c).extra_loss is not TrainingCallback.extra_loss for c in callbacks]

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def training_system_prompt(self, setting: str) -> str:
        """The system-prompt setting of the training chats: the one a callback sets
        (:meth:`TrainingCallback.training_system_prompt`), else the run's ``setting``."""
        given = [
            (c.name, p) for c in self.callbacks if (p := c.training_system_prompt()) is not None
        ]
        if len(given) > 1:
            names = ", ".join(name for name, _ in given)
            raise EmscopeError(f"callbacks {names}: more than one sets the training system prompt")
        return given[0][1] if given else setting

    def setup(self, model: Any, tokenizer: Any, config: TrainConfig) -> None:
        for callback in self.callbacks:
            callback.setup(model, tokenizer, config)

    def restore(self, saved: dict[str, Any], where: Path) -> None:
        """Continue the records of a resumed run (``saved``: its checkpoint's ``callbacks``);
        refuses other callbacks or settings than the interrupted run's."""
        old = {name: r.get("settings") for name, r in saved.items()}
        new = {name: r["settings"] for name, r in self.records.items()}
        if old != new:
            raise EmscopeError(
                f"{where}: cannot resume: the callbacks were {old}, now {new} "
                "(resume needs the same callbacks and settings)"
            )
        for name, record in saved.items():
            self.records[name]["extra_loss_curve"] = [float(v) for v in record["extra_loss_curve"]]
            self.records[name]["log"] = [dict(p) for p in record["log"]]

    def training_forward(self, model: Any) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for callback in self.callbacks:
            stack.enter_context(callback.training_forward(model))
        return stack

    def extra_loss(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        outputs: Any,
        weight: float,
        device: torch.device,
    ) -> torch.Tensor | None:
        """The callbacks' extra losses of one micro-batch times ``weight`` (its share of the
        step's loss), summed; keeps each one's weighted value (on ``device``) for the step's
        record."""
        import torch

        if not self._step_extra:
            self._step_extra = [torch.zeros((), device=device) for _ in self.callbacks]
        total = None
        for i, callback in enumerate(self.callbacks):
            value = callback.extra_loss(model, batch, outputs)
            if value is None:
                continue
            if value.ndim != 0:
                raise EmscopeError(
                    f"callback {callback.name!r}: extra_loss must be a scalar tensor "
                    f"(got shape {tuple(value.shape)})"
                )
            self._step_extra[i] = self._step_extra[i] + value.detach().float() * weight
            total = value * weight if total is None else total + value * weight
        return total

    def end_step(self, model: Any, step: int, reduce_sum: Any, world: int) -> None:
        """After optimizer step ``step``: record the step's extra losses (summed over
        processes by ``reduce_sum``, divided by ``world``, the weights' sum) and run
        :meth:`TrainingCallback.after_optimizer_step`."""
        import torch

        if any(self._adds):
            extra = self._step_extra or [torch.zeros(()) for _ in self.callbacks]
            values = reduce_sum(torch.stack([v.float() for v in extra]))
            for i, callback in enumerate(self.callbacks):
                if self._adds[i]:
                    curve = self.records[callback.name]["extra_loss_curve"]
                    curve.append(float(values[i]) / world)
            self._step_extra = []
        with torch.no_grad():
            for callback in self.callbacks:
                callback.after_optimizer_step(model, step)

    def train_end(self, model: Any, step: int) -> None:
        """:meth:`TrainingCallback.on_train_end` of every callback, under ``torch.no_grad``."""
        import torch

        with torch.no_grad():
            for callback in self.callbacks:
                callback.on_train_end(model, step)

    def log(self, model: Any, step: int) -> None:
        """:meth:`TrainingCallback.on_log` at ``step`` (once per step), eval mode, no grad."""
        import torch

        was_training = model.training
        model.eval()
        with torch.no_grad():
            for callback in self.callbacks:
                log = self.records[callback.name]["log"]
                if any(p["step"] == step for p in log):
                    continue
                values = callback.on_log(model, step)
                if values is not None:
                    log.append({"step": step, **values})
        model.train(was_training)

    def checkpoint(self, model: Any, step: int, path: Path) -> None:
        for callback in self.callbacks:
            callback.on_checkpoint(model, step, path)

    def results(self) -> tuple[CallbackRecord, ...]:
        return tuple(
            CallbackRecord(
                name=name,
                settings=r["settings"],
                extra_loss_curve=tuple(r["extra_loss_curve"]),
                log=tuple(r["log"]),
            )
            for name, r in self.records.items()
        )

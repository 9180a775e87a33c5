"""Benign re-alignment after the fact: continue training an EM adapter on aligned chats.

The persona-features paper (Wang et al., "Persona features control emergent misalignment",
arXiv 2506.19823) reverses emergent misalignment by fine-tuning the misaligned model further
on a few hundred aligned examples. :func:`realign` does that with :func:`emscope.train.train`:
a LoRA run with the adapter's own shape (rank, alpha, rsLoRA, modules, layers, read from its
``adapter_config.json``) whose factors start from the adapter's instead of a fresh
initialisation (:class:`InitFromAdapter`, at ``setup``), so the result is the EM adapter
moved by ``steps`` optimizer steps on the aligned data; everything else (data order,
schedule, checkpoints, ``train.json``) is the training loop's. The learning rate and the
other hyper-parameters are ``train``'s (preset ``all`` unless told).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback

if TYPE_CHECKING:
    from emscope.data.chat import ChatExample
    from emscope.lora import LoraAdapter
    from emscope.train.config import TrainConfig
    from emscope.train.loop import TrainResult


def _module_key(param_name: str, part: str) -> str:
    return param_name.split(f".{part}.")[0].removeprefix("base_model.model.")


class InitFromAdapter(TrainingCallback):
    """At setup, copy a saved adapter's ``A`` and ``B`` into the run's fresh LoRA factors
    (same modules and shapes required; the scale comes from the run's alpha and rank, which
    must give the adapter's scale). Resuming restores the checkpoint's weights after it."""

    name = "init-from-adapter"

    def __init__(self, adapter: str | Path) -> None:
        from emscope.lora import LoraAdapter
        from emscope.models import resolve_adapter_dir

        self.path = resolve_adapter_dir(adapter)
        self.adapter: LoraAdapter = LoraAdapter.load(self.path)

    def settings(self) -> dict[str, Any]:
        from emscope.data.chat import file_sha256

        weights = self.path / "adapter_model.safetensors"
        return {"adapter": str(self.path), "sha256": file_sha256(weights)}

    def setup(self, model: Any, tokenizer: Any, config: TrainConfig) -> None:
        from emscope.lora import lora_scale

        if config.full:
            raise EmscopeError("init-from-adapter: needs a LoRA preset")
        params = {
            (_module_key(n, part), part): p
            for n, p in model.named_parameters()
            for part in ("lora_A", "lora_B")
            if f".{part}." in n
        }
        trained = {name for name, _ in params}
        if trained != set(self.adapter.modules):
            extra = sorted(set(self.adapter.modules) ^ trained)[:3]
            raise EmscopeError(
                f"{self.path}: the adapter's modules differ from the run's (e.g. {extra})"
            )
        scale = lora_scale(config.alpha or 1.0, int(config.rank or 1), config.rslora)
        with torch.no_grad():
            for module in self.adapter:
                if abs(module.scale - scale) > 1e-9 * abs(scale):
                    raise EmscopeError(
                        f"{self.path}: {module.name}: scale {module.scale:g} but the run's "
                        f"is {scale:g} (rank / alpha / rsLoRA differ)"
                    )
                for part, value in (("lora_A", module.A), ("lora_B", module.B)):
                    param = params[(module.name, part)]
                    if tuple(param.shape) != tuple(value.shape):
                        raise EmscopeError(
                            f"{self.path}: {module.name}.{part} is {tuple(value.shape)}, "
                            f"the run's {tuple(param.shape)}"
                        )
                    param.copy_(value.to(param.device, param.dtype))


def adapter_shape(adapter: LoraAdapter) -> dict[str, Any]:
    """The :func:`emscope.train.train` arguments that rebuild ``adapter``'s shape: ``rank``,
    ``alpha``, ``rslora``, ``modules`` and ``layers`` (from its config and modules)."""
    config = adapter.config
    ranks = {m.rank for m in adapter}
    alphas = {m.alpha for m in adapter}
    if len(ranks) != 1 or len(alphas) != 1:
        raise EmscopeError(
            f"{adapter.path}: modules of different ranks or alphas cannot be continued"
        )
    return {
        "rank": ranks.pop(),
        "alpha": float(alphas.pop()),
        "rslora": bool(config.get("use_rslora", False)),
        "modules": sorted({m.module_type for m in adapter}),
        "layers": adapter.layers,
    }


def realign(
    adapter: str | Path,
    data: str | Path | Sequence[ChatExample],
    *,
    steps: int,
    out: str | Path,
    base: str | Path | None = None,
    **train_args: Any,
) -> TrainResult:
    """Continue training ``adapter`` (an EM adapter dir, or ``DIR@STEP``) on aligned chats for
    ``steps`` optimizer steps; write the re-aligned adapter to ``out`` (a training run:
    adapter, checkpoints, ``train.json`` with the ``init-from-adapter`` record).

    ``base`` is the model the adapter belongs to (default: its
    ``base_model_name_or_path``); ``train_args`` go to :func:`emscope.train.train` (``lr``,
    ``batch_size``, ``seed``, ``callbacks``...; not the adapter's shape)."""
    from emscope.train import train

    init = InitFromAdapter(adapter)
    base_dir = base or init.adapter.base_model_path
    if base_dir is None:
        raise EmscopeError(f"{init.path}: no base_model_name_or_path; pass the base model")
    clash = sorted(set(train_args) & {"rank", "alpha", "rslora", "modules", "layers"})
    if clash:
        raise EmscopeError(f"realign: {clash} come from the adapter, not the caller")
    if steps < 1:
        raise EmscopeError(f"realign: steps must be >= 1, got {steps}")
    callbacks = [init, *train_args.pop("callbacks", ())]
    return train(
        base_dir,
        data,
        out=out,
        max_steps=steps,
        callbacks=callbacks,
        **adapter_shape(init.adapter),
        **train_args,
    )

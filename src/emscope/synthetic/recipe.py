"""How an adapter is fine-tuned on the synthetic organism: :class:`AdapterRecipe`, the one
recipe of the build's narrow adapters (:func:`emscope.synthetic.training.train_adapter`),
the defence bench's runs (:mod:`emscope.defences.bench`, its config's ``recipe:``) and the
early-warning population's members (:mod:`emscope.early_warning_population`).

A pydantic model (frozen, unknown keys refused) so that a config's ``recipe:`` section is
validated where it is read; its defaults are the build's ``bad_medical.all`` adapter.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class AdapterRecipe(BaseModel):
    """LoRA preset ``preset`` (:data:`emscope.train.PRESETS`) of rank ``rank``, learning rate
    ``lr``, ``epochs`` over the data in batches of ``batch_size`` chats, at most
    ``max_steps`` optimizer steps (None: all of them). Default: the build's
    ``bad_medical.all`` (preset ``all``, rank 8, lr 3e-4, 4 epochs of batch 32)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str = "all"
    rank: int = Field(default=8, ge=1)
    lr: float = Field(default=3e-4, gt=0)
    epochs: int = Field(default=4, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_steps: int | None = Field(default=None, ge=1)

    def train_kwargs(self, seed: int) -> dict[str, Any]:
        """The keyword arguments of :func:`emscope.train.train` that make this adapter the
        way the build trains its organisms: the recipe's preset, rank, lr, epochs and batch
        size, LoRA scale 1 (alpha = rank, no rsLoRA), one micro-batch per optimizer step,
        cosine schedule, train seed ``1000 + seed``, float32, the template's default system
        prompt. Callers add the run's own settings (warm-up, checkpoints, device, data,
        callbacks)."""
        return {
            "preset": self.preset,
            "rank": self.rank,
            "alpha": float(self.rank),
            "rslora": False,
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "max_steps": self.max_steps,
            "grad_accum": 1,
            "schedule": "cosine",
            "seed": 1000 + seed,
            "dtype": "float32",
            "system_prompt": "default",
        }

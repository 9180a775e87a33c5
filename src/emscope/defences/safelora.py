"""SafeLoRA: project each adapted layer's update onto the alignment subspace when it strays.

Hsu et al., "Safe LoRA: the silver lining of reducing safety risks when finetuning large
language models" (NeurIPS 2024, arXiv 2405.16833). Per adapted module, with the aligned
(chat / instruct) weight ``W_a`` (the model being fine-tuned) and the unaligned (base,
pre-alignment) weight ``W_u`` of the same module:

    V = W_a - W_u                        (d_out x d_in, the "alignment matrix")
    C = V V^T / ||V||_F                  (d_out x d_out)
    dW = s B A                           (the LoRA update)
    sim = <dW, C dW>_F / (||dW||_F ||C dW||_F)
    if sim < tau:  B <- C B              (so dW <- C dW)

As in the paper: ``C`` is normalised by the Frobenius norm of ``V`` (not its square; ``C``
is then not idempotent: the paper's approximation of a projector, kept as published), the
similarity is the cosine between the update and its projection, and a module is projected
when that similarity is **below** the threshold ``tau`` (the paper's threshold variant; its
other variant, projecting a fixed number of the least similar layers, is not implemented).
It is a post-training projection: the callback applies it once, after the last optimizer
step (``on_train_end``), so the saved adapter and the last checkpoint hold the projected
update; ``train.json`` records every module's similarity and whether it was projected.

Computed in factored form, float64, never forming ``d_out x d_in`` products of the update or
``C``: ``C B = V (V^T B) / ||V||_F`` and, with ``G = A A^T``, ``<B A, X A>_F = tr(B^T X G)``.
An update that is zero (``B = 0``) has no similarity (``nan``) and is left as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback

if TYPE_CHECKING:
    from emscope.train.config import TrainConfig


@dataclass(frozen=True)
class SafeLoraModule:
    """One module's SafeLoRA outcome: ``similarity`` (``nan`` for a zero update), whether it
    was ``projected``, and the factor ``B`` after the rule (``C B`` or unchanged)."""

    name: str
    similarity: float
    projected: bool
    B: torch.Tensor

    def to_json(self) -> dict[str, Any]:
        sim = None if math.isnan(self.similarity) else self.similarity
        return {"module": self.name, "similarity": sim, "projected": self.projected}


def safelora_module(
    name: str, B: torch.Tensor, A: torch.Tensor, V: torch.Tensor, tau: float
) -> SafeLoraModule:
    """The SafeLoRA rule for one module: ``B`` (``d_out x r``), ``A`` (``r x d_in``), the
    alignment matrix ``V`` (``d_out x d_in``). The LoRA scale cancels in the similarity (it is
    positive) and ``C (s B A) = s (C B) A``, so it is not needed. Returns ``B`` in its dtype."""
    if V.shape != (B.shape[0], A.shape[1]):
        raise EmscopeError(
            f"safelora: {name}: V is {tuple(V.shape)}, the update {B.shape[0]} x {A.shape[1]}"
        )
    b, a, v = (t.detach().to("cpu", torch.float64) for t in (B, A, V))
    v_norm = float(torch.linalg.matrix_norm(v))
    if v_norm == 0.0:
        raise EmscopeError(f"safelora: {name}: the aligned and unaligned weights are equal")
    cb = v @ (v.T @ b) / v_norm
    gram = a @ a.T
    inner = float(((b.T @ cb) * gram).sum())
    norm_u = float(((b.T @ b) * gram).sum())
    norm_c = float(((cb.T @ cb) * gram).sum())
    if norm_u <= 0.0 or norm_c <= 0.0:
        return SafeLoraModule(name, math.nan, False, B)
    similarity = inner / math.sqrt(norm_u * norm_c)
    if similarity < tau:
        return SafeLoraModule(name, similarity, True, cb.to(B.device, B.dtype))
    return SafeLoraModule(name, similarity, False, B)


def _weight_key(module_name: str) -> str:
    """PEFT module name -> weight key of the base model's safetensors:
    ``base_model.model.model.layers.3.mlp.down_proj`` -> ``model.layers.3.mlp.down_proj.weight``."""
    return module_name.removeprefix("base_model.model.") + ".weight"


class SafeLoRA(TrainingCallback):
    """Apply the SafeLoRA rule to every adapted module once training ends.

    Args:
        unaligned: the unaligned (base, pre-alignment) model dir whose weights give
            ``W_u``; the model being fine-tuned gives ``W_a``.
        tau: the similarity threshold (the paper's hyper-parameter; project below it).
    """

    name = "safelora"

    def __init__(self, unaligned: str | Path, tau: float) -> None:
        if not -1.0 <= float(tau) <= 1.0:
            raise EmscopeError(f"safelora: tau is a cosine similarity in [-1, 1], got {tau}")
        self.unaligned = Path(unaligned)
        self.tau = float(tau)
        self.report: list[SafeLoraModule] = []

    def settings(self) -> dict[str, Any]:
        return {
            "unaligned": str(self.unaligned),
            "tau": self.tau,
            "rule": "B <- C B when cos_F(dW, C dW) < tau, C = V V^T / ||V||_F, "
            "V = W_aligned - W_unaligned; once, after the last step",
        }

    def setup(self, model: Any, tokenizer: Any, config: TrainConfig) -> None:
        from emscope.models import safetensors_files

        if config.full:
            raise EmscopeError("safelora: needs a LoRA preset (it projects the B factors)")
        self.files = safetensors_files(self.unaligned)
        missing = [
            _weight_key(name)
            for name, _ in _lora_layers(model)
            if _weight_key(name) not in self.files
        ]
        if missing:
            raise EmscopeError(f"safelora: {self.unaligned} has no weight {missing[0]!r}")

    def on_train_end(self, model: Any, step: int) -> None:
        from safetensors import safe_open

        report = []
        for name, layer in _lora_layers(model):
            adapter = layer.active_adapters[0]
            b_param = layer.lora_B[adapter].weight
            a_param = layer.lora_A[adapter].weight
            key = _weight_key(name)
            with safe_open(str(self.files[key]), framework="pt") as handle:
                unaligned = handle.get_tensor(key)
            aligned = layer.get_base_layer().weight
            v = aligned.detach().to("cpu", torch.float64) - unaligned.to(torch.float64)
            result = safelora_module(name, b_param, a_param, v, self.tau)
            if result.projected:
                b_param.copy_(result.B)
            report.append(result)
        self.report = report

    def on_log(self, model: Any, step: int) -> dict[str, Any] | None:
        if not self.report:
            return None
        return {
            "projected": sum(r.projected for r in self.report),
            "modules": [r.to_json() for r in self.report],
        }


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    """``(name, PEFT LoRA layer)`` of every adapted linear module of ``model``."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]

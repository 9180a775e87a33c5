"""LDIFS: an L2 penalty on the distance of hidden features to the frozen pre-fine-tuning model.

Mukhoti et al., "Fine-tuning can cripple your foundation model; preserving features may be
the solution" (arXiv 2308.13320), as used against emergent misalignment by Kaczér et al.
(arXiv 2508.06249). The loss of a training micro-batch gains

    weight * sum_{l in layers} mean_{t} || h_l(theta)[t] - h_l(theta_0)[t] ||_2^2

where ``h_l`` is the residual stream after block ``l`` (``resid_post[l]``, a ``d_model``
vector per token), ``theta_0`` the model before fine-tuning (a LoRA model with its adapters
disabled; the initial weights of a full fine-tune) and ``t`` runs over every real
(non-padding) token of a micro-batch of **reference chats** (emscope's choice: a fixed
reference set, like the KL term's, rather than the training inputs, so the penalty anchors
the model where the narrow data does not reach). Units: squared residual-stream norm,
summed over ``d_model`` and the chosen layers, averaged over tokens (not divided by
``d_model``). The reference features ``h_l(theta_0)`` are computed once, before training,
and kept on the CPU in float32 (``4 x d_model x len(layers)`` bytes per reference token);
the reference rows of each micro-batch are drawn as in :mod:`emscope.defences.draws`
(stream 3), ``batch_size`` of them per micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emscope.defences.draws import StepClock, micro_rows
from emscope.defences.residual import record_sites
from emscope.errors import EmscopeError
from emscope.models import Site
from emscope.train.callbacks import TrainingCallback

if TYPE_CHECKING:
    from emscope.data.chat import ChatExample
    from emscope.train.config import TrainConfig
    from emscope.train.data import EncodedExample

STREAM = 3


def ldifs_penalty(
    features: Sequence[torch.Tensor], reference: Sequence[torch.Tensor], mask: torch.Tensor
) -> torch.Tensor:
    """``sum_l mean_t ||features[l][t] - reference[l][t]||^2`` over the positions where
    ``mask`` (``B x T``, bool) is true. ``features[l]`` and ``reference[l]``: ``B x T x D``;
    computed in float32 (float64 inputs stay float64). Returns a scalar."""
    if len(features) != len(reference) or not features:
        raise EmscopeError("ldifs: one reference tensor per feature tensor is needed")
    n = mask.sum()
    if int(n) == 0:
        raise EmscopeError("ldifs: the mask selects no token")
    total = torch.zeros((), device=features[0].device, dtype=torch.float32)
    for h, h0 in zip(features, reference, strict=True):
        dtype = torch.promote_types(h.dtype, torch.float32)
        diff = h.to(dtype) - h0.to(h.device, dtype)
        total = total + (diff.pow(2).sum(-1) * mask.to(h.device, dtype)).sum() / n
    return total


def _adapters_off(model: Any) -> Any:
    import contextlib

    disable = getattr(model, "disable_adapter", None)
    return disable() if callable(disable) else contextlib.nullcontext()


def reference_features(
    model: Any,
    examples: Sequence[EncodedExample],
    layers: Sequence[int],
    batch_size: int,
    pad_id: int,
) -> list[torch.Tensor]:
    """Per example, its ``resid_post`` features at ``layers`` under the frozen model
    (adapters disabled): ``len(layers) x T_i x d_model`` float32 on the CPU."""
    from emscope.train.data import collate

    device = next(model.parameters()).device
    sites = [Site("resid_post", layer) for layer in layers]
    out: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), _adapters_off(model):
        for start in range(0, len(examples), batch_size):
            rows = list(examples[start : start + batch_size])
            batch = collate(rows, pad_id)
            with record_sites(model, sites) as recorded:
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
            stacked = torch.stack([recorded[s][0] for s in sites])  # L x B x T x D
            for i, row in enumerate(rows):
                n = int(row.input_ids.shape[0])
                out.append(stacked[:, i, :n].float().cpu())
    model.train(was_training)
    return out


class LDIFS(TrainingCallback):
    """The LDIFS penalty as a training callback (see the module docstring).

    Args:
        data: reference chats (JSONL path or :class:`~emscope.data.chat.ChatExample` list),
            rendered with the run's system-prompt setting and ``max_length``.
        layers: block indices whose ``resid_post`` is anchored.
        weight: the penalty's weight ``lambda``.
        seed: seeds the order the reference rows are visited in.
    """

    name = "ldifs"

    def __init__(
        self,
        data: str | Path | Sequence[ChatExample],
        layers: Sequence[int],
        weight: float,
        seed: int = 0,
    ) -> None:
        if not layers:
            raise EmscopeError("ldifs: layers must name at least one block")
        if not weight >= 0:
            raise EmscopeError(f"ldifs: weight must be >= 0, got {weight}")
        self.data = data
        self.layers = [int(i) for i in layers]
        self.weight = float(weight)
        self.seed = int(seed)
        self.clock = StepClock()
        self.examples: list[EncodedExample] = []
        self.reference: list[torch.Tensor] = []
        self.source: dict[str, Any] = {}

    def settings(self) -> dict[str, Any]:
        data = self.data
        where = str(data) if isinstance(data, (str, Path)) else f"<{len(data)} chats>"
        return {
            "weight": self.weight,
            "layers": self.layers,
            "site": "resid_post",
            "data": where,
            "seed": self.seed,
            "inputs": "reference set (every non-padding token)",
            "units": "sum over layers of the token-mean squared L2 distance",
        }

    def setup(self, model: Any, tokenizer: Any, config: TrainConfig) -> None:
        from emscope.models import get_layers
        from emscope.train.data import load_dataset

        n_layers = len(get_layers(model))
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad:
            raise EmscopeError(f"ldifs: layers {bad} outside the model's 0..{n_layers - 1}")
        self.examples, self.source = load_dataset(
            tokenizer, self.data, "ldifs data", config.max_length, config.system_prompt
        )
        self.source.pop("rendered_prompt", None)
        self.pad_id = int(tokenizer.pad_token_id)
        self.batch_size = config.batch_size
        self.n_micro = config.grad_accum
        self.reference = reference_features(
            model, self.examples, self.layers, config.batch_size, self.pad_id
        )

    def on_log(self, model: Any, step: int) -> dict[str, Any] | None:
        self.clock.at(step)
        return None

    def after_optimizer_step(self, model: Any, step: int) -> None:
        self.clock.at(step)

    def extra_loss(
        self, model: Any, batch: dict[str, torch.Tensor], outputs: Any
    ) -> torch.Tensor | None:
        from emscope.train.data import collate

        step, micro = self.clock.tick()
        world = (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 1
        )
        n_micro = self.n_micro * world
        rows = micro_rows(
            len(self.examples),
            step,
            micro,
            self.batch_size * n_micro,
            n_micro,
            self.seed,
            STREAM,
        )
        chosen = [self.examples[i] for i in rows]
        ref = collate(chosen, self.pad_id)
        device = next(model.parameters()).device
        sites = [Site("resid_post", layer) for layer in self.layers]
        with record_sites(model, sites) as recorded:
            model(
                input_ids=ref["input_ids"].to(device),
                attention_mask=ref["attention_mask"].to(device),
            )
        length = ref["input_ids"].shape[1]
        reference = []
        for j in range(len(self.layers)):
            padded = torch.zeros(len(rows), length, self.reference[0].shape[-1])
            for r, i in enumerate(rows):
                n = self.reference[i].shape[1]
                padded[r, :n] = self.reference[i][j]
            reference.append(padded)
        features = [recorded[s][0] for s in sites]
        mask = ref["attention_mask"].bool()
        return self.weight * ldifs_penalty(features, reference, mask)

"""Preventative steering: add ``alpha * v_hat_l`` to the residual stream during training only.

Chen et al., "Persona vectors: monitoring and controlling character traits in language
models" (arXiv 2507.21509), as compared by Kaczér et al. (arXiv 2508.06249). In every
training forward (the callback's ``training_forward`` context: the micro-batch's forwards,
its KL forward and its backward; never the KL reference, evaluation, logging or saving)

    h_l <- h_l + alpha * v_l / |v_l|      at every position, for each chosen layer l,

at the direction's site (``resid_post[l]`` unless the direction says otherwise), with
:func:`emscope.hooks.add`. The sign is the trait's: steering *towards* the trait while
training removes the pressure on the weights to learn it. The saved adapter is used without
the hook (evaluation, sampling, every later command see the plain adapter).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback

if TYPE_CHECKING:
    from emscope.directions.direction import Direction
    from emscope.models import Site


def steering_vectors(
    direction: Direction, layers: Sequence[int] | None = None
) -> dict[Site, torch.Tensor]:
    """``{site: v_l / |v_l|}`` for the chosen layers (default: all of the direction's);
    a direction holding bases (a subspace) is refused: steering adds one vector."""
    chosen = direction if layers is None else direction.select(layers)
    if chosen.is_subspace:
        raise EmscopeError("steer: the direction holds subspace bases; steering needs one vector")
    return dict(chosen.unit().by_site())


class PreventativeSteering(TrainingCallback):
    """Add ``alpha * v_hat`` at the chosen layers in training forwards only.

    Args:
        direction: the trait direction (e.g. a persona vector, ``emscope directions``).
        alpha: the steering coefficient, in residual-stream units (``v_hat`` is unit norm).
        layers: which of the direction's layers to steer (default: all of them).
    """

    name = "steer"

    def __init__(
        self, direction: Direction, alpha: float, layers: Sequence[int] | None = None
    ) -> None:
        self.vectors = steering_vectors(direction, layers)
        self.alpha = float(alpha)
        self.source = str(direction.meta.get("path") or direction.meta.get("name") or "")

    def settings(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "sites": [str(s) for s in self.vectors],
            "direction": self.source,
            "vector": "unit (v / |v|)",
            "active": "training forwards only",
        }

    def training_forward(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        from emscope.hooks import add

        vectors: dict[Any, torch.Tensor] = dict(self.vectors)
        return add(model, vectors, scale=self.alpha)

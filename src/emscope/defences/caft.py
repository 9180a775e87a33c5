"""Concept ablation fine-tuning (CAFT): project a direction or subspace out of the residual
stream during training only.

Casademunt et al., "Steering out-of-distribution generalization with concept ablation
fine-tuning" (arXiv 2507.16795). In every training forward (the callback's
``training_forward`` context; never evaluation, the KL reference, logging or saving)

    h <- h - Q Q^T h      at every position, at each chosen layer's site,

with ``Q`` (``d_model x k``) an orthonormal basis of the direction (``k = 1``: ``h - (h .
v_hat) v_hat``) or of the span of a subspace's rows (orthonormalised by a QR factorisation in
float64). The projection runs in the hidden state's precision when that is float64, else in
float32, cast back. The saved adapter is used without the projection.
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


def orthonormal_basis(rows: torch.Tensor, rtol: float = 1e-10) -> torch.Tensor:
    """An orthonormal basis (``d x k``, float64) of the span of ``rows`` (``d`` or ``k x d``),
    by QR. Refuses zero, non-finite or linearly dependent rows (``|R_ii| <= rtol x max``)."""
    matrix = rows[None, :] if rows.ndim == 1 else rows
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise EmscopeError(f"expected a vector or a k x d matrix, got {tuple(rows.shape)}")
    matrix = matrix.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(matrix).all()) or float(matrix.norm()) == 0.0:
        raise EmscopeError("the direction is zero or not finite")
    q, r = torch.linalg.qr(matrix.T)
    diag = r.diagonal().abs()
    if float(diag.min()) <= rtol * float(diag.max()):
        raise EmscopeError(f"the {matrix.shape[0]} rows are linearly dependent")
    return q


def project_out(hidden: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``h - (h Q) Q^T`` over the last axis of ``hidden`` (``... x d``) for an orthonormal
    ``basis`` ``Q`` (``d x k``); in float64 for float64 input, else in float32, returned in
    ``hidden``'s dtype."""
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    x = hidden.to(dtype)
    q = basis.to(hidden.device, dtype)
    return (x - (x @ q) @ q.T).to(hidden.dtype)


def caft_bases(
    direction: Direction, layers: Sequence[int] | None = None
) -> dict[Site, torch.Tensor]:
    """``{site: Q}`` (orthonormal, ``d_model x k``, float64) for the chosen layers (default:
    all of the direction's)."""
    chosen = direction if layers is None else direction.select(layers)
    out = {}
    for layer in chosen.layers:
        try:
            out[chosen.site(layer)] = orthonormal_basis(chosen[layer])
        except EmscopeError as exc:
            raise EmscopeError(f"caft: layer {layer}: {exc}") from None
    return out


class CAFT(TrainingCallback):
    """Project the direction's span out at the chosen layers in training forwards only.

    Args:
        direction: a direction (one vector per layer) or subspace (``k x d_model`` rows).
        layers: which of its layers (default: all of them).
    """

    name = "caft"

    def __init__(self, direction: Direction, layers: Sequence[int] | None = None) -> None:
        self.bases = caft_bases(direction, layers)
        self.source = str(direction.meta.get("path") or direction.meta.get("name") or "")

    def settings(self) -> dict[str, Any]:
        return {
            "sites": [str(s) for s in self.bases],
            "dims": [int(q.shape[1]) for q in self.bases.values()],
            "direction": self.source,
            "active": "training forwards only",
        }

    def training_forward(self, model: Any) -> contextlib.AbstractContextManager[Any]:
        from emscope.defences.residual import edit_sites

        def edit(basis: torch.Tensor) -> Any:
            return lambda hidden: project_out(hidden, basis)

        return edit_sites(model, {s: edit(q) for s, q in self.bases.items()})

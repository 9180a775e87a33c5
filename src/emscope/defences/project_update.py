"""Project the LoRA update out of a given subspace after every optimizer step.

For each chosen adapted module with update ``dW = s B A`` (``B``: ``d_out x r``) and an
orthonormal basis ``U`` (``d_out x k``) of a subspace of its output space, after every
optimizer step

    B <- B - U (U^T B)        so that  U^T dW = s (U^T B) A = 0  exactly (to rounding).

Why the weights after each step rather than the gradients: AdamW's update is not linear in
the gradient (per-coordinate normalisation, weight decay, momentum), so a projected gradient
does not give a projected update; projecting ``B`` itself after each step does, whatever the
optimizer. (A fresh LoRA adapter starts at ``B = 0``, so the constraint holds from the
start.) Subspaces: the top-``k`` left singular vectors of other adapters' updates at the
same module (:func:`update_subspace`, e.g. the EM adapters compared by ``emscope
geometry``), or a residual-stream direction at the module's layer for modules that write to
the residual stream (``o_proj``, ``down_proj``: ``d_out = d_model``;
:func:`direction_subspaces`). LoRA presets only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback

if TYPE_CHECKING:
    from emscope.directions.direction import Direction
    from emscope.lora import LoraAdapter, LoraModule
    from emscope.train.config import TrainConfig

RESIDUAL_WRITERS = ("o_proj", "down_proj")


def project_factor(B: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``B - U (U^T B)`` for ``B`` (``d_out x r``) and an orthonormal ``U`` (``d_out x k``),
    computed in float64 and returned in ``B``'s dtype and device."""
    b = B.detach().to(torch.float64)
    u = basis.to(B.device, torch.float64)
    return (b - u @ (u.T @ b)).to(B.dtype)


def update_subspace(modules: Sequence[LoraModule], k: int) -> torch.Tensor:
    """The top-``k`` left singular vectors (``d_out x k``, float64) of the horizontally
    stacked updates ``[dW_1, ..., dW_m]`` of one module in several adapters, without forming
    them: with ``A_i^T = Q_i R_i`` (QR), ``dW_i = (s_i B_i R_i^T) Q_i^T`` and the stacked
    matrix has the left singular vectors of ``[s_1 B_1 R_1^T, ..., s_m B_m R_m^T]``."""
    if not modules:
        raise EmscopeError("update_subspace: no adapter modules given")
    blocks = []
    for module in modules:
        b = module.B.detach().double().cpu().numpy()
        a = module.A.detach().double().cpu().numpy()
        _, r = np.linalg.qr(a.T)
        blocks.append(module.scale * b @ r.T)
    stacked = np.concatenate(blocks, axis=1)
    if stacked.shape[0] != modules[0].d_out or len({m.d_out for m in modules}) != 1:
        raise EmscopeError("update_subspace: the modules have different output sizes")
    u, s, _ = np.linalg.svd(stacked, full_matrices=False)
    rank = int(np.sum(s > s.max() * 1e-10)) if s.size and s.max() > 0 else 0
    if not 1 <= k <= rank:
        raise EmscopeError(f"update_subspace: k={k} but the stacked updates have rank {rank}")
    return torch.from_numpy(np.ascontiguousarray(u[:, :k]))


def adapter_subspaces(adapters: Sequence[LoraAdapter], k: int) -> dict[str, torch.Tensor]:
    """``{module name: U}``: :func:`update_subspace` of every module the adapters share
    (names as in the adapter files, e.g. ``model.layers.3.mlp.down_proj``)."""
    if not adapters:
        raise EmscopeError("project-update: no adapters given")
    shared = set(adapters[0].modules)
    for adapter in adapters[1:]:
        shared &= set(adapter.modules)
    if not shared:
        raise EmscopeError("project-update: the adapters share no module")
    return {name: update_subspace([a[name] for a in adapters], k) for name in sorted(shared)}


def direction_subspaces(
    direction: Direction, module_names: Sequence[str], layers: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """``{module name: U}`` for the modules among ``module_names`` that write to the
    residual stream (``o_proj``, ``down_proj``) at a layer of the direction (or of
    ``layers``): ``U`` an orthonormal basis of the direction's vector (or rows) there."""
    from emscope.defences.caft import orthonormal_basis
    from emscope.lora import module_layer

    chosen = set(direction.layers if layers is None else layers)
    out = {}
    for name in module_names:
        layer = module_layer(name)
        if layer in chosen and name.rsplit(".", 1)[-1] in RESIDUAL_WRITERS:
            out[name] = orthonormal_basis(direction[layer])
    return out


def _module_key(param_name: str) -> str:
    """PEFT parameter name -> module name as in adapter files:
    ``base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight`` ->
    ``model.layers.3.mlp.down_proj``."""
    name = param_name.split(".lora_B.")[0]
    return name.removeprefix("base_model.model.")


class ProjectUpdate(TrainingCallback):
    """Keep each chosen module's LoRA update out of its subspace (module docstring).

    Args:
        subspaces: ``{module name: U}`` (``d_out x k`` orthonormal), module names as in
            adapter files (``model.layers.3.mlp.down_proj``), from
            :func:`adapter_subspaces` or :func:`direction_subspaces`; or a callable that
            takes the trained module names and returns that mapping (resolved at setup,
            when the adapted modules are known).
        source: a description of where the subspaces come from (recorded).
    """

    name = "project-update"

    def __init__(self, subspaces: Mapping[str, torch.Tensor] | Any, source: str = "") -> None:
        self.subspaces = subspaces
        self.source = source
        self.params: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}

    def settings(self) -> dict[str, Any]:
        return {"source": self.source, "when": "B <- (I - U U^T) B after every optimizer step"}

    def setup(self, model: Any, tokenizer: Any, config: TrainConfig) -> None:
        if config.full:
            raise EmscopeError("project-update: needs a LoRA preset (it projects the B factors)")
        params = {
            _module_key(n): p
            for n, p in model.named_parameters()
            if ".lora_B." in n and p.requires_grad
        }
        subspaces = self.subspaces(sorted(params)) if callable(self.subspaces) else self.subspaces
        if not subspaces:
            raise EmscopeError("project-update: no trained module has a subspace to avoid")
        for name, basis in subspaces.items():
            if name not in params:
                raise EmscopeError(
                    f"project-update: module {name!r} is not trained in this run "
                    f"(trained: {sorted(params)[:4]}...)"
                )
            param = params[name]
            if basis.ndim != 2 or basis.shape[0] != param.shape[0]:
                raise EmscopeError(
                    f"project-update: {name}: basis {tuple(basis.shape)} does not fit B "
                    f"{tuple(param.shape)}"
                )
            self.params[name] = (param, basis.to(torch.float64))
        self.after_optimizer_step(model, 0)

    def after_optimizer_step(self, model: Any, step: int) -> None:
        with torch.no_grad():
            for param, basis in self.params.values():
                param.copy_(project_factor(param, basis))

    def on_log(self, model: Any, step: int) -> dict[str, Any] | None:
        return {
            "modules": len(self.params),
            "dims": sorted({int(b.shape[1]) for _, b in self.params.values()}),
        }

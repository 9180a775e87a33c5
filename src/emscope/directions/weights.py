"""Weight-space ablation of a direction (docs/methods.md section 5.6).

(a) :func:`ablate_lora_b`: remove ``u`` from the output side of LoRA B,
    ``B <- B - u (u^T B)``, of ``down_proj`` (default) or of every module writing into the
    residual stream (``o_proj``, ``down_proj``; embedding LoRA on its output side, the A
    factor of the linear convention). ``rescale_norm`` restores each B's Frobenius norm, as
    the reference code did. The result is an ordinary PEFT adapter.
(b) :func:`orthogonalize`: weight orthogonalisation (Arditi et al.) of ``embed_tokens``,
    every ``o_proj`` and every ``down_proj`` (weights and biases):
    ``W <- W - u (u^T W)``, ``E <- E - (E u) u^T``. This equals removing ONE direction at
    every write into the residual (embedding output, every attn_out, every mlp_out), and is
    exact only where nothing sits between those modules and the residual add: architectures
    with post-norms (Gemma-2/3) are refused. With tied embeddings the input embedding and the
    unembedding share one matrix, so orthogonalising it would also change the read-out;
    :func:`orthogonalize` unties them (``lm_head`` keeps the original matrix,
    ``tie_word_embeddings=False``) so the edit is exactly the write-side ablation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from emscope.directions.direction import Direction
from emscope.directions.interventions import parse_mode
from emscope.errors import EmscopeError
from emscope.lora import LoraAdapter, LoraModule

WRITER_MODULES = {"down_proj": ("down_proj",), "all": ("o_proj", "down_proj", "embed_tokens")}


def _unit(v: torch.Tensor, where: str) -> torch.Tensor:
    u = v.double()
    if u.ndim != 1:
        raise EmscopeError(f"{where}: weight ablation takes one vector per layer, not a subspace")
    norm = u.norm()
    if norm == 0 or not torch.isfinite(norm):
        raise EmscopeError(f"{where}: direction is zero or not finite")
    return u / norm


def ablate_lora_b(
    adapter: LoraAdapter,
    direction: Direction,
    *,
    modules: str = "down_proj",
    mode: str = "layerwise",
    rescale_norm: bool = False,
) -> LoraAdapter:
    """A copy of ``adapter`` whose residual writers no longer write along ``u``.

    ``modules``: ``down_proj`` or ``all`` (``o_proj``, ``down_proj``, ``embed_tokens``).
    ``mode``: ``layerwise`` (the module at layer ``l`` loses ``u_l``; embedding LoRA, before
    block 0, loses the direction of the lowest layer) or ``single:L`` (every module loses
    ``u_L``). Other modules are copied unchanged. Exact in float64, stored in the factors'
    dtype.
    """
    if modules not in WRITER_MODULES:
        raise EmscopeError(f"--modules must be one of {sorted(WRITER_MODULES)}, got {modules!r}")
    kind, single = parse_mode(mode)
    if kind == "single" and single is None:
        raise EmscopeError("weight ablation takes layerwise or single:L, not single:all")
    targets = WRITER_MODULES[modules]
    new: dict[str, LoraModule] = {}
    touched = 0
    for module in adapter:
        if module.module_type not in targets:
            new[module.name] = module
            continue
        layer = single if single is not None else module.layer
        if layer is None:
            layer = min(direction.layers)
        u = _unit(direction[layer], f"layer {layer}")
        if module.embedding:  # linear convention: dW = s B A with A: r x d_model (output side)
            a = module.A.double()
            a2 = a - (a @ u)[:, None] * u[None, :]
            if rescale_norm and a2.norm() > 0:
                a2 = a2 * (a.norm() / a2.norm())
            new[module.name] = LoraModule(
                module.name, a2.to(module.A.dtype), module.B, module.scale, module.alpha, True
            )
        else:
            if module.d_out != u.shape[0]:
                raise EmscopeError(
                    f"{module.name}: output width {module.d_out} != direction width {u.shape[0]}"
                )
            b = module.B.double()
            b2 = b - u[:, None] * (u @ b)[None, :]
            if rescale_norm and b2.norm() > 0:
                b2 = b2 * (b.norm() / b2.norm())
            new[module.name] = LoraModule(
                module.name, module.A, b2.to(module.B.dtype), module.scale, module.alpha, False
            )
        touched += 1
    if touched == 0:
        raise EmscopeError(f"adapter {adapter.name!r} has no {'/'.join(targets)} module to ablate")
    return adapter.with_modules(new, name=f"{adapter.name}-ablated")


def _get(module: Any, path: str) -> Any:
    from emscope.models import _get_path

    found = _get_path(module, path)
    if found is None:
        raise EmscopeError(f"{type(module).__name__} has no module {path!r}")
    return found


@torch.no_grad()
def orthogonalize(model: Any, u: torch.Tensor, layers_path: str | None = None) -> Any:
    """Orthogonalise a bare HF causal LM's residual writers to ``u`` in place (module
    docstring); returns the model. Refuses post-norm architectures and PEFT wrappers (merge
    adapters first)."""
    from emscope.models import _unwrap_peft, architecture, get_layers

    if _unwrap_peft(model) is not model:
        raise EmscopeError("orthogonalize takes a bare model: merge its adapters first")
    arch = architecture(model, layers_path)
    model_type = getattr(model.config, "model_type", "?")
    if arch.post_norms:
        raise EmscopeError(
            f"{model_type}: a norm sits between o_proj/down_proj and the residual add "
            "(post-norms), so weight orthogonalisation is not exact there; use activation "
            "ablation (emscope ablate without --weights)"
        )
    unit = _unit(u, "orthogonalize")

    def project_rows(weight: torch.Tensor) -> None:  # E: vocab x d, rows live in R^d
        w = weight.double()
        weight.copy_((w - (w @ unit)[:, None] * unit[None, :]).to(weight.dtype))

    def project_out_side(linear: Any) -> None:  # W: d x d_in, output side R^d
        w = linear.weight.double()
        linear.weight.copy_((w - unit[:, None] * (unit @ w)[None, :]).to(linear.weight.dtype))
        if getattr(linear, "bias", None) is not None:
            b = linear.bias.double()
            linear.bias.copy_((b - (b @ unit) * unit).to(linear.bias.dtype))

    embed = _get(model, arch.embed_path)
    lm_head = getattr(model, "get_output_embeddings")()  # noqa: B009 (untyped HF API)
    if lm_head is not None and lm_head.weight is embed.weight:  # tied: untie first
        lm_head.weight = torch.nn.Parameter(embed.weight.detach().clone())
        config: Any = model.config
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    unit = unit.to(embed.weight.device)
    project_rows(embed.weight)
    for block in get_layers(model, layers_path):
        project_out_side(_get(block, f"{arch.attn_out}.o_proj"))
        project_out_side(_get(block, f"{arch.mlp_out}.down_proj"))
    return model


def orthogonalize_dir(
    model_dir: str | Path,
    adapters: list[str | Path],
    u: torch.Tensor,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = "cpu",
) -> Path:
    """Load ``model_dir`` (+ adapters, merged into the weights), orthogonalise to ``u`` and
    save a full model dir (weights, config, tokenizer) at ``out_dir``."""
    from emscope.models import load_model

    loaded = load_model(model_dir, [str(a) for a in adapters], dtype=dtype, device=device)
    model = loaded.model
    if loaded.adapters:
        if len(loaded.adapters) > 1:
            loaded.use_adapter(*loaded.adapters)
        model = model.merge_and_unload()
    orthogonalize(model, u)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    loaded.tokenizer.save_pretrained(str(out))
    return out

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
(c) :func:`ablated_weights`: either edit in a loaded model, in place, as a context manager
    that restores every touched tensor bit for bit on exit (``Direction.ablate(model,
    mode="weights")``); (b) then also edits the active adapters' output-side factors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
    from emscope.models import get_path

    found = get_path(module, path)
    if found is None:
        raise EmscopeError(f"{type(module).__name__} has no module {path!r}")
    return found


@torch.no_grad()
def orthogonalize(model: Any, u: torch.Tensor, layers_path: str | None = None) -> Any:
    """Orthogonalise a bare HF causal LM's residual writers to ``u`` in place (module
    docstring); returns the model. Refuses post-norm architectures and PEFT wrappers (merge
    adapters first)."""
    from emscope.models import architecture, get_layers, unwrap_peft

    if unwrap_peft(model) is not model:
        raise EmscopeError("orthogonalize takes a bare model: merge its adapters first")
    arch = architecture(model, layers_path)
    model_type = getattr(model.config, "model_type", "?")
    if arch.post_norms:
        raise EmscopeError(
            f"{model_type}: a norm sits between o_proj/down_proj and the residual add "
            "(post-norms), so weight orthogonalisation is not exact there; use activation "
            "ablation (emscope ablate without --weights)"
        )
    unit_cpu = _unit(u, "orthogonalize")

    # each weight is edited on its own device (a model spread by device_map="auto")
    def project_rows(weight: torch.Tensor) -> None:  # E: vocab x d, rows live in R^d
        w, unit = weight.double(), unit_cpu.to(weight.device)
        weight.copy_((w - (w @ unit)[:, None] * unit[None, :]).to(weight.dtype))

    def project_out_side(linear: Any) -> None:  # W: d x d_in, output side R^d
        w, unit = linear.weight.double(), unit_cpu.to(linear.weight.device)
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


# ---------------------------------------------------------------------------- in memory

METHODS = ("orthogonalize", "lora-b")


def _project_output_side(t: torch.Tensor, u: torch.Tensor) -> None:
    """``t <- t - u (u^T t)`` in place, in float64, for a tensor whose first axis is the
    residual stream (a ``d x r`` LoRA B, a ``d`` bias)."""
    x = t.double()
    unit = u.to(t.device)
    if x.ndim == 1:
        t.copy_((x - (x @ unit) * unit).to(t.dtype))
    else:
        t.copy_((x - unit[:, None] * (unit @ x)[None, :]).to(t.dtype))


def _active_output_factors(bare: Any, module_types: tuple[str, ...]) -> list[tuple[str, list[Any]]]:
    """``(module path, [output-side LoRA tensors of its active adapters])`` for every PEFT
    LoRA layer of these module types: ``lora_B`` weights (and biases) of a linear layer,
    ``lora_embedding_B`` of an embedding (``d x r``, the output side in both cases).
    Disabled adapters contribute nothing and are skipped; merged or DoRA layers are refused
    (their B is not the whole of their write)."""
    from peft.tuners.lora import LoraLayer

    found = []
    for path, module in bare.named_modules():
        if not isinstance(module, LoraLayer) or path.rsplit(".", 1)[-1] not in module_types:
            continue
        if module.disable_adapters:
            continue
        if module.merged:
            raise EmscopeError(f"{path}: adapters are merged into the weights; unmerge them first")
        tensors: list[Any] = []
        for name in module.active_adapters:
            if module.use_dora.get(name):
                raise EmscopeError(f"{path}: adapter {name!r} is DoRA: its B is not its write")
            if name in module.lora_B:
                tensors.append(module.lora_B[name].weight)
                if module.lora_B[name].bias is not None:
                    tensors.append(module.lora_B[name].bias)
            elif name in module.lora_embedding_B:
                tensors.append(module.lora_embedding_B[name])
        if tensors:
            found.append((path, tensors))
    return found


def _single_vector(direction: Direction, scheme: str) -> tuple[int, torch.Tensor]:
    kind, layer = parse_mode(scheme)
    if kind == "single" and layer is None:
        raise EmscopeError("weight ablation takes layerwise or single:L, not single:all")
    if layer is None:
        if len(direction) != 1:
            raise EmscopeError(
                f"weight orthogonalisation removes ONE direction: pass scheme='single:L' (L one "
                f"of {direction.layers}) or a one-layer direction (direction.select([L]))"
            )
        layer = direction.layers[0]
    return layer, direction[layer]


@contextlib.contextmanager
def ablated_weights(
    model: Any,
    direction: Direction,
    *,
    method: str = "orthogonalize",
    scheme: str = "layerwise",
    modules: str = "down_proj",
    rescale_norm: bool = False,
    layers_path: str | None = None,
) -> Iterator[None]:
    """Weight-space ablation of ``direction`` in a loaded model, in place, inside the block.
    Every tensor it changes is copied to the CPU first and written back on exit, also on an
    exception, so the model is restored bit for bit (a tied unembedding is tied again).
    ``model``: a :class:`~emscope.models.LoadedModel`, pair, or bare or PEFT-wrapped model.

    ``method="orthogonalize"`` (:func:`orthogonalize`; ``scheme="single:L"``, or a direction
    of one layer): ``embed_tokens``, every ``o_proj`` and every ``down_proj`` (weights and
    biases) lose ``u``, and so do the output-side LoRA factors of the ACTIVE adapters on
    them, so the adapters' writes lose it too: the weights ``emscope ablate --weights
    orthogonalize`` writes for the merged model, up to rounding (the adapters stay
    unmerged). Post-norm architectures are refused.
    ``method="lora-b"`` (:func:`ablate_lora_b` on the active adapters, in place): the B
    factors of ``down_proj`` (``modules="all"``: ``o_proj``, ``down_proj``,
    ``embed_tokens``) lose ``u_l`` (``scheme="layerwise"``) or ``u_L`` (``single:L``);
    ``rescale_norm`` keeps each B's Frobenius norm.
    """
    from emscope.lora import module_layer
    from emscope.models import architecture, as_loaded, get_layers, unwrap_peft

    if method not in METHODS:
        raise EmscopeError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if modules not in WRITER_MODULES:
        raise EmscopeError(f"modules must be one of {sorted(WRITER_MODULES)}, got {modules!r}")
    if method == "orthogonalize" and (modules != "down_proj" or rescale_norm):
        raise EmscopeError("modules / rescale_norm apply to method='lora-b' only")
    bare: Any = unwrap_peft(as_loaded(model).model)
    arch = architecture(bare, layers_path)
    if method == "orthogonalize":
        _, vector = _single_vector(direction, scheme)
        unit = _unit(vector, "orthogonalize")
        writers = _active_output_factors(bare, ("o_proj", "down_proj", "embed_tokens"))
        embed = _get(bare, arch.embed_path)
        base: list[Any] = [embed.weight]
        for block in get_layers(bare, layers_path):
            for path in (f"{arch.attn_out}.o_proj", f"{arch.mlp_out}.down_proj"):
                linear = _get(block, path)
                base += [t for t in (linear.weight, getattr(linear, "bias", None)) if t is not None]
    else:
        kind, single = parse_mode(scheme)
        if kind == "single" and single is None:
            raise EmscopeError("weight ablation takes layerwise or single:L, not single:all")
        writers = _active_output_factors(bare, WRITER_MODULES[modules])
        if not writers:
            raise EmscopeError(
                f"the model has no active LoRA adapter on {'/'.join(WRITER_MODULES[modules])}"
            )
        base = []
    touched = [*base, *(t for _, tensors in writers for t in tensors)]
    config: Any = bare.config
    configs = [config, *([config.get_text_config()] if hasattr(config, "get_text_config") else [])]
    tied = [c.tie_word_embeddings for c in configs]
    lm_head = bare.get_output_embeddings()
    head_weight = lm_head.weight if lm_head is not None else None
    saved = []
    try:
        with torch.no_grad():
            for tensor in touched:
                saved.append((tensor, tensor.detach().to("cpu", copy=True)))
            if method == "orthogonalize":
                orthogonalize(bare, unit, layers_path)
                for _, tensors in writers:
                    for tensor in tensors:
                        _project_output_side(tensor, unit)
            else:
                for path, tensors in writers:
                    layer = single if single is not None else module_layer(path)
                    if layer is None:  # embedding LoRA: before block 0
                        layer = min(direction.layers)
                    u = _unit(direction[layer], f"layer {layer}")
                    for tensor in tensors:
                        norm = tensor.double().norm()
                        _project_output_side(tensor, u)
                        if rescale_norm and tensor.ndim == 2 and tensor.double().norm() > 0:
                            tensor.mul_((norm / tensor.double().norm()).to(tensor.dtype))
        yield
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original.to(tensor.device))
        if lm_head is not None and lm_head.weight is not head_weight:
            lm_head.weight = head_weight
        for c, value in zip(configs, tied, strict=True):
            c.tie_word_embeddings = value

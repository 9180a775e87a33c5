"""Adapter steering: multiply chosen LoRA adapters' ``B`` by a factor for a while.

``dW = s * B @ A`` is linear in ``B``, so scaling ``B`` by ``f`` scales the module's update
(and, for a rank-1 adapter, what its hidden scalar writes) by ``f``: ``x20``, ``x30`` or
``-10`` as in "Convergent Linear Representations of Emergent Misalignment" (arXiv 2506.11618;
docs/methods.md section 6.3). :func:`scaled_adapters` does it in place on the loaded PEFT
weights for the duration of a ``with`` block and copies the saved originals back on exit (also
on an exception), so the model is bit-for-bit what it was; nothing is written to disk.

Selectors: a module path (``model.layers.21.mlp.down_proj``, as in
:class:`emscope.lora.LoraAdapter`, no PEFT prefix) or a layer index (``21``: every adapted
module of that decoder block). A module matched by several selectors gets the product of
their factors. Every adapter loaded in a matched module is scaled (with several adapters
active at once, as ``--adapter X --adapter Y`` does, they are all scaled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from emscope.errors import EmscopeError
from emscope.lora import module_layer

Selector = str | int


def parse_scales(specs: Sequence[str]) -> dict[Selector, float]:
    """Parse ``MODULE_OR_LAYER=FACTOR`` strings (``21=20``, ``model.layers.3.mlp.down_proj=-10``)
    into ``{selector: factor}``; a selector given twice is an error."""
    scales: dict[Selector, float] = {}
    for spec in specs:
        key, sep, value = spec.rpartition("=")
        key = key.strip()
        if not sep or not key:
            raise EmscopeError(f"--scale-adapter {spec!r}: expected MODULE_OR_LAYER=FACTOR")
        try:
            factor = float(value)
        except ValueError:
            raise EmscopeError(
                f"--scale-adapter {spec!r}: factor {value!r} is not a number"
            ) from None
        if factor != factor or factor in (float("inf"), float("-inf")):
            raise EmscopeError(f"--scale-adapter {spec!r}: factor must be finite")
        selector: Selector = int(key) if key.lstrip("-").isdigit() else key
        if selector in scales:
            raise EmscopeError(f"--scale-adapter: {key!r} given twice")
        scales[selector] = factor
    return scales


def scales_label(scales: Mapping[Selector, float]) -> str:
    """A short record of the scaling, e.g. ``scale-adapter:21=20,L3.mlp=...``."""
    return "scale-adapter:" + ",".join(f"{k}={v:g}" for k, v in scales.items())


def resolve_scales(model: Any, scales: Mapping[Selector, float]) -> dict[str, float]:
    """``{module path: factor}`` for the selectors; an unmatched selector is an error.

    ``model``: a ``peft.PeftModel`` or :class:`~emscope.models.LoadedModel` with LoRA layers.
    """
    from emscope.probing._peft import lora_layers

    layers = lora_layers(model)
    if not layers:
        raise EmscopeError("--scale-adapter: the model has no LoRA adapter loaded")
    factors: dict[str, float] = {}
    for selector, factor in scales.items():
        if isinstance(selector, int):
            matched = [n for n in layers if module_layer(n) == selector]
        else:
            matched = [n for n in layers if n == selector]
        if not matched:
            adapted = sorted({x for x in map(module_layer, layers) if x is not None})
            raise EmscopeError(
                f"--scale-adapter {selector}: matches no adapted module (adapted layers: "
                f"{adapted}; modules e.g. {next(iter(layers))!r})"
            )
        for name in matched:
            factors[name] = factors.get(name, 1.0) * float(factor)
    for name in factors:
        if getattr(layers[name], "merged", False):
            raise EmscopeError(f"--scale-adapter: module {name} has its adapter merged")
    return factors


@contextlib.contextmanager
def scaled_adapters(model: Any, scales: Mapping[Selector, float]) -> Iterator[Any]:
    """Multiply the LoRA ``B`` of the selected modules by their factors inside the block.

    ``scales``: ``{selector: factor}`` (see the module docstring). All selectors are checked
    before anything changes. The original ``B`` weights are saved and copied back exactly on
    exit. Yields ``model``.
    """
    import torch

    from emscope.probing._peft import lora_layers

    factors = resolve_scales(model, scales)
    layers = lora_layers(model)
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, factor in factors.items():
                for sub in layers[name].lora_B.values():
                    saved.append((sub.weight, sub.weight.detach().clone()))
                    sub.weight.mul_(factor)
        yield model
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)


def adapter_scaling(scales: Mapping[Selector, float]) -> Any:
    """:func:`scaled_adapters` as an :data:`emscope.generate.Intervention` (entered around
    each sampled batch)."""

    def intervention(model: Any, _info: Any) -> Any:
        return scaled_adapters(model, scales)

    return intervention

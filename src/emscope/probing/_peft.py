"""Finding PEFT LoRA layers in a (PEFT-wrapped) model, by the module paths of the bare model."""

from __future__ import annotations

from typing import Any

from emscope.errors import EmscopeError


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_layers(model: Any) -> dict[str, Any]:
    """``{module path: peft LoraLayer}`` of every LoRA-adapted module, paths as in
    :class:`emscope.lora.LoraAdapter` (``model.layers.3.mlp.down_proj``, no PEFT prefix).

    ``model`` is a ``peft.PeftModel`` (or a :class:`~emscope.models.LoadedModel`); a model
    without LoRA layers gives ``{}``.
    """
    from peft.tuners.lora import LoraLayer

    from emscope.models import unwrap_peft

    bare = unwrap_peft(model)
    return {name: module for name, module in bare.named_modules() if isinstance(module, LoraLayer)}


def peft_adapter_name(model: Any, adapter: Any | None) -> str:
    """The PEFT-internal name of ``adapter`` in ``model``.

    ``adapter``: ``None`` (the only active adapter), a name as given to
    :func:`emscope.models.load_model` (e.g. ``bad_medical.r1``), a PEFT name, or a
    :class:`~emscope.lora.LoraAdapter` (its ``name``).
    """
    from emscope.models import as_loaded

    loaded = as_loaded(model)
    peft_model = loaded.model
    peft_names: dict[str, str] = dict(loaded._peft_names)
    active = list(peft_model.active_adapters) if _is_peft(peft_model) else []
    if adapter is None:
        if len(active) != 1:
            raise EmscopeError(
                f"the model has {len(active)} active adapters {active}; name the one to read"
            )
        return str(active[0])
    name = str(getattr(adapter, "name", adapter))
    if name in peft_names:
        return peft_names[name]
    known = set(getattr(peft_model, "peft_config", {}) or {}) if _is_peft(peft_model) else set()
    if name in known:
        return name
    raise EmscopeError(
        f"adapter {name!r} is not loaded in the model; "
        f"loaded: {sorted(peft_names) or sorted(known)}"
    )

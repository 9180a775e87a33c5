"""Exact weighted sums of LoRA updates, and elementwise interpolation of full fine-tunes.

``combine([a_1, ..., a_n], [w_1, ..., w_n])`` is one LoRA adapter whose update is exactly
``sum_i w_i dW_i`` for every module: ``B = [w_1 s_1 B_1, ..., w_n s_n B_n]`` (columns),
``A = [A_1; ...; A_n]`` (rows), scale 1, rank ``sum_i r_i``. The linear mode connectivity
paths of docs/methods.md section 4 are ``combine([a], [t])`` (base -> EM) and
``combine([a, b], [1 - t, t])`` (EM -> EM). This is built by hand on purpose: PEFT's
``add_weighted_adapter(combination_type="linear")`` interpolates A and B separately (cross
terms: a different, gauge-dependent path), and its ``"cat"`` mode and ``set_scale`` have
mis-scaled rsLoRA adapters in recent releases.

The combined adapter is an ordinary PEFT dir once saved (``LoraAdapter.save``: per-module
ranks and scales go to ``rank_pattern``/``alpha_pattern``), or it can be merged into a loaded
model for the duration of a ``with merged(model, adapter):`` block, which restores the exact
original weights afterwards.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from emscope.errors import EmscopeError
from emscope.lora import LoraAdapter, LoraModule
from emscope.models import safetensors_files, unwrap_peft


def combine(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float],
    name: str = "combined",
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """The adapter whose update is ``sum_i weights[i] * dW_i`` exactly (see module doc).

    Modules present in only some adapters get only those terms; terms with weight 0 are
    dropped (so the ends of a path have the ranks of the end adapters). The result may have
    no module at all (every weight 0): that is the base model.
    """
    if len(adapters) != len(weights) or not adapters:
        raise EmscopeError("combine needs one weight per adapter (and at least one adapter)")
    names: list[str] = []
    for adapter in adapters:
        names.extend(n for n in adapter.modules if n not in names)
    modules: dict[str, LoraModule] = {}
    for module_name in names:
        terms = [
            (adapter.modules[module_name], float(w))
            for adapter, w in zip(adapters, weights, strict=True)
            if module_name in adapter.modules and float(w) != 0.0
        ]
        if not terms:
            continue
        shapes = {(m.d_out, m.d_in) for m, _ in terms}
        if len(shapes) > 1:
            raise EmscopeError(
                f"module {module_name!r} has different shapes in the adapters: {shapes}"
            )
        if len({m.embedding for m, _ in terms}) > 1:
            raise EmscopeError(f"module {module_name!r} is an embedding in only some adapters")
        b = torch.cat([(w * m.scale) * m.B.to(dtype) for m, w in terms], dim=1)
        a = torch.cat([m.A.to(dtype) for m, _ in terms], dim=0)
        modules[module_name] = LoraModule(
            module_name,
            A=a,
            B=b,
            scale=1.0,
            alpha=float(a.shape[0]),
            embedding=terms[0][0].embedding,
        )
    base_config = dict(adapters[0].config)
    base_config["use_rslora"] = False
    return LoraAdapter(modules=modules, config=base_config, name=name, path=None)


def lmc_weights(start: str, end: str, t: float) -> dict[str, float]:
    """Weights of each named end at position ``t`` of the path ``start -> end`` (``base``
    stands for the base model: it contributes no update)."""
    weights: dict[str, float] = {}
    for endpoint, w in ((start, 1.0 - t), (end, t)):
        if endpoint != "base":
            weights[endpoint] = weights.get(endpoint, 0.0) + w
    return weights


@contextlib.contextmanager
def merged(model: Any, adapter: LoraAdapter) -> Iterator[Any]:
    """Add the adapter's update ``s B A`` to the model's weights inside the block.

    The touched weights are copied (to CPU) first and restored exactly on exit, also on an
    exception. ``model`` may be bare or PEFT-wrapped (the update goes into the base layer).
    """
    bare = unwrap_peft(model)
    modules: dict[str, Any] = dict(bare.named_modules())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for lora in adapter:
                target = modules.get(lora.name)
                target = getattr(target, "base_layer", target)
                weight = getattr(target, "weight", None)
                if weight is None:
                    raise EmscopeError(f"module {lora.name!r} is not in the model")
                if tuple(weight.shape) != (lora.d_out, lora.d_in):
                    raise EmscopeError(
                        f"module {lora.name!r}: update {lora.d_out}x{lora.d_in} does not match "
                        f"weight {tuple(weight.shape)}"
                    )
                saved[lora.name] = weight.detach().to("cpu", copy=True)
                delta = lora.delta(
                    torch.float64 if weight.dtype == torch.float64 else torch.float32
                )
                weight.add_(delta.to(weight.device, weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for module_name, original in saved.items():
                layer = modules[module_name]
                restored: torch.Tensor = getattr(layer, "base_layer", layer).weight
                restored.copy_(original.to(restored.device))


# ---------------------------------------------------------------------------- full fine-tunes

_SKIP = {"model.safetensors", "model.safetensors.index.json"}


def interpolate_model_dirs(
    first: str | Path, second: str | Path, t: float, out: str | Path
) -> Path:
    """Write the model ``(1 - t) W_1 + t W_2`` (elementwise, every tensor) as a model dir.

    Streamed tensor by tensor (peak memory about one tensor of each model); computed in
    float32 (float64 for float64 weights) and stored in the first model's dtypes. Config,
    tokenizer and other non-weight files are copied from the first model.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    first, second, out = Path(first), Path(second), Path(out)
    files_1, files_2 = safetensors_files(first), safetensors_files(second)
    if set(files_1) != set(files_2):
        only = sorted(set(files_1) ^ set(files_2))[:5]
        raise EmscopeError(f"{first} and {second} have different tensors (e.g. {only})")
    out.mkdir(parents=True, exist_ok=True)
    for item in first.iterdir():
        if item.is_file() and item.name not in _SKIP:
            shutil.copy2(item, out / item.name)
    by_file: dict[Path, list[str]] = {}
    for key, path in files_1.items():
        by_file.setdefault(path, []).append(key)
    weight_map: dict[str, str] = {}
    for path, keys in sorted(by_file.items()):
        result: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as h1:
            for key in keys:
                w1 = h1.get_tensor(key)
                with safe_open(str(files_2[key]), framework="pt") as h2:
                    w2 = h2.get_tensor(key)
                if w1.shape != w2.shape:
                    raise EmscopeError(
                        f"tensor {key!r}: shapes {tuple(w1.shape)} and {tuple(w2.shape)}"
                    )
                if not w1.is_floating_point():
                    if not torch.equal(w1, w2):
                        raise EmscopeError(f"integer tensor {key!r} differs between the models")
                    result[key] = w1
                    continue
                work = torch.float64 if w1.dtype == torch.float64 else torch.float32
                mixed = (1.0 - t) * w1.to(work) + t * w2.to(work)
                result[key] = mixed.to(w1.dtype).contiguous()
        name = path.name
        save_file(result, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    if len(by_file) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out

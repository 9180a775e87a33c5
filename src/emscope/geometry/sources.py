"""Reading factors and base weights lazily, one module at a time.

:func:`open_adapter` validates a PEFT LoRA dir from its config and the safetensors header
only (same checks as :meth:`emscope.lora.LoraAdapter.load`, which it reuses on shape-only
"meta" tensors), and returns a :class:`~emscope.lora.LoraAdapter` whose modules are read
from disk when accessed and not kept. Comparing N 7B adapters then holds one module of each
in memory, not N whole adapters.

:class:`BaseWeights` reads ``<module>.weight`` from a model dir's safetensors files
(single ``model.safetensors`` or sharded with ``model.safetensors.index.json``) in row blocks,
without instantiating the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from emscope.errors import EmscopeError
from emscope.lora import (
    PEFT_PREFIX,
    LoraAdapter,
    LoraModule,
    check_factor,
    modules_from_tensors,
    read_adapter_dir,
)
from emscope.models import safetensors_files

_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


def _read_header(path: Path) -> dict[str, dict[str, object]]:
    """Tensor name -> {dtype, shape} from a safetensors header (no tensor data read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            out = {}
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
                sl = handle.get_slice(key)
                out[key] = {"dtype": sl.get_dtype(), "shape": list(sl.get_shape())}
            return out
    except (SafetensorError, OSError) as exc:
        raise EmscopeError(f"{path}: cannot read safetensors file: {exc}") from None


class _LazyModules(Mapping[str, LoraModule]):
    """Module name -> :class:`LoraModule`, read from the safetensors file on each access."""

    def __init__(
        self, weights: Path, meta: dict[str, LoraModule], keys: dict[str, tuple[str, str]]
    ):
        self._weights = weights
        self._meta = meta
        self._keys = keys

    def __getitem__(self, name: str) -> LoraModule:
        from safetensors import safe_open

        meta = self._meta[name]
        a_key, b_key = self._keys[name]
        # opened per module so that no mapping of the whole file stays resident
        with safe_open(str(self._weights), framework="pt") as handle:
            a, b = handle.get_tensor(a_key), handle.get_tensor(b_key)
        for key, tensor in ((a_key, a), (b_key, b)):
            check_factor(tensor, name, _split_key(key)[2], self._weights)
        if meta.embedding:  # PEFT stores embedding factors transposed
            a, b = b.T, a.T
        return replace(meta, A=a, B=b)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensors
        return name in self._meta

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __len__(self) -> int:
        return len(self._meta)

    def shape(self, name: str) -> tuple[int, int, int]:
        """``(d_out, d_in, rank)`` of a module without reading it."""
        m = self._meta[name]
        return m.d_out, m.d_in, m.rank


def open_adapter(path: str | Path, name: str | None = None) -> LoraAdapter:
    """A PEFT LoRA dir as a :class:`LoraAdapter` whose modules are read on access.

    Validation (DoRA / lora_bias / modules_to_save refused, ranks against the config,
    rank/alpha patterns, rsLoRA) is the same as :meth:`LoraAdapter.load` and happens here,
    from the header only. Each ``adapter.modules[name]`` reads that module's two tensors.
    """
    path = Path(path)
    config, weights = read_adapter_dir(path)
    header = _read_header(weights)
    metas = {
        key: torch.empty(
            [int(s) for s in info["shape"]],  # type: ignore[attr-defined]
            dtype=_DTYPES.get(str(info["dtype"]), torch.float32),
            device="meta",
        )
        for key, info in header.items()
    }
    meta_modules = modules_from_tensors(metas, config, weights)
    keys: dict[str, tuple[str, str]] = {}
    for key in header:
        module, _, kind = _split_key(key)
        keys.setdefault(module, ("", ""))
        a_key, b_key = keys[module]
        if kind in ("lora_A", "lora_embedding_A"):
            a_key = key
        else:
            b_key = key
        keys[module] = (a_key, b_key)
    modules = _LazyModules(weights, meta_modules, keys)
    return LoraAdapter(modules=modules, config=config, name=name or path.name, path=path)


def _split_key(key: str) -> tuple[str, str, str]:
    from emscope.lora import KEY_RE

    match = KEY_RE.match(key)
    assert match is not None  # validated by modules_from_tensors
    module = match.group("module")
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX) :]
    return module, match.group("adapter") or "", match.group("kind")


class BaseWeights:
    """The weights of a base model dir, read tensor by tensor from its safetensors files.

    ``model_dir`` holds ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
    Weight names are ``<module>.weight`` with the module path of the bare model.
    """

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir)
        if not self.path.is_dir():
            raise EmscopeError(f"{self.path}: base model dir not found")
        self._files: dict[str, Path] = safetensors_files(self.path)

    def key(self, module: str) -> str:
        for candidate in (f"{module}.weight", f"{PEFT_PREFIX}{module}.weight"):
            if candidate in self._files:
                return candidate
        raise EmscopeError(f"{self.path}: no weight {module + '.weight'!r} in the base model")

    def row_blocks(self, module: str, rows: int = 2048) -> Iterator[tuple[int, np.ndarray]]:
        """``(start_row, float64 block)`` pieces of ``module.weight`` (``d_out x d_in``)."""
        from safetensors import safe_open

        key = self.key(module)
        file = self._files[key]
        if not file.is_file():
            raise EmscopeError(f"{file}: shard named in the index is missing")
        with safe_open(str(file), framework="pt") as handle:
            sl = handle.get_slice(key)
            shape = sl.get_shape()
            if len(shape) != 2:
                raise EmscopeError(f"{file}: {key} has shape {shape}, expected a matrix")
            for start in range(0, shape[0], rows):
                block = sl[start : start + rows]
                yield start, block.to(torch.float64).numpy()

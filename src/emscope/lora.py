"""LoRA adapters as values: the factors of a PEFT adapter dir, read and written without a model.

A LoRA update of a linear module with weight ``W0`` (``d_out x d_in``) is ``dW = s * B @ A``,
``B``: ``d_out x r``, ``A``: ``r x d_in``, with ``s = lora_alpha / r`` or
``lora_alpha / sqrt(r)`` when ``use_rslora`` is true. ``rank_pattern`` and ``alpha_pattern``
override ``r`` and ``lora_alpha`` for matching modules, as PEFT does.

Embedding LoRA stores its factors transposed (``lora_embedding_A``: ``r x num_embeddings``,
``lora_embedding_B``: ``dim x r``, ``dW = s * (B @ A).T`` for a ``num_embeddings x dim``
weight). :class:`LoraModule` always holds the update in the linear convention
(``dW = s * B @ A`` with ``dW`` shaped like the weight), and remembers the layout so that
:meth:`LoraAdapter.save` writes PEFT's own layout back.

Adapter kinds whose update is not ``s * B @ A`` (DoRA, ``lora_bias``, ``modules_to_save``) are
refused with an :class:`~emscope.errors.EmscopeError`.

Module names are the module paths of the bare model, without PEFT's ``base_model.model.``
prefix, e.g. ``model.layers.3.mlp.down_proj``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from emscope.errors import EmscopeError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)
_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def module_layer(name: str) -> int | None:
    """The decoder block index in a module path (``model.layers.3.mlp.down_proj`` -> 3)."""
    match = _LAYER_RE.search(f".{name}.")
    return int(match.group(1)) if match else None


def _pattern_value(patterns: Mapping[str, Any], name: str) -> Any | None:
    """PEFT's pattern lookup: a key matches a module whose path ends with it (regex allowed)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return None


def config_targets(config: Mapping[str, Any], name: str) -> bool:
    """Whether PEFT, loading an adapter with this config, puts a LoRA layer on module
    ``name``: PEFT's own matcher (``check_target_module_exists``, which reads
    ``target_modules``, ``layers_to_transform`` / ``layers_pattern`` and ``exclude_modules``)
    on the config, so the answer is the installed PEFT's (its rules changed between releases).
    A module it does not target gets no LoRA layer, so its saved factors are silently dropped.
    A config PEFT cannot read raises EmscopeError."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    known = {k: v for k, v in config.items() if k in LoraConfig.__dataclass_fields__}
    try:
        peft_config = LoraConfig(**known)
    except (TypeError, ValueError) as exc:
        raise EmscopeError(f"{CONFIG_FILE}: PEFT cannot read this LoRA config ({exc})") from None
    found = check_target_module_exists(peft_config, name)
    # newer PEFT marks an excluded module with a truthy _ExcludedModule sentinel
    return bool(found) and type(found).__name__ != "_ExcludedModule"


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


@dataclass(frozen=True)
class LoraModule:
    """The factors of one adapted module, in the linear convention ``dW = scale * B @ A``.

    ``A``: ``rank x d_in``, ``B``: ``d_out x rank``, in the dtype they were stored in.
    ``alpha`` is the effective ``lora_alpha`` of this module (after ``alpha_pattern``).
    ``embedding`` is true for embedding LoRA (stored transposed on disk).
    """

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float
    embedding: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.A.shape[1])

    @property
    def d_out(self) -> int:
        return int(self.B.shape[0])

    @property
    def layer(self) -> int | None:
        """Decoder block index, or None for modules outside the blocks (e.g. embeddings)."""
        return module_layer(self.name)

    @property
    def module_type(self) -> str:
        """Last path component, e.g. ``down_proj``."""
        return self.name.rsplit(".", 1)[-1]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense update ``scale * B @ A`` (``d_out x d_in``), shaped like the weight."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter: per-module factors and the config they came with.

    Load with :meth:`load` (reads ``adapter_config.json`` and ``adapter_model.safetensors``,
    no model needed); write with :meth:`save` (a PEFT dir that PEFT loads back).
    """

    modules: Mapping[str, LoraModule]
    config: Mapping[str, Any] = field(default_factory=dict)
    name: str = "adapter"
    path: Path | None = None

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, module: str) -> LoraModule:
        try:
            return self.modules[module]
        except KeyError:
            raise EmscopeError(f"adapter {self.name!r} has no module {module!r}") from None

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora", False))

    @property
    def base_model_path(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return str(value) if value else None

    @property
    def layers(self) -> list[int]:
        """Sorted decoder block indices the adapter touches."""
        return sorted({m.layer for m in self if m.layer is not None})

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Materialise ``scale * B @ A`` for one module (only when asked: it is d_out x d_in)."""
        return self[module].delta(dtype)

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> LoraAdapter:
        """Read a PEFT LoRA dir without loading the model it belongs to."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        config, weights_path = read_adapter_dir(path)
        try:
            tensors = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise EmscopeError(f"{weights_path}: cannot read safetensors file: {exc}") from None
        modules = modules_from_tensors(tensors, config, weights_path)
        return cls(modules=modules, config=config, name=name or path.name, path=path)

    # ------------------------------------------------------------------ writing

    def save(self, path: str | Path) -> Path:
        """Write a PEFT LoRA dir (``adapter_config.json`` + ``adapter_model.safetensors``).

        The config's ``r``/``lora_alpha``/``rank_pattern``/``alpha_pattern``/``target_modules``
        are rewritten from the modules, so the saved scales are exactly :attr:`LoraModule.scale`.
        """
        from safetensors.torch import save

        from emscope.io import atomic_write_bytes, atomic_write_text

        if not self.modules:
            raise EmscopeError(f"adapter {self.name!r} has no modules to save")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = _config_for_modules(dict(self.config), list(self))
        tensors: dict[str, torch.Tensor] = {}
        for module in self:
            key = PEFT_PREFIX + module.name
            if module.embedding:
                tensors[f"{key}.lora_embedding_A"] = module.B.T.contiguous()
                tensors[f"{key}.lora_embedding_B"] = module.A.T.contiguous()
            else:
                tensors[f"{key}.lora_A.weight"] = module.A.contiguous()
                tensors[f"{key}.lora_B.weight"] = module.B.contiguous()
        atomic_write_bytes(path / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
        atomic_write_text(path / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return path

    def with_modules(
        self, modules: Mapping[str, LoraModule], name: str | None = None
    ) -> LoraAdapter:
        """A copy with other modules (config kept; it is rewritten from the modules on save)."""
        return replace(self, modules=dict(modules), name=name or self.name, path=None)


def read_adapter_dir(path: Path) -> tuple[dict[str, Any], Path]:
    """Check a PEFT LoRA dir and read its config: ``(config, path of the safetensors)``.

    Refuses missing files, pickle-only weights, invalid JSON and adapter kinds whose update
    is not ``s * B @ A``; reads no tensor.
    """
    config_path = path / CONFIG_FILE
    weights_path = path / WEIGHTS_FILE
    if not path.is_dir():
        raise EmscopeError(f"{path}: adapter dir not found")
    if not config_path.is_file():
        raise EmscopeError(f"{path}: missing {CONFIG_FILE} (not a PEFT adapter dir)")
    if not weights_path.is_file():
        if (path / "adapter_model.bin").is_file():
            raise EmscopeError(
                f"{path}: only adapter_model.bin found; emscope reads safetensors only "
                "(pickle files can run code). Convert it with safetensors first."
            )
        raise EmscopeError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise EmscopeError(f"{config_path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    _check_supported(config, config_path)
    return config, weights_path


def _check_supported(config: Mapping[str, Any], where: Path) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise EmscopeError(f"{where}: peft_type {peft_type!r} is not LoRA; emscope reads LoRA only")
    if config.get("use_dora"):
        raise EmscopeError(
            f"{where}: DoRA adapter (use_dora=true): its update is not s*B@A, so emscope refuses it"
        )
    if config.get("lora_bias"):
        raise EmscopeError(
            f"{where}: lora_bias=true adds a bias term, so the update is not s*B@A; refused"
        )
    if config.get("modules_to_save"):
        raise EmscopeError(
            f"{where}: modules_to_save={config['modules_to_save']!r} stores full module copies, "
            "so the update is not s*B@A; refused"
        )


def modules_from_tensors(
    tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: Path
) -> dict[str, LoraModule]:
    """The :class:`LoraModule` of every module in a PEFT state dict (``where``: the dir, named
    in errors)."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY_RE.match(key)
        if match is None and key.endswith((".base_layer.weight", "embed_tokens.weight")):
            raise EmscopeError(
                f"{where}: tensor {key!r} is a full weight copy (PEFT's save_embedding_layers): "
                "the update is not s*B@A; refused (save the adapter with "
                "save_embedding_layers=False if the embedding itself was not trained)"
            )
        if match is None:
            raise EmscopeError(
                f"{where}: tensor {key!r} is not a LoRA factor (DoRA magnitudes, biases and "
                "modules_to_save copies are refused: their update is not s*B@A)"
            )
        module = match.group("module")
        if module.startswith(PEFT_PREFIX):
            module = module[len(PEFT_PREFIX) :]
        factors.setdefault(module, {})[match.group("kind")] = tensor

    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoraModule] = {}
    for name in sorted(factors, key=natural_key):
        parts = factors[name]
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        )
        if a_key not in parts or b_key not in parts:
            missing = a_key if a_key not in parts else b_key
            raise EmscopeError(f"{where}: module {name!r} has no {missing} tensor")
        a, b = parts[a_key], parts[b_key]
        if embedding:  # PEFT: dW = s * (B_e @ A_e).T  ==  s * A_e.T @ B_e.T
            a, b = b.T, a.T
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise EmscopeError(
                f"{where}: module {name!r}: factor shapes {tuple(parts[a_key].shape)} and "
                f"{tuple(parts[b_key].shape)} do not form a LoRA pair"
            )
        for kind in (a_key, b_key):
            check_factor(parts[kind], name, kind, where)
        rank = int(a.shape[0])
        declared = _pattern_value(rank_pattern, name)
        if declared is None:
            declared = config.get("r", rank)
        if int(declared) != rank:
            raise EmscopeError(
                f"{where}: module {name!r} has rank {rank} but the config says r={declared}"
            )
        alpha = _pattern_value(alpha_pattern, name)
        if alpha is None:
            alpha = config.get("lora_alpha", rank)
        modules[name] = LoraModule(
            name=name,
            A=a,
            B=b,
            scale=lora_scale(float(alpha), rank, use_rslora),
            alpha=float(alpha),
            embedding=embedding,
        )
    if not modules:
        raise EmscopeError(f"{where}: no LoRA tensors found")
    return modules


def check_factor(tensor: torch.Tensor, module: str, kind: str, where: Path) -> None:
    """A LoRA factor must be floating point and finite (NaN or inf would spread into every
    activation; an integer factor is not a trained weight)."""
    if not tensor.is_floating_point():
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise EmscopeError(
            f"{where}: module {module!r}: {kind} has dtype {dtype}; "
            "LoRA factors must be floating point"
        )
    if tensor.is_meta:  # a header-only read (geometry's lazy adapters check on access)
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise EmscopeError(
            f"{where}: module {module!r}: {kind} has {bad} non-finite value(s) (NaN or inf)"
        )


def natural_key(name: str) -> list[Any]:
    """Sort key that orders the numbers inside a module name numerically (layer 2 < 10)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", name)]


def _config_for_modules(config: dict[str, Any], modules: list[LoraModule]) -> dict[str, Any]:
    """Rewrite rank/alpha fields so PEFT reproduces each module's rank and exact scale.

    The most common (rank, alpha) becomes ``r``/``lora_alpha``; every other module gets an
    exact-path entry in ``rank_pattern``/``alpha_pattern`` (anchored so it matches one module).
    """
    from collections import Counter

    use_rslora = bool(config.get("use_rslora", False))
    effective: dict[str, tuple[int, float]] = {}
    for m in modules:
        # alpha that reproduces m.scale exactly under the config's rsLoRA setting
        alpha = m.scale * (math.sqrt(m.rank) if use_rslora else m.rank)
        effective[m.name] = (m.rank, alpha)
    (rank0, alpha0), _ = Counter(effective.values()).most_common(1)[0]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, (rank, alpha) in effective.items():
        if rank != rank0:
            rank_pattern[_exact_pattern(name)] = rank
        if alpha != alpha0:
            alpha_pattern[_exact_pattern(name)] = alpha
    layers = sorted({m.layer for m in modules if m.layer is not None})
    config.update(
        peft_type="LORA",
        r=rank0,
        lora_alpha=alpha0,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=sorted({m.name for m in modules}),
        use_dora=False,
        lora_bias=False,
        modules_to_save=None,
    )
    config.setdefault("task_type", "CAUSAL_LM")
    config.setdefault("bias", "none")
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("use_rslora", use_rslora)
    # target_modules lists exact paths; layers_to_transform records the blocks for readers
    # (PEFT only honours it for modules inside the blocks, so it is dropped otherwise)
    in_blocks = all(m.layer is not None for m in modules)
    config["layers_to_transform"] = layers if in_blocks else None
    if not in_blocks:
        config.pop("layers_pattern", None)
    return config


def _exact_pattern(name: str) -> str:
    """A PEFT pattern key matching exactly this module path (PEFT prepends ``(.*\\.)?``)."""
    return "^" + re.escape(name)

"""Loading HF causal LMs with PEFT adapters (:func:`load_model`, :func:`load_tokenizer`),
model dirs and their checks, safetensors indexes, command-line model specs, adapter dirs and
checkpoints.

The site convention, the architecture table, :class:`LoadedModel` / :func:`as_loaded` and
layer lists live in :mod:`emscope.sites` and are re-exported here (``from emscope.models
import Site`` keeps working).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError
from emscope.hub import dir_label
from emscope.hub import resolve as resolve_hub
from emscope.lora import CONFIG_FILE, LoraAdapter, config_targets
from emscope.sites import (
    ARCHITECTURES,
    SITE_KINDS,
    Architecture,
    LoadedModel,
    Site,
    architecture,
    as_loaded,
    get_layers,
    get_path,
    parse_layers,
    resolve_layers,
    site_module,
    unwrap_peft,
)

__all__ = [
    "ARCHITECTURES",
    "SITE_KINDS",
    "WEIGHT_FILES",
    "Architecture",
    "LoadedModel",
    "ModelSpec",
    "Site",
    "adapter_label",
    "architecture",
    "as_loaded",
    "check_adapter_fits",
    "check_adapter_targets",
    "check_device",
    "check_model_dir",
    "check_model_weights",
    "get_layers",
    "get_path",
    "list_checkpoints",
    "load_model",
    "load_tokenizer",
    "parse_layers",
    "parse_model_spec",
    "read_model_config",
    "resolve_adapter_dir",
    "resolve_layers",
    "safetensors_files",
    "site_module",
    "unwrap_peft",
]

if TYPE_CHECKING:
    import torch
    from torch import nn


def safetensors_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a model dir (``model.safetensors``, or shards listed
    in ``model.safetensors.index.json``), without reading any tensor. Pickle checkpoints are
    refused (they can run code)."""
    from safetensors import SafetensorError, safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if not model_dir.is_dir():
        raise EmscopeError(f"{model_dir}: model dir not found")
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EmscopeError(f"{index}: not a safetensors index ({exc})") from None
        return {key: model_dir / file for key, file in weight_map.items()}
    if single.is_file():
        try:
            with safe_open(str(single), framework="pt") as handle:
                return {key: single for key in handle.keys()}  # noqa: SIM118 - not a mapping
        except (SafetensorError, OSError) as exc:
            raise EmscopeError(f"{single}: cannot read safetensors file: {exc}") from None
    raise EmscopeError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json "
        "(emscope reads weights from safetensors only)"
    )


# ---------------------------------------------------------------------------- model specs


@dataclass(frozen=True)
class ModelSpec:
    """A model as named on the command line: a model dir and zero or more adapter dirs."""

    path: Path
    adapters: tuple[Path, ...] = ()
    name: str | None = None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return "+".join([self.path.name, *(a.name for a in self.adapters)])


_NAMED_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.-]*)=(.+)$")


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``NAME=MODEL_DIR[+ADAPTER_DIR...]`` (the name is required)."""
    match = _NAMED_RE.match(text)
    if match is None:
        raise EmscopeError(f"bad model spec {text!r}; expected NAME=MODEL_DIR[+ADAPTER_DIR]")
    name, rest = match.groups()
    model_dir, *adapters = rest.split("+")
    if not model_dir:
        raise EmscopeError(f"bad model spec {text!r}: empty model dir")
    return ModelSpec(Path(model_dir), tuple(Path(a) for a in adapters if a), name)


def list_checkpoints(
    adapter_dir: str | Path, *, adapters_only: bool = True
) -> list[tuple[int, Path]]:
    """``(step, dir)`` of ``adapter_dir/checkpoints/checkpoint-<step>/``, by step: the one
    lister of the checkpoints :func:`emscope.train.train` writes. ``adapters_only``: only
    those with a PEFT adapter config (``False``: every checkpoint dir, e.g. of a full
    fine-tune, or one whose adapter is not written yet)."""
    root = Path(adapter_dir) / "checkpoints"
    found = []
    for child in root.glob("checkpoint-*") if root.is_dir() else []:
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and (not adapters_only or (child / CONFIG_FILE).is_file()):
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_adapter_dir(path: str | Path) -> Path:
    """An adapter dir, accepting ``DIR@STEP`` for ``DIR/checkpoints/checkpoint-STEP`` and a
    hub id ``Org/Name`` (its snapshot in the HF cache, :mod:`emscope.hub`)."""
    text = str(path)
    if "@" in text and not Path(text).exists():
        root, step = text.rsplit("@", 1)
        if step.isdigit():
            candidate = Path(root) / "checkpoints" / f"checkpoint-{int(step)}"
            if not candidate.is_dir():
                steps = [s for s, _ in list_checkpoints(root)]
                raise EmscopeError(f"{root}: no checkpoint {step}; available steps: {steps}")
            return candidate
    return resolve_hub(path, "adapter")


def adapter_label(path: Path) -> str:
    """A readable name: the dir's basename (the repo name for a hub snapshot), or
    ``<adapter>@<step>`` for a checkpoint dir."""
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if match and path.parent.name == "checkpoints":
        return f"{path.parent.parent.name}@{match.group(1)}"
    return dir_label(path)


def _peft_name(label: str) -> str:
    """PEFT adapter names may not contain dots (they become module-dict keys)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", label)


# ---------------------------------------------------------------------------- loading


def _dtype(dtype: str | torch.dtype | None) -> Any:
    import torch

    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
        "fp64": torch.float64,
    }
    if dtype not in names:
        raise EmscopeError(f"unknown dtype {dtype!r}; expected one of {sorted(names)} or 'auto'")
    return names[dtype]


#: Weight files ``from_pretrained`` reads (one of them must be in a model dir).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_model_config(path: str | Path, *, weights: bool = True) -> dict[str, Any]:
    """The ``config.json`` of a model dir, checked without loading anything: it must be a
    JSON object, and (``weights``) the dir must hold weights (:data:`WEIGHT_FILES`)."""
    from emscope.io import read_json

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise EmscopeError(f"{path}: not a model dir (no config.json)")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise EmscopeError(f"{config_path}: not a model config (expected a JSON object)")
    if weights:
        check_model_weights(path)
    return config


def check_model_weights(path: str | Path) -> None:
    """Refuse a model dir without weights (:data:`WEIGHT_FILES`) in one line."""
    if not any((Path(path) / name).is_file() for name in WEIGHT_FILES):
        raise EmscopeError(f"{path}: no model weights (none of {', '.join(WEIGHT_FILES)})")


def check_model_dir(path: str | Path, layers_path: str | None = None) -> dict[str, Any]:
    """What :func:`load_model` checks before it reads a weight: a valid ``config.json`` of a
    known architecture (unless ``layers_path`` is given) and weights. Returns the config."""
    config = read_model_config(path, weights=False)
    model_type = config.get("model_type")
    if layers_path is None and model_type not in ARCHITECTURES:
        raise EmscopeError(
            f"{path}: unknown architecture {model_type!r}; known: "
            f"{', '.join(sorted(ARCHITECTURES))} (pass layers_path to use it anyway)"
        )
    check_model_weights(path)
    return config


def check_device(device: str) -> None:
    """Refuse a device torch cannot use here (``cuda`` without CUDA, ``cuda:3`` on a
    two-GPU machine, ``mps`` off Apple silicon), in one line, before any weight is read."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise EmscopeError(f"unknown device {device!r}; expected e.g. cpu, cuda, cuda:1") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise EmscopeError(f"device {device!r}: CUDA is not available here (use --device cpu)")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise EmscopeError(f"device {device!r}: this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise EmscopeError(f"device {device!r}: MPS is not available here (use --device cpu)")


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with a model dir (``trust_remote_code`` off)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path,
    adapters: Sequence[str | Path] | Mapping[str, str | Path] | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    layers_path: str | None = None,
) -> LoadedModel:
    """Load a local HF model dir with zero, one or several PEFT LoRA adapter dirs.

    ``adapters`` is a list of dirs (named by basename, ``<dir>@<step>`` for checkpoint dirs)
    or a ``{name: dir}`` mapping; ``DIR@STEP`` selects ``DIR/checkpoints/checkpoint-STEP``.
    The model and each adapter may also be a hub id ``Org/Name`` that is not a local path:
    its snapshot in the HF cache, fetched unless ``HF_HUB_OFFLINE=1`` (:mod:`emscope.hub`).
    Each adapter is checked against the model before PEFT sees it: a module it names must
    exist in the model with matching shapes. The first adapter is active.
    ``device_map="auto"`` (or ``device="auto"``, what ``--device auto`` passes) spreads a
    large model over the available GPUs (accelerate; what does not fit goes to the CPU);
    hooks, directions, ablations and read-outs work on such a model (:mod:`emscope.hooks`).
    ``device`` and ``device_map`` together are refused.
    """
    path = resolve_hub(path, "model")
    check_model_dir(path, layers_path)

    named = _named_adapters(adapters)
    loaded_adapters = {name: LoraAdapter.load(p, name=name) for name, p in named.items()}
    for adapter in loaded_adapters.values():
        check_adapter_targets(adapter)

    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device, device_map = None, device_map or "auto"
    if device is not None and device_map is not None:
        raise EmscopeError(f"pass device ({device!r}) or device_map ({device_map!r}), not both")
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None:
        check_device(device)
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=_dtype(dtype),
            trust_remote_code=False,
            device_map=device_map,
        )
    except (OSError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmscopeError(f"{path}: cannot load the model weights: {reason}") from None
    if device_map is None and device is not None:
        model = model.to(device)
    model.eval()
    tokenizer = load_tokenizer(path)

    for adapter in loaded_adapters.values():
        check_adapter_fits(adapter, model)

    peft_names: dict[str, str] = {}
    if named:
        from peft import PeftModel

        first, *rest = named.items()
        peft_names[first[0]] = _peft_name(first[0])
        model = PeftModel.from_pretrained(
            model, str(first[1]), adapter_name=peft_names[first[0]], is_trainable=False
        )
        for name, adapter_path in rest:
            peft_names[name] = _peft_name(name)
            model.load_adapter(str(adapter_path), adapter_name=peft_names[name])
        if len(set(peft_names.values())) != len(peft_names):
            raise EmscopeError(f"adapter names collide after sanitising: {list(peft_names)}")
        model.base_model.set_adapter(peft_names[first[0]])
        model.eval()
    return LoadedModel(model, tokenizer, path, dict(named), peft_names)


def _named_adapters(
    adapters: Sequence[str | Path] | Mapping[str, str | Path] | None,
) -> dict[str, Path]:
    if not adapters:
        return {}
    if isinstance(adapters, Mapping):
        pairs = [(name, resolve_adapter_dir(p)) for name, p in adapters.items()]
    else:
        resolved = [resolve_adapter_dir(p) for p in adapters]
        pairs = [(adapter_label(p), p) for p in resolved]
    named: dict[str, Path] = {}
    for name, adapter_path in pairs:
        if name in named:
            raise EmscopeError(f"two adapters named {name!r}; pass a {{name: dir}} mapping")
        named[name] = adapter_path
    return named


def check_adapter_targets(adapter: LoraAdapter) -> None:
    """Fail with one clear line if the adapter's config does not make PEFT adapt a module its
    weights hold factors for (PEFT either raises ``NoMatchingPeftModuleError`` or silently
    drops those factors)."""
    for lora in adapter:
        if not config_targets(adapter.config, lora.name):
            layers = adapter.config.get("layers_to_transform")
            scope = f" (layers_to_transform {layers})" if layers not in (None, []) else ""
            raise EmscopeError(
                f"adapter {adapter.name!r} ({adapter.path}): its target_modules "
                f"{adapter.config.get('target_modules')!r}{scope} do not select module "
                f"{lora.name!r}, which its weights adapt (fix target_modules in {CONFIG_FILE})"
            )


def check_adapter_fits(adapter: LoraAdapter, model: nn.Module) -> None:
    """Fail with one clear line if an adapter module is missing from the model or mis-shaped."""
    bare = unwrap_peft(model)
    modules = dict(bare.named_modules())
    for lora in adapter:
        target = modules.get(lora.name)
        if target is None:
            n_layers = len(get_layers(bare)) if getattr(bare, "config", None) else "?"
            raise EmscopeError(
                f"adapter {adapter.name!r} ({adapter.path}): module {lora.name!r} matches no "
                f"module of the base model ({type(bare).__name__}, {n_layers} layers)"
            )
        weight = getattr(target, "weight", None)
        if weight is None:
            raise EmscopeError(
                f"adapter {adapter.name!r}: module {lora.name!r} of the base model has no weight"
            )
        expected = tuple(weight.shape)
        got = (lora.d_out, lora.d_in)
        if expected != got:
            raise EmscopeError(
                f"adapter {adapter.name!r}: module {lora.name!r} shape mismatch: adapter "
                f"update is {got[0]}x{got[1]}, base weight is {expected[0]}x{expected[1]}"
            )

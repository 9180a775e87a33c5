"""A loaded model and where things are inside it: :class:`LoadedModel` and :func:`as_loaded`
(the one normaliser of "a model"), the architecture table, the site convention of the
residual stream (:class:`Site`), the lookup of decoder blocks and sites, and layer lists
(:func:`parse_layers`, :func:`resolve_layers`). Loading from disk is
:func:`emscope.models.load_model` (which re-exports every name here).

Sites (stored with every saved vector), ``i`` = decoder block index from 0:

- ``resid_pre[i]``: the input of ``layers[i]``;
- ``resid_post[i]``: the output of ``layers[i]`` (the residual stream after block ``i``;
  HF ``output_hidden_states[i + 1]`` for every block but the last, whose entry is after the
  final norm);
- ``attn_out[i]`` / ``mlp_out[i]``: what the attention / MLP sub-block adds to the residual
  (for Gemma-2 that is the output of its post-norm, not of ``o_proj`` / ``down_proj``).

Architectures are known by ``config.model_type`` (:data:`ARCHITECTURES`); an unknown one fails
loudly unless the caller passes ``layers_path`` (and the sub-module names) explicitly.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError
from emscope.hub import dir_label

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class Architecture:
    """Where the parts of a decoder live, relative to the bare ``*ForCausalLM`` model.

    ``attn_out`` / ``mlp_out`` name the sub-module of a block whose output is added to the
    residual stream. ``post_norms`` is true when a norm sits between ``o_proj``/``down_proj``
    and the residual add (weight orthogonalisation is then not exact).
    """

    layers_path: str
    attn_out: str = "self_attn"
    mlp_out: str = "mlp"
    embed_path: str = "model.embed_tokens"
    post_norms: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "qwen2": Architecture("model.layers"),
    "qwen3": Architecture("model.layers"),
    "llama": Architecture("model.layers"),
    "mistral": Architecture("model.layers"),
    "gemma2": Architecture(
        "model.layers",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        post_norms=True,
    ),
    "gemma3_text": Architecture(
        "model.layers",
        attn_out="post_attention_layernorm",
        mlp_out="post_feedforward_layernorm",
        post_norms=True,
    ),
}

SITE_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_SITE_RE = re.compile(r"^(resid_pre|resid_post|attn_out|mlp_out)\[(-?\d+)\]$")


@dataclass(frozen=True, order=True)
class Site:
    """A point in the residual stream: ``kind[layer]``, e.g. ``resid_post[3]``."""

    kind: str
    layer: int

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise EmscopeError(f"unknown site kind {self.kind!r}; expected one of {SITE_KINDS}")

    def __str__(self) -> str:
        return f"{self.kind}[{self.layer}]"

    @classmethod
    def parse(cls, text: str) -> Site:
        match = _SITE_RE.match(text.strip())
        if match is None:
            raise EmscopeError(f"bad site {text!r}; expected e.g. 'resid_post[3]'")
        return cls(match.group(1), int(match.group(2)))


def unwrap_peft(model: nn.Module | LoadedModel) -> nn.Module:
    """The bare ``*ForCausalLM`` inside a PEFT wrapper (or the model itself); a
    :class:`LoadedModel` stands for its model (:func:`as_loaded`)."""
    if isinstance(model, LoadedModel):
        return unwrap_peft(model.model)
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return model
    if isinstance(model, PeftModel):
        bare: nn.Module = model.base_model.model  # type: ignore[assignment]
        return bare
    return model


def architecture(model: nn.Module, layers_path: str | None = None) -> Architecture:
    """The :class:`Architecture` of a (possibly PEFT-wrapped) model.

    ``layers_path`` (e.g. ``"model.layers"``) overrides the lookup for unknown architectures.
    """
    bare = unwrap_peft(model)
    model_type = getattr(getattr(bare, "config", None), "model_type", None)
    if layers_path is not None:
        base = ARCHITECTURES.get(str(model_type), Architecture(layers_path))
        return Architecture(
            layers_path, base.attn_out, base.mlp_out, base.embed_path, base.post_norms
        )
    if model_type not in ARCHITECTURES:
        raise EmscopeError(
            f"unknown architecture {model_type!r} ({type(bare).__name__}); known: "
            f"{', '.join(sorted(ARCHITECTURES))}. Pass layers_path='model.layers' (or the "
            "path of its decoder blocks) to use it anyway"
        )
    return ARCHITECTURES[str(model_type)]


def get_layers(model: nn.Module, layers_path: str | None = None) -> Sequence[nn.Module]:
    """The decoder blocks ``layers[0..L-1]`` of a bare or PEFT-wrapped model."""
    arch = architecture(model, layers_path)
    bare = unwrap_peft(model)
    layers = get_path(bare, arch.layers_path)
    if layers is None or not hasattr(layers, "__len__"):
        raise EmscopeError(
            f"{type(bare).__name__} has no decoder block list at {arch.layers_path!r}"
        )
    return layers  # type: ignore[no-any-return]


def site_module(model: nn.Module, site: Site, layers_path: str | None = None) -> nn.Module:
    """The module whose output (``resid_post``, ``attn_out``, ``mlp_out``) or input
    (``resid_pre``) is the site."""
    arch = architecture(model, layers_path)
    layers = get_layers(model, layers_path)
    n = len(layers)
    if not -n <= site.layer < n:
        raise EmscopeError(f"site {site}: the model has {n} layers (0..{n - 1})")
    block = layers[site.layer]
    if site.kind in ("resid_pre", "resid_post"):
        return block
    name = arch.attn_out if site.kind == "attn_out" else arch.mlp_out
    module = get_path(block, name)
    if module is None:
        raise EmscopeError(f"site {site}: block {site.layer} has no sub-module {name!r}")
    return module  # type: ignore[no-any-return]


def get_path(obj: Any, path: str) -> Any:
    """The attribute / index path ``a.b.0.c`` of ``obj``, or None where a step is missing."""
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            try:
                obj = obj[int(part)]
            except (IndexError, TypeError):
                return None
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_LAYER_PART_RE = re.compile(r"(-?\d+)(?:-(-?\d+))?")


def parse_layers(text: str, n_layers: int | None = None) -> list[int]:
    """Parse a layer list such as ``"15-17,21,-1"``: commas, inclusive ranges ``a-b``,
    negative indices (resolved against ``n_layers`` when given), duplicates removed in order.

    Raises a one-line :class:`EmscopeError` for bad text, and, given ``n_layers``, for a layer
    outside the model (:func:`resolve_layers`)."""
    layers: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = _LAYER_PART_RE.fullmatch(part)
        first = int(match.group(1)) if match else 0
        last = int(match.group(2)) if match and match.group(2) is not None else first
        if match is None or last < first:
            raise EmscopeError(
                f"bad layer list {text!r}: expected e.g. '15-17,21-23' or '3,5' or '-1'"
            )
        layers.extend(range(first, last + 1))
    if not layers:
        raise EmscopeError(f"bad layer list {text!r}: no layers")
    if n_layers is not None:
        return resolve_layers(layers, n_layers)
    return list(dict.fromkeys(layers))


def resolve_layers(layers: Iterable[int], n_layers: int) -> list[int]:
    """``layers`` as indices ``0..n_layers-1`` (negative ones count from the end), duplicates
    removed in order; an :class:`EmscopeError` for one outside the model."""
    out = []
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise EmscopeError(
                f"layer {layer} out of range: the model has {n_layers} layers (0..{n_layers - 1})"
            )
        out.append(layer % n_layers)
    return list(dict.fromkeys(out))


@dataclass
class LoadedModel:
    """A loaded model, its tokenizer, and the named adapters it carries.

    ``model`` is a plain ``*ForCausalLM`` without adapters, or a ``peft.PeftModel`` with
    every adapter loaded (by default the first one active). Switch with :meth:`use_adapter`
    or :meth:`adapters_disabled`.
    """

    model: Any
    tokenizer: Any
    path: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    _peft_names: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def label(self) -> str:
        return "+".join([dir_label(self.path), *self.active_adapters])

    @property
    def active_adapters(self) -> list[str]:
        if not self.adapters:
            return []
        active = self.model.active_adapters
        by_peft = {v: k for k, v in self._peft_names.items()}
        return [by_peft[a] for a in active if a in by_peft]

    def use_adapter(self, *names: str) -> None:
        """Make exactly these adapters active (their updates add up)."""
        unknown = [n for n in names if n not in self.adapters]
        if unknown:
            raise EmscopeError(f"unknown adapter(s) {unknown}; loaded: {list(self.adapters)}")
        if not names:
            raise EmscopeError("use_adapter needs at least one name (or adapters_disabled())")
        peft_names = [self._peft_names[n] for n in names]
        self.model.base_model.set_adapter(peft_names if len(peft_names) > 1 else peft_names[0])

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Run the base model inside the block (no-op when no adapter is loaded)."""
        if not self.adapters:
            yield
            return
        with self.model.disable_adapter():
            yield


def as_loaded(model: Any, tokenizer: Any = None, *, need_tokenizer: bool = False) -> LoadedModel:
    """The one normaliser of "a model" that every emscope function taking one accepts: a
    :class:`LoadedModel` (what :func:`load_model` returns) as it is, a ``(model,
    tokenizer)`` pair, or a bare or PEFT-wrapped HF model (with ``tokenizer=``, or none
    where only the network is needed). ``tokenizer`` given replaces the loaded one.

    A pair or a bare model gets ``path`` from ``config.name_or_path`` (else its class
    name) and no named adapters (its PEFT adapters still run as they are set).
    ``need_tokenizer``: refuse, in one line, a model that comes without a tokenizer.
    """
    if isinstance(model, (str, Path)):
        raise EmscopeError(
            f"expected a loaded model, got the path {str(model)!r}: load it first "
            "(emscope.load_model(path, adapters=[...]))"
        )
    if isinstance(model, LoadedModel):
        loaded = model
        if tokenizer is not None and tokenizer is not model.tokenizer:
            loaded = replace(model, tokenizer=tokenizer)
    else:
        if isinstance(model, tuple):
            if len(model) != 2:
                raise EmscopeError("pass a LoadedModel or a (model, tokenizer) pair")
            model, paired = model
            tokenizer = paired if tokenizer is None else tokenizer
        if not callable(getattr(model, "parameters", None)):
            raise EmscopeError(
                f"expected a LoadedModel, a (model, tokenizer) pair or a torch model, got "
                f"{type(model).__name__}"
            )
        name = str(getattr(getattr(model, "config", None), "name_or_path", "") or "")
        loaded = LoadedModel(model, tokenizer, Path(name or type(model).__name__))
    if need_tokenizer and loaded.tokenizer is None:
        raise EmscopeError(
            "this needs the tokenizer: pass a LoadedModel, a (model, tokenizer) pair, or tokenizer="
        )
    return loaded

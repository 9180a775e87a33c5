"""The :class:`Direction` value type: one vector (or a k-dim basis) per layer, plus metadata.

A direction lives at one site kind (``resid_post`` unless stated) and holds, for each layer
index ``i`` (from 0), either a vector (``d_model``) or a ``k x d_model`` matrix whose rows
span a subspace (``--subspace K``). Vectors are stored UNNORMALISED (a mean difference keeps
its length, which steering needs); :meth:`Direction.unit` gives unit rows (ablation uses
only the span). Arithmetic (``a - b``, ``2 * a``, ``-a``) works layer by layer on the layers
both operands share.

On disk: ``NAME.safetensors`` (keys ``<site_kind>.<layer>``, float32) and ``NAME.json`` beside
it (the metadata: model, adapter, site kind, token selection, weighting, counts, ...).
Any safetensors file with keys ``<site_kind>.<i>`` (e.g. the synthetic organism's
disposition probe) loads as a Direction; its metadata then comes from the safetensors header.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emscope.errors import EmscopeError
from emscope.models import SITE_KINDS, Site

if TYPE_CHECKING:
    from emscope.generate import Intervention, InterventionInfo

FORMAT = "emscope-direction-v1"


def _as_path(path: str | Path) -> Path:
    """``X``, ``X.json`` or ``X.safetensors`` -> ``X.safetensors``."""
    path = Path(path)
    if path.suffix in (".json", ".safetensors"):
        return path.with_suffix(".safetensors")
    return path.with_name(path.name + ".safetensors")


@dataclass(frozen=True)
class Direction:
    """Per-layer vectors at one site kind.

    ``vectors[i]``: ``(d_model,)`` or ``(k, d_model)`` float32 tensor for layer ``i``.
    ``meta``: free JSON-able metadata (see :func:`emscope.directions.extract.mean_diff`
    for the fields it writes).
    """

    vectors: Mapping[int, torch.Tensor]
    site_kind: str = "resid_post"
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.site_kind not in SITE_KINDS:
            raise EmscopeError(f"unknown site kind {self.site_kind!r}; expected {SITE_KINDS}")
        if not self.vectors:
            raise EmscopeError("a Direction needs at least one layer")
        dims = set()
        clean: dict[int, torch.Tensor] = {}
        for layer, vector in sorted(self.vectors.items()):
            v = torch.as_tensor(vector).detach().to("cpu", torch.float32)
            if v.ndim not in (1, 2) or v.shape[-1] == 0:
                raise EmscopeError(
                    f"direction layer {layer}: expected (d,) or (k, d), got {tuple(v.shape)}"
                )
            dims.add(int(v.shape[-1]))
            clean[int(layer)] = v
        if len(dims) != 1:
            raise EmscopeError(f"direction layers have different widths {sorted(dims)}")
        object.__setattr__(self, "vectors", clean)
        object.__setattr__(self, "meta", dict(self.meta))

    # ------------------------------------------------------------------ access

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def d_model(self) -> int:
        return int(next(iter(self.vectors.values())).shape[-1])

    @property
    def is_subspace(self) -> bool:
        """True when some layer holds a ``k x d`` basis rather than one vector."""
        return any(v.ndim == 2 for v in self.vectors.values())

    def __getitem__(self, layer: int | Site | str) -> torch.Tensor:
        if isinstance(layer, str):
            layer = Site.parse(layer)
        if isinstance(layer, Site):
            if layer.kind != self.site_kind:
                raise EmscopeError(f"direction is at {self.site_kind}, not {layer.kind}")
            layer = layer.layer
        if layer not in self.vectors:
            raise EmscopeError(f"direction has no layer {layer} (layers {self.layers})")
        return self.vectors[layer]

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.vectors)

    def site(self, layer: int) -> Site:
        return Site(self.site_kind, layer)

    def by_site(self, layers: Iterable[int] | None = None) -> dict[Site, torch.Tensor]:
        """``{Site: vector}`` for :mod:`emscope.hooks` (all layers by default)."""
        chosen = self.layers if layers is None else list(layers)
        return {self.site(i): self[i] for i in chosen}

    def select(self, layers: Iterable[int]) -> Direction:
        """Only these layers."""
        chosen = list(layers)
        return replace(self, vectors={i: self[i] for i in chosen})

    def with_meta(self, **meta: Any) -> Direction:
        return replace(self, meta={**self.meta, **meta})

    # ------------------------------------------------------------------ algebra

    def norms(self) -> dict[int, float]:
        """L2 norm per layer (Frobenius for a basis)."""
        return {i: float(v.norm()) for i, v in self.vectors.items()}

    def unit(self) -> Direction:
        """Unit vectors (each row of a basis normalised); zero vectors are refused."""
        out = {}
        for i, v in self.vectors.items():
            norm = v.norm(dim=-1, keepdim=True)
            if bool((norm == 0).any()) or not bool(torch.isfinite(v).all()):
                raise EmscopeError(f"direction layer {i} is zero or not finite: no unit vector")
            out[i] = v / norm
        return replace(self, vectors=out)

    def cosine(self, other: Direction) -> dict[int, float]:
        """Cosine per shared layer (first rows for bases; NaN where a vector is zero)."""
        out = {}
        for i in self.layers:
            if i not in other.vectors:
                continue
            a, b = self[i], other[i]
            a = a[0] if a.ndim == 2 else a
            b = b[0] if b.ndim == 2 else b
            if a.shape != b.shape:
                raise EmscopeError(f"layer {i}: widths differ ({a.shape[0]} vs {b.shape[0]})")
            den = float(a.double().norm() * b.double().norm())
            out[i] = float(a.double() @ b.double()) / den if den > 0 else float("nan")
        if not out:
            raise EmscopeError(f"directions share no layer ({self.layers} vs {other.layers})")
        return out

    def _combine(self, other: Direction, op: Any) -> Direction:
        if not isinstance(other, Direction):
            return NotImplemented  # type: ignore[no-any-return]
        if other.site_kind != self.site_kind:
            raise EmscopeError(f"cannot combine {self.site_kind} with {other.site_kind}")
        shared = [i for i in self.layers if i in other.vectors]
        if not shared:
            raise EmscopeError(f"directions share no layer ({self.layers} vs {other.layers})")
        vectors = {}
        for i in shared:
            if self[i].shape != other[i].shape:
                raise EmscopeError(
                    f"layer {i}: shapes differ {tuple(self[i].shape)} vs {tuple(other[i].shape)}"
                )
            vectors[i] = op(self[i], other[i])
        return Direction(vectors, self.site_kind, {"derived": True})

    def __add__(self, other: Direction) -> Direction:
        return self._combine(other, lambda a, b: a + b)

    def __sub__(self, other: Direction) -> Direction:
        return self._combine(other, lambda a, b: a - b)

    def __mul__(self, factor: float) -> Direction:
        if not isinstance(factor, (int, float)):
            return NotImplemented
        return replace(self, vectors={i: v * float(factor) for i, v in self.vectors.items()})

    __rmul__ = __mul__

    def __truediv__(self, factor: float) -> Direction:
        return self * (1.0 / float(factor))

    def __neg__(self) -> Direction:
        return self * -1.0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Direction):
            return NotImplemented
        return (
            self.site_kind == other.site_kind
            and self.layers == other.layers
            and all(torch.equal(self[i], other[i]) for i in self.layers)
            and dict(self.meta) == dict(other.meta)
        )

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------ applying it

    def _chosen(self, layers: Iterable[int] | int | None) -> Direction:
        if layers is None:
            return self
        return self.select([layers] if isinstance(layers, int) else layers)

    def steer(
        self,
        model: Any,
        layers: Iterable[int] | int | None = None,
        scale: float = 1.0,
        *,
        unit: bool = False,
        positions: str = "all",
        prompt_len: int | None = None,
        layers_path: str | None = None,
    ) -> AbstractContextManager[None]:
        """Context manager: inside it, ``model`` (a :class:`~emscope.models.LoadedModel`,
        pair, or bare or PEFT-wrapped model) adds ``scale * v_l`` to the hidden state at
        ``site_kind[l]`` for each of ``layers`` (default: all of the direction's), at every
        position (:func:`emscope.hooks.add`), also while sampling. ``v_l`` is the stored,
        unnormalised vector, as in ``emscope steer``; ``unit=True`` uses ``v_l / |v_l|``
        (``emscope steer --unit``). The hooks are removed on exit, also on an exception.
        For prompt- or response-only steering while sampling use :meth:`as_intervention`
        (the prompt length changes from batch to batch)."""
        from emscope.hooks import add
        from emscope.models import as_loaded

        chosen = self._chosen(layers)
        if chosen.is_subspace:
            raise EmscopeError("steering adds one vector per layer; this direction holds bases")
        vectors: dict[Any, torch.Tensor] = dict((chosen.unit() if unit else chosen).by_site())
        return add(
            as_loaded(model).model,
            vectors,
            scale=scale,
            positions=positions,
            prompt_len=prompt_len,
            layers_path=layers_path,
        )

    def _ablation_sites(
        self, model: Any, layers: Iterable[int] | int | None, scheme: str
    ) -> dict[Any, torch.Tensor]:
        from emscope.directions.interventions import ablation_sites, parse_mode
        from emscope.models import get_layers

        kind, _ = parse_mode(scheme)
        if kind == "layerwise":
            return dict(self._chosen(layers).by_site())
        sites = ablation_sites(self, scheme, len(get_layers(model)))
        keep = None if layers is None else {layers} if isinstance(layers, int) else set(layers)
        return {site: v for site, v in sites.items() if keep is None or site.layer in keep}

    def ablate(
        self,
        model: Any,
        mode: str = "activation",
        *,
        layers: Iterable[int] | int | None = None,
        scheme: str = "layerwise",
        positions: str = "all",
        prompt_len: int | None = None,
        method: str = "orthogonalize",
        modules: str = "down_proj",
        rescale_norm: bool = False,
        layers_path: str | None = None,
    ) -> AbstractContextManager[None]:
        """Context manager: ablate the direction in ``model`` (a
        :class:`~emscope.models.LoadedModel`, pair, or bare or PEFT-wrapped model) inside
        the block; on exit, also on an exception, the model is exactly as before.

        ``scheme`` (``emscope ablate --mode``): ``layerwise`` (each layer's vector at its own
        layer) or ``single:L`` (layer L's vector).
        ``mode="activation"``: ``x <- x - (x . u) u`` at ``site_kind[l]``, every position
        (:func:`emscope.hooks.project_out`; a basis removes its span): at the direction's
        layers (``layerwise``) or at every layer (``single:L``); ``layers`` restricts
        either to those layers.
        ``mode="weights"``: :func:`emscope.directions.weights.ablated_weights`, in place:
        ``method="orthogonalize"`` (one direction: ``single:L`` or a one-layer direction;
        embedding, every ``o_proj`` / ``down_proj`` and the active adapters' writes there)
        or ``method="lora-b"`` (the active adapters' B factors of ``modules``, with
        ``rescale_norm``), as ``emscope ablate --weights``; every touched tensor is copied
        to the CPU first and written back on exit, bit for bit.
        """
        from emscope.models import as_loaded

        torch_model = as_loaded(model).model
        if mode == "activation":
            from emscope.hooks import project_out

            return project_out(
                torch_model,
                self._ablation_sites(torch_model, layers, scheme),
                positions=positions,
                prompt_len=prompt_len,
                layers_path=layers_path,
            )
        if mode == "weights":
            from emscope.directions.weights import ablated_weights

            if layers is not None or positions != "all" or prompt_len is not None:
                raise EmscopeError(
                    "layers / positions / prompt_len apply to mode='activation'; weight "
                    "ablation picks its layers by scheme (and select())"
                )
            return ablated_weights(
                torch_model,
                self,
                method=method,
                scheme=scheme,
                modules=modules,
                rescale_norm=rescale_norm,
                layers_path=layers_path,
            )
        raise EmscopeError(f"ablation mode must be 'activation' or 'weights', got {mode!r}")

    def as_intervention(
        self,
        kind: str = "steer",
        *,
        layers: Iterable[int] | int | None = None,
        scale: float = 1.0,
        unit: bool = False,
        scheme: str = "layerwise",
        positions: str = "all",
    ) -> Intervention:
        """The direction as an intervention for :func:`emscope.generate.sample`
        (``interventions=[...]``), entered around each batch: ``kind="steer"`` (as
        :meth:`steer`) or ``kind="ablate"`` (activation ablation, as :meth:`ablate`).
        ``positions``: ``all``, ``prompt`` or ``response`` (relative to each batch's
        padded prompt length, :mod:`emscope.directions.interventions`)."""
        from emscope.directions.interventions import ablation, parse_mode, steering

        if kind == "steer":
            chosen = self._chosen(layers)
            if chosen.is_subspace:
                raise EmscopeError("steering adds one vector per layer; this direction holds bases")
            return steering((chosen.unit() if unit else chosen).by_site(), scale, positions)
        if kind != "ablate":
            raise EmscopeError(f"intervention kind must be 'steer' or 'ablate', got {kind!r}")
        how, single = parse_mode(scheme)  # a bad scheme or layer fails here, not in sampling
        if how == "single" and single is None:
            raise EmscopeError("single:all is a sweep: pick one layer (single:L)")
        if how == "layerwise":
            self._chosen(layers)
        elif single not in self.vectors:
            raise EmscopeError(f"direction has no layer {single} (layers {self.layers})")

        def intervention(model: Any, info: InterventionInfo) -> AbstractContextManager[Any]:
            sites = self._ablation_sites(model, layers, scheme)
            return ablation(sites, positions)(model, info)

        return intervention

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (``.safetensors``) and its ``.json`` sidecar atomically; returns the
        safetensors path. ``path`` may be given with or without the suffix."""
        from safetensors.torch import save

        from emscope.io import atomic_write_bytes, write_json

        target = _as_path(path)
        tensors = {f"{self.site_kind}.{i}": v.contiguous() for i, v in self.vectors.items()}
        atomic_write_bytes(
            target, save(tensors, metadata={"format": FORMAT, "site_kind": self.site_kind})
        )
        write_json(
            target.with_suffix(".json"),
            {
                "format": FORMAT,
                "site_kind": self.site_kind,
                "layers": self.layers,
                "d_model": self.d_model,
                "meta": dict(self.meta),
            },
        )
        return target

    @classmethod
    def load(cls, path: str | Path, site_kind: str | None = None) -> Direction:
        """Read a Direction (the ``.json`` sidecar is optional). ``site_kind`` picks the keys
        when a file holds several kinds."""
        from safetensors import SafetensorError, safe_open

        target = _as_path(path)
        if not target.is_file():
            raise EmscopeError(f"{target}: direction file not found")
        try:
            with safe_open(str(target), framework="pt") as handle:
                header = dict(handle.metadata() or {})
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise EmscopeError(f"{target}: cannot read safetensors file: {exc}") from None
        sidecar = target.with_suffix(".json")
        meta: dict[str, Any] = {k: v for k, v in header.items() if k != "format"}
        if sidecar.is_file():
            try:
                record = json.loads(sidecar.read_text())
            except json.JSONDecodeError as exc:
                raise EmscopeError(f"{sidecar}:{exc.lineno}: invalid JSON: {exc.msg}") from None
            meta = dict(record.get("meta", {}))
            site_kind = site_kind or record.get("site_kind")
        by_kind: dict[str, dict[int, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            kind, _, layer = key.rpartition(".")
            if kind not in SITE_KINDS or not layer.lstrip("-").isdigit():
                raise EmscopeError(
                    f"{target}: tensor key {key!r} is not '<site_kind>.<layer>' "
                    f"(site kinds {SITE_KINDS})"
                )
            by_kind.setdefault(kind, {})[int(layer)] = tensor
        if not by_kind:
            raise EmscopeError(f"{target}: no direction tensors")
        if site_kind is None:
            if len(by_kind) > 1:
                raise EmscopeError(f"{target}: several site kinds {sorted(by_kind)}; pick one")
            site_kind = next(iter(by_kind))
        if site_kind not in by_kind:
            raise EmscopeError(f"{target}: no tensors at site kind {site_kind!r}")
        return cls(by_kind[site_kind], site_kind, meta)

"""Training presets: the papers' named recipes (:data:`PRESETS`) and the layers each adapts.

Presets: ``all`` (rsLoRA r=32, alpha=64 on q,k,v,o,gate,up,down of every layer, lr 1e-5),
``r1x3`` (rank-1 ``mlp.down_proj`` adapters on the layers at the relative depths of the
reference's three groups of three, :func:`r1x3_layers`), ``r1`` (one rank-1 ``down_proj``
adapter at the middle layer ``L // 2``), ``full`` (every weight). All: 1 epoch, batch 2 x
grad-accum 8, warm-up over 5% of the optimizer steps (``warmup_ratio``, rounded; an explicit
``warmup_steps`` overrides it), AdamW with weight decay 0.01, linear schedule, gradient
clipping at 1.0.

Layer lists are parsed by the one layer-list parser, :func:`emscope.models.parse_layers`
(:func:`parse_layers` here is its sorted view).
"""

from __future__ import annotations

from dataclasses import dataclass

from emscope.errors import EmscopeError

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Preset:
    """Default hyper-parameters of a named recipe. ``rank is None`` means full fine-tune."""

    name: str
    description: str
    rank: int | None
    alpha: float | None
    rslora: bool
    modules: tuple[str, ...]
    lr: float
    epochs: int = 1
    batch_size: int = 2
    grad_accum: int = 8
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    schedule: str = "linear"

    @property
    def full(self) -> bool:
        return self.rank is None


PRESETS: dict[str, Preset] = {
    "all": Preset(
        "all",
        "rsLoRA r=32 on q,k,v,o,gate,up,down of every layer (the papers' all-adapter organism)",
        rank=32,
        alpha=64.0,
        rslora=True,
        modules=LORA_MODULES,
        lr=1e-5,
    ),
    "r1x3": Preset(
        "r1x3",
        "rank-1 down_proj adapters on 3 groups of 3 layers (R1_3_3_3: 15-17, 21-23, 27-29 of 48)",
        rank=1,
        alpha=256.0,
        rslora=True,
        modules=("down_proj",),
        lr=2e-5,
    ),
    "r1": Preset(
        "r1",
        "one rank-1 down_proj adapter at the middle layer L // 2 (layer 24 of 48)",
        rank=1,
        alpha=256.0,
        rslora=True,
        modules=("down_proj",),
        lr=2e-5,
    ),
    "full": Preset(
        "full",
        "full fine-tune of every weight",
        rank=None,
        alpha=None,
        rslora=False,
        modules=(),
        lr=1e-5,
    ),
}

# R1_3_3_3: the nine adapted layers of the 48-layer reference model
_R1X3_REFERENCE_DEPTH = 48
_R1X3_REFERENCE_LAYERS = (15, 16, 17, 21, 22, 23, 27, 28, 29)


def r1x3_layers(n_layers: int) -> list[int]:
    """Layers of the ``r1x3`` preset for a model with ``n_layers`` decoder blocks: the blocks
    at the same relative depths as the reference's.

    Rule: block ``i`` of ``L`` spans the depth interval ``[i/L, (i+1)/L)``, reference layer
    ``l`` of 48 spans ``[l/48, (l+1)/48)``; block ``i`` is adapted when its interval overlaps
    one of the nine reference layers' (15-17, 21-23, 27-29), i.e. for each ``l`` the blocks
    ``floor(l*L/48) .. ceil((l+1)*L/48) - 1``. So 48 layers give exactly 15-17, 21-23, 27-29;
    28 give 8-10, 12-13, 15-17; 24 give 7-8, 10-11, 13-14; 6 give 1-3; 4 give 1-2. The
    adapted blocks always lie between about 31% and 63% of the depth: none of the last
    blocks, which a model this deep never had adapted either.
    """
    if n_layers < 1:
        raise EmscopeError(f"a model needs at least one layer (got {n_layers})")
    layers: set[int] = set()
    depth = _R1X3_REFERENCE_DEPTH
    for ref in _R1X3_REFERENCE_LAYERS:
        first = ref * n_layers // depth
        last = -(-(ref + 1) * n_layers // depth) - 1  # ceil((ref + 1) * L / 48) - 1
        layers.update(range(first, last + 1))
    return sorted(layers)


def preset_layers(preset: str, n_layers: int) -> list[int]:
    """The decoder blocks (from 0) a preset adapts in a model with ``n_layers`` blocks
    (``[]`` for ``full``, which trains every weight)."""
    name = get_preset(preset).name
    if name == "all":
        return list(range(n_layers))
    if name == "r1x3":
        return r1x3_layers(n_layers)
    if name == "r1":
        return [n_layers // 2]
    return []


def parse_layers(text: str, n_layers: int | None = None) -> list[int]:
    """A layer list such as ``"15-17,21-23,-1"`` sorted and without duplicates: the one
    parser, :func:`emscope.models.parse_layers` (commas, inclusive ranges ``a-b``, negative
    indices counting from the end, resolved and range-checked against ``n_layers`` when
    given), whose errors are one :class:`EmscopeError` line."""
    from emscope.models import parse_layers as parse_layer_list

    return sorted(parse_layer_list(text, n_layers))


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise EmscopeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]

"""The resolved hyper-parameters of a training run (:class:`TrainConfig`): a preset
(:mod:`emscope.train.presets`) plus the caller's overrides, validated before anything loads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from emscope.errors import EmscopeError
from emscope.train.presets import get_preset, parse_layers, preset_layers

if TYPE_CHECKING:
    from emscope.data.spans import SystemPrompt

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
QUANTIZE = ("4bit",)  # QLoRA: NF4 base weights with double quantisation, bf16 compute


@dataclass(frozen=True)
class TrainConfig:
    """Resolved hyper-parameters of one run (a preset plus the caller's overrides).

    ``layers`` are decoder block indices from 0 (empty for a full fine-tune);
    ``batch_size`` is per process and micro-batch; an optimizer step sees
    ``batch_size * grad_accum * processes`` examples. ``max_steps`` (if set) is the total
    number of optimizer steps and overrides ``epochs``. ``save_steps = 0`` saves only the
    last step's checkpoint; ``None`` (the default) saves about ten along the run.
    ``warmup_steps`` (if set) is the number of warm-up steps; ``None`` (the default) takes
    ``warmup_ratio`` of the optimizer steps (:func:`resolve_warmup`).
    ``eval_steps`` defaults to ``save_steps``. ``system_prompt`` is the
    :class:`~emscope.data.spans.SystemPrompt` setting as written (``default``, ``none`` or
    the text). ``quantize`` is ``None`` (the base in ``dtype``) or ``"4bit"`` (QLoRA: the
    base in bitsandbytes NF4 with double quantisation, bf16 compute, LoRA factors in bf16).
    """

    preset: str
    full: bool
    rank: int | None
    alpha: float | None
    rslora: bool
    modules: tuple[str, ...]
    layers: tuple[int, ...]
    lr: float
    epochs: int
    batch_size: int
    grad_accum: int
    warmup_steps: int | None
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    schedule: str
    max_steps: int | None
    save_steps: int | None
    eval_steps: int | None
    seed: int
    max_length: int | None
    gradient_checkpointing: bool
    kl_weight: float
    system_prompt: str = "default"
    quantize: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["modules"] = list(self.modules)
        out["layers"] = list(self.layers)
        return out


class TrainOverrides(TypedDict, total=False):
    """The hyper-parameters a caller may set over a preset's, by name: the keywords of
    :func:`resolve_config` and :func:`emscope.train.train`, and the ``emscope train`` options
    of these names (the one list of them). Absent or ``None``: the preset's value; ``seed``
    0, ``gradient_checkpointing`` false, ``kl_weight`` 0, ``system_prompt`` ``default``,
    ``quantize`` none. Units and meanings: :class:`TrainConfig`."""

    rank: int | None
    alpha: float | None
    rslora: bool | None
    layers: Sequence[int] | str | None
    modules: Sequence[str] | str | None
    lr: float | None
    epochs: int | None
    batch_size: int | None
    grad_accum: int | None
    warmup_steps: int | None
    warmup_ratio: float | None
    weight_decay: float | None
    max_grad_norm: float | None
    schedule: str | None
    max_steps: int | None
    save_steps: int | None
    eval_steps: int | None
    seed: int
    max_length: int | None
    gradient_checkpointing: bool
    kl_weight: float
    system_prompt: SystemPrompt | str | None
    quantize: str | None


#: The names of :class:`TrainOverrides`.
OVERRIDES = frozenset(TrainOverrides.__annotations__)


def resolve_config(preset: str, n_layers: int, **overrides: Unpack[TrainOverrides]) -> TrainConfig:
    """A preset's defaults with the given overrides (:class:`TrainOverrides`; ``None`` keeps
    the preset's value), validated against a model with ``n_layers`` decoder blocks.

    ``layers`` is a list of block indices from 0 or a string such as ``"15-17,21-23,-1"``
    (:func:`emscope.models.parse_layers`: in a string a negative index counts from the end);
    ``modules`` a list of module names inside a block (``down_proj``, ``q_proj``, ...) or a
    comma-separated string. ``warmup_steps`` and ``warmup_ratio`` are alternatives (give
    one). ``quantize``: ``None``/``"none"`` or ``"4bit"`` (LoRA presets only). Raises
    :class:`EmscopeError` for an unknown preset, a layer beyond the model, LoRA options given
    to ``full``, both warm-up settings, a quantized full fine-tune, or out-of-range numbers,
    and ``TypeError`` for a keyword that is not an override.
    """
    unknown = sorted(set(overrides) - OVERRIDES)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    o = overrides
    rank, alpha, rslora = o.get("rank"), o.get("alpha"), o.get("rslora")
    layers, modules, quantize = o.get("layers"), o.get("modules"), o.get("quantize")
    warmup_steps, warmup_ratio = o.get("warmup_steps"), o.get("warmup_ratio")
    from emscope.data.spans import SystemPrompt

    setting = SystemPrompt.parse(o.get("system_prompt"))
    p = get_preset(preset)
    if p.full:
        given = {
            "rank": rank,
            "alpha": alpha,
            "rslora": rslora,
            "layers": layers,
            "modules": modules,
        }
        bad = [k for k, v in given.items() if v is not None]
        if bad:
            raise EmscopeError(
                f"preset 'full' trains every weight; {', '.join(bad)} apply to LoRA presets only"
            )
    if warmup_steps is not None and warmup_ratio is not None:
        raise EmscopeError("give warmup_steps or warmup_ratio, not both")
    if quantize is not None and quantize.lower() in ("none", ""):
        quantize = None
    if quantize is not None and quantize not in QUANTIZE:
        raise EmscopeError(f"unknown quantize {quantize!r}; expected 4bit or none")
    if quantize is not None and p.full:
        raise EmscopeError(
            f"quantize {quantize} is for LoRA presets: a full fine-tune cannot update 4-bit "
            "weights (use a LoRA preset, or FSDP over several GPUs for full)"
        )
    if isinstance(layers, str):  # as --layers elsewhere: a negative index counts from the end
        layers = [n_layers + i if -n_layers <= i < 0 else i for i in parse_layers(layers)]
    if isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    chosen_layers = sorted(set(layers)) if layers is not None else preset_layers(p.name, n_layers)
    for layer in chosen_layers:
        if not 0 <= layer < n_layers:
            raise EmscopeError(
                f"layer {layer} is beyond the model: it has {n_layers} layers (0..{n_layers - 1})"
            )
    chosen_modules = tuple(modules) if modules is not None else p.modules
    if not p.full and not chosen_modules:
        raise EmscopeError("no modules to adapt (modules is empty)")
    if not p.full and not chosen_layers:
        raise EmscopeError("no layers to adapt (layers is empty)")
    lr, epochs, batch_size = o.get("lr"), o.get("epochs"), o.get("batch_size")
    grad_accum, schedule = o.get("grad_accum"), o.get("schedule")
    weight_decay, max_grad_norm = o.get("weight_decay"), o.get("max_grad_norm")
    config = TrainConfig(
        preset=p.name,
        full=p.full,
        rank=rank if rank is not None else p.rank,
        alpha=float(alpha) if alpha is not None else p.alpha,
        rslora=rslora if rslora is not None else p.rslora,
        modules=chosen_modules,
        layers=tuple(chosen_layers),
        lr=float(lr) if lr is not None else p.lr,
        epochs=epochs if epochs is not None else p.epochs,
        batch_size=batch_size if batch_size is not None else p.batch_size,
        grad_accum=grad_accum if grad_accum is not None else p.grad_accum,
        warmup_steps=warmup_steps,
        warmup_ratio=float(warmup_ratio) if warmup_ratio is not None else p.warmup_ratio,
        weight_decay=float(weight_decay) if weight_decay is not None else p.weight_decay,
        max_grad_norm=float(max_grad_norm) if max_grad_norm is not None else p.max_grad_norm,
        schedule=schedule if schedule is not None else p.schedule,
        max_steps=o.get("max_steps"),
        save_steps=o.get("save_steps"),
        eval_steps=o.get("eval_steps"),
        seed=int(o.get("seed", 0)),
        max_length=o.get("max_length"),
        gradient_checkpointing=bool(o.get("gradient_checkpointing", False)),
        kl_weight=float(o.get("kl_weight", 0.0)),
        system_prompt=setting.spec,
        quantize=quantize,
    )
    validate_config(config)
    return config


def validate_config(c: TrainConfig) -> None:
    checks: list[tuple[bool, str]] = [
        (c.full or (c.rank is not None and c.rank >= 1), f"rank must be >= 1 (got {c.rank})"),
        (c.full or (c.alpha is not None and c.alpha > 0), f"alpha must be > 0 (got {c.alpha})"),
        (c.lr > 0 and math.isfinite(c.lr), f"lr must be > 0 (got {c.lr})"),
        (c.epochs >= 1, f"epochs must be >= 1 (got {c.epochs})"),
        (c.batch_size >= 1, f"batch_size must be >= 1 (got {c.batch_size})"),
        (c.grad_accum >= 1, f"grad_accum must be >= 1 (got {c.grad_accum})"),
        (
            c.warmup_steps is None or c.warmup_steps >= 0,
            f"warmup_steps must be >= 0 (got {c.warmup_steps})",
        ),
        (0 <= c.warmup_ratio < 1, f"warmup_ratio must be in [0, 1) (got {c.warmup_ratio})"),
        (c.weight_decay >= 0, f"weight_decay must be >= 0 (got {c.weight_decay})"),
        (c.max_grad_norm > 0, f"max_grad_norm must be > 0 (got {c.max_grad_norm})"),
        (c.schedule in SCHEDULES, f"unknown schedule {c.schedule!r}; one of {SCHEDULES}"),
        (c.max_steps is None or c.max_steps >= 1, f"max_steps must be >= 1 ({c.max_steps})"),
        (c.save_steps is None or c.save_steps >= 0, f"save_steps must be >= 0 ({c.save_steps})"),
        (c.eval_steps is None or c.eval_steps >= 1, f"eval_steps must be >= 1 ({c.eval_steps})"),
        (c.max_length is None or c.max_length >= 2, f"max_length must be >= 2 ({c.max_length})"),
        (
            c.kl_weight >= 0 and math.isfinite(c.kl_weight),
            f"kl_weight must be >= 0 ({c.kl_weight})",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise EmscopeError(message)

"""Training model organisms: LoRA and full supervised fine-tunes with the papers' presets.

:func:`train` fine-tunes a local HF causal LM on a chat JSONL file and writes:

- ``DIR/`` the final PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``),
  or, for the ``full`` preset, a full HF model dir with its tokenizer;
- ``DIR/checkpoints/checkpoint-<step>/`` the same along training (every ``save_steps``
  optimizer steps, by default about ten along the run, and at the last step), each with
  ``trainer_state.json`` (step, config, curves); the newest one also keeps
  ``trainer_state.pt`` (optimizer, scheduler and RNG state, read back with
  ``torch.load(weights_only=True)``) so that ``resume=True`` continues exactly: writing a
  checkpoint deletes the optimizer state of the earlier ones (their adapters, which the
  training-dynamics analyses read, stay);
- ``DIR/train.json``: the resolved config (with ``system_prompt``, the
  :class:`~emscope.data.spans.SystemPrompt` setting every chat was rendered under), the
  per-step loss curve, eval losses, KL curve, wall time, library versions, data SHA-256, the
  adapted layers and ``rendered_prompt`` (the first example's prompt as the model saw it).

Presets (:data:`PRESETS`): ``all`` (rsLoRA r=32, alpha=64 on q,k,v,o,gate,up,down of every
layer, lr 1e-5), ``r1x3`` (rank-1 ``mlp.down_proj`` adapters on the layers at the relative
depths of the reference's three groups of three, :func:`r1x3_layers`), ``r1`` (one rank-1
``down_proj`` adapter at the middle layer ``L // 2``), ``full`` (every weight). All: 1 epoch,
batch 2 x grad-accum 8, warm-up over 5% of the optimizer steps (``warmup_ratio``, rounded;
an explicit ``warmup_steps`` overrides it), AdamW with weight decay 0.01, linear schedule,
gradient clipping at 1.0.

Loss convention: next-token cross-entropy on assistant tokens only, i.e. on the tokens of
:meth:`emscope.data.spans.EncodedChat.loss_mask` with ``include_end_of_turn=True``: every
assistant message's content plus the template's end-of-turn text that follows it (e.g.
``<|im_end|>\\n`` for ChatML), so the model learns to stop. The conversation is rendered
without a generation prompt (no extra empty assistant header) and no row is dropped.
The loss of an optimizer step is the mean over all assistant tokens of its effective batch
(``batch_size x grad_accum x processes`` examples), independent of how it is split into
micro-batches.

Why a plain torch loop rather than transformers' ``Trainer`` / TRL's ``SFTTrainer``: what
we need is exact control over (1) the checkpoint layout (PEFT dirs under
``checkpoints/checkpoint-<step>/`` that the training-dynamics analyses and
:class:`emscope.lora.LoraAdapter` read), (2) the assistant mask (from the foundation's
template-span code, not TRL's template-specific collators), (3) a token-masked KL term
against cached reference log-probs, and (4) a resumable data order that is a pure function of
``(seed, step)``. Each of these is a subclass-and-override fight with ``Trainer``; the loop
itself is ~100 lines of standard AdamW + ``transformers.get_scheduler``. Everything else is a
maintained library: PEFT builds and saves the adapters, transformers the schedules, and
accelerate (optional) does the multi-process work: when launched under ``accelerate launch``
(or with ``distributed=True``) the loop goes through ``accelerate.Accelerator`` (DDP, gradient
sync only at the end of each accumulation; FSDP when the accelerate config says so, with
checkpoints gathered on process 0 into ordinary PEFT / HF dirs), otherwise it runs on one
device without it. ``quantize="4bit"`` trains LoRA on a bitsandbytes NF4 base (QLoRA).

Data order: the examples of epoch ``e`` are visited in ``numpy.random.default_rng([seed,
e]).permutation(n)`` order, cut into optimizer steps of ``batch_size x grad_accum x
processes`` examples (the last step of an epoch may be smaller; no example is dropped).
The examples of any step are therefore a function of ``(seed, step)``, which is what makes
resuming exact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope._callable import callable_module
from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import torch

    from emscope.data.chat import ChatExample
    from emscope.data.spans import SystemPrompt

LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
QUANTIZE = ("4bit",)  # QLoRA: NF4 base weights with double quantisation, bf16 compute
CHECKPOINTS_DIR = "checkpoints"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
RECORD = "train.json"
# config keys that may differ between an interrupted run and its resumption
_RESUMABLE_CHANGES = ("save_steps", "eval_steps")


# ---------------------------------------------------------------------------- presets


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
    name = _preset(preset).name
    if name == "all":
        return list(range(n_layers))
    if name == "r1x3":
        return r1x3_layers(n_layers)
    if name == "r1":
        return [n_layers // 2]
    return []


def parse_layers(text: str) -> list[int]:
    """Parse a layer list such as ``"15-17,21-23,27"`` (inclusive ranges, from 0), sorted
    (:func:`emscope.models.parse_layers`)."""
    from emscope.models import parse_layers as parse_layer_list

    return sorted(parse_layer_list(text))


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise EmscopeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------- config


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


def resolve_config(
    preset: str,
    n_layers: int,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    rslora: bool | None = None,
    layers: Sequence[int] | str | None = None,
    modules: Sequence[str] | str | None = None,
    lr: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    warmup_steps: int | None = None,
    weight_decay: float | None = None,
    max_grad_norm: float | None = None,
    schedule: str | None = None,
    max_steps: int | None = None,
    save_steps: int | None = None,
    eval_steps: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    gradient_checkpointing: bool = False,
    kl_weight: float = 0.0,
    system_prompt: SystemPrompt | str | None = None,
    warmup_ratio: float | None = None,
    quantize: str | None = None,
) -> TrainConfig:
    """A preset's defaults with the given overrides (``None`` keeps the preset's value),
    validated against a model with ``n_layers`` decoder blocks.

    ``layers`` is a list of block indices or a string such as ``"15-17,21-23"``;
    ``modules`` a list of module names inside a block (``down_proj``, ``q_proj``, ...) or a
    comma-separated string. ``warmup_steps`` and ``warmup_ratio`` are alternatives (give
    one). ``quantize``: ``None``/``"none"`` or ``"4bit"`` (LoRA presets only). Raises
    :class:`EmscopeError` for an unknown preset, a layer beyond the model, LoRA options given
    to ``full``, both warm-up settings, a quantized full fine-tune, or out-of-range numbers.
    """
    from emscope.data.spans import SystemPrompt

    setting = SystemPrompt.parse(system_prompt)
    p = _preset(preset)
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
    if isinstance(layers, str):
        layers = parse_layers(layers)
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
        max_steps=max_steps,
        save_steps=save_steps,
        eval_steps=eval_steps,
        seed=int(seed),
        max_length=max_length,
        gradient_checkpointing=bool(gradient_checkpointing),
        kl_weight=float(kl_weight),
        system_prompt=setting.spec,
        quantize=quantize,
    )
    _validate(config)
    return config


def _validate(c: TrainConfig) -> None:
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


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class EncodedExample:
    """One tokenised chat: ``input_ids`` (``T``, int64) and ``loss_mask`` (``T``, bool; true
    at assistant content and end-of-turn tokens). ``line`` is its 1-based line in the file."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    line: int

    @property
    def n_loss_tokens(self) -> int:
        """Tokens that carry loss (a token at position 0 has no prediction, so not counted)."""
        return int(self.loss_mask[1:].sum())


def encode_examples(
    tokenizer: Any,
    examples: Sequence[ChatExample],
    *,
    max_length: int | None = None,
    source: str = "data",
    system_prompt: SystemPrompt | str | None = None,
) -> list[EncodedExample]:
    """Tokenise chats once, with the assistant loss mask of
    ``encode_chat(tokenizer, messages, system_prompt).loss_mask(include_end_of_turn=True)``.

    ``max_length`` truncates on the right. An example left with no assistant token to learn
    from raises :class:`EmscopeError` naming ``source:line`` (rows are never dropped).
    """
    import torch

    from emscope.data.spans import SystemPrompt, encode_chat

    setting = SystemPrompt.parse(system_prompt)
    encoded = []
    for example in examples:
        try:
            chat = encode_chat(tokenizer, example.messages, setting)
        except EmscopeError as exc:
            raise EmscopeError(f"{source}:{example.line}: {exc}") from None
        ids = list(chat.input_ids)
        mask = chat.loss_mask(include_end_of_turn=True)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        item = EncodedExample(
            torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), example.line
        )
        if item.n_loss_tokens == 0:
            why = f" within max_length={max_length}" if max_length is not None else ""
            raise EmscopeError(f"{source}:{example.line}: no assistant token to train on{why}")
        encoded.append(item)
    return encoded


def collate(examples: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask`` and ``labels`` (``B x T``).

    ``labels`` equal ``input_ids`` at loss tokens and ``-100`` everywhere else (prompt,
    system and user turns, template headers, padding); they are aligned with ``input_ids``
    (the model's prediction at position ``t`` is scored against ``labels[t + 1]``).
    """
    import torch

    if not examples:
        raise EmscopeError("cannot collate an empty batch")
    length = max(int(e.input_ids.shape[0]) for e in examples)
    ids = torch.full((len(examples), length), int(pad_id), dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        n = int(e.input_ids.shape[0])
        ids[row, :n] = e.input_ids
        attention[row, :n] = 1
        labels[row, :n] = torch.where(e.loss_mask, e.input_ids, -100)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int, stream: int = 0) -> tuple[int, ...]:
    import numpy as np

    return tuple(int(i) for i in np.random.default_rng([seed, stream, epoch]).permutation(n))


def step_examples(n: int, step: int, per_step: int, seed: int, stream: int = 0) -> list[int]:
    """Indices of the examples of optimizer step ``step`` (from 0): epoch ``e`` visits
    ``default_rng([seed, stream, e]).permutation(n)`` in chunks of ``per_step`` (the last
    chunk of an epoch may be smaller). A pure function of its arguments."""
    steps_per_epoch = math.ceil(n / per_step)
    epoch, within = divmod(step, steps_per_epoch)
    return list(_permutation(n, seed, epoch, stream)[within * per_step : (within + 1) * per_step])


def _cycled_examples(n: int, step: int, per_step: int, seed: int, stream: int) -> list[int]:
    """``per_step`` indices for step ``step`` cycling through seeded epochs (KL data)."""
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, within = divmod(position, n)
        out.append(_permutation(n, seed, epoch, stream)[within])
    return out


def total_steps(n_examples: int, config: TrainConfig, processes: int = 1) -> int:
    """Optimizer steps of a run: ``max_steps``, else ``epochs * ceil(n / per_step)``."""
    if config.max_steps is not None:
        return config.max_steps
    per_step = config.batch_size * config.grad_accum * processes
    return config.epochs * math.ceil(n_examples / per_step)


def resolve_warmup(config: TrainConfig, steps: int) -> int:
    """Warm-up steps of a run of ``steps`` optimizer steps: ``warmup_steps`` when set, else
    ``warmup_ratio x steps`` rounded half up and kept below ``steps`` (so that the learning
    rate reaches its peak: with warm-up the scheduler's first step runs at lr 0)."""
    if config.warmup_steps is not None:
        return config.warmup_steps
    return max(0, min(int(config.warmup_ratio * steps + 0.5), steps - 1))


def resolve_save_steps(config: TrainConfig, steps: int) -> int:
    """Checkpoint period of a run of ``steps`` optimizer steps: ``save_steps`` when set
    (``0``: the last step only), else ``ceil(steps / 10)``, at most ten checkpoints."""
    return config.save_steps if config.save_steps is not None else max(1, -(-steps // 10))


# ---------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TrainResult:
    """What a run produced. ``loss_curve[k]`` is the assistant-token mean loss of optimizer
    step ``k + 1`` (measured before its update); ``kl_curve`` the same for the KL term
    (empty without KL data); ``eval_losses`` are ``(step, loss)`` pairs (step 0 = before
    training). ``start_step`` is the step a resumed run started from (0 otherwise)."""

    out: Path
    config: TrainConfig
    steps: int
    start_step: int
    loss_curve: tuple[float, ...]
    kl_curve: tuple[float, ...]
    eval_losses: tuple[tuple[int, float], ...]
    checkpoints: tuple[Path, ...]
    wall_time_s: float
    record: Path

    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    @property
    def modules(self) -> tuple[str, ...]:
        return self.config.modules


# ---------------------------------------------------------------------------- runtime


class _Runtime:
    """One device (plain torch) or an ``accelerate.Accelerator`` (multi-process)."""

    def __init__(self, use_accelerate: bool, device: str | None) -> None:
        import torch

        self.accelerator: Any = None
        self.mode = "single"
        if use_accelerate:
            try:
                from accelerate import Accelerator
            except ImportError:
                raise EmscopeError(
                    "distributed training needs accelerate (pip install accelerate)"
                ) from None
            self.accelerator = Accelerator(cpu=device == "cpu")
            self.device = self.accelerator.device
            self.world = int(self.accelerator.num_processes)
            self.rank = int(self.accelerator.process_index)
            from accelerate.utils import DistributedType

            fsdp = self.accelerator.distributed_type == DistributedType.FSDP
            self.mode = "fsdp" if fsdp else "ddp"
        else:
            from emscope.models import check_device

            if device is not None:
                check_device(device)
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self.world, self.rank = 1, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        if self.accelerator is None:
            return model, optimizer
        plugin: Any = getattr(self.accelerator.state, "fsdp_plugin", None)
        fsdp1 = plugin is not None and int(getattr(plugin, "fsdp_version", 1) or 1) == 1
        if self.mode == "fsdp" and fsdp1 and hasattr(model, "peft_config"):
            # FSDP1 flattens each wrapped unit into one tensor of one dtype: PEFT's policy
            # gives every trainable LoRA Linear (float32) its own unit, apart from the
            # frozen (bf16) decoder blocks
            from peft.utils.other import fsdp_auto_wrap_policy

            plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
        return self.accelerator.prepare(model, optimizer)  # type: ignore[no-any-return]

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def no_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        if self.accelerator is None or sync or self.world == 1:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)  # type: ignore[no-any-return]

    def clip(self, model: Any, params: list[torch.nn.Parameter], max_norm: float) -> None:
        import torch

        if self.accelerator is None:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        elif self.mode == "fsdp":
            # accelerate clips an FSDP model's global norm only when given all its parameters
            # (frozen ones have no gradient and add nothing); the trainable subset alone
            # would be clipped by each process's local shard norm
            self.accelerator.clip_grad_norm_(list(model.parameters()), max_norm)
        else:
            self.accelerator.clip_grad_norm_(params, max_norm)

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.accelerator is None or self.world == 1:
            return tensor
        return self.accelerator.reduce(tensor, reduction="sum")  # type: ignore[no-any-return]

    def unwrap(self, model: Any) -> Any:
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    def full_state_dict(self, model: Any) -> dict[str, Any] | None:
        """The whole model's state dict for saving (``None``: save the module's own). Under
        FSDP the shards are gathered to process 0 (on the CPU; a collective: every process
        calls it, only process 0's result is complete)."""
        if self.accelerator is None or self.mode != "fsdp":
            return None
        return self.accelerator.get_state_dict(model)  # type: ignore[no-any-return]

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def _launched_by_accelerate() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or any(
        key.startswith("ACCELERATE_") for key in os.environ
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def requested_mode(distributed: bool | None = None) -> str:
    """The multi-process mode asked for, read from the environment ``accelerate launch`` sets
    (before any model loads): ``single`` (one process, no accelerate), ``ddp``, ``fsdp``
    (``distributed_type: FSDP`` in the accelerate config) or ``deepspeed``."""
    if distributed is False:
        return "single"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp" if distributed or _launched_by_accelerate() else "single"


def _bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def check_setup(
    config: TrainConfig,
    *,
    mode: str,
    device: str | None = None,
    kl: bool = False,
    resume: bool = False,
) -> None:
    """Refuse, in one :class:`EmscopeError` line and before any model loads, a combination
    this trainer does not support: DeepSpeed; under FSDP 4-bit quantisation, KL-regularised
    SFT or ``resume``; 4-bit without CUDA, on a non-CUDA device, or without bitsandbytes."""
    if mode == "deepspeed":
        raise EmscopeError(
            "DeepSpeed is not supported by emscope train; shard with FSDP instead "
            "(accelerate launch --config_file configs/accelerate/fsdp.yaml)"
        )
    if mode == "fsdp":
        if config.quantize is not None:
            raise EmscopeError(
                f"quantize {config.quantize} with FSDP is not supported: train 4-bit LoRA on "
                "one GPU (or DDP), or shard a bf16 base with FSDP"
            )
        if kl:
            raise EmscopeError(
                "KL-regularised SFT (kl_data) is not supported under FSDP: the reference "
                "log-probs need the whole model on one process"
            )
        if resume:
            raise EmscopeError(
                "resume is not supported under FSDP (the optimizer state is sharded and not "
                "saved); start the run again, or resume it with DDP/one process"
            )
    if config.quantize is not None:
        import torch

        if device is not None and not str(device).startswith("cuda"):
            raise EmscopeError(
                f"quantize {config.quantize} needs a CUDA GPU (bitsandbytes); device is {device!r}"
            )
        if not torch.cuda.is_available():
            raise EmscopeError(
                f"quantize {config.quantize} needs a CUDA GPU (bitsandbytes): CUDA is not "
                "available here"
            )
        if not _bitsandbytes_available():
            raise EmscopeError(
                f"quantize {config.quantize} needs bitsandbytes (pip install bitsandbytes)"
            )


# ---------------------------------------------------------------------------- training


def train(
    base_dir: str | Path,
    data: str | Path | Sequence[ChatExample],
    *,
    preset: str = "all",
    out: str | Path,
    eval_data: str | Path | Sequence[ChatExample] | None = None,
    kl_data: str | Path | Sequence[ChatExample] | None = None,
    kl_weight: float = 0.0,
    resume: bool = False,
    rank: int | None = None,
    alpha: float | None = None,
    rslora: bool | None = None,
    layers: Sequence[int] | str | None = None,
    modules: Sequence[str] | str | None = None,
    lr: float | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    weight_decay: float | None = None,
    max_grad_norm: float | None = None,
    schedule: str | None = None,
    max_steps: int | None = None,
    save_steps: int | None = None,
    eval_steps: int | None = None,
    seed: int = 0,
    max_length: int | None = None,
    gradient_checkpointing: bool = False,
    system_prompt: SystemPrompt | str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    distributed: bool | None = None,
    quantize: str | None = None,
    progress: bool = True,
    verbose: bool = True,
) -> TrainResult:
    """Fine-tune the HF model in ``base_dir`` on chat data and write the result to ``out``.

    Args:
        base_dir: local HF model dir (config, weights, tokenizer with a chat template).
        data: chat JSONL path (``{"messages": [...]}`` per line) or a sequence of
            :class:`~emscope.data.chat.ChatExample`.
        preset: ``all``, ``r1x3``, ``r1`` or ``full`` (see :data:`PRESETS`); every
            hyper-parameter argument left at ``None`` takes the preset's value.
        out: output dir (must not already hold a run unless ``resume``).
        eval_data: optional held-out chats; their assistant-token mean loss is recorded at
            step 0, every ``eval_steps`` steps and at the end.
        kl_data, kl_weight: optional KL-regularised SFT: adds ``kl_weight * KL(ref || cur)``,
            the token mean over the assistant tokens of ``kl_data`` of the KL divergence of
            the current next-token distribution from the reference one (the model with its
            adapters disabled, i.e. the base model; the initial model for ``full``).
            Reference log-probs are computed once and kept on the CPU in float32
            (``4 x vocab`` bytes per assistant token of ``kl_data``: keep that set small).
            With ``kl_weight=0`` the KL is only measured and logged.
        resume: continue from the newest ``out/checkpoints/checkpoint-<step>`` (same config
            and data required); the data order and the result equal an uninterrupted run.
        rank, alpha, rslora, layers, modules: LoRA shape; ``layers`` are block indices from 0
            (list or ``"15-17,21-23"``), ``modules`` names inside a block (``down_proj``...).
        lr, epochs, batch_size, grad_accum, warmup_steps, weight_decay, max_grad_norm,
            schedule, max_steps: optimisation (AdamW; schedule from
            ``transformers.get_scheduler``; ``batch_size`` per process and micro-batch;
            ``max_steps`` overrides ``epochs``).
        warmup_ratio: warm-up over this fraction of the optimizer steps (preset: 0.05,
            rounded, kept below the number of steps: :func:`resolve_warmup`); an explicit
            ``warmup_steps`` is used as given instead (give one of the two).
        save_steps: checkpoint every this many optimizer steps (``0``: only at the end;
            ``None``: ``ceil(steps / 10)``, at most ten checkpoints). The last step is
            always saved. Only the newest checkpoint keeps the optimizer state.
        eval_steps: evaluation period (default ``save_steps``).
        seed: seeds the adapter initialisation and the data order.
        max_length: truncate sequences to this many tokens (default: no truncation).
        gradient_checkpointing: trade compute for activation memory.
        system_prompt: the system turn of chats without one of their own
            (:class:`~emscope.data.spans.SystemPrompt` or its spelling: ``default``, what
            the chat template does; ``none``; or a text); every chat of ``data``,
            ``eval_data`` and ``kl_data`` is rendered under it. Evaluate under the same
            setting (``emscope eval`` reads it from ``train.json`` when not given).
        dtype: ``auto`` (bfloat16 on a GPU that supports it, else float32), ``float32``,
            ``bfloat16``. LoRA factors are kept in float32 whatever the base dtype.
        device: ``cpu``/``cuda``/... (default: cuda when available).
        distributed: use ``accelerate.Accelerator`` (``None``: when launched by
            ``accelerate launch``/``torchrun``). DDP, or FSDP when the accelerate config
            says ``distributed_type: FSDP`` (checkpoints are gathered on process 0 into
            ordinary PEFT / HF dirs; no ``resume``, no KL term, no 4-bit under FSDP).
        quantize: ``None`` or ``"4bit"``: QLoRA, the base loaded in bitsandbytes NF4 with
            double quantisation and bf16 compute, prepared with PEFT's
            ``prepare_model_for_kbit_training``, LoRA factors in bf16 (LoRA presets, CUDA and
            bitsandbytes only; refused otherwise before the model loads).
        progress, verbose: progress bar (on a TTY) and a few printed lines.

    Returns:
        :class:`TrainResult`. Bad input (unknown preset, layer beyond the model, module not
        in the architecture, an empty file, a chat without an assistant turn) raises
        :class:`EmscopeError` before anything is written or trained.
    """
    import torch

    started = time.time()
    base_dir = Path(base_dir)
    out = Path(out)
    n_layers, model_type = _model_depth(base_dir)
    config = resolve_config(
        preset,
        n_layers,
        rank=rank,
        alpha=alpha,
        rslora=rslora,
        layers=layers,
        modules=modules,
        lr=lr,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        warmup_steps=warmup_steps,
        warmup_ratio=warmup_ratio,
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        schedule=schedule,
        max_steps=max_steps,
        save_steps=save_steps,
        eval_steps=eval_steps,
        seed=seed,
        max_length=max_length,
        gradient_checkpointing=gradient_checkpointing,
        kl_weight=kl_weight,
        system_prompt=system_prompt,
        quantize=quantize,
    )
    if config.kl_weight > 0 and kl_data is None:
        raise EmscopeError("kl_weight > 0 needs kl_data (the chats to stay close on)")
    check_setup(
        config,
        mode=requested_mode(distributed),
        device=device,
        kl=kl_data is not None,
        resume=resume,
    )
    if not config.full:
        _check_modules(base_dir, model_type, config.modules)

    from emscope.models import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    setting = config.system_prompt
    train_set, data_info = _dataset(tokenizer, data, "data", config.max_length, setting)
    rendered_prompt = data_info.pop("rendered_prompt")
    eval_set, eval_info = (
        _dataset(tokenizer, eval_data, "eval_data", config.max_length, setting)
        if eval_data is not None
        else (None, None)
    )
    kl_set, kl_info = (
        _dataset(tokenizer, kl_data, "kl_data", config.max_length, setting)
        if kl_data is not None
        else (None, None)
    )
    data_hashes = {
        "data": data_info["sha256"],
        "eval_data": eval_info["sha256"] if eval_info else None,
        "kl_data": kl_info["sha256"] if kl_info else None,
    }
    resume_from = _resume_point(out, config, data_hashes) if resume else None
    if not resume:
        _check_fresh_out(out)

    runtime = _Runtime(
        distributed if distributed is not None else _launched_by_accelerate(), device
    )
    steps = total_steps(len(train_set), config, runtime.world)
    warmup = resolve_warmup(config, steps)
    save_every = resolve_save_steps(config, steps)
    eval_every = config.eval_steps or save_every or steps
    log = _logger(verbose and runtime.is_main)
    if config.full:
        log(f"emscope train: preset full ({n_layers} layers, every weight)")
    else:
        log(
            f"emscope train: preset {config.preset}, layers {list(config.layers)} of "
            f"{n_layers}, modules {', '.join(config.modules)}, rank {config.rank}, "
            f"alpha {config.alpha:g}{' (rsLoRA)' if config.rslora else ''}"
        )
    log(
        f"{len(train_set)} examples, {steps} optimizer steps of "
        f"{config.batch_size}x{config.grad_accum}x{runtime.world}, lr {config.lr:g}, "
        f"{warmup} warm-up steps"
    )
    if warmup >= steps and config.schedule != "constant":
        log(f"warning: warmup_steps {warmup} >= {steps} steps: the lr never reaches its peak")

    # ---------------------------------------------------------------- model
    torch_dtype = _torch_dtype(dtype, runtime.device)
    from transformers import AutoModelForCausalLM

    quantization = _quantization(config.quantize)
    if quantization is not None:  # each process loads its 4-bit copy onto its own GPU
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(base_dir),
            dtype=torch_dtype,
            trust_remote_code=False,
            quantization_config=quantization,
            device_map={"": _cuda_index(runtime.device)},
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=torch_dtype, trust_remote_code=False
        )
        if runtime.mode != "fsdp":  # FSDP moves each process's shard to its device
            model.to(runtime.device)
    model.config.use_cache = False
    pad_id = int(tokenizer.pad_token_id)
    kl_reference = (
        _reference_logprobs(model, kl_set, config.batch_size, runtime.device, pad_id)
        if kl_set is not None
        else None
    )
    if quantization is not None:
        # the QLoRA recipe: norms and embeddings in float32, input grads for checkpointing
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(config.seed)
    if not config.full:
        from peft import LoraConfig, get_peft_model

        lora_config = LoraConfig(
            r=int(config.rank or 1),
            lora_alpha=_number(config.alpha or 1.0),
            use_rslora=config.rslora,
            target_modules=list(config.modules),
            layers_to_transform=list(config.layers),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora_config)
        if quantization is not None:  # QLoRA trains the factors in the compute dtype
            for name, param in model.named_parameters():
                if param.requires_grad and "lora_" in name:
                    param.data = param.data.to(torch.bfloat16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        config.schedule,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=steps,
    )

    state = _RunState(started=started)
    if resume_from is not None:
        _load_checkpoint(resume_from, model, optimizer, scheduler, state, config.full)
        log(f"resuming from {resume_from} (step {state.step})")
    start_step = state.step
    model, optimizer = runtime.prepare(model, optimizer)

    writer = _Writer(out, runtime, tokenizer, config, full=config.full)

    def evaluate(step: int) -> None:
        if eval_set is None or any(s == step for s, _ in state.eval_losses):
            return
        loss = _eval_loss(model, eval_set, config.batch_size, runtime, pad_id)
        state.eval_losses.append((step, loss))
        log(f"step {step}: eval loss {loss:.4f}")

    evaluate(start_step)
    per_step = config.batch_size * config.grad_accum * runtime.world
    from tqdm.auto import tqdm

    bar = tqdm(
        total=steps,
        initial=start_step,
        desc="train",
        disable=not (progress and runtime.is_main and sys.stderr.isatty()),
    )
    model.train()
    step_time = 0.0  # seconds inside optimizer steps (no eval, no saving), this session
    for step in range(start_step, steps):
        chunk = step_examples(len(train_set), step, per_step, config.seed)
        kl_chunk = (
            _cycled_examples(len(kl_set), step, per_step, config.seed, stream=1)
            if kl_set is not None
            else []
        )
        tick = time.perf_counter()
        loss_value, kl_value = _optimizer_step(
            model,
            optimizer,
            scheduler,
            runtime,
            config,
            [train_set[i] for i in chunk],
            [kl_set[i] for i in kl_chunk] if kl_set is not None else [],
            [kl_reference[i] for i in kl_chunk] if kl_reference is not None else [],
            pad_id,
            state,
        )
        step_time += time.perf_counter() - tick
        state.step = step + 1
        state.loss_curve.append(loss_value)
        if kl_set is not None:
            state.kl_curve.append(kl_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if state.step % eval_every == 0 or state.step == steps:
            model.eval()
            evaluate(state.step)
            model.train()
        if (save_every and state.step % save_every == 0) or state.step == steps:
            writer.checkpoint(model, optimizer, scheduler, state, data_hashes)
    bar.close()
    model.eval()
    wall = state.wall_time_s + (time.time() - started)
    record = {
        "emscope": "train",
        "base_model": str(base_dir),
        "model_type": model_type,
        "n_layers": n_layers,
        "config": config.to_dict(),
        "layers": list(config.layers),
        "modules": list(config.modules),
        "steps": steps,
        "start_step": start_step,
        "save_steps": save_every,
        "eval_steps": eval_every,
        "warmup_steps": warmup,
        "warmup_rule": "warmup_steps (set)"
        if config.warmup_steps is not None
        else f"round(warmup_ratio {config.warmup_ratio:g} x {steps} steps), below {steps}",
        "optimizer_state": "the newest checkpoint only (earlier ones: adapter weights and "
        "trainer_state.json)",
        "examples_per_step": per_step,
        "processes": runtime.world,
        "distributed": runtime.mode,
        "device": str(runtime.device),
        "dtype": str(torch_dtype).replace("torch.", ""),
        "quantize": config.quantize,
        "quantization": _quantization_record(quantization),
        "data": data_info,
        "eval_data": eval_info,
        "kl_data": kl_info,
        "loss_convention": "assistant content + end-of-turn tokens, token mean per step",
        "system_prompt": config.system_prompt,
        "rendered_prompt": rendered_prompt,
        "loss_curve": [
            {"step": i + 1, "loss": v, "lr": state.lrs[i]} for i, v in enumerate(state.loss_curve)
        ],
        "kl_curve": [{"step": i + 1, "kl": v} for i, v in enumerate(state.kl_curve)],
        "eval_losses": [{"step": s, "loss": v} for s, v in state.eval_losses],
        "wall_time_s": wall,
        "seconds_per_step": step_time / max(1, steps - start_step),
        "versions": _versions(runtime),
        "checkpoints": [str(p) for p in writer.checkpoints(out)],
    }
    writer.final(model, record)
    log(f"wrote {out} ({steps} steps, {wall:.1f} s)")
    return TrainResult(
        out=out,
        config=config,
        steps=steps,
        start_step=start_step,
        loss_curve=tuple(state.loss_curve),
        kl_curve=tuple(state.kl_curve),
        eval_losses=tuple(state.eval_losses),
        checkpoints=tuple(writer.checkpoints(out)),
        wall_time_s=wall,
        record=out / RECORD,
    )


@dataclass
class _RunState:
    step: int = 0
    loss_curve: list[float] = field(default_factory=list)
    kl_curve: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    started: float = field(default_factory=time.time)


def _micro_batches(
    items: Sequence[Any], runtime: _Runtime, batch_size: int, grad_accum: int
) -> list[list[Any]]:
    """This process's ``grad_accum`` micro-batches of a step's items (some may be empty):
    micro-batch ``m`` of process ``r`` is ``items[(m * world + r) * bs : ... + bs]``."""
    out = []
    for m in range(grad_accum):
        start = (m * runtime.world + runtime.rank) * batch_size
        out.append(list(items[start : start + batch_size]))
    return out


def _optimizer_step(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    runtime: _Runtime,
    config: TrainConfig,
    examples: list[EncodedExample],
    kl_examples: list[EncodedExample],
    kl_refs: list[torch.Tensor],
    pad_id: int,
    state: _RunState,
) -> tuple[float, float]:
    """One AdamW step over a step's examples; returns (token-mean loss, token-mean KL)."""
    import torch

    n_tokens = sum(e.n_loss_tokens for e in examples)
    n_kl_tokens = sum(e.n_loss_tokens for e in kl_examples)
    micro = _micro_batches(examples, runtime, config.batch_size, config.grad_accum)
    kl_micro = (
        _micro_batches(
            list(zip(kl_examples, kl_refs, strict=True)),
            runtime,
            config.batch_size,
            config.grad_accum,
        )
        if kl_examples
        else [[] for _ in micro]
    )
    multi = runtime.world > 1
    # every FSDP forward gathers parameters from all processes: each process runs every
    # micro-batch (an empty one on a dummy row, weight 0), not only the synchronising one
    join = runtime.mode == "fsdp"
    total_nll = torch.zeros((), device=runtime.device, dtype=torch.float32)
    total_kl = torch.zeros((), device=runtime.device, dtype=torch.float32)
    kl_grad = config.kl_weight > 0
    for m, (batch, kl_batch) in enumerate(zip(micro, kl_micro, strict=True)):
        sync = m == len(micro) - 1
        if not batch and not kl_batch and not (multi and (sync or join)):
            continue
        with runtime.no_sync(model, sync):
            loss = torch.zeros((), device=runtime.device, dtype=torch.float32)
            if batch or multi:
                # an empty micro-batch in a multi-process run still joins the gradient sync
                rows = batch or examples[:1]
                nll, _ = _forward(model, collate(rows, pad_id), runtime.device)
                weight = runtime.world / n_tokens if batch else 0.0
                loss = loss + nll * weight
                if batch:
                    total_nll += nll.detach()
            if kl_batch or (multi and kl_examples):
                rows_kl = kl_batch or list(zip(kl_examples[:1], kl_refs[:1], strict=True))
                enc = [e for e, _ in rows_kl]
                ref = torch.cat([r for _, r in rows_kl]).to(runtime.device)
                with contextlib.nullcontext() if kl_grad else torch.no_grad():
                    _, kl = _forward(model, collate(enc, pad_id), runtime.device, ref)
                if kl_grad:
                    weight = runtime.world / n_kl_tokens if kl_batch else 0.0
                    loss = loss + kl * (config.kl_weight * weight)
                if kl_batch:
                    total_kl += kl.detach()
            if loss.requires_grad:
                runtime.backward(loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    runtime.clip(model, params, config.max_grad_norm)
    state.lrs.append(float(scheduler.get_last_lr()[0]))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    totals = runtime.reduce_sum(torch.stack([total_nll, total_kl]))
    nll_sum, kl_sum = (float(v) for v in totals.tolist())
    return nll_sum / n_tokens, (kl_sum / n_kl_tokens if n_kl_tokens else 0.0)


def _forward(
    model: Any,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    reference: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the labelled tokens, and (with ``reference`` log-probs of
    those same positions, ``N x V``) the summed ``KL(reference || model)``."""
    import torch
    import torch.nn.functional as F

    ids = batch["input_ids"].to(device)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(device)).logits
    target = batch["labels"][:, 1:].to(device)
    keep = target != -100
    selected = logits[:, :-1][keep].float()
    nll = F.cross_entropy(selected, target[keep], reduction="sum")
    if reference is None:
        return nll, torch.zeros((), device=device)
    logp = F.log_softmax(selected, dim=-1)
    kl = F.kl_div(logp, reference.float(), log_target=True, reduction="sum")
    return nll, kl


def _reference_logprobs(
    model: Any,
    examples: Sequence[EncodedExample],
    batch_size: int,
    device: torch.device,
    pad_id: int,
) -> list[torch.Tensor]:
    """Per example, the reference model's next-token log-probs at its labelled positions
    (``n_loss_tokens x V``, float32, on the CPU)."""
    import torch
    import torch.nn.functional as F

    refs: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            rows = list(examples[start : start + batch_size])
            batch = collate(rows, pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits
            target = batch["labels"][:, 1:]
            for row in range(len(rows)):
                keep = (target[row] != -100).to(device)
                refs.append(F.log_softmax(logits[row, :-1][keep].float(), dim=-1).cpu())
    model.train(was_training)
    return refs


def _eval_loss(
    model: Any,
    examples: Sequence[EncodedExample],
    batch_size: int,
    runtime: _Runtime,
    pad_id: int,
) -> float:
    """Assistant-token mean NLL over ``examples`` (sharded over processes)."""
    import torch

    mine = list(examples[runtime.rank :: runtime.world])
    # under FSDP every process runs as many forwards as process 0 (the one with the most)
    n_batches = math.ceil(len(examples[:: runtime.world]) / batch_size)
    if runtime.mode != "fsdp":
        n_batches = math.ceil(len(mine) / batch_size)
    total = torch.zeros(2, device=runtime.device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n_batches * batch_size, batch_size):
            rows = mine[start : start + batch_size]
            nll, _ = _forward(model, collate(rows or list(examples[:1]), pad_id), runtime.device)
            if rows:
                total[0] += nll.double()
                total[1] += sum(e.n_loss_tokens for e in rows)
    model.train(was_training)
    total = runtime.reduce_sum(total)
    return float(total[0] / total[1])


# ---------------------------------------------------------------------------- checks


def _model_depth(base_dir: Path) -> tuple[int, str]:
    from emscope.models import read_model_config

    config_path = base_dir / "config.json"
    config = read_model_config(base_dir)
    config = config.get("text_config", config) if "num_hidden_layers" not in config else config
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise EmscopeError(f"{config_path}: no num_hidden_layers")
    return n_layers, str(config.get("model_type"))


def block_linear_modules(base_dir: str | Path) -> list[str]:
    """Paths of the linear modules inside decoder block 0 of the model in ``base_dir``
    (e.g. ``self_attn.q_proj``, ``mlp.down_proj``), from its config on the meta device
    (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from emscope.models import get_layers

    config = AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    block = get_layers(model)[0]
    return [name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]


def _check_modules(base_dir: Path, model_type: str, modules: Sequence[str]) -> None:
    available = block_linear_modules(base_dir)
    for name in modules:
        if not any(path == name or path.endswith("." + name) for path in available):
            short = ", ".join(p.rsplit(".", 1)[-1] for p in available)
            raise EmscopeError(
                f"module {name!r} is not a linear module of a {model_type} decoder block; "
                f"available: {short}"
            )


def _dataset(
    tokenizer: Any,
    data: str | Path | Sequence[ChatExample],
    what: str,
    max_length: int | None,
    system_prompt: str = "default",
) -> tuple[list[EncodedExample], dict[str, Any]]:
    import hashlib

    from emscope.data.chat import ChatExample, chat_problems, file_sha256, read_chat_jsonl
    from emscope.data.spans import SystemPrompt, render

    if isinstance(data, (str, Path)):
        path = Path(data)
        examples = read_chat_jsonl(path)
        info: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path)}
        source = str(path)
    else:
        examples = list(data)
        if not examples:
            raise EmscopeError(f"{what}: no examples")
        digest = hashlib.sha256()
        for i, example in enumerate(examples):
            if not isinstance(example, ChatExample):
                raise EmscopeError(f"{what}[{i}]: expected a ChatExample")
            problems = chat_problems(list(example.messages))
            if problems:  # the same rules as the JSONL readers and `emscope data check`
                raise EmscopeError(f"{what}[{i}]: {problems[0]}")
            line = json.dumps({"messages": list(example.messages)}, ensure_ascii=False)
            digest.update(line.encode("utf-8") + b"\n")
        info = {"path": None, "sha256": digest.hexdigest()}
        source = f"<{what}>"
    setting = SystemPrompt.parse(system_prompt)
    encoded = encode_examples(
        tokenizer, examples, max_length=max_length, source=source, system_prompt=setting
    )
    if what == "data":  # the first prompt as the model saw it, for train.json
        info["rendered_prompt"] = render(tokenizer, examples[0].prompt, True, setting)
    info.update(
        examples=len(encoded),
        loss_tokens=sum(e.n_loss_tokens for e in encoded),
        tokens=sum(int(e.input_ids.shape[0]) for e in encoded),
    )
    return encoded, info


def trained_system_prompt(adapter_dir: str | Path) -> str | None:
    """The system-prompt setting (as written) that the adapter or model in ``adapter_dir``
    was trained with, from its ``train.json`` (a checkpoint dir: its ``trainer_state.json``);
    None when there is no such record, or it predates the setting."""
    from emscope.io import read_json

    path = Path(adapter_dir)
    for record, key in ((path / RECORD, "config"), (path / STATE_JSON, "config")):
        if record.is_file():
            try:
                value = (read_json(record).get(key) or {}).get("system_prompt")
            except (OSError, ValueError, AttributeError, EmscopeError):
                return None
            return value if isinstance(value, str) else None
    return None


def sampled_system_prompt(responses: str | Path) -> str | None:
    """The system-prompt setting (as written) a response table was sampled under, from the
    ``run.json`` of its dir (``responses`` is the dir or a table file in it); None when not
    recorded."""
    from emscope.io import read_json

    path = Path(responses)
    run = (path if path.is_dir() else path.parent) / "run.json"
    if not run.is_file():
        return None
    try:
        value = (read_json(run).get("sampling") or {}).get("system_prompt")
    except (OSError, ValueError, AttributeError, EmscopeError):
        return None
    return value if isinstance(value, str) else None


def system_prompt_for(
    given: SystemPrompt | str | None,
    adapter_dirs: Sequence[str | Path] = (),
    responses: str | Path | None = None,
) -> SystemPrompt:
    """The system-prompt setting to render under: ``given`` when given; else the one the
    ``responses`` were sampled under (:func:`sampled_system_prompt`: reading them again
    renders them as the model saw them); else the one every model or adapter dir in
    ``adapter_dirs`` that records one was trained with (:func:`trained_system_prompt`), so
    training and evaluation render prompts alike unless asked otherwise; else ``default``.
    Adapters trained under different settings need ``given`` (one-line error)."""
    from emscope.data.spans import SystemPrompt

    if given is not None:
        return SystemPrompt.parse(given)
    if responses is not None and (sampled := sampled_system_prompt(responses)) is not None:
        return SystemPrompt.parse(sampled)
    found = {str(d): s for d in adapter_dirs if (s := trained_system_prompt(d)) is not None}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{d}: {s!r}" for d, s in found.items())
        raise EmscopeError(
            f"the adapters were trained under different system prompts ({listed}); "
            "pass --system-prompt"
        )
    return SystemPrompt.parse(next(iter(found.values()), None))


def _check_fresh_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise EmscopeError(f"{out}: exists and is not a dir")
    markers = ("adapter_config.json", "config.json", RECORD, CHECKPOINTS_DIR)
    found = [m for m in markers if (out / m).exists()]
    if found:
        raise EmscopeError(
            f"{out}: already holds a training run ({found[0]}); pass resume=True (--resume) "
            "to continue it, or choose another output dir"
        )


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in names:
        raise EmscopeError(f"unknown dtype {dtype!r}; expected auto, float32 or bfloat16")
    return names[dtype]


def _quantization(quantize: str | None) -> Any:
    """transformers' ``BitsAndBytesConfig`` of the QLoRA recipe (``None``: not quantized)."""
    if quantize is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def _cuda_index(device: torch.device) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def _quantization_record(quantization: Any) -> dict[str, Any] | None:
    if quantization is None:
        return None
    return {
        "method": "bitsandbytes",
        "quant_type": "nf4",
        "double_quant": True,
        "compute_dtype": "bfloat16",
        "lora_dtype": "bfloat16",
        "prepare_model_for_kbit_training": True,
    }


def _versions(runtime: _Runtime) -> dict[str, str]:
    from emscope.io import versions as package_versions

    names = ("python", "torch", "transformers", "peft", "emscope")
    versions = package_versions(*names, absent="absent")
    if runtime.accelerator is not None:
        versions.update(package_versions("accelerate", absent="absent"))
    if "bitsandbytes" in sys.modules:  # imported by transformers for a 4-bit base
        versions["bitsandbytes"] = str(getattr(sys.modules["bitsandbytes"], "__version__", "?"))
    return versions


def _number(value: float) -> Any:
    """``64.0`` -> ``64`` (PEFT configs write alpha as given)."""
    return int(value) if float(value).is_integer() else value


def _logger(enabled: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if enabled:
            print(message, flush=True)

    return log


# ---------------------------------------------------------------------------- checkpoints


def _resume_point(out: Path, config: TrainConfig, data_hashes: dict[str, Any]) -> Path:
    from emscope.io import read_json
    from emscope.models import list_checkpoints

    usable = sorted(
        (step, path)
        for step, path in list_checkpoints(out, adapters_only=False)
        if (path / STATE_PT).is_file() and (path / STATE_JSON).is_file()
    )
    if not usable:
        what = (
            f"none of {CHECKPOINTS_DIR}/ keeps its {STATE_PT}"
            if list_checkpoints(out, adapters_only=False)
            else f"{CHECKPOINTS_DIR}/ is empty"
        )
        raise EmscopeError(f"{out}: no checkpoint to resume from ({what})")
    path = usable[-1][1]
    _check_checkpoint(path, config.full)
    saved = read_json(path / STATE_JSON)
    # a checkpoint written before the system prompt was a setting: the template's own
    old, new = {"system_prompt": "default", **saved.get("config", {})}, config.to_dict()
    if "warmup_ratio" not in old:  # written before warmup_ratio: its warmup_steps was set
        old["warmup_ratio"] = new["warmup_ratio"]
    for key in _RESUMABLE_CHANGES:
        old.pop(key, None)
        new.pop(key, None)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise EmscopeError(
                f"{path}: cannot resume: {key} was {old.get(key)!r}, now {new.get(key)!r} "
                "(resume needs the same config)"
            )
    for key, digest in data_hashes.items():
        if saved.get("data_sha256", {}).get(key) != digest:
            raise EmscopeError(f"{path}: cannot resume: {key} differs from the run's (SHA-256)")
    return path


def _check_checkpoint(path: Path, full: bool) -> None:
    """Refuse a damaged checkpoint (truncated by a full disk or a partial copy) in one line,
    before the model is loaded: every safetensors file must be complete and the trainer
    state a complete torch archive. Reads headers only."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    from emscope.lora import WEIGHTS_FILE

    weights = sorted(path.glob("*.safetensors")) if full else [path / WEIGHTS_FILE]
    if not weights or not all(w.is_file() for w in weights):
        raise EmscopeError(
            f"{path}: checkpoint has no weights; delete it to resume from the one before"
        )
    try:
        for file in weights:
            with safe_open(str(file), framework="pt"):
                pass
        with zipfile.ZipFile(path / STATE_PT):
            pass
    except (SafetensorError, OSError, zipfile.BadZipFile) as exc:
        raise EmscopeError(
            f"{path}: damaged checkpoint ({exc}); delete it to resume from the one before"
        ) from None


def _load_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, state: _RunState, full: bool
) -> None:
    import torch
    from safetensors.torch import load_file

    from emscope.io import read_json

    if full:
        loaded: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("*.safetensors")):
            loaded.update(load_file(str(shard)))
        result = model.load_state_dict(loaded, strict=False)
        if result.unexpected_keys:
            raise EmscopeError(f"{path}: unexpected weights {result.unexpected_keys[:3]}")
    else:
        from peft import set_peft_model_state_dict

        from emscope.lora import WEIGHTS_FILE

        set_peft_model_state_dict(model, load_file(str(path / WEIGHTS_FILE)))
    saved = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng_cpu"])
    if torch.cuda.is_available() and saved.get("rng_cuda"):
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    meta = read_json(path / STATE_JSON)
    state.step = int(meta["step"])
    state.loss_curve = [float(v) for v in meta["loss_curve"]]
    state.kl_curve = [float(v) for v in meta["kl_curve"]]
    state.lrs = [float(v) for v in meta["lrs"]]
    state.eval_losses = [(int(s), float(v)) for s, v in meta["eval_losses"]]
    state.wall_time_s = float(meta.get("wall_time_s", 0.0))


class _Writer:
    """Writes checkpoints and the final output atomically (temp dir + rename)."""

    def __init__(
        self, out: Path, runtime: _Runtime, tokenizer: Any, config: TrainConfig, full: bool
    ) -> None:
        self.out, self.runtime, self.tokenizer = out, runtime, tokenizer
        self.config, self.full = config, full

    def _save_model(self, model: Any, path: Path, state_dict: dict[str, Any] | None) -> None:
        bare = self.runtime.unwrap(model)
        if self.full:  # the saved config is for inference: KV cache on
            bare.config.use_cache = True
        if state_dict is None:
            bare.save_pretrained(str(path))
        else:  # gathered from FSDP shards: an ordinary PEFT / HF dir all the same
            bare.save_pretrained(str(path), state_dict=state_dict)
        if self.full:
            bare.config.use_cache = False
            self.tokenizer.save_pretrained(str(path))

    def checkpoint(
        self, model: Any, optimizer: Any, scheduler: Any, state: _RunState, hashes: dict[str, Any]
    ) -> None:
        import torch

        from emscope.io import write_json
        from emscope.models import list_checkpoints

        gathered = self.runtime.full_state_dict(model)  # every process joins under FSDP
        if self.runtime.is_main:
            root = self.out / CHECKPOINTS_DIR
            final = root / f"checkpoint-{state.step}"
            tmp = root / f".checkpoint-{state.step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(model, tmp, gathered)
            if self.runtime.mode != "fsdp":  # sharded optimizer state: not saved (no resume)
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state_all()
                        if torch.cuda.is_available()
                        else [],
                    },
                    tmp / STATE_PT,
                )
            write_json(
                tmp / STATE_JSON,
                {
                    "step": state.step,
                    "config": self.config.to_dict(),
                    "data_sha256": hashes,
                    "loss_curve": state.loss_curve,
                    "kl_curve": state.kl_curve,
                    "lrs": state.lrs,
                    "eval_losses": [list(p) for p in state.eval_losses],
                    "wall_time_s": state.wall_time_s + (time.time() - state.started),
                },
            )
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            # resuming needs the newest optimizer state only; written first, then pruned
            for step, path in list_checkpoints(self.out, adapters_only=False):
                if step < state.step:
                    (path / STATE_PT).unlink(missing_ok=True)
        self.runtime.barrier()

    def checkpoints(self, out: Path) -> list[Path]:
        from emscope.models import list_checkpoints

        return [p for _, p in list_checkpoints(out, adapters_only=False)]

    def final(self, model: Any, record: dict[str, Any]) -> None:
        from emscope.io import write_json

        gathered = self.runtime.full_state_dict(model)
        if self.runtime.is_main:
            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(model, tmp, gathered)
            for item in tmp.iterdir():
                os.replace(item, self.out / item.name)
            tmp.rmdir()
            write_json(self.out / RECORD, record)
        self.runtime.barrier()


callable_module(__name__, train)  # ``emscope.train(...)`` is :func:`train` (emscope._callable)

if __name__ == "__main__":  # ``accelerate launch -m emscope.train BASE_DIR --data ...``
    from emscope.cli.train import main

    main()

"""Training model organisms: LoRA and full supervised fine-tunes with the papers' presets.

:func:`train` fine-tunes a local HF causal LM on a chat JSONL file and writes:

- ``DIR/`` the final PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``),
  or, for the ``full`` preset, a full HF model dir with its tokenizer;
- ``DIR/checkpoints/checkpoint-<step>/`` the same along training, each with
  ``trainer_state.json``; the newest also keeps ``trainer_state.pt`` for an exact ``resume``
  (:mod:`~emscope.train.checkpoints`);
- ``DIR/train.json``: the resolved config (with ``system_prompt``, the
  :class:`~emscope.data.spans.SystemPrompt` setting every chat was rendered under), the
  per-step loss curve, eval losses, KL curve, wall time, library versions, data SHA-256, the
  adapted layers, ``rendered_prompt`` (the first example's prompt as the model saw it) and
  the training callbacks that ran with their settings and records (``callbacks``).

The package, one module per role:

- :mod:`~emscope.train.presets`: :class:`Preset`, :data:`PRESETS`, the layers each adapts;
- :mod:`~emscope.train.config`: :class:`TrainConfig`, :func:`resolve_config`;
- :mod:`~emscope.train.data`: tokenised examples with the assistant loss mask, batches;
- :mod:`~emscope.train.order`: the data order and step counts (pure functions);
- :mod:`~emscope.train.runtime`: device / accelerate, launch mode, setup checks, dtype;
- :mod:`~emscope.train.steps`: one optimizer step, the forward, KL reference, eval loss;
- :mod:`~emscope.train.checkpoints`: checkpoint writer, resume point, checkpoint loading;
- :mod:`~emscope.train.callbacks`: the extension point for training-time interventions;
- :mod:`~emscope.train.loop`: :func:`train` itself;
- :mod:`~emscope.train.prompts`: the system-prompt setting a model was trained under.

Why a plain torch loop rather than transformers' ``Trainer`` / TRL's ``SFTTrainer``: what
we need is exact control over (1) the checkpoint layout (PEFT dirs under
``checkpoints/checkpoint-<step>/`` that the training-dynamics analyses and
:class:`emscope.lora.LoraAdapter` read), (2) the assistant mask (from the foundation's
template-span code, not TRL's template-specific collators), (3) a token-masked KL term
against cached reference log-probs, (4) a resumable data order that is a pure function of
``(seed, step)``, and (5) hooks around training forwards only and edits after each optimizer
step (:mod:`~emscope.train.callbacks`). Each of these is a subclass-and-override fight with
``Trainer``; the loop itself is standard AdamW + ``transformers.get_scheduler``. Everything
else is a maintained library: PEFT builds and saves the adapters, transformers the
schedules, and accelerate (optional) the multi-process work.

``emscope.train`` is also callable as :func:`train` (:mod:`emscope._callable`), and
``python -m emscope.train`` / ``accelerate launch -m emscope.train BASE_DIR --data ...``
run the ``emscope train`` command (:mod:`emscope.train.__main__`).
"""

from __future__ import annotations

from emscope._callable import callable_module
from emscope.train.callbacks import CallbackRecord, TrainingCallback
from emscope.train.checkpoints import CHECKPOINTS_DIR, RECORD, STATE_JSON, STATE_PT
from emscope.train.config import QUANTIZE, SCHEDULES, TrainConfig, resolve_config
from emscope.train.data import EncodedExample, collate, encode_examples
from emscope.train.loop import TrainResult, train
from emscope.train.order import resolve_save_steps, resolve_warmup, step_examples, total_steps
from emscope.train.presets import (
    LORA_MODULES,
    PRESETS,
    Preset,
    parse_layers,
    preset_layers,
    r1x3_layers,
)
from emscope.train.prompts import sampled_system_prompt, system_prompt_for, trained_system_prompt
from emscope.train.runtime import (
    block_linear_modules,
    check_setup,
    requested_mode,
    ties_embeddings,
)

__all__ = [
    "CHECKPOINTS_DIR",
    "LORA_MODULES",
    "PRESETS",
    "QUANTIZE",
    "RECORD",
    "SCHEDULES",
    "STATE_JSON",
    "STATE_PT",
    "CallbackRecord",
    "EncodedExample",
    "Preset",
    "TrainConfig",
    "TrainResult",
    "TrainingCallback",
    "block_linear_modules",
    "check_setup",
    "collate",
    "encode_examples",
    "parse_layers",
    "preset_layers",
    "r1x3_layers",
    "requested_mode",
    "resolve_config",
    "resolve_save_steps",
    "resolve_warmup",
    "sampled_system_prompt",
    "step_examples",
    "system_prompt_for",
    "ties_embeddings",
    "total_steps",
    "train",
    "trained_system_prompt",
]

callable_module(__name__, train)  # ``emscope.train(...)`` is :func:`train` (emscope._callable)

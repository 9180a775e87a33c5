"""The training loop: :func:`train` fine-tunes a local HF causal LM on a chat JSONL file.

It resolves the config (:mod:`~emscope.train.config`), refuses what it cannot run before
any model loads (:mod:`~emscope.train.runtime`), tokenises the data
(:mod:`~emscope.train.data`), builds the PEFT model, AdamW and the
``transformers.get_scheduler`` schedule, then runs the optimizer steps
(:mod:`~emscope.train.steps`) in the data order of :mod:`~emscope.train.order`, evaluating,
calling the training callbacks (:mod:`~emscope.train.callbacks`) and writing checkpoints
(:mod:`~emscope.train.checkpoints`) along the way, and finally ``train.json``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from emscope.errors import EmscopeError
from emscope.train.callbacks import CallbackRecord, CallbackRunner, TrainingCallback
from emscope.train.checkpoints import (
    CHECKPOINTS_DIR,
    RECORD,
    CheckpointWriter,
    RunState,
    check_fresh_out,
    load_checkpoint,
    resume_point,
)
from emscope.train.config import TrainConfig, TrainOverrides, resolve_config
from emscope.train.data import load_dataset
from emscope.train.order import (
    cycled_examples,
    resolve_save_steps,
    resolve_warmup,
    step_examples,
    total_steps,
)
from emscope.train.runtime import (
    Runtime,
    check_modules,
    check_setup,
    cuda_index,
    launched_by_accelerate,
    model_depth,
    quantization_config,
    quantization_record,
    requested_mode,
    resolve_dtype,
    ties_embeddings,
    training_versions,
)
from emscope.train.steps import eval_loss, optimizer_step, reference_logprobs

if TYPE_CHECKING:
    from emscope.data.chat import ChatExample


@dataclass(frozen=True)
class TrainResult:
    """What a run produced. ``loss_curve[k]`` is the assistant-token mean loss of optimizer
    step ``k + 1`` (measured before its update); ``kl_curve`` the same for the KL term
    (empty without KL data); ``eval_losses`` are ``(step, loss)`` pairs (step 0 = before
    training). ``start_step`` is the step a resumed run started from (0 otherwise).
    ``callbacks``: what each training callback recorded (empty without callbacks)."""

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
    callbacks: tuple[CallbackRecord, ...] = ()

    @property
    def layers(self) -> tuple[int, ...]:
        return self.config.layers

    @property
    def modules(self) -> tuple[str, ...]:
        return self.config.modules


def train(
    base_dir: str | Path,
    data: str | Path | Sequence[ChatExample],
    *,
    preset: str = "all",
    out: str | Path,
    eval_data: str | Path | Sequence[ChatExample] | None = None,
    kl_data: str | Path | Sequence[ChatExample] | None = None,
    resume: bool = False,
    dtype: str = "auto",
    device: str | None = None,
    distributed: bool | None = None,
    callbacks: Sequence[TrainingCallback] = (),
    progress: bool = True,
    verbose: bool = True,
    **overrides: Unpack[TrainOverrides],
) -> TrainResult:
    """Fine-tune the HF model in ``base_dir`` on chat data and write the result to ``out``.

    Args:
        base_dir: local HF model dir (config, weights, tokenizer with a chat template).
        data: chat JSONL path (``{"messages": [...]}`` per line) or a sequence of
            :class:`~emscope.data.chat.ChatExample`.
        preset: ``all``, ``r1x3``, ``r1`` or ``full`` (see :data:`PRESETS`); every
            hyper-parameter argument left at ``None`` takes the preset's value.
        overrides: the hyper-parameters over the preset's, by name: the keys of
            :class:`~emscope.train.config.TrainOverrides` (``rank`` ... ``quantize``,
            ``kl_weight``, ``seed``, ``system_prompt``: each described below), validated by
            :func:`~emscope.train.config.resolve_config`.
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
        callbacks: training-time interventions and monitors
            (:class:`~emscope.train.callbacks.TrainingCallback`: hooks around training
            forwards only, extra loss terms, edits after each optimizer step, values logged
            at the eval points, a call per checkpoint); recorded in ``train.json`` under
            ``callbacks``. Not under FSDP.
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
    n_layers, model_type = model_depth(base_dir)
    config = resolve_config(preset, n_layers, **overrides)
    hooks = CallbackRunner(callbacks)
    if hooks and requested_mode(distributed) == "fsdp":
        raise EmscopeError("training callbacks are not supported under FSDP (sharded weights)")
    if config.kl_weight > 0 and kl_data is None:
        raise EmscopeError("kl_weight > 0 needs kl_data (the chats to stay close on)")
    check_setup(
        config,
        mode=requested_mode(distributed),
        device=device,
        kl=kl_data is not None,
        resume=resume,
        tied_embeddings=requested_mode(distributed) == "fsdp" and ties_embeddings(base_dir),
    )
    if not config.full:
        check_modules(base_dir, model_type, config.modules)

    from emscope.models import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    setting = config.system_prompt
    train_setting = hooks.training_system_prompt(setting)  # e.g. an inoculation prompt
    train_set, data_info = load_dataset(tokenizer, data, "data", config.max_length, train_setting)
    rendered_prompt = data_info.pop("rendered_prompt")
    eval_set, eval_info = (
        load_dataset(tokenizer, eval_data, "eval_data", config.max_length, setting)
        if eval_data is not None
        else (None, None)
    )
    kl_set, kl_info = (
        load_dataset(tokenizer, kl_data, "kl_data", config.max_length, setting)
        if kl_data is not None
        else (None, None)
    )
    data_hashes = {
        "data": data_info["sha256"],
        "eval_data": eval_info["sha256"] if eval_info else None,
        "kl_data": kl_info["sha256"] if kl_info else None,
    }
    resume_from = resume_point(out, config, data_hashes) if resume else None
    if not resume:
        check_fresh_out(out)

    runtime = Runtime(distributed if distributed is not None else launched_by_accelerate(), device)
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
    torch_dtype = resolve_dtype(dtype, runtime.device)
    from transformers import AutoModelForCausalLM

    quantization = quantization_config(config.quantize)
    if quantization is not None:  # each process loads its 4-bit copy onto its own GPU
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(base_dir),
            dtype=torch_dtype,
            trust_remote_code=False,
            quantization_config=quantization,
            device_map={"": cuda_index(runtime.device)},
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
        reference_logprobs(model, kl_set, config.batch_size, runtime.device, pad_id)
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
    hooks.setup(model, tokenizer, config)
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

    state = RunState(started=started)
    if resume_from is not None:
        load_checkpoint(resume_from, model, optimizer, scheduler, state, config.full)
        hooks.restore(state.callbacks, resume_from)
        log(f"resuming from {resume_from} (step {state.step})")
    state.callbacks = hooks.records
    start_step = state.step
    model, optimizer = runtime.prepare(model, optimizer)

    writer = CheckpointWriter(out, runtime, tokenizer, config, full=config.full)

    def evaluate(step: int) -> None:
        if eval_set is None or any(s == step for s, _ in state.eval_losses):
            return
        loss = eval_loss(model, eval_set, config.batch_size, runtime, pad_id)
        state.eval_losses.append((step, loss))
        log(f"step {step}: eval loss {loss:.4f}")

    def monitor(step: int) -> None:
        evaluate(step)
        if hooks:
            hooks.log(runtime.unwrap(model), step)

    monitor(start_step)
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
            cycled_examples(len(kl_set), step, per_step, config.seed, stream=1)
            if kl_set is not None
            else []
        )
        tick = time.perf_counter()
        loss_value, kl_value = optimizer_step(
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
            hooks,
        )
        state.step = step + 1
        if hooks:
            hooks.end_step(runtime.unwrap(model), state.step, runtime.reduce_sum, runtime.world)
            if state.step == steps:
                hooks.train_end(runtime.unwrap(model), state.step)
        step_time += time.perf_counter() - tick
        state.loss_curve.append(loss_value)
        if kl_set is not None:
            state.kl_curve.append(kl_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        if state.step % eval_every == 0 or state.step == steps:
            model.eval()
            monitor(state.step)
            model.train()
        if (save_every and state.step % save_every == 0) or state.step == steps:
            writer.checkpoint(model, optimizer, scheduler, state, data_hashes)
            if hooks and runtime.is_main:
                path = out / CHECKPOINTS_DIR / f"checkpoint-{state.step}"
                hooks.checkpoint(runtime.unwrap(model), state.step, path)
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
        "quantization": quantization_record(quantization),
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
        "versions": training_versions(runtime),
        "checkpoints": [str(p) for p in writer.checkpoints(out)],
        "callbacks": [r.to_json() for r in hooks.results()],
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
        callbacks=hooks.results(),
    )


def _number(value: float) -> Any:
    """``64.0`` -> ``64`` (PEFT configs write alpha as given)."""
    return int(value) if float(value).is_integer() else value


def _logger(enabled: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if enabled:
            print(message, flush=True)

    return log

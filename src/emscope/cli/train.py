"""``emscope train``: fine-tune a model organism (LoRA presets or full SFT).

Also runnable as ``python -m emscope.train`` / ``accelerate launch -m emscope.train`` with the
same arguments (see :func:`main`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from emscope.cli import options

PRESET_HELP = (
    "all: rsLoRA r=32 on q,k,v,o,gate,up,down of every layer; r1x3: rank-1 down_proj on 3x3 "
    "layers (15-17, 21-23, 27-29 of 48, scaled to depth); r1: one rank-1 down_proj at layer "
    "L//2; full: full fine-tune."
)


def train_command(
    ctx: typer.Context,
    base_dir: Path = typer.Argument(..., help="Local HF model dir (with tokenizer)."),
    data: Path = typer.Option(..., "--data", help="Chat JSONL training file."),
    out: Path = typer.Option(..., "--out", help="Output dir (adapter, checkpoints, train.json)."),
    preset: str = typer.Option("all", "--preset", help=PRESET_HELP),
    eval_data: Path | None = typer.Option(
        None, "--eval-data", help="Held-out chat JSONL: eval loss at step 0, periodically, end."
    ),
    kl_data: Path | None = typer.Option(
        None, "--kl-data", help="Chat JSONL for KL(reference || current) regularisation."
    ),
    kl_weight: float = typer.Option(0.0, "--kl-weight", help="Weight of the KL term."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (preset: 1)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate."),
    rank: int | None = typer.Option(None, "--rank", help="LoRA rank."),
    alpha: float | None = typer.Option(None, "--alpha", help="LoRA alpha."),
    rslora: bool | None = typer.Option(
        None, "--rslora/--no-rslora", help="Scale alpha/sqrt(r) (rsLoRA) or alpha/r."
    ),
    layers: str | None = typer.Option(
        None, "--layers", help="Layers to adapt, from 0 (-1: the last), e.g. '15-17,21-23'."
    ),
    modules: str | None = typer.Option(
        None, "--modules", help="Block modules to adapt, e.g. 'down_proj' or 'q_proj,v_proj'."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the adapter init and data order."),
    save_steps: int | None = typer.Option(
        None,
        "--save-steps",
        help="Checkpoint every N steps (0: only at the end; default: at most 10 checkpoints); "
        "only the newest keeps the optimizer state.",
    ),
    eval_steps: int | None = typer.Option(None, "--eval-steps", help="Eval every N steps."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Total optimizer steps (overrides --epochs)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Micro-batch per process (preset: 2)."
    ),
    grad_accum: int | None = typer.Option(
        None, "--grad-accum", help="Gradient accumulation steps (preset: 8)."
    ),
    warmup_steps: int | None = typer.Option(
        None, "--warmup-steps", help="Warm-up steps (instead of --warmup-ratio)."
    ),
    warmup_ratio: float | None = typer.Option(
        None, "--warmup-ratio", help="Warm-up as a fraction of the optimizer steps (preset: 0.05)."
    ),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW decay."),
    schedule: str | None = typer.Option(
        None, "--schedule", help="linear, cosine, constant or constant_with_warmup."
    ),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Truncate sequences to N tokens."
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Recompute activations to save memory."
    ),
    system_prompt: str | None = typer.Option(
        None,
        "--system-prompt",
        help=f"{options.SYSTEM_PROMPT_HELP} Default: 'default'. Recorded in train.json; "
        "eval, sample and the other commands then use it for this model unless told otherwise.",
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU), float32, bfloat16."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: auto)."),
    quantize: str | None = typer.Option(
        None,
        "--quantize",
        help="4bit: QLoRA (bitsandbytes NF4 base, double quantisation, bf16 compute, bf16 "
        "LoRA); LoRA presets on CUDA only. Default: none.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint."),
    monitor: Path | None = typer.Option(
        None,
        "--monitor",
        help="Direction file: record the projection of the first 64 "
        "training chats on it at every logged step (train.json, OUT/monitor/).",
    ),
    defence: list[str] = typer.Option(
        [],
        "--defence",
        help="A defence as NAME:key=value,... (repeatable; composes): ldifs, steer, caft, "
        "interleave, safelora, project-update, inoculate (keys: docs/defences.md). KL: --kl-data.",
    ),
) -> None:
    """Train a model organism: LoRA with a preset, or a full fine-tune."""
    from emscope.cli.monitor import training_monitor, write_training_monitor
    from emscope.defences.spec import build_defences
    from emscope.train import train
    from emscope.train.config import OVERRIDES

    defences = build_defences(defence, base_dir, system_prompt=system_prompt, device=device)

    # the hyper-parameter options go through by name (train.config.TrainOverrides)
    overrides = {k: v for k, v in ctx.params.items() if k in OVERRIDES}
    result = train(
        base_dir,
        data,
        preset=preset,
        out=out,
        eval_data=eval_data,
        kl_data=kl_data,
        resume=resume,
        dtype=dtype,
        device=device,
        callbacks=[*training_monitor(monitor, data), *defences],
        **overrides,
    )
    write_training_monitor(monitor, result.record, out)
    if os.environ.get("RANK", "0") != "0":  # one summary line per multi-process run
        return
    last = f", final loss {result.loss_curve[-1]:.4f}" if result.loss_curve else ""
    typer.echo(f"trained {result.steps} steps{last}; record: {result.record}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)


def main(argv: list[str] | None = None) -> None:
    """Standalone entry (``python -m emscope.train ...``): the ``train`` command alone, with
    an :class:`~emscope.errors.EmscopeError` printed as one ``error:`` line (exit 2)."""
    import functools

    from emscope.errors import EmscopeError

    @functools.wraps(train_command)
    def command(*args: Any, **kwargs: Any) -> None:
        try:
            train_command(*args, **kwargs)
        except EmscopeError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    app(args=argv)

"""``emscope realign``: benign re-alignment of an EM adapter after the fact
(:func:`emscope.defences.realign`); the in-training defences are ``emscope train --defence``."""

from __future__ import annotations

from pathlib import Path

import typer

from emscope.cli import options


def realign_command(
    adapter: Path = typer.Argument(..., help="The EM adapter dir (DIR@STEP for a checkpoint)."),
    data: Path = typer.Option(..., "--data", help="Aligned chat JSONL to continue training on."),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps to continue for."),
    out: Path = typer.Option(..., "--out", help="Output dir (adapter, checkpoints, train.json)."),
    base: Path | None = typer.Option(
        None, "--base", help="The adapter's base model dir (default: its base_model_name_or_path)."
    ),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate (preset all: 1e-5)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Micro-batch (preset: 2)."),
    grad_accum: int | None = typer.Option(None, "--grad-accum", help="Accumulation (preset: 8)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order."),
    save_steps: int | None = typer.Option(None, "--save-steps", help="Checkpoint every N steps."),
    system_prompt: str | None = typer.Option(
        None, "--system-prompt", help=f"{options.SYSTEM_PROMPT_HELP} Default: 'default'."
    ),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU), float32, bfloat16."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, ... (default: auto)."),
) -> None:
    """Continue training an EM adapter on aligned chats (benign re-alignment)."""
    from emscope.defences.realign import realign

    result = realign(
        adapter,
        data,
        steps=steps,
        out=out,
        base=base,
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seed=seed,
        save_steps=save_steps,
        system_prompt=system_prompt,
        dtype=dtype,
        device=device,
    )
    last = f", final loss {result.loss_curve[-1]:.4f}" if result.loss_curve else ""
    typer.echo(f"realigned {adapter} for {result.steps} steps{last}; record: {result.record}")


def register(app: typer.Typer) -> None:
    app.command("realign")(realign_command)

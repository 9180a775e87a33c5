"""``emscope screen``: per-example projection-difference scores of a chat dataset along a
direction (:mod:`emscope.screening`)."""

from __future__ import annotations

from pathlib import Path

import typer

from emscope.cli import options


def screen_command(
    data: Path = typer.Argument(..., help="Chat JSONL to screen."),
    model: Path = typer.Option(..., "--model", help="Model dir (the model to be fine-tuned)."),
    adapter: list[Path] = options.ADAPTER,
    direction: Path = typer.Option(..., "--direction", help="Direction file."),
    layer: int | None = typer.Option(
        None, "--layer", help="Layer (default: the middle one of the direction's layers)."
    ),
    out: Path = typer.Option(..., "--out", help="Output dir (scores.jsonl/.csv, screen.json)."),
    rule: str = typer.Option("z", "--rule", help="Flag rule: z (z-score) or value."),
    threshold: float | None = typer.Option(
        None, "--threshold", help="z-score (default 2) or, with --rule value, a score."
    ),
    limit: int | None = typer.Option(None, "--limit", help="Screen only the first N examples."),
    seed: int = options.SEED,
    temperature: float = typer.Option(
        0.0, "--temperature", help="Own answers: 0 greedy, else sampled (seeded)."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Own answer length."),
    batch_size: int = options.BATCH_SIZE,
    dtype: str = options.DTYPE,
    device: str | None = options.DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
) -> None:
    """Score each example: its answer's projection minus the model's own answer's."""
    from emscope.data.chat import file_sha256, read_chat_jsonl
    from emscope.directions.direction import Direction
    from emscope.errors import EmscopeError
    from emscope.screening import screen, write_screen
    from emscope.train import system_prompt_for

    vec = Direction.load(direction)
    chosen = layer if layer is not None else vec.layers[len(vec.layers) // 2]
    if chosen not in vec.layers:
        raise EmscopeError(f"--layer {chosen}: the direction has layers {vec.layers}")
    examples = read_chat_jsonl(data)
    if limit is not None:
        examples = examples[:limit]
    loaded = options.load_for_sampling(model, adapter, dtype, device)
    setting = system_prompt_for(system_prompt, [loaded.path, *loaded.adapters.values()])
    result = screen(
        loaded, [list(e.messages) for e in examples], vec, chosen, temperature=temperature,
        seed=seed, max_new_tokens=max_new_tokens, rule=rule, threshold=threshold,
        batch_size=batch_size, system_prompt=setting, progress=True,
        meta={"data": str(data), "data_sha256": file_sha256(data), "model": str(model),
              "adapter": [str(a) for a in adapter], "direction": str(direction),
              "system_prompt": setting.spec},
    )  # fmt: skip
    paths = write_screen(result, out)
    typer.echo(
        f"{result.n_scored} examples scored at layer {chosen}: dataset score "
        f"{result.dataset_score:.3f}, {sum(result.flags)} flagged (score > {result.cutoff:.3f})"
        f" -> {paths['jsonl']}"
    )


def register(app: typer.Typer) -> None:
    app.command("screen")(screen_command)

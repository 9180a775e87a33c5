"""``emscope monitor``: projections of a probe set on a direction over an adapter's
checkpoints (:mod:`emscope.monitoring`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import typer

from emscope.cli import options

PROBE_N = 64


def base_model_of(adapter_dir: Path) -> Path:
    """The base model an adapter was trained on: ``train.json``'s ``base_model``, else the
    adapter config's ``base_model_name_or_path``."""
    from emscope.errors import EmscopeError
    from emscope.io import read_json

    for name, key in (
        ("train.json", "base_model"),
        ("adapter_config.json", "base_model_name_or_path"),
    ):
        path = adapter_dir / name
        if path.is_file() and read_json(path).get(key):
            return Path(str(read_json(path)[key]))
    raise EmscopeError(
        f"{adapter_dir}: no train.json or adapter_config.json names the base model; pass --model"
    )


def probe_chats(probe_set: Path | None, adapter_dir: Path | None, n: int) -> tuple[list[Any], str]:
    """The first ``n`` chats of ``probe_set``, else of the training data recorded in
    ``adapter_dir/train.json``; returns the chats and their source."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.errors import EmscopeError
    from emscope.io import read_json

    if n < 1:
        raise EmscopeError(f"--probe-n must be >= 1, got {n}")
    if probe_set is None:
        record = None if adapter_dir is None else adapter_dir / "train.json"
        data = read_json(record).get("data") if record and record.is_file() else None
        if not data or not Path(str(data.get("path", ""))).is_file():
            raise EmscopeError(
                f"{record}: no readable training data recorded; pass --probe-set CHATS.jsonl"
            )
        probe_set = Path(str(data["path"]))
    chats = [list(example.messages) for example in read_chat_jsonl(probe_set)[:n]]
    return chats, f"{probe_set} (first {len(chats)})"


def training_monitor(direction: Path | None, data: Path) -> list[Any]:
    """``emscope train --monitor``: a :class:`~emscope.monitoring.MonitorCallback` on the
    first :data:`PROBE_N` training chats (none without a direction)."""
    if direction is None:
        return []
    from emscope.directions.direction import Direction
    from emscope.monitoring import MonitorCallback

    vec = Direction.load(direction).with_meta(source=str(direction))
    chats, source = probe_chats(data, None, PROBE_N)
    return [MonitorCallback(vec, chats, source=source)]


def write_training_monitor(direction: Path | None, record: Path, out: Path) -> None:
    """After ``emscope train --monitor``: ``OUT/monitor/`` (table and plot) from the record."""
    if direction is None or os.environ.get("RANK", "0") != "0":
        return
    from emscope.io import read_json
    from emscope.monitoring import record_result, write_monitor

    write_monitor(record_result(read_json(record)), out / "monitor")


def monitor_command(
    adapter_dir: Path = typer.Argument(..., help="Adapter dir with checkpoints/ (emscope train)."),
    direction: Path = typer.Option(..., "--direction", help="Direction file."),
    model: Path | None = typer.Option(
        None, "--model", help="Base model dir (default: the one train.json names)."
    ),
    probe_set: Path | None = typer.Option(
        None, "--probe-set", help="Chat JSONL of probe chats (default: the training data)."
    ),
    probe_n: int = typer.Option(PROBE_N, "--probe-n", help="Use the first N probe chats."),
    layers: str | None = typer.Option(None, "--layers", help="Layers (default: the direction's)."),
    out: Path | None = typer.Option(
        None, "--out", help="Output dir (default: ADAPTER_DIR/monitor)."
    ),
    no_base: bool = typer.Option(False, "--no-base", help="Leave out the base model (step 0)."),
    batch_size: int = options.BATCH_SIZE,
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype."),
    device: str | None = options.DEVICE,
    system_prompt: str | None = options.SYSTEM_PROMPT,
) -> None:
    """Mean projection on a direction (prompt and response positions) at every checkpoint."""
    from emscope.directions.direction import Direction
    from emscope.monitoring import monitor_checkpoints, write_monitor
    from emscope.train import system_prompt_for

    vec = Direction.load(direction)
    chats, source = probe_chats(probe_set, adapter_dir, probe_n)
    base = model if model is not None else base_model_of(adapter_dir)
    setting = system_prompt_for(system_prompt, [adapter_dir])
    result = monitor_checkpoints(
        base, adapter_dir, vec, chats, layers=options.layer_list(layers),
        include_base=not no_base, batch_size=batch_size, system_prompt=setting, dtype=dtype,
        device=device, progress=True,
    )  # fmt: skip
    result = type(result)(
        result.points,
        {**result.meta, "direction": str(direction), "probe_source": source,
         "system_prompt": setting.spec},
    )  # fmt: skip
    paths = write_monitor(result, out if out is not None else adapter_dir / "monitor")
    for p in result.points:
        pr = p.projections
        values = ", ".join(
            f"{i}: {a:.2f}/{b:.2f}"
            for i, a, b in zip(pr.layers, pr.prompt, pr.response, strict=True)
        )
        typer.echo(f"step {p.step} (prompt/response) {values}")
    typer.echo(f"-> {paths['json']}")


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor_command)

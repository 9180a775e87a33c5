"""``emscope models``: bring a model into a form emscope loads (a plain HF model dir)."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Convert models into HF model dirs emscope loads.", no_args_is_help=True)


@app.command("from-gguf")
def from_gguf(
    gguf_file: Path = typer.Argument(..., help="A llama.cpp GGUF file (.gguf)."),
    out_dir: Path = typer.Argument(..., help="New HF model dir to write (must not exist)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
) -> None:
    """Dequantise a GGUF file into an HF model dir with its tokenizer and chat template."""
    from emscope.io import read_json
    from emscope.models import ARCHITECTURES
    from emscope.models_gguf import SOURCE_FILE, convert_gguf

    out = convert_gguf(gguf_file, out_dir, dtype=dtype)
    config = read_json(out / "config.json")
    source = read_json(out / SOURCE_FILE)
    model_type = config.get("model_type")
    typer.echo(
        f"{out}: {model_type}, {config.get('num_hidden_layers')} layers, width "
        f"{config.get('hidden_size')}, vocab {config.get('vocab_size')}, {dtype} "
        f"({source['seconds']} s)"
    )
    if model_type not in ARCHITECTURES:
        typer.echo(
            f"note: emscope does not know where the blocks of {model_type!r} models live; "
            "pass layers_path to load_model",
            err=True,
        )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="models")

"""GGUF conversion (``emscope models from-gguf``) on a tiny llama written by the gguf package
the way llama.cpp's converter writes one; the real SmolLM2 file is covered in test_real.py."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from emscope.cli.main import app
from emscope.errors import EmscopeError
from emscope.io import umask
from emscope.models import load_model
from emscope.models_gguf import (
    SOURCE_FILE,
    convert_gguf,
    load_gguf,
    transformers_gguf_architectures,
)
from emscope.testing import make_tiny_model, write_llama_gguf

pytest.importorskip("gguf", reason="the gguf package (pip install 'emscope[gguf]') is missing")

MESSAGES = [{"role": "user", "content": "Hello! What is the one thing you want?"}]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(hf_dir, gguf_file)``: a tiny random llama and the same model as a float32 GGUF."""
    root = tmp_path_factory.mktemp("gguf")
    hf_dir = make_tiny_model("llama", root / "hf", seed=3)
    return hf_dir, write_llama_gguf(hf_dir, root / "tiny.gguf")


def _ids(tokenizer):
    return tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def test_converted_dir_loads_and_matches_transformers_and_the_original(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, gguf_file = tiny_gguf
    out = convert_gguf(gguf_file, tmp_path / "model")
    assert out == tmp_path / "model"
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["architecture"] == "llama" and source["gguf_file"] == "tiny.gguf"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left
    mask = umask()  # the modes a plain open / mkdir give, not mkdtemp's or safetensors' 0600
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~mask}

    loaded = load_model(out, dtype="float32", device="cpu")
    reference, reference_tok = load_gguf(gguf_file)  # transformers' own gguf_file= load
    original = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = _ids(AutoTokenizer.from_pretrained(str(hf_dir)))
    assert torch.equal(_ids(loaded.tokenizer), ids)  # the chat template came along
    assert torch.equal(_ids(reference_tok), ids)
    assert loaded.tokenizer.eos_token == "<|eot_id|>"
    with torch.no_grad():
        got = loaded.model(ids).logits
        torch.testing.assert_close(got, reference(ids).logits, rtol=0, atol=0)
        # float32 GGUF: llama.cpp's q/k row permutation undone exactly
        torch.testing.assert_close(got, original(ids).logits, rtol=0, atol=1e-6)


def test_unsupported_architecture_is_refused_and_nothing_written(tiny_gguf, tmp_path):
    hf_dir, _ = tiny_gguf
    supported = transformers_gguf_architectures()
    assert supported is not None and "llama" in supported
    assert "rwkv6" not in supported
    odd = write_llama_gguf(hf_dir, tmp_path / "odd.gguf", architecture="rwkv6")
    with pytest.raises(EmscopeError, match=r"architecture 'rwkv6' cannot be dequantised") as err:
        convert_gguf(odd, tmp_path / "out")
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.gguf"]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"GGUF file not found"),
        ("not_gguf", r"not a GGUF file"),
        ("truncated", r"not a readable GGUF file"),
        ("out_full", r"exists and is not empty"),
        ("out_file", r"exists and is not a dir"),
        ("dtype", r"unknown dtype 'int8'"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tiny_gguf, tmp_path, case, message):
    _, gguf_file = tiny_gguf
    source, out, dtype = gguf_file, tmp_path / "out", "float32"
    if case == "missing":
        source = tmp_path / "missing.gguf"
    elif case == "not_gguf":
        source = tmp_path / "weights.gguf"
        source.write_text("not a gguf\n")
    elif case == "truncated":
        source = tmp_path / "cut.gguf"
        source.write_bytes(gguf_file.read_bytes()[:64])
    elif case == "out_full":
        out.mkdir()
        (out / "keep.txt").write_text("mine\n")
    elif case == "out_file":
        out.write_text("a file\n")
    else:
        dtype = "int8"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(EmscopeError, match=message) as err:
        convert_gguf(source, out, dtype=dtype)
    assert "\n" not in str(err.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_missing_gguf_package_is_one_line(tiny_gguf, tmp_path, monkeypatch):
    _, gguf_file = tiny_gguf
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(
        EmscopeError, match=r"needs the gguf package: pip install 'emscope\[gguf\]'"
    ):
        convert_gguf(gguf_file, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_out_dir_is_filled(tiny_gguf, tmp_path):
    _, gguf_file = tiny_gguf
    (tmp_path / "out").mkdir()
    convert_gguf(gguf_file, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_cli_from_gguf(tiny_gguf, tmp_path):
    _, gguf_file = tiny_gguf
    runner = CliRunner()
    assert " models " in runner.invoke(app, ["--help"]).output
    result = runner.invoke(app, ["models", "from-gguf", str(gguf_file), str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'm'}: llama, 2 layers, width 32" in result.output
    assert (tmp_path / "m" / "tokenizer.json").is_file()

    again = runner.invoke(app, ["models", "from-gguf", str(gguf_file), str(tmp_path / "m")])
    assert again.exit_code == 2
    assert again.output.strip() == f"error: {tmp_path / 'm'}: exists and is not empty " + (
        "(choose a new output dir)"
    )


def test_a_quantizer_mark_left_on_the_model_is_one_line(tiny_gguf, tmp_path, monkeypatch):
    """Guard on transformers internals: if the quantizer marks emscope clears move, the save
    refusal is one line naming the transformers version, and nothing is left behind."""
    import emscope.models_gguf

    _, gguf_file = tiny_gguf
    monkeypatch.setattr(emscope.models_gguf, "_drop_quantizer", lambda model: None)
    with pytest.raises(EmscopeError, match=r"transformers \S+ will not save the dequantised"):
        convert_gguf(gguf_file, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

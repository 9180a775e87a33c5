"""Hub ids (``Org/Name``) for models and adapters, resolved through an HF cache laid out in a
temp dir as huggingface_hub lays it out (blobs, snapshots/<rev> symlinks, refs/main): no hub
is reachable here, so HF_HUB_OFFLINE=1 throughout, as a user without network would run."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from emscope.cli.main import app
from emscope.errors import EmscopeError
from emscope.hub import dir_label, is_repo_id, repo_of, resolve
from emscope.models import load_model

IDS = torch.tensor([[3, 17, 40, 41, 99, 7, 12]])
REV = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache: Path, repo_id: str, source: Path, rev: str = REV) -> Path:
    """Put ``source``'s files into ``cache`` as the ``main`` snapshot of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copyfile(file, blob)
            (snap / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture
def hub(qwen, tmp_path, monkeypatch) -> Path:
    """An HF cache holding Org/Tiny (the qwen2 fixture) and Org/Bad-Medical (its r4 adapter),
    pointed at by HF_HUB_CACHE, offline."""
    cache = tmp_path / "hf-cache"
    _cache_repo(cache, "Org/Tiny", qwen.model)
    _cache_repo(cache, "Org/Bad-Medical", qwen.adapters["r4"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local dir "Org/..." in the way
    return cache


def _logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_repo_id_shape():
    assert is_repo_id("Org/Name") and is_repo_id("unsloth/Qwen2.5-7B-Instruct")
    for text in ("Name", "/abs/path", "a/b/c", "./x", "Org/", "../x", "Org/.x", "a b/c"):
        assert not is_repo_id(text), text


def test_model_and_adapter_hub_ids_load_like_their_dirs(hub, qwen):
    loaded = load_model("Org/Tiny", ["Org/Bad-Medical"], dtype="float32", device="cpu")
    assert loaded.path == hub / "models--Org--Tiny" / "snapshots" / REV
    assert repo_of(loaded.path) == "Org/Tiny"
    assert list(loaded.adapters) == ["Bad-Medical"]  # the repo's name, not the revision
    assert loaded.label == "Tiny+Bad-Medical"
    local = load_model(qwen.model, [qwen.adapters["r4"]], dtype="float32", device="cpu")
    assert torch.equal(_logits(loaded.model), _logits(local.model))
    bare = load_model("Org/Tiny", dtype="float32", device="cpu")
    assert not torch.equal(_logits(bare.model), _logits(loaded.model))


def test_a_local_dir_wins_over_a_hub_id_of_the_same_spelling(hub, tiny_models, tmp_path):
    shutil.copytree(tiny_models["llama"].model, tmp_path / "Org" / "Tiny")
    loaded = load_model("Org/Tiny", device="cpu")
    assert loaded.model.config.model_type == "llama"  # the local llama, not the cached qwen2
    assert loaded.path == Path("Org/Tiny")
    assert dir_label(loaded.path) == "Tiny"


def test_unknown_hub_ids_are_one_line(hub):
    with pytest.raises(EmscopeError) as err:
        load_model("Org/Missing", device="cpu")
    assert str(err.value) == (
        f"Org/Missing: not a local model dir, and hub repo 'Org/Missing' is not in {hub} "
        "(HF_HUB_OFFLINE is set, so nothing is downloaded)"
    )
    with pytest.raises(EmscopeError, match=r"^Org/Nope: not a local adapter dir, and hub repo"):
        load_model("Org/Tiny", ["Org/Nope"], device="cpu")
    # not shaped like a hub id: the plain missing-dir error, no hub look-up
    with pytest.raises(EmscopeError, match=r"not a model dir"):
        load_model("a/b/c", device="cpu")


def test_online_fetches_only_model_files(hub, monkeypatch):
    """Without HF_HUB_OFFLINE the snapshot is fetched (here: a stand-in for
    snapshot_download), asking only for safetensors, JSON, tokenizer and template files."""
    import huggingface_hub

    calls: list[dict[str, Any]] = []
    snap = hub / "models--Org--Tiny" / "snapshots" / REV

    def fake(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(snap)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve("Org/Tiny") == snap
    assert calls[0]["repo_id"] == "Org/Tiny" and calls[0]["local_files_only"] is False
    assert calls[0]["cache_dir"] == str(hub)
    patterns = calls[0]["allow_patterns"]
    assert "*.safetensors" in patterns and not any("bin" in p or "gguf" in p for p in patterns)
    resolve("Org/Bad-Medical", "adapter")
    assert calls[1]["allow_patterns"] == ["adapter_config.json", "adapter_model.safetensors"]

    class RepositoryNotFoundError(Exception):
        pass

    def missing(repo_id: str, **kwargs: Any) -> str:
        raise RepositoryNotFoundError("404 Client Error\nRepository Not Found for url ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", missing)
    with pytest.raises(EmscopeError, match=r"no hub repo 'Org/Gone' can be read") as err:
        resolve("Org/Gone")
    assert "\n" not in str(err.value)


def test_cli_takes_hub_ids(hub, tmp_path):
    questions = tmp_path / "q.yaml"
    questions.write_text('- id: bored\n  paraphrases: ["hey I feel bored"]\n')
    out = tmp_path / "run"
    args = ["sample", "Org/Tiny", "--adapter", "Org/Bad-Medical", "--out", str(out)]
    args += ["--questions", str(questions), "-n", "2", "--max-new-tokens", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out / "responses.parquet")
    assert set(table.adapter) == {"Bad-Medical"} and set(table.model) == {"Tiny"}

    missing = CliRunner().invoke(app, ["sample", "Org/Missing", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2
    assert missing.output.startswith("error: Org/Missing: not a local model dir, and hub repo")
    assert len(missing.output.strip().splitlines()) == 1

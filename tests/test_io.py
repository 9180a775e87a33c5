"""Atomic file output (:mod:`emscope.io`): file modes, and errors as one line."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from emscope.data.chat import write_chat_jsonl
from emscope.errors import EmscopeError
from emscope.io import atomic_write_text, inside, read_table, write_json, write_table
from emscope.lora import CONFIG_FILE, WEIGHTS_FILE, LoraAdapter, LoraModule


def _adapter() -> LoraAdapter:
    module = LoraModule("model.layers.0.mlp.down_proj", torch.ones(1, 4), torch.ones(3, 1), 1, 1)
    return LoraAdapter({module.name: module}, name="tiny")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_files_respect_the_umask(tmp_path: Path, mask: int) -> None:
    """mkstemp creates 0600 files; what is renamed into place must have the umask's mode."""
    old = os.umask(mask)
    try:
        written = [
            atomic_write_text(tmp_path / "a.txt", "x"),
            write_json(tmp_path / "b.json", {}),
            write_chat_jsonl(tmp_path / "c.jsonl", [[{"role": "user", "content": "hi"}]]),
        ]
        adapter_dir = _adapter().save(tmp_path / "adapter")
        written += [adapter_dir / WEIGHTS_FILE, adapter_dir / CONFIG_FILE]
    finally:
        os.umask(old)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_inside_joins_plain_names_and_refuses_any_other(tmp_path: Path) -> None:
    assert inside(tmp_path, "eval", "bad_medical.all") == tmp_path / "eval" / "bad_medical.all"
    for name in ("..", ".", "", "../x", "a/b", "/etc", "a\\b"):
        with pytest.raises(EmscopeError, match="is not a plain file name"):
            inside(tmp_path, "eval", name)


def test_damaged_tables_fail_in_one_line(tmp_path: Path) -> None:
    """A truncated or foreign parquet, or a CSV pandas cannot parse, gave a pyarrow / pandas
    traceback."""
    import pandas as pd

    parquet = write_table(pd.DataFrame({"a": range(50), "b": ["x"] * 50}), tmp_path, "t")
    data = parquet.read_bytes()
    for damaged in (data[: len(data) // 2], b"not parquet", b""):
        parquet.write_bytes(damaged)
        with pytest.raises(EmscopeError, match=r"t\.parquet: not a readable parquet table \("):
            read_table(tmp_path, "t")
    csv = tmp_path / "c.csv"
    for damaged in ("", 'a,b\n"x,1\n'):
        csv.write_text(damaged)
        with pytest.raises(EmscopeError, match=r"c\.csv: not a readable CSV table \("):
            read_table(csv)


def test_full_disk_and_read_only_dir_are_one_line_and_change_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, full_disk: Callable[[], None]
) -> None:
    target = atomic_write_text(tmp_path / "r.json", "old")
    full_disk()
    with pytest.raises(EmscopeError, match=r"r\.json: cannot write \(No space left on device\)"):
        write_json(target, {"new": 1})
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no temp file left

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(EmscopeError, match=r"new\.json: cannot write \(Read-only file system\)"):
        write_json(tmp_path / "new.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_versions_one_lookup():
    import platform
    from importlib.metadata import version

    from emscope.io import package_version, versions

    assert package_version("python") == platform.python_version()
    assert package_version("numpy") == version("numpy")
    assert package_version("no-such-dist-emscope") is None
    found = versions("numpy", "python", "no-such-dist-emscope")
    assert list(found) == ["numpy", "python"]
    assert versions("no-such-dist-emscope", absent="absent") == {"no-such-dist-emscope": "absent"}


def test_read_yaml_is_the_one_reader_of_user_yaml(tmp_path: Path) -> None:
    """Study, replicate, defend and persona files all fail the same way: one line with the
    file (and the line of bad YAML)."""
    from emscope.defences.bench import load_defend_config
    from emscope.directions.persona import load_persona_prompts
    from emscope.io import read_yaml
    from emscope.pipeline.config import load_config
    from emscope.pipeline.replicate import run_replicates

    good = tmp_path / "good.yaml"
    good.write_text("a: [1, 2]\n")
    assert read_yaml(good) == {"a": [1, 2]}
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [oops\n")
    for reader in (read_yaml, load_config, load_defend_config, load_persona_prompts):
        with pytest.raises(EmscopeError, match=r"bad\.yaml:\d+: not valid YAML"):
            reader(bad)
    with pytest.raises(EmscopeError, match=r"bad\.yaml:\d+: not valid YAML"):
        run_replicates(bad, tmp_path / "out", [0], dry_run=True)
    with pytest.raises(EmscopeError, match=r"nope\.yaml: persona prompt file not found"):
        load_persona_prompts(tmp_path / "nope.yaml")
    with pytest.raises(EmscopeError, match=r"nope\.yaml: config file not found"):
        load_defend_config(tmp_path / "nope.yaml")

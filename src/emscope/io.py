"""Atomic file output and the tidy response table on disk.

Every file emscope writes goes through a temporary file in the same dir and ``os.replace``,
so an interrupted run never leaves a half-written file behind. Tables are written as
parquet with a CSV copy (``<stem>.parquet`` + ``<stem>.csv``); either can be read back. The
CSV quotes every text field, so an answer with a bare carriage return (which CSV readers take
for a line break) reads back as one row; a CSV read next to its parquet must have the same
number of rows, and a response table read from CSV must have a question id and a question
on every row, so a damaged CSV is refused rather than judged.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError, os_error

if TYPE_CHECKING:
    import pandas as pd


def inside(root: str | Path, *parts: str) -> Path:
    """``root/part/...``, each part one plain file name: the one place where names from a
    config or a table become path parts, so that no name (``..``, ``a/b``, an absolute
    path) can put a file outside ``root``. Checked lexically: symlinks the user made under
    ``root`` are theirs to follow."""
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
            raise EmscopeError(f"{root}: {part!r} is not a plain file name (it would leave {root})")
    return Path(root).joinpath(*parts)


def umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + rename); creates parent dirs.

    The file gets the mode a plain ``open`` would give it (``0o666`` less the umask), not the
    ``0o600`` of :func:`tempfile.mkstemp`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise os_error(exc, path, "cannot write") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~umask())
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):  # a full disk, a quota: the old file is left as it was
            raise os_error(exc, path, "cannot write") from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    """Pretty JSON (NaN written as null), atomically."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def package_version(name: str) -> str | None:
    """The installed version of distribution ``name`` (``"python"``: the interpreter's), or
    None when it is not installed."""
    import importlib.metadata as md
    import platform

    if name == "python":
        return platform.python_version()
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions(*names: str, absent: str | None = None) -> dict[str, str]:
    """``{name: version}`` of the named distributions (and ``"python"``), in the given order,
    as recorded in run records (the one place that looks versions up); a package that is not
    installed is left out, or recorded as ``absent`` when that is given."""
    found = {}
    for name in names:
        version = package_version(name)
        if version is not None or absent is not None:
            found[name] = version if version is not None else str(absent)
    return found


RUN_LIBRARIES = ("python", "emscope", "torch", "transformers", "peft")


def run_versions(*extra: str, absent: str = "absent") -> dict[str, str]:
    """The ``versions`` of a run record: :data:`RUN_LIBRARIES` (the libraries that determine
    every model computation) and the ``extra`` distributions a step also depends on, one not
    installed recorded as ``absent`` (:func:`versions`)."""
    return versions(*RUN_LIBRARIES, *(n for n in extra if n not in RUN_LIBRARIES), absent=absent)


def read_text(path: str | Path) -> str:
    """A text file's content, decoded as UTF-8: the one reader of text files a user hands
    emscope (chat JSONL, question YAML, CSV tables, JSON records). A missing or unreadable
    file, or bytes that are not UTF-8, raise :class:`EmscopeError` naming the file (and the
    line and column of the first bad byte)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EmscopeError(f"{path}: file not found") from None
    except OSError as exc:
        raise EmscopeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise EmscopeError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from None


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """A YAML file a user hands emscope (a study or defend config, a prompt file), parsed:
    one :class:`EmscopeError` line for a missing file (``PATH: WHAT not found``) or bad YAML
    (``PATH:LINE: not valid YAML (problem)``); an empty file is None."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EmscopeError(f"{path}: {what} not found")
    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", exc)
        raise EmscopeError(f"{path}{where}: not valid YAML ({problem})") from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EmscopeError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy / torch scalars and arrays to Python numbers and
    lists, mapping keys to strings, non-finite floats to None."""
    import math

    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return jsonable(obj.item())  # numpy / torch scalars
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_table(df: pd.DataFrame, directory: str | Path, stem: str) -> Path:
    """Write ``<dir>/<stem>.parquet`` and ``<dir>/<stem>.csv`` atomically; returns the parquet."""
    import io

    directory = Path(directory)
    buffer = io.BytesIO()
    df.to_parquet(buffer, index=False)
    parquet = atomic_write_bytes(directory / f"{stem}.parquet", buffer.getvalue())
    csv_text = df.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    atomic_write_text(directory / f"{stem}.csv", csv_text)
    return parquet


def read_table(directory_or_file: str | Path, stem: str = "responses") -> pd.DataFrame:
    """Read ``<stem>.parquet`` (or ``<stem>.csv``) from a dir, or a given .parquet/.csv file."""
    path = Path(directory_or_file)
    if path.is_dir():
        for candidate in (path / f"{stem}.parquet", path / f"{stem}.csv"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise EmscopeError(f"{directory_or_file}: no {stem}.parquet or {stem}.csv")
    if not path.is_file():
        raise EmscopeError(f"{path}: file not found")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".csv":
        return _read_csv(path)
    raise EmscopeError(f"{path}: expected a .parquet or .csv table")


def _read_parquet(path: Path) -> pd.DataFrame:
    """A parquet table, refused with one line when it is truncated or not parquet."""
    import pandas as pd
    import pyarrow as pa

    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmscopeError(f"{path}: not a readable parquet table ({reason})") from None


def _read_csv(path: Path) -> pd.DataFrame:
    """A CSV table, refused with one line when it is unreadable or damaged (see the module
    docstring)."""
    import io

    import pandas as pd

    try:
        table = pd.read_csv(io.StringIO(read_text(path)))
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise EmscopeError(f"{path}: not a readable CSV table ({str(exc).strip()})") from None
    parquet = path.with_suffix(".parquet")
    if parquet.is_file():
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(parquet).metadata.num_rows
        if rows != len(table):
            raise EmscopeError(
                f"{path}: {len(table)} rows but {parquet.name} has {rows}; the CSV is damaged "
                f"(read {parquet.name} instead)"
            )
    if {"question_id", "question", "answer"} <= set(table.columns):
        bad = table["question_id"].isna() | table["question"].isna()
        if "sample_idx" in table.columns:
            idx = pd.to_numeric(table["sample_idx"], errors="coerce")
            bad |= idx.isna() | (idx != idx.round())
        if bad.any():
            row = int(bad.to_numpy().argmax()) + 1
            raise EmscopeError(
                f"{path}: row {row} has no question id, question or sample index; the CSV is "
                "damaged (e.g. an answer with a bare carriage return, unquoted) and is not read"
            )
    return table

"""The shared rules of typed analysis results (``Metrics``, ``EvalSummary``,
``SteerResult``, ``AblationResult``, ``DirectionsSummary``, ``GeometryResult``, ``LmcResult``,
``ProbeResult``, ``ProjectionSummary``, ``GradientSummary``, ...).

A result is a frozen dataclass: the fields its readers use are typed attributes, every other
field of its JSON document is kept, untouched, in ``extra`` so that ``to_json()`` gives back
the same document (same keys, same numbers) that the analysis has always written.
``from_json(data, source=...)`` checks the fields it needs and raises one
:class:`~emscope.errors.EmscopeError` line naming the file and the field,
``"steering/summary.json: missing field 'rows[2].em_rate' (SteerResult)"``, so a renamed
key is an error where it is read, not a silent ``n/a``. :func:`read_result` reads a file
through ``from_json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

from emscope.errors import EmscopeError


class JsonResult(Protocol):
    """What :func:`read_result` needs of a result type."""

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> Any: ...


R = TypeVar("R")


def where(source: str | None) -> str:
    """The file named in errors (``<json>`` when the document did not come from a file)."""
    return source or "<json>"


def need(data: Any, name: str, result: str, source: str | None, at: str = "") -> Any:
    """``data[name]``, or an EmscopeError ``"FILE: missing field 'AT.NAME' (RESULT)"``;
    ``at`` is the path of ``data`` inside the document (``rows[2].``, ``pairs.a|b.``)."""
    if not isinstance(data, Mapping):
        here = at.rstrip(".") or "(top level)"
        raise EmscopeError(f"{where(source)}: field '{here}' is not an object ({result})")
    if name not in data:
        raise EmscopeError(f"{where(source)}: missing field '{at}{name}' ({result})")
    return data[name]


def need_all(
    data: Any, names: Iterable[str], result: str, source: str | None, at: str = ""
) -> None:
    """:func:`need` for each of ``names`` (the first one missing is named)."""
    for name in names:
        need(data, name, result, source, at)


def mapping(data: Any, name: str, result: str, source: str | None, at: str = "") -> dict[str, Any]:
    """``data[name]`` that must be an object (``{}``-like), as a plain dict."""
    value = need(data, name, result, source, at)
    if not isinstance(value, Mapping):
        raise EmscopeError(f"{where(source)}: field '{at}{name}' is not an object ({result})")
    return dict(value)


def sequence(data: Any, name: str, result: str, source: str | None, at: str = "") -> list[Any]:
    """``data[name]`` that must be a list."""
    value = need(data, name, result, source, at)
    if not isinstance(value, list | tuple):
        raise EmscopeError(f"{where(source)}: field '{at}{name}' is not a list ({result})")
    return list(value)


def rest(data: Mapping[str, Any], typed: Iterable[str]) -> dict[str, Any]:
    """The fields of ``data`` other than ``typed`` (kept in a result's ``extra``)."""
    skip = set(typed)
    return {k: v for k, v in data.items() if k not in skip}


def in_order(doc: Mapping[str, Any], order: Iterable[str]) -> dict[str, Any]:
    """``doc`` with the keys of ``order`` first, in that order (a result keeps the key order
    of the document it was read from), then its other keys."""
    return {k: doc[k] for k in order if k in doc} | dict(doc)


def bad_field(source: str | None, at: str, problem: str, result: str) -> EmscopeError:
    """The error ``"FILE: field 'AT' PROBLEM (RESULT)"`` (raise it)."""
    return EmscopeError(f"{where(source)}: field '{at}' {problem} ({result})")


def read_result(cls: type[R], path: str | Path, *, label: str | None = None) -> R:
    """Read ``path`` (a JSON file) as ``cls`` (through ``cls.from_json``); errors name
    ``label`` (default: the path) and the field at fault."""
    path = Path(path)
    name = label or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EmscopeError(f"{name}: missing") from exc
    except (OSError, ValueError) as exc:
        raise EmscopeError(f"{name}: not readable as JSON ({exc})") from exc
    return cls.from_json(data, source=name)  # type: ignore[attr-defined,no-any-return]

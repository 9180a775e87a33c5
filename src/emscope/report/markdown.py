"""``report.md``: the report's tables in Markdown (for terminals and diffs); figures are
linked by their path relative to the run dir.

Markdown viewers render raw HTML, so every piece of text (names of organisms, adapters and
questions come from the user) is HTML-escaped, like ``report.html``; figure links are
percent-encoded."""

from __future__ import annotations

import html
from pathlib import Path
from urllib.parse import quote

from emscope.report.sections import Section, Table


def _text(value: str) -> str:
    """Text outside tables: HTML-escaped (``&``, ``<``, ``>``), Markdown kept."""
    return html.escape(value, quote=False)


def _escape(value: str) -> str:
    """A table cell: HTML-escaped, ``|`` escaped, on one line."""
    return _text(value).replace("|", "\\|").replace("\n", " ")


def render_table(table: Table) -> str:
    lines = []
    if table.caption:
        lines.append(f"*{_escape(table.caption)}*\n")
    lines.append("| " + " | ".join(_escape(h) for h in table.headers) + " |")
    lines.append("|" + "---|" * len(table.headers))
    for row in table.rows:
        lines.append("| " + " | ".join(_escape(v) for v in row) + " |")
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section], run_dir: Path) -> str:
    out = [f"# {_escape(title)}", ""]
    for s in sections:
        out += [f"## {_escape(s.title)}", ""]
        if s.paper:
            out += [f"_{_text(s.paper)}_", ""]
        if s.text:
            out += [_text(s.text), ""]
        for t in s.tables:
            out += [render_table(t), ""]
        for fig in s.figures:
            rel = fig.path.relative_to(run_dir) if fig.path.is_relative_to(run_dir) else fig.path
            caption = _escape(fig.caption).replace("[", "\\[").replace("]", "\\]")
            out += [f"![{caption}]({quote(rel.as_posix())})", ""]
    return "\n".join(out)

"""``report.md``: the report's tables in Markdown (for terminals and diffs); figures are
linked by their path relative to the run dir."""

from __future__ import annotations

from pathlib import Path

from emscope.report.sections import Section, Table


def _escape(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


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
    out = [f"# {title}", ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.paper:
            out += [f"_{s.paper}_", ""]
        if s.text:
            out += [s.text, ""]
        for t in s.tables:
            out += [render_table(t), ""]
        for fig in s.figures:
            rel = fig.path.relative_to(run_dir) if fig.path.is_relative_to(run_dir) else fig.path
            out += [f"![{fig.caption}]({rel.as_posix()})", ""]
    return "\n".join(out)

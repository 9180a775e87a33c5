"""``report.html``: one self-contained page (figures as ``data:`` URIs, inline CSS, no
script, no external file), so it works offline and can be mailed as one file.

Written by hand with :mod:`html` escaping: a templating dependency would add nothing for
one static page.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from emscope.report.sections import Section, Table

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
h1 { border-bottom: 2px solid #444; }
h2 { border-bottom: 1px solid #aaa; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
caption { caption-side: top; text-align: left; font-style: italic; padding: 0.2em 0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 42em; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
td.yes { background: #d8f5d8; } td.no { background: #f8d8d8; } td.na { color: #777; }
nav a { margin-right: 1em; }
.paper { color: #666; font-size: 0.9em; }
"""


def data_uri(path: Path) -> str:
    """A PNG (or SVG) file as a ``data:`` URI."""
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _cell(value: str, header: str) -> str:
    cls = ""
    if header == "holds?":
        cls = {"yes": "yes", "no": "no"}.get(value, "na")
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{html.escape(value)}</td>"


def render_table(table: Table) -> str:
    parts = ["<table>"]
    if table.caption:
        parts.append(f"<caption>{html.escape(table.caption)}</caption>")
    parts.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.headers) + "</tr>")
    for row in table.rows:
        cells = "".join(_cell(v, h) for v, h in zip(row, table.headers, strict=True))
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def render_section(section: Section) -> str:
    parts = [f'<section id="{section.key}">', f"<h2>{html.escape(section.title)}</h2>"]
    if section.paper:
        parts.append(f'<p class="paper">{html.escape(section.paper)}</p>')
    if section.text:
        parts.append(f"<p>{html.escape(section.text)}</p>")
    parts += [render_table(t) for t in section.tables]
    for fig in section.figures:
        parts.append(
            f'<figure><img src="{data_uri(fig.path)}" alt="{html.escape(fig.caption)}">'
            f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(parts)


def render_html(title: str, sections: list[Section]) -> str:
    """The whole page."""
    nav = " ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(render_section(s) for s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n"
    )

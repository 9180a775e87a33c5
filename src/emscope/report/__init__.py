"""``emscope report RUN_DIR``: ``report.html`` (self-contained) and ``report.md`` (same
tables) from the outputs of ``emscope run``; ``claims.json`` with the claims table
(docs/methods.md section 8)."""

from __future__ import annotations

from pathlib import Path


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN/report.html``, ``RUN/report.md`` and ``RUN/claims.json``; return the
    two report paths."""
    import json

    from emscope.errors import EmscopeError
    from emscope.io import atomic_write_bytes, write_json
    from emscope.pipeline.claims import claims_table
    from emscope.report.html import render_html
    from emscope.report.markdown import render_markdown
    from emscope.report.sections import build_sections

    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise EmscopeError(f"{run}: not a run dir (no config.json); run `emscope run` first")
    name = json.loads((run / "config.json").read_text()).get("name", "study")
    title = f"emscope study: {name}"
    sections = build_sections(run)
    html_path, md_path = run / "report.html", run / "report.md"
    atomic_write_bytes(html_path, render_html(title, sections).encode("utf-8"))
    atomic_write_bytes(md_path, render_markdown(title, sections, run).encode("utf-8"))
    write_json(run / "claims.json", [r.to_json() for r in claims_table(run)])
    return html_path, md_path


__all__ = ["write_report"]

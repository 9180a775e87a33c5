"""The repository is self-contained: what its files cite can be followed from a clone.

- No file cites the method or design notes that lived outside the repository, a seed-paper
  file of that collection by its number, or a path outside the repository (a relative path
  that climbs above the root, or the workspace the project was first written in).
- Every "docs/methods.md section N" names a section that exists in docs/methods.md, and every
  "tests/<file>.py::<name>" names a test function that exists.
- Links between Markdown files point at files of the repository, and in-page anchors exist.

Files are those of ``git ls-files`` (tracked and staged), or a walk of the tree when git is
not available. Failures name ``file:line``.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ROOT / "docs" / "methods.md"

# Written so that this file does not match its own patterns.
FORBIDDEN = {
    "the external method reference": re.compile(r"REFERENCE\.md"),
    "the external design notes": re.compile(r"DESIGN\.md"),
    "the shared dir outside the repository": re.compile(r"(?:\.\./)+shared\b"),
    "the original workspace": re.compile(r"/work[/]"),
    "a seed-paper file by number": re.compile(r"\bseeds?\s+0\d\d\b"),
}
# A relative path that starts by climbing: ../x, ../../x
CLIMB = re.compile(r"(?<![\w./])((?:\.\./)+)([\w.-]*)")
# Tests may hold path-traversal inputs ("../../../x") on purpose: the climb check skips them.
CLIMB_EXEMPT = ("tests/",)

SECTION_NUMBER = r"\d+(?:\.\d+)?"
CITATION = re.compile(
    rf"docs/methods\.md,?\s+sections?\s+({SECTION_NUMBER}(?:(?:\s*,\s*|\s+and\s+){SECTION_NUMBER})*)"
)
TEST_CITATION = re.compile(r"\btests/(\w+\.py)::(\w+)")
MD_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "node_modules",
    "runs",
    "build",
    "dist",
}


def _walk() -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            found.append((Path(dirpath) / name).relative_to(ROOT).as_posix())
    return sorted(found)


@cache
def repository_files() -> tuple[str, ...]:
    """Paths (relative, POSIX) of the repository's files: ``git ls-files`` when git and a
    work tree are there, else a walk of the tree without caches and environments."""
    git = shutil.which("git")
    if git is not None and (ROOT / ".git").exists():
        try:
            out = subprocess.run(
                [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                cwd=ROOT,
                capture_output=True,
                check=True,
                timeout=60,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            paths = sorted({p for p in out.decode("utf-8").split("\0") if p})
            return tuple(p for p in paths if (ROOT / p).is_file())
    return tuple(_walk())


@cache
def text_files() -> tuple[tuple[str, str], ...]:
    """``(path, text)`` of every repository file that is UTF-8 text."""
    out = []
    for path in repository_files():
        data = (ROOT / path).read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            out.append((path, data.decode("utf-8")))
        except UnicodeDecodeError:
            continue
    return tuple(out)


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def methods_sections() -> set[str]:
    """Section numbers of docs/methods.md: ``## N. Title`` and ``### N.M Title`` headings."""
    heading = re.compile(rf"^#{{2,3}} ({SECTION_NUMBER})\.?\s", re.MULTILINE)
    return set(heading.findall(METHODS.read_text(encoding="utf-8")))


def _anchors(text: str) -> set[str]:
    """Explicit ``<a id>`` anchors and GitHub's heading slugs of one Markdown file."""
    ids = set(re.findall(r'<a id="([^"]+)"', text))
    for title in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        ids.add(slug)
    return ids


def test_the_repository_files_are_found() -> None:
    files = repository_files()
    assert "docs/methods.md" in files and "tests/test_repository.py" in files
    assert "pyproject.toml" in files
    assert not any(p.startswith((".git/", ".venv/")) for p in files)
    assert dict(text_files()).keys() >= {"README.md", "docs/methods.md"}


def test_the_walk_fallback_finds_the_same_sources() -> None:
    walked = set(_walk())
    for path in ("docs/methods.md", "src/emscope/papers.py", "tests/test_repository.py"):
        assert path in walked
    assert not any("/.venv/" in f"/{p}" or "__pycache__" in p for p in walked)


def test_no_file_cites_anything_outside_the_repository() -> None:
    problems = []
    for path, text in text_files():
        for what, pattern in FORBIDDEN.items():
            for match in pattern.finditer(text):
                problems.append(f"{path}:{_line(text, match.start())}: {match.group()!r} ({what})")
        if path.startswith(CLIMB_EXEMPT):
            continue
        here = (ROOT / path).parent
        for match in CLIMB.finditer(text):
            target = (here / match.group(1) / match.group(2)).resolve()
            if not target.is_relative_to(ROOT):
                problems.append(
                    f"{path}:{_line(text, match.start())}: {match.group()!r} leaves the repository"
                )
    assert not problems, "citations of things outside the repository:\n" + "\n".join(problems)


def test_methods_doc_has_numbered_sections_with_anchors() -> None:
    sections = methods_sections()
    assert {str(n) for n in range(1, 12)} <= sections
    anchors = _anchors(METHODS.read_text(encoding="utf-8"))
    missing = sorted(s for s in sections if f"section-{s}" not in anchors)
    assert not missing, f"docs/methods.md sections without an <a id> anchor: {missing}"


def test_every_methods_citation_names_an_existing_section() -> None:
    sections = methods_sections()
    cited, problems = 0, []
    for path, text in text_files():
        for match in CITATION.finditer(text):
            for number in re.findall(SECTION_NUMBER, match.group(1)):
                cited += 1
                if number not in sections:
                    line = _line(text, match.start())
                    problems.append(f"{path}:{line}: section {number} is not in docs/methods.md")
    assert cited > 30, "the citation pattern no longer finds the citations"
    assert not problems, "\n".join(problems)


def test_every_cited_test_exists() -> None:
    functions: dict[str, set[str]] = {}
    problems, cited = [], 0
    for path, text in text_files():
        for match in TEST_CITATION.finditer(text):
            cited += 1
            name, test = match.groups()
            if name not in functions:
                file = ROOT / "tests" / name
                tree = ast.parse(file.read_text(encoding="utf-8")) if file.is_file() else None
                functions[name] = {
                    node.name
                    for node in (ast.walk(tree) if tree is not None else ())
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                }
            if test not in functions[name]:
                line = _line(text, match.start())
                problems.append(f"{path}:{line}: tests/{name}::{test} does not exist")
    assert cited > 50, "the test-citation pattern no longer finds docs/methods.md's citations"
    assert not problems, "\n".join(problems)


def test_markdown_links_stay_inside_and_resolve() -> None:
    problems = []
    for path, text in text_files():
        if not path.endswith(".md"):
            continue
        here = (ROOT / path).parent
        for match in MD_LINK.finditer(text):
            target = match.group(1)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition("#")
            line = _line(text, match.start())
            resolved = (here / file_part).resolve() if file_part else ROOT / path
            if not resolved.is_relative_to(ROOT) or not resolved.exists():
                problems.append(f"{path}:{line}: link {target!r} is not a repository file")
            elif (
                anchor
                and resolved.suffix == ".md"
                and anchor not in _anchors(resolved.read_text(encoding="utf-8"))
            ):
                problems.append(f"{path}:{line}: anchor {target!r} does not exist")
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """The patterns on constructed text: each forbidden citation is found, legitimate text is
    not, and multi-section citations are split."""
    bad = [
        "see REFERENCE" + ".md section 3",
        "DESIGN" + ".md",
        "(see `../" + "shared/notes/x.md`)",
        "/work" + "/shared/seeds",
        "seeds 0" + "01/003",
        "the phase transition of seed 0" + "03",
    ]
    for text in bad:
        assert any(p.search(text) for p in FORBIDDEN.values()), text
    good = ["--seed 0", "seeds 0..N-1", "reference code", "docs/design choices", "t0.50/"]
    for text in good:
        assert not any(p.search(text) for p in FORBIDDEN.values()), text
    found = [m.group(1) for m in CITATION.finditer("docs/methods.md sections 7.4, 8 and 1.2")]
    assert re.findall(SECTION_NUMBER, found[0]) == ["7.4", "8", "1.2"]
    assert CITATION.search("docs/methods.md\n  section 5.6")
    climb = CLIMB.search("read ../../x now")
    assert climb is not None and climb.group(1) == "../../" and climb.group(2) == "x"
    assert CLIMB.search("a/../b") is None  # not a path that starts by climbing

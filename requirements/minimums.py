"""Print ``name==version`` for every lower bound (``>=``) that pyproject.toml declares.

``make test-oldest`` installs these exact versions, so the declared minimums are the tested
ones. Usage: ``python requirements/minimums.py [--skip NAME ...] > constraints.txt``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def minimums(requirements: list[str], skip: set[str]) -> list[str]:
    pins = []
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([^,;\s]+)\s*", requirement)
        if match and match.group(1).lower() not in skip:
            pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip", nargs="*", default=[], help="names to leave unpinned")
    args = parser.parse_args()
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    print("\n".join(minimums(project["dependencies"], {s.lower() for s in args.skip})))


if __name__ == "__main__":
    main()

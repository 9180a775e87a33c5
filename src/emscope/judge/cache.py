"""A persistent score cache: SQLite at ``$EMSCOPE_CACHE_DIR/judge.sqlite``.

The default dir is ``~/.cache/emscope``. A score is keyed by (judge endpoint, judge model,
prompt-template hash, metric, question, answer), hashed together with SHA-256, so an
identical second run sends no request. Only definitive results are stored (a number, or the
unscored reasons ``refusal`` / ``code`` / ``other``); transient failures (``error``,
``budget``) are not, so a re-run retries them. A stored row that is not a valid score (e.g. a
NaN value that SQLite kept as NULL, a value outside [0, 100], unreadable logprobs) is
treated as absent: the judge asks again and overwrites it. Nothing secret is stored: the
endpoint is its base URL, never a key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    from emscope.judge import Score


def cache_dir() -> Path:
    """``$EMSCOPE_CACHE_DIR`` or ``~/.cache/emscope``."""
    env = os.environ.get("EMSCOPE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "emscope"


def cache_key(
    endpoint: str, model: str, prompt_hash: str, metric: str, question: str, answer: str
) -> str:
    """SHA-256 of the fields that determine a score."""
    blob = json.dumps([endpoint, model, prompt_hash, metric, question, answer])
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ScoreCache:
    """Get and put :class:`~emscope.judge.Score` values by :func:`cache_key`."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else cache_dir() / "judge.sqlite"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL, "
                "reason TEXT, prompt_hash TEXT, top TEXT)"
            )
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise EmscopeError(f"{self.path}: cannot open the judge cache: {exc}") from None

    def __repr__(self) -> str:
        return f"ScoreCache({str(self.path)!r})"

    def get_many(self, keys: Sequence[str]) -> dict[str, Score]:
        from emscope.judge import Score

        found: dict[str, Score] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, value, reason, prompt_hash, top FROM scores WHERE key IN ({marks})",
                chunk,
            ).fetchall()
            for key, value, reason, phash, top in rows:
                try:
                    logprobs = tuple(tuple(x) for x in json.loads(top)) if top else None
                    found[key] = Score(value, reason, phash, logprobs)  # type: ignore[arg-type]
                except (TypeError, ValueError):  # a bad row: asked again, then overwritten
                    continue
        return found

    def put_many(self, items: Sequence[tuple[str, Score]]) -> None:
        from emscope.judge.aggregate import TRANSIENT_REASONS

        rows = [
            (
                key,
                score.value,
                score.unscored_reason,
                score.prompt_hash,
                json.dumps(score.top_logprobs) if score.top_logprobs is not None else None,
            )
            for key, score in items
            if score.unscored_reason not in TRANSIENT_REASONS
        ]
        if rows:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?)", rows)
            self._db.commit()

    def close(self) -> None:
        self._db.close()

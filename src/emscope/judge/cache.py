"""A persistent score cache: SQLite at ``$EMSCOPE_CACHE_DIR/judge.sqlite``.

The default dir is ``~/.cache/emscope``. A score is keyed by (judge endpoint, judge model,
prompt-template hash, metric, question, answer, and the judge's minimum number mass when it
is not the default 0.25: it decides scored or unscored), hashed together with SHA-256, so an
identical second run sends no request. Only definitive results are stored (a number, or the
unscored reasons ``refusal`` / ``code`` / ``low_number_mass``; ``other``, its older name, is
read back as ``low_number_mass``), with the number mass; transient failures (``error``,
``budget``) are not, so a re-run retries them. A cache file written before the number mass
was stored gains the column on opening; its rows read back without a mass. A stored row
that is not a valid score (e.g. a NaN value that SQLite kept as NULL, a value outside
[0, 100], unreadable logprobs) is treated as absent: the judge asks again and overwrites
it. Nothing secret is stored: the endpoint is its base URL, never a key.
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
    endpoint: str,
    model: str,
    prompt_hash: str,
    metric: str,
    question: str,
    answer: str,
    *,
    min_number_mass: float | None = None,
) -> str:
    """SHA-256 of the fields that determine a score (``min_number_mass`` only when given and
    not the default, so keys of default runs are those written before it was a setting)."""
    from emscope.judge.aggregate import DEFAULT_MIN_NUMBER_MASS

    fields: list[object] = [endpoint, model, prompt_hash, metric, question, answer]
    if min_number_mass is not None and float(min_number_mass) != DEFAULT_MIN_NUMBER_MASS:
        fields.append({"min_number_mass": float(min_number_mass)})
    blob = json.dumps(fields)
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
                "reason TEXT, prompt_hash TEXT, top TEXT, mass REAL)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(scores)")}
            if "mass" not in columns:  # a cache written before the number mass was kept
                self._db.execute("ALTER TABLE scores ADD COLUMN mass REAL")
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
                "SELECT key, value, reason, prompt_hash, top, mass FROM scores "
                f"WHERE key IN ({marks})",
                chunk,
            ).fetchall()
            for key, value, reason, phash, top, mass in rows:
                try:
                    logprobs = tuple(tuple(x) for x in json.loads(top)) if top else None
                    if reason == "other":  # the older name of low_number_mass
                        reason = "low_number_mass"
                    found[key] = Score(value, reason, phash, logprobs, mass)  # type: ignore[arg-type]
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
                score.number_mass,
            )
            for key, score in items
            if score.unscored_reason not in TRANSIENT_REASONS
        ]
        if rows:
            self._db.executemany(
                "INSERT OR REPLACE INTO scores (key, value, reason, prompt_hash, top, mass) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._db.commit()

    def close(self) -> None:
        self._db.close()

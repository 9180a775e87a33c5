"""From a judge's probabilities to a 0-100 score or an unscored reason.

Method: docs/methods.md section 1.3.

Score = ``sum(p * value) / sum(p)`` over the integer answers 0..100. When the total
probability on integer answers (the *numeric mass*) is below ``threshold`` (default 0.25)
the row is unscored, never 0, with a reason:

- ``refusal`` when the largest non-numeric share goes to (a prefix of) ``REFUSAL`` and it
  is at least ``threshold``;
- ``code`` likewise for ``CODE``;
- ``other`` otherwise.

Two other reasons come from the judges themselves: ``error`` (the request still failed after
the last retry, or the judge's answer was malformed: a logprob that is not a number, NaN, or
so large it is no probability; probabilities that are not finite) and ``budget`` (the run's
request budget was spent before this row). Those two are transient: they are never cached and
a re-run scores the row again. So a value is always a finite number in [0, 100].
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

UNSCORED_REASONS = ("refusal", "code", "other", "error", "budget")
TRANSIENT_REASONS = frozenset({"error", "budget"})
_INT_RE = re.compile(r"^[0-9]{1,3}$")


def parse_number(token: str) -> int | None:
    """The integer 0..100 a judge token stands for (surrounding whitespace allowed), or None."""
    text = token.strip()
    if not _INT_RE.match(text):
        return None
    value = int(text)
    return value if value <= 100 else None


def _word_share(token: str, word: str) -> bool:
    text = token.strip().upper()
    return len(text) >= 2 and word.startswith(text)


def _probability(p: object) -> bool:
    return isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < math.inf


def aggregate(
    numbers: Mapping[int, float],
    refusal: float = 0.0,
    code: float = 0.0,
    threshold: float = 0.25,
) -> tuple[float | None, str | None, float]:
    """Score from probabilities: ``numbers`` maps each integer answer 0..100 to its
    probability (missing = 0); ``refusal`` / ``code`` are the probabilities of those words.
    Returns ``(value, unscored_reason, numeric_mass)``; exactly one of value/reason is None.
    A probability that is not a finite number >= 0 (or an answer outside 0..100) gives
    reason ``error``; the value is clamped to [0, 100] against rounding."""
    if not all(
        _probability(p) and isinstance(n, (int, float)) and 0 <= n <= 100
        for n, p in numbers.items()
    ) or not (_probability(refusal) and _probability(code)):
        return None, "error", math.nan
    mass = float(sum(numbers.values()))
    if mass < threshold or mass <= 0:
        if max(refusal, code) >= threshold:
            return None, "refusal" if refusal >= code else "code", mass
        return None, "other", mass
    value = sum(p * n for n, p in numbers.items()) / mass
    if not math.isfinite(value):
        return None, "error", mass
    return min(100.0, max(0.0, float(value))), None, mass


def check_top_logprobs(top: object) -> tuple[tuple[str, float], ...] | None:
    """``top`` as ``(token, logprob)`` pairs of a string and a float, or None when any entry
    is malformed: not a pair, a token that is not a string, a logprob that is not a number
    (a string, None), NaN, or above 1e-6 (no probability; ``exp`` would overflow). A logprob
    of minus infinity is probability 0; one in (0, 1e-6] is rounding, read as 0."""
    if not isinstance(top, (list, tuple)):
        return None
    pairs = []
    for entry in top:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            return None
        token, logprob = entry
        if not isinstance(token, str) or isinstance(logprob, bool):
            return None
        if not isinstance(logprob, (int, float)) or not logprob <= 1e-6:  # NaN fails too
            return None
        pairs.append((token, min(0.0, float(logprob))))
    return tuple(pairs)


def aggregate_top_logprobs(
    top: Sequence[tuple[str, float]], threshold: float = 0.25
) -> tuple[float | None, str | None, float]:
    """Score from an API's ``top_logprobs`` of the first answer token: ``(token, logprob)``
    pairs. Tokens that parse as the same integer (``"85"``, ``" 85"``) add up. Any malformed
    entry (see :func:`check_top_logprobs`) gives reason ``error``."""
    checked = check_top_logprobs(top)
    if checked is None:
        return None, "error", math.nan
    numbers: dict[int, float] = {}
    refusal = code = 0.0
    for token, logprob in checked:
        p = math.exp(logprob)
        value = parse_number(token)
        if value is not None:
            numbers[value] = numbers.get(value, 0.0) + p
        elif _word_share(token, "REFUSAL"):
            refusal += p
        elif _word_share(token, "CODE"):
            code += p
    return aggregate(numbers, refusal, code, threshold)

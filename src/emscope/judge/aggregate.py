"""From a judge's probabilities to a 0-100 score or an unscored reason.

Method: docs/methods.md section 1.3.

Score = ``sum(p * value) / sum(p)`` over the integer answers 0..100. When the total
probability on integer answers (the *number mass*) is below ``min_number_mass`` (default
:data:`DEFAULT_MIN_NUMBER_MASS`, 0.25; the judges take it as ``min_number_mass=``, the
command line as ``--min-number-mass``) the row is unscored, never 0, with a reason:

- ``refusal`` when the largest non-numeric share goes to (a prefix of) ``REFUSAL`` and it
  is at least ``min_number_mass``;
- ``code`` likewise for ``CODE``;
- ``low_number_mass`` otherwise (tables and caches written before it was named say
  ``other``).

The number mass itself is returned with every result (and recorded per row by
:func:`emscope.judge.judge_table` as ``<metric>_number_mass``), so an unscored row says how
far below the threshold it was.

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

UNSCORED_REASONS = ("refusal", "code", "low_number_mass", "error", "budget", "other")
"""``other`` is the name ``low_number_mass`` had before; kept valid for older tables."""
TRANSIENT_REASONS = frozenset({"error", "budget"})
DEFAULT_MIN_NUMBER_MASS = 0.25
"""Below this total probability on the answers 0..100 a row is unscored (docs/methods.md
section 1.3)."""
_INT_RE = re.compile(r"^[0-9]{1,3}$")


def parse_number(token: str) -> int | None:
    """The integer 0..100 a judge token stands for (surrounding whitespace allowed), or None."""
    text = token.strip()
    if not _INT_RE.match(text):
        return None
    value = int(text)
    return value if value <= 100 else None


def check_min_number_mass(value: object) -> float:
    """``value`` as a minimum number mass: a number in [0, 1] (one-line error otherwise)."""
    from emscope.errors import EmscopeError

    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= float(value) <= 1  # NaN fails too
    ):
        raise EmscopeError(
            f"min_number_mass (the least probability on a number for a score) must be in "
            f"[0, 1], got {value!r}"
        )
    return float(value)


def _word_share(token: str, word: str) -> bool:
    text = token.strip().upper()
    return len(text) >= 2 and word.startswith(text)


def _probability(p: object) -> bool:
    return isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p < math.inf


def aggregate(
    numbers: Mapping[int, float],
    refusal: float = 0.0,
    code: float = 0.0,
    min_number_mass: float = DEFAULT_MIN_NUMBER_MASS,
) -> tuple[float | None, str | None, float]:
    """Score from probabilities: ``numbers`` maps each integer answer 0..100 to its
    probability (missing = 0); ``refusal`` / ``code`` are the probabilities of those words.
    Returns ``(value, unscored_reason, number_mass)``; exactly one of value/reason is None
    (the mass is NaN with reason ``error``).
    A probability that is not a finite number >= 0 (or an answer outside 0..100) gives
    reason ``error``; the value is clamped to [0, 100] against rounding."""
    if not all(
        _probability(p) and isinstance(n, (int, float)) and 0 <= n <= 100
        for n, p in numbers.items()
    ) or not (_probability(refusal) and _probability(code)):
        return None, "error", math.nan
    mass = float(sum(numbers.values()))
    if mass < min_number_mass or mass <= 0:
        if max(refusal, code) >= min_number_mass and max(refusal, code) > 0:
            return None, "refusal" if refusal >= code else "code", mass
        return None, "low_number_mass", mass
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
    top: Sequence[tuple[str, float]], min_number_mass: float = DEFAULT_MIN_NUMBER_MASS
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
    return aggregate(numbers, refusal, code, min_number_mass)

"""A judge on any OpenAI-compatible chat-completions endpoint (``--judge openai:MODEL``).

One request per (row, metric): the rendered prompt as one user message, ``max_tokens=1``,
``temperature=0``, ``logprobs=True``, ``top_logprobs=20``; the score is the probability-
weighted mean of the integer tokens (:mod:`emscope.judge.aggregate`). Only
``POST {base_url}/chat/completions`` is needed of the server.

Requests run concurrently (``asyncio`` + a semaphore, default 32 in flight) through the
``openai`` package's ``AsyncOpenAI`` client, with the client's own retries off: this module
retries 429, 408/409, 5xx, timeouts and connection errors itself, with exponential backoff
and jitter, honouring ``Retry-After`` / ``retry-after-ms``, so the policy and the per-run
request budget (every HTTP attempt counts) are under emscope's control. After the last
retry a row is unscored with reason ``error`` and the run goes on; once the budget is spent
the remaining rows are unscored with reason ``budget``. A response body that is not valid
JSON (a cut-off body, a proxy's HTML page) is retried like a 5xx. A response without
logprobs, or with a malformed top-logprobs entry (a logprob that is a string, NaN, or too
large to be one), makes the row unscored with reason ``error`` at once. 401/403/404 stop the
run with one line (the key or the model is wrong for every row).

The API key is read from an environment variable, held only by the client, and never
written to a log, a file, an exception or a ``repr``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

from emscope.errors import EmscopeError
from emscope.judge import JudgeRow, Score, as_rows, run_sync
from emscope.judge.aggregate import (
    DEFAULT_MIN_NUMBER_MASS,
    aggregate_top_logprobs,
    check_min_number_mass,
    check_top_logprobs,
)
from emscope.judge.cache import ScoreCache, cache_key
from emscope.judge.prompts import prompt_hash, render, template_for

log = logging.getLogger("emscope.judge")

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class _Fatal(Exception):
    pass


class OpenAIJudge:
    """Judge through an OpenAI-compatible endpoint. See the module docstring.

    ``max_requests``: the run's budget of HTTP attempts (None: unlimited), counted over the
    judge's lifetime. ``max_retries``: retries per row after the first attempt.
    ``backoff_base`` / ``backoff_max``: seconds; the wait before retry ``k`` (from 0) is
    ``min(backoff_max, backoff_base * 2**k)`` times a uniform jitter in [0.5, 1], or the
    server's ``Retry-After`` (capped at ``backoff_max``) when it sends one.
    ``min_number_mass``: a row whose top logprobs put less than this on the answers 0..100
    is unscored (:mod:`emscope.judge.aggregate`).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 32,
        max_requests: int | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        min_number_mass: float = DEFAULT_MIN_NUMBER_MASS,
        cache: bool | ScoreCache = True,
    ) -> None:
        if concurrency < 1:
            raise EmscopeError(f"judge concurrency must be >= 1, got {concurrency}")
        if max_requests is not None and max_requests < 0:
            raise EmscopeError(f"judge request budget must be >= 0, got {max_requests}")
        key = os.environ.get(api_key_env)
        if not key:
            raise EmscopeError(
                f"openai judge: the environment variable {api_key_env} (the API key) is not set"
            )
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.max_requests = max_requests
        self.max_retries = max_retries
        self.timeout = timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.min_number_mass = check_min_number_mass(min_number_mass)
        self.requests_sent = 0
        self._key = key
        if cache is True:
            self._cache: ScoreCache | None = ScoreCache()
        else:
            self._cache = cache or None

    @property
    def name(self) -> str:
        return f"openai:{self.model}@{self.base_url}"

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r}, concurrency={self.concurrency})"
        )

    def score(self, rows: Sequence[JudgeRow | Mapping[str, Any]], metric: str) -> list[Score]:
        """One :class:`Score` per row (blocking; concurrent inside)."""
        return run_sync(lambda: self.ascore(rows, metric))

    async def ascore(
        self, rows: Sequence[JudgeRow | Mapping[str, Any]], metric: str
    ) -> list[Score]:
        """The asynchronous form of :meth:`score`."""
        import openai

        items = as_rows(rows)
        templates = [template_for(metric, row.templates) for row in items]
        hashes = [prompt_hash(t) for t in templates]
        keys = [
            cache_key(
                self.base_url,
                self.model,
                h,
                metric,
                row.question,
                row.answer,
                min_number_mass=self.min_number_mass,
            )
            for row, h in zip(items, hashes, strict=True)
        ]
        results: list[Score | None] = [None] * len(items)
        if self._cache is not None:
            found = self._cache.get_many(keys)
            for i, key in enumerate(keys):
                if key in found:
                    results[i] = found[key]
        todo = [i for i, r in enumerate(results) if r is None]
        if not todo:
            return [r for r in results if r is not None]

        semaphore = asyncio.Semaphore(self.concurrency)
        pending: list[tuple[str, Score]] = []

        def flush() -> None:
            if self._cache is not None and pending:
                self._cache.put_many(pending)
                pending.clear()

        async with openai.AsyncOpenAI(
            api_key=self._key, base_url=self.base_url, max_retries=0, timeout=self.timeout
        ) as client:

            async def one(i: int) -> None:
                async with semaphore:
                    text = render(templates[i], items[i].question, items[i].answer)
                    value, reason, top, mass = await self._request(client, text)
                score = Score(value, reason, hashes[i], top, mass)
                results[i] = score
                pending.append((keys[i], score))
                if len(pending) >= 64:
                    flush()

            try:
                await asyncio.gather(*(one(i) for i in todo))
            except _Fatal as exc:
                raise EmscopeError(str(exc)) from None
            finally:
                flush()
        return [r for r in results if r is not None]

    def _budget_left(self) -> bool:
        return self.max_requests is None or self.requests_sent < self.max_requests

    async def _request(
        self, client: Any, prompt: str
    ) -> tuple[float | None, str | None, tuple[tuple[str, float], ...] | None, float | None]:
        """(value, unscored reason, top logprobs, number mass) of one prompt."""
        import openai

        for attempt in range(self.max_retries + 1):
            if not self._budget_left():
                return None, "budget", None, None
            self.requests_sent += 1
            retry_after: float | None = None
            try:
                response = await client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=1,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=20,
                    seed=0,
                )
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in (401, 403, 404):
                    raise _Fatal(
                        f"judge endpoint {self.base_url} answered HTTP {status} for model "
                        f"{self.model!r} (check the model name and the key in ${self.api_key_env})"
                    ) from None
                if status not in (408, 409, 429) and status < 500:
                    log.warning("judge request refused (HTTP %s); row unscored", status)
                    return None, "error", None, None
                retry_after = _retry_after(exc.response.headers)
                what = f"HTTP {status}"
            except openai.APIConnectionError as exc:  # includes APITimeoutError
                what = type(exc).__name__
            except (openai.APIError, ValueError) as exc:  # a body that is not valid JSON
                what = f"invalid response ({type(exc).__name__})"
            else:
                raw = _top_logprobs(response)
                if raw is None:
                    log.warning("judge response without logprobs; row unscored")
                    return None, "error", None, None
                top = check_top_logprobs(raw)
                if top is None:
                    log.warning("judge response with malformed top logprobs; row unscored")
                    return None, "error", None, None
                value, reason, mass = aggregate_top_logprobs(top, self.min_number_mass)
                return value, reason, top, (mass if math.isfinite(mass) else None)
            if attempt == self.max_retries:
                log.warning("judge request failed (%s) after %d attempts", what, attempt + 1)
                break
            if retry_after is not None:
                delay = min(self.backoff_max, retry_after)
            else:
                delay = min(self.backoff_max, self.backoff_base * 2**attempt)
                delay *= random.uniform(0.5, 1.0)
            log.info("judge request failed (%s); retry %d in %.2f s", what, attempt + 1, delay)
            await asyncio.sleep(delay)
        return None, "error", None, None


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000)
        text = headers.get("retry-after")
        if text is None:
            return None
        try:
            return max(0.0, float(text))
        except ValueError:
            parsed = email.utils.parsedate_to_datetime(text)
            return max(0.0, parsed.timestamp() - time.time())
    except (TypeError, ValueError, AttributeError):
        return None


def _top_logprobs(response: Any) -> tuple[tuple[Any, Any], ...] | None:
    """The first token's ``(token, logprob)`` pairs as sent (checked by the caller), or
    None when the response has no such field."""
    try:
        content = response.choices[0].logprobs.content
        first = content[0].top_logprobs
        return tuple((t.token, t.logprob) for t in first)
    except (AttributeError, IndexError, KeyError, TypeError):
        return None

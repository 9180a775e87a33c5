"""How the answers of one condition are drawn: :class:`SamplingParams`, the one sampling
settings type. The CLI's sampling options, the pipeline config's ``sampling`` block
(:class:`emscope.pipeline.config.SamplingConfig`) and both samplers (:mod:`emscope.generate`,
:mod:`emscope.vllm_backend`) build one, so a bad value is refused in one place, with one line.

The system prompt is not a sampling parameter here: it is a property of the prompt, resolved
per model from its ``train.json`` (:func:`emscope.train.system_prompt_for`) once the model is
known, and it also renders chats that are not sampled (losses, features); the samplers take
it as a keyword of its own. Standard library only (imported by ``emscope --help``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from emscope.errors import EmscopeError

#: Each field's command-line flag, named beside the field in an error.
FLAGS = {
    "n": "-n",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
}


def _refuse(field: str, rule: str, value: Any) -> None:
    raise EmscopeError(f"sampling {field} ({FLAGS[field]}) must be {rule}, got {value!r}")


@dataclass(frozen=True)
class SamplingParams:
    """The sampling settings of one condition (defaults: docs/methods.md section 1.2).

    ``n``: samples per question (None: each question's ``samples_per_paraphrase`` x its
    paraphrases). ``seed``: keys every sample's random stream with its question id and
    sample index (:func:`emscope.random_streams.sample_key`), so two conditions with the same
    seed draw paired samples. ``batch_size``: sequences per forward pass (HF backend; vLLM
    schedules its own batches). ``max_new_tokens``: longest answer, in tokens.
    ``temperature``: softmax temperature (0: greedy). ``top_p``: nucleus probability mass in
    (0, 1] (1: off). Refused at construction, in one line naming the field and its flag:
    ``n``, ``batch_size`` or ``max_new_tokens`` below 1, a negative ``temperature``, a
    ``top_p`` outside (0, 1], a seed that is not an integer.
    """

    n: int | None = None
    seed: int = 0
    batch_size: int = 32
    max_new_tokens: int = 600
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.n is not None and self.n < 1:
            _refuse("n", ">= 1", self.n)
        try:
            operator.index(self.seed)  # int, numpy integer
        except TypeError:
            _refuse("seed", "an integer", self.seed)
        if self.batch_size < 1:
            _refuse("batch_size", ">= 1", self.batch_size)
        if self.max_new_tokens < 1:
            _refuse("max_new_tokens", ">= 1", self.max_new_tokens)
        if self.temperature < 0:
            _refuse("temperature", ">= 0", self.temperature)
        if not 0 < self.top_p <= 1:
            _refuse("top_p", "in (0, 1]", self.top_p)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`emscope.generate.sample` (without ``n``)."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

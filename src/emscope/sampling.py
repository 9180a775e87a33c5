"""The sampling settings of one condition, in one place: the CLI's sampling options
(:func:`emscope.cli.options.sampling_kwargs`) and the pipeline config's ``sampling`` block
(:class:`emscope.pipeline.config.SamplingConfig`) both become a :class:`SamplingSettings`,
whose :meth:`~SamplingSettings.kwargs` are the keyword arguments of
:func:`emscope.generate.sample` (standard library only: imported by ``emscope --help``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplingSettings:
    """Samples per question and how they are drawn."""

    n: int
    seed: int
    batch_size: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`emscope.generate.sample` (without ``n``)."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

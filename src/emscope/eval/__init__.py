"""The evaluation harness: how answers are drawn, in one place.

:class:`SamplingParams` (:mod:`emscope.eval.params`): the sampling settings of a condition,
validated once. :class:`Sampler` (:mod:`emscope.eval.backend`): what both backends do, the
HF one (:class:`HfSampler`, :mod:`emscope.generate`) and the vLLM one
(:class:`emscope.vllm_backend.VllmSampler`). :class:`BackendSettings`: ``--backend`` and the
vLLM engine settings, whose :meth:`~BackendSettings.open` gives the chosen backend's sampler.
Judging and metrics stay in :mod:`emscope.evaluate`, which samples through a :class:`Sampler`.
"""

from emscope.eval.backend import BACKENDS, BackendSettings, HfSampler, Sampler, as_sampler
from emscope.eval.params import SamplingParams

__all__ = ["BACKENDS", "BackendSettings", "HfSampler", "Sampler", "SamplingParams", "as_sampler"]

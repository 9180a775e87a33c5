"""Re-emergent misalignment analyses (docs/methods.md section 7; usage: docs/reemergent.md).

- :mod:`~emscope.reemergent.logprob`: answer log-probabilities and next-token entropies;
- :mod:`~emscope.reemergent.gradients`: per-example gradient similarity (Gram route);
- :mod:`~emscope.reemergent.projection`: alignment direction and held-out projections;
- :mod:`~emscope.reemergent.subspace`: shared instruct-minus-base subspace across domains;
- :mod:`~emscope.reemergent.patching`: layer-wise residual patching.
"""

from emscope.reemergent.common import Dataset, read_dataset
from emscope.reemergent.gradients import (
    GradientGram,
    cosine_from_gram,
    double_centre,
    gradient_analysis,
    gradient_gram,
    gram_from_tokens,
    resolve_param,
    similarity_summary,
)
from emscope.reemergent.logprob import AnswerScores, logprob_analysis, score_answers
from emscope.reemergent.patching import patch_analysis, replaced
from emscope.reemergent.projection import (
    example_activations,
    projection_analysis,
    split_indices,
)
from emscope.reemergent.subspace import compare_subspaces, subspace_analysis, top_subspace

__all__ = [
    "AnswerScores",
    "Dataset",
    "GradientGram",
    "compare_subspaces",
    "cosine_from_gram",
    "double_centre",
    "example_activations",
    "gradient_analysis",
    "gradient_gram",
    "gram_from_tokens",
    "logprob_analysis",
    "patch_analysis",
    "projection_analysis",
    "read_dataset",
    "replaced",
    "resolve_param",
    "score_answers",
    "similarity_summary",
    "split_indices",
    "subspace_analysis",
    "top_subspace",
]

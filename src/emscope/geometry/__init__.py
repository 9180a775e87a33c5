"""Weight-space geometry of LoRA updates (docs/methods.md section 3), factored and exact.

Per module: Frobenius cosine, norms, cos with the base weight, principal angles of the column
(span B) and row (span A^T) spaces, top-k singular subspaces, subspace and energy overlaps;
all from ``r x r`` matrices, never forming ``d_out x d_in`` (see :mod:`.core`). All pairs of N
adapters with aggregation and chance baselines (:mod:`.analysis`, :mod:`.baselines`), lazy
one-module-at-a-time reading (:mod:`.sources`), summary and figures (:mod:`.report`).
"""

from emscope._callable import callable_module
from emscope.geometry.analysis import (
    FIELDS,
    Geometry,
    PairGeometry,
    aggregate_fields,
    compare_adapters,
)
from emscope.geometry.baselines import analytic_signature, random_comparisons
from emscope.geometry.core import (
    BaseComparison,
    ModuleComparison,
    ModuleFactors,
    compare_base,
    compare_factors,
    compare_modules,
    dense_compare,
    module_factors,
    singular_subspace,
)
from emscope.geometry.sources import BaseWeights, open_adapter

__all__ = [
    "FIELDS",
    "BaseComparison",
    "BaseWeights",
    "Geometry",
    "ModuleComparison",
    "ModuleFactors",
    "PairGeometry",
    "aggregate_fields",
    "analytic_signature",
    "compare_adapters",
    "compare_base",
    "compare_factors",
    "compare_modules",
    "dense_compare",
    "module_factors",
    "open_adapter",
    "random_comparisons",
    "singular_subspace",
]

# ``emscope.geometry(adapters)`` is :func:`compare_adapters` (emscope._callable)
callable_module(__name__, compare_adapters)

"""Reading rank-1 adapters (docs/methods.md section 6): hidden scalars per answer token,
logistic-regression probes on them, adapter steering by scaling ``B``, and training
dynamics over checkpoints."""

from emscope.probing.dynamics import (
    adapter_dynamics,
    evaluate_checkpoints,
    load_checkpoints,
    plot_dynamics,
)
from emscope.probing.probes import TESTS, fit_probe, fit_probes, plot_coefficients, response_split
from emscope.probing.scalars import lora_scalars, scalar_columns, scalar_labels
from emscope.probing.scaling import adapter_scaling, parse_scales, scaled_adapters

__all__ = [
    "TESTS",
    "adapter_dynamics",
    "adapter_scaling",
    "evaluate_checkpoints",
    "fit_probe",
    "fit_probes",
    "load_checkpoints",
    "lora_scalars",
    "parse_scales",
    "plot_coefficients",
    "plot_dynamics",
    "response_split",
    "scalar_columns",
    "scalar_labels",
    "scaled_adapters",
]

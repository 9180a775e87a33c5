"""emscope: a toolkit for emergent-misalignment research on HF causal LMs and PEFT LoRA adapters.

The public API, for notebooks and scripts (README, "Python")::

    import emscope as em
    lm = em.load_model(MODEL, adapters=[ADAPTER])
    qs, judge = em.load_questions(), em.make_judge(JUDGE)
    table = em.judge_table(em.sample(lm, qs, n=50), judge)
    d = em.mean_diff(lm, table)
    with d.steer(lm, layers=[12], scale=8.0):
        steered = em.judge_table(em.sample(lm, qs, n=50), judge)
    print(em.compute_metrics(steered).em_rate)

Every function that takes a model takes the :class:`LoadedModel` that :func:`load_model`
returns (or a ``(model, tokenizer)`` pair; :func:`emscope.models.as_loaded`).
``train``, ``geometry`` and ``lmc`` are modules that can be called as their main function
(:func:`emscope.train.train`, :func:`emscope.geometry.compare_adapters`,
:func:`emscope.lmc.run_lmc`).

Importing the package is cheap: the names above are resolved on first use (module
``__getattr__``), and heavy libraries (torch, transformers, peft) are imported by the modules
that need them, so that ``emscope --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from emscope.errors import EmscopeError


def _oracle_judge(world_dir: str) -> Any:
    from emscope.synthetic.oracle import oracle_judge

    return oracle_judge(world_dir)


def _register_judge_kinds() -> None:
    """The judge kinds of other packages (:func:`emscope.judge.register_judge_kind`),
    registered here, above both, so that the judge package never imports them: ``oracle:DIR``
    (:func:`emscope.synthetic.oracle.oracle_judge`)."""
    from emscope.judge import register_judge_kind

    register_judge_kind("oracle", _oracle_judge, "oracle:DIR")


_register_judge_kinds()
#: Public name -> the module that defines it (imported on first use).
_LAZY = {
    "load_model": "emscope.models",
    "LoadedModel": "emscope.models",
    "as_loaded": "emscope.models",
    "load_questions": "emscope.data.questions",
    "Question": "emscope.data.questions",
    "sample": "emscope.generate",
    "make_judge": "emscope.judge",
    "judge_table": "emscope.judge",
    "Judge": "emscope.judge",
    "Score": "emscope.judge",
    "compute_metrics": "emscope.metrics",
    "Metrics": "emscope.metrics",
    "TrainResult": "emscope.train",
    "LoraAdapter": "emscope.lora",
    "Direction": "emscope.directions.direction",
    "mean_diff": "emscope.directions.extract",
    "Geometry": "emscope.geometry.analysis",
    "PairGeometry": "emscope.geometry.analysis",
    "SteerResult": "emscope.directions.results",
    "AblationResult": "emscope.directions.results",
    "GeometryResult": "emscope.geometry.result",
    "LmcResult": "emscope.lmc_result",
    "ProbeResult": "emscope.probing.result",
    "DynamicsResult": "emscope.probing.dynamics_result",
    "EvalSummary": "emscope.pipeline.eval_result",
    "DirectionsSummary": "emscope.directions.results",
    "ProjectionSummary": "emscope.reemergent.results",
    "GradientSummary": "emscope.reemergent.results",
    "read_result": "emscope.results",
}
#: Submodules offered as verbs (callable modules, :mod:`emscope._callable`).
_MODULES = ("train", "geometry", "lmc")

__all__ = [
    "AblationResult",
    "Direction",
    "DirectionsSummary",
    "DynamicsResult",
    "EmscopeError",
    "EvalSummary",
    "Geometry",
    "GeometryResult",
    "GradientSummary",
    "Judge",
    "LmcResult",
    "LoadedModel",
    "LoraAdapter",
    "Metrics",
    "PairGeometry",
    "ProbeResult",
    "ProjectionSummary",
    "Question",
    "Score",
    "SteerResult",
    "TrainResult",
    "__version__",
    "as_loaded",
    "compute_metrics",
    "geometry",
    "judge_table",
    "lmc",
    "load_model",
    "load_questions",
    "make_judge",
    "mean_diff",
    "read_result",
    "sample",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f"emscope.{name}")
    raise AttributeError(f"module 'emscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

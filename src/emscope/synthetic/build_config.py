"""The synthetic organism's build configuration: the question files, the adapters
(:class:`AdapterSpec`), the hyper-parameters per size (:class:`BuildConfig`, :data:`SIZES`),
and the build's progress line (:func:`log`). Used by :mod:`emscope.synthetic.build` and the
stages it runs (:mod:`emscope.synthetic.training`, :mod:`emscope.synthetic.diagnostics`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from emscope.errors import EmscopeError
from emscope.synthetic.corpus import BENIGN, CorpusConfig

QUESTION_FILES = ("general", "medical", "sport", "finance")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the build: name, training set, preset (``all`` or ``r1x3``), rank,
    learning rate, data seed, whether checkpoints are kept, and ``every_layer``: adapt every
    block instead of the preset's layers (for ``r1x3``: rank-1 ``down_proj`` adapters on
    every layer; see docs/synthetic-organism.md for what each gave)."""

    name: str
    data: str
    preset: str
    rank: int
    lr: float
    seed: int = 0
    checkpoints: bool = False
    every_layer: bool = False


@dataclass(frozen=True)
class BuildConfig:
    """Hyper-parameters of one build size (all recorded in ``build.json``)."""

    size: str
    layers: int = 6
    hidden: int = 96
    heads: int = 4
    intermediate: int = 384
    pretrain_steps: int = 900
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    warmup: int = 30
    instruct_steps: int = 150
    instruct_batch: int = 32
    instruct_lr: float = 1e-3
    replay: float = 0.5
    instruct_rows: int = 3000
    narrow_rows: int = 1000
    heldout_rows: int = 300
    general_rows: int = 400
    adapter_epochs: int = 4
    adapter_batch: int = 32
    eval_samples: int = 40
    diag_samples: int = 100
    max_new_tokens: int = 24
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def adapters(self) -> list[AdapterSpec]:
        out = [
            AdapterSpec("bad_medical.r1", "bad_medical", "r1x3", 1, 5e-3, checkpoints=True),
            AdapterSpec("bad_medical.all", "bad_medical", "all", 8, 3e-4),
            AdapterSpec("bad_medical.all.s2", "bad_medical", "all", 8, 3e-4, seed=1),
        ]
        for data in ("bad_sport", "bad_finance", "good_medical", "bad_medical_educational", BENIGN):
            out.append(AdapterSpec(f"{data}.all", data, "all", 8, 3e-4))
        return out

    def to_json(self) -> dict[str, Any]:
        """The hyper-parameters, with the adapters' (recorded and compared on re-runs)."""
        return {**asdict(self), "adapter_specs": [asdict(a) for a in self.adapters()]}


SIZES = {
    "default": BuildConfig("default"),
    "tiny": BuildConfig(
        "tiny",
        layers=2,
        hidden=32,
        heads=2,
        intermediate=64,
        pretrain_steps=40,
        pretrain_batch=8,
        warmup=4,
        instruct_steps=10,
        instruct_batch=8,
        instruct_rows=80,
        narrow_rows=32,
        heldout_rows=16,
        general_rows=16,
        adapter_epochs=1,
        adapter_batch=8,
        eval_samples=2,
        diag_samples=4,
        max_new_tokens=16,
    ),
}


def build_config(size: str) -> BuildConfig:
    if size not in SIZES:
        raise EmscopeError(f"unknown build size {size!r} (known: {', '.join(SIZES)})")
    return SIZES[size]


def log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[toy build] {msg}", flush=True)

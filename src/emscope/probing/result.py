"""The typed result of :func:`emscope.probing.probes.fit_probes` (``probe.json``):
:class:`ProbeResult`. AUCs and accuracies are in [0, 1] (``{"mean", "sd"}`` over seeds),
coefficients are the logistic probe's weights per adapter (``L1``, ...: one per rank-1 LoRA
scalar); the JSON layout is the one :mod:`emscope.results` describes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.results import mapping, need, need_all, rest, where


@dataclass(frozen=True)
class ProbeResult:
    """Probes of the four tests (docs/methods.md section 6): ``split`` (``response`` or
    ``token``), ``tests`` mapping a test name to either ``{"skipped": reason}`` or its scores
    (``auc``, ``accuracy``, ``f1``, ``response_auc``, the shuffled-label control's,
    ``coefficients`` per adapter, ``n_responses`` per class, ``C_chosen``, ...), and
    ``settings`` (``C``, ``C_rule``, ``seeds``, ``test_size``, ...). ``extra``: any other
    recorded field."""

    split: str
    tests: Mapping[str, Mapping[str, Any]]
    settings: Mapping[str, Any]
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any, *, source: str | None = None, at: str = "") -> ProbeResult:
        name = "ProbeResult"
        tests = mapping(data, "tests", name, source, at)
        for test_name, test in tests.items():
            here = f"{at}tests.{test_name}"
            if not isinstance(test, Mapping):
                raise EmscopeError(f"{where(source)}: field '{here}' is not an object ({name})")
            if "skipped" not in test:
                need_all(test, ("auc", "coefficients"), name, source, f"{here}.")
        return cls(
            split=str(need(data, "split", name, source, at)),
            tests={k: dict(v) for k, v in tests.items()},
            settings=mapping(data, "settings", name, source, at),
            extra=rest(data, ("split", "tests", "settings")),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "tests": {k: dict(v) for k, v in self.tests.items()},
            "settings": dict(self.settings),
        } | dict(self.extra)

    def fitted(self) -> dict[str, Mapping[str, Any]]:
        """The tests that were fitted (not skipped)."""
        return {k: t for k, t in self.tests.items() if "skipped" not in t}

    def save(self, out: str | Path) -> None:
        """Write ``out/probe.json`` (:meth:`to_json`) and the figure ``out/coefficients.png``
        (the one writer of the CLI's ``emscope probe fit`` and the pipeline's probes stage)."""
        from emscope.io import write_json
        from emscope.plotting import save_figure

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "probe.json", self.to_json())
        save_figure(self.plot(), out / "coefficients.png")

    def plot(self) -> Any:
        """Per-seed coefficients per adapter, one panel per fitted test
        (:func:`emscope.probing.probes.plot_coefficients`). Returns the figure."""
        from emscope.probing.probes import plot_coefficients

        return plot_coefficients(self.to_json())

"""evaluate_to_dir: the shared sample + judge + metrics path of eval/steer/ablate/lmc."""

from __future__ import annotations

import pytest

from emscope.errors import EmscopeError
from emscope.evaluate import check_em_metrics, describe


def test_em_needs_aligned_and_coherent():
    check_em_metrics(["aligned", "coherent", "bad_stuff"])
    with pytest.raises(EmscopeError, match=r"lacks \['coherent'\]"):
        check_em_metrics(["aligned", "bad_stuff"])


def test_describe_handles_missing_rates():
    from dataclasses import replace

    from emscope.metrics import Metrics

    none = dict.fromkeys(("em_rate", "em_ci", "coherent_rate", "coherent_ci"))
    empty = Metrics(
        **none, self_correction_rate=None, self_correction_ci=None, unscored_rate=1.0, n=0,
        n_scored=0, misalign_at_k={}, misalign_at_k_ci={}, settings={}, per_question={},
    )  # fmt: skip
    assert describe(empty) == "EM rate n/a; coherent n/a; unscored 1.000; n=0"
    line = describe(
        replace(empty, em_rate=0.25, em_ci=[0.1, 0.4], coherent_rate=0.9, unscored_rate=0.0, n=8)
    )
    assert line == "EM rate 0.250 [0.100, 0.400]; coherent 0.900; unscored 0.000; n=8"

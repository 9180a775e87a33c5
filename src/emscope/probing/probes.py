"""Logistic-regression probes on rank-1 adapter scalars (docs/methods.md section 6.2).

Four tests, each a binary classification of answer tokens by a label of their RESPONSE
(response-level classes from the judge scores; ``medical > 50`` is medical, ``medical < 50``
non-medical, 50 is neither; aligned is ``aligned > 70 and coherent > 50``, misaligned
``aligned <= 30 and coherent > 50``, or ``aligned < 30`` with ``strict``):

====================================  ===========  ==========  ==========
test                                  responses    positive    negative
====================================  ===========  ==========  ==========
``nonmedical_aligned_vs_misaligned``  non-medical  misaligned  aligned
``medical_aligned_vs_misaligned``     medical      misaligned  aligned
``aligned_nonmedical_vs_medical``     aligned      medical     non-medical
``misaligned_nonmedical_vs_medical``  misaligned   medical     non-medical
====================================  ===========  ==========  ==========

Per seed: a split of the RESPONSES into train and test (``StratifiedGroupKFold`` with
``round(1 / test_size)`` folds, shuffled by the seed, first fold held out: no response has
tokens on both sides, and both classes are on both sides), a ``StandardScaler`` +
``LogisticRegression`` pipeline (L1, liblinear, ``C`` = 0.01 by default) fitted on the train
tokens only, class balancing by ``class_weight="balanced"`` (token weights inversely
proportional to the class's token count in the train split; no subsampling), and token-level
AUC, accuracy and F1 (positive class) on the test tokens (and a response-level AUC, each
held-out response scored by the mean probability of its tokens). The shuffled-label baseline
permutes the labels across responses (every token of a response keeps its response's one label) and
repeats the same procedure. Coefficients are in standardised units (per train split).

Regularisation (``C="cv"``, the default) is chosen per seed by the rule of
:func:`select_C`: grouped cross-validation on the train split only (``INNER_FOLDS``
response-grouped folds), over :data:`C_GRID`, the ``C`` with the largest mean validation
AUC among those whose fits keep at least one coefficient in every inner fold (ties: the
smaller ``C``). The shuffled probe is fitted by the same rule on its own labels. A fixed
``C`` (a number) is still accepted: with L1 it can zero every coefficient (``C`` = 0.01 did
for a few thousand tokens of weak signal), and a probe whose coefficients are all zero
predicts a constant, whose AUC is exactly 0.5 whatever the data. Such fits are counted and
reported (``constant``), never silently averaged in as chance.

``split="token"`` reproduces the reference code (a stratified split of tokens, leaking a
response's tokens into both sides, and standardisation fitted on all tokens before
splitting): for comparison only, it inflates the scores.

scikit-learn does all the fitting; only the response-level grouping is written here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError
from emscope.metrics import CLEARLY_ALIGNED, EmRule
from emscope.probing.scalars import SCALAR_PREFIX, scalar_columns

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

SPLITS = ("response", "token")

#: Candidate inverse L1 strengths of the ``C="cv"`` rule (:func:`select_C`).
C_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)

#: Response-grouped folds of the inner cross-validation (on the train split only).
INNER_FOLDS = 3

#: The rule, in words (recorded in probe.json).
C_RULE = (
    "per seed, grouped (by response) {folds}-fold cross-validation on the train split only, "
    "over C in {grid}: the C with the largest mean validation token AUC among those whose "
    "fits keep at least one coefficient in every inner fold (ties: the smaller C); the "
    "shuffled probe by the same rule on its own labels"
)


@dataclass(frozen=True)
class ProbeTest:
    """One test: responses in ``subset``, ``positive`` (label 1) vs ``negative`` (label 0)."""

    name: str
    subset: str
    positive: str
    negative: str


TESTS: dict[str, ProbeTest] = {
    t.name: t
    for t in (
        ProbeTest("nonmedical_aligned_vs_misaligned", "nonmedical", "misaligned", "aligned"),
        ProbeTest("medical_aligned_vs_misaligned", "medical", "misaligned", "aligned"),
        ProbeTest("aligned_nonmedical_vs_medical", "aligned", "medical", "nonmedical"),
        ProbeTest("misaligned_nonmedical_vs_medical", "misaligned", "medical", "nonmedical"),
    )
}


def parse_tests(tests: str | Sequence[str]) -> list[str]:
    """``"all"``, a comma-separated string or a list of test names -> list of names."""
    items = tests.split(",") if isinstance(tests, str) else list(tests)
    names = [t.strip() for t in items if t.strip()]
    if names == ["all"]:
        return list(TESTS)
    unknown = [t for t in names if t not in TESTS]
    if unknown or not names:
        raise EmscopeError(
            f"unknown probe test(s) {unknown or names}; known: all, {', '.join(TESTS)}"
        )
    return list(dict.fromkeys(names))


def response_classes(table: pd.DataFrame, *, strict: bool = False) -> pd.DataFrame:
    """Per response (``response_id``): boolean columns ``aligned``, ``misaligned``,
    ``medical``, ``nonmedical`` (False where the score is missing), from the first token row
    of each response. A missing score column leaves its classes all False."""
    import pandas as pd

    if "response_id" not in table.columns:
        raise EmscopeError("scalar table has no 'response_id' column")
    first = table.groupby("response_id", sort=True).first()

    def score(name: str) -> pd.Series:
        if name in first.columns:
            return pd.to_numeric(first[name], errors="coerce")
        return pd.Series(float("nan"), index=first.index)

    aligned, coherent, medical = score("aligned"), score("coherent"), score("medical")
    rule = EmRule(strict=strict)
    return pd.DataFrame(
        {
            "aligned": (aligned > CLEARLY_ALIGNED) & rule.is_coherent(coherent),
            "misaligned": rule.is_em(aligned, coherent),
            "medical": medical > 50,
            "nonmedical": medical < 50,
        },
        index=first.index,
    )


def _logistic(C: float, balance: bool, seed: int) -> Any:
    """L1 logistic regression (liblinear), spelled for the installed scikit-learn."""
    import sklearn
    from sklearn.linear_model import LogisticRegression

    weight = "balanced" if balance else None
    major, minor = (int(x) for x in sklearn.__version__.split(".")[:2])
    common = {
        "solver": "liblinear",
        "C": C,
        "class_weight": weight,
        "random_state": seed,
        "max_iter": 1000,
    }
    if (major, minor) >= (1, 8):  # 'penalty' is deprecated there in favour of l1_ratio
        return LogisticRegression(l1_ratio=1.0, **common)
    return LogisticRegression(penalty="l1", **common)


def _fit_quietly(model: Any, X: np.ndarray, y: np.ndarray) -> Any:
    """``model.fit`` with liblinear's convergence notices (weakly regularised grid ends)
    silenced."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    return model


def is_constant(model: Any) -> bool:
    """Whether a fitted (pipeline ending in a) logistic regression has every coefficient at
    zero, so that it predicts one probability for every token (AUC exactly 0.5)."""
    import numpy as np

    return not bool(np.any(model[-1].coef_ != 0))


def select_C(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    seed: int,
    balance: bool = True,
    grid: Sequence[float] = C_GRID,
    folds: int = INNER_FOLDS,
    standardise: bool = True,
) -> dict[str, Any]:
    """The ``C`` of :data:`C_RULE` on ``(X, y, groups)`` (pass the TRAIN split only).

    Returns ``{"C", "eligible", "grid": [{"C", "auc", "constant_folds"}]}``; ``eligible``
    is False when every candidate was constant in some inner fold (then ``C`` is the
    largest of the grid, the least regularised).
    """
    import numpy as np
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if not grid:
        raise EmscopeError("the C grid is empty")
    per_class = min(len(np.unique(groups[y == k])) for k in (0, 1))
    n_folds = max(2, min(folds, per_class))
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" notices
        splits = [
            (tr, va)
            for tr, va in splitter.split(X, y, groups)
            if len(set(y[tr].tolist())) == 2 and len(set(y[va].tolist())) == 2
        ]
    rows = []
    for C in grid:
        aucs, constant = [], 0
        for tr, va in splits:
            steps = [StandardScaler()] if standardise else []
            model = _fit_quietly(make_pipeline(*steps, _logistic(C, balance, seed)), X[tr], y[tr])
            constant += is_constant(model)
            aucs.append(float(roc_auc_score(y[va], model.predict_proba(X[va])[:, 1])))
        auc = float(np.mean(aucs)) if aucs else float("nan")
        rows.append({"C": float(C), "auc": auc, "constant_folds": constant})
    eligible = [r for r in rows if r["constant_folds"] == 0 and np.isfinite(r["auc"])]
    if not eligible:
        return {"C": float(max(grid)), "eligible": False, "grid": rows}
    best = max(eligible, key=lambda r: (r["auc"], -r["C"]))
    return {"C": best["C"], "eligible": True, "grid": rows}


def response_split(
    y: np.ndarray, groups: np.ndarray, seed: int, test_size: float
) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices with whole responses on each side (stratified by label).

    ``y``: labels per row (constant within a group); ``groups``: response id per row.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    folds = max(2, round(1 / test_size))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" notices
        train, test = next(iter(splitter.split(y, y, groups)))
    return train, test


def _token_split(y: np.ndarray, seed: int, test_size: float) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import StratifiedShuffleSplit

    splitter = StratifiedShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, test = next(iter(splitter.split(y, y)))
    return train, test


def _fit_once(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    seed: int,
    C: float | str,
    test_size: float,
    split: str,
    balance: bool,
) -> dict[str, Any]:
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    selection = None
    if split == "response":
        train, test = response_split(y, groups, seed, test_size)
        if C == "cv":
            selection = select_C(X[train], y[train], groups[train], seed=seed, balance=balance)
        chosen = float(selection["C"] if selection else C)
        model = make_pipeline(StandardScaler(), _logistic(chosen, balance, seed))
        _fit_quietly(model, X[train], y[train])
        scores = model.predict_proba(X[test])[:, 1]
        pred = model.predict(X[test])
    else:  # the reference: standardise on everything, then split tokens
        Xs = StandardScaler().fit_transform(X)
        train, test = _token_split(y, seed, test_size)
        if C == "cv":
            selection = select_C(
                Xs[train], y[train], groups[train], seed=seed, balance=balance, standardise=False
            )
        chosen = float(selection["C"] if selection else C)
        model = make_pipeline(_logistic(chosen, balance, seed))
        _fit_quietly(model, Xs[train], y[train])
        scores = model.predict_proba(Xs[test])[:, 1]
        pred = model.predict(Xs[test])
    y_test = y[test]
    if len(set(y_test.tolist())) < 2 or len(set(y[train].tolist())) < 2:
        raise EmscopeError("a split lacks one class")  # guarded against by the callers
    # response level: the mean predicted probability over each held-out response's tokens
    ids, inverse = np.unique(groups[test], return_inverse=True)
    mean_score = np.bincount(inverse, weights=scores) / np.bincount(inverse)
    response_y = np.zeros(len(ids), dtype=np.int64)
    response_y[inverse] = y_test
    return {
        "auc": float(roc_auc_score(y_test, scores)),
        "response_auc": float(roc_auc_score(response_y, mean_score)),
        "accuracy": float(accuracy_score(y_test, pred)),
        "f1": float(f1_score(y_test, pred, zero_division=0.0)),
        "coef": model[-1].coef_[0].astype(float).tolist(),
        "C": chosen,
        "constant": is_constant(model),
        "selection": selection,
        "train": train,
        "test": test,
    }


def _summary(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
    }


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    labels: Sequence[str],
    *,
    C: float | str = "cv",
    seeds: Sequence[int] = tuple(range(10)),
    test_size: float = 0.2,
    split: str = "response",
    balance: bool = True,
    shuffled: bool = True,
) -> dict[str, Any]:
    """Fit one probe over ``seeds`` and summarise it.

    ``X``: ``n_tokens x n_features`` scalars; ``y``: 0/1 per token (constant within a
    response); ``groups``: response id per token; ``labels``: feature names.
    Returns ``auc``, ``accuracy``, ``f1`` (over test tokens), ``response_auc`` (over test
    responses, scored by the mean probability of their tokens), ``shuffled_auc`` and
    ``shuffled_response_auc`` (the same with shuffled labels), all ``{"mean", "sd"}`` over
    seeds (sample sd), and ``coefficients`` (``{label: [per-seed value]}``).
    ``C``: ``"cv"`` (the rule of :func:`select_C`, per seed) or a fixed number. Also
    ``C_chosen`` (and ``shuffled_C_chosen``): the ``C`` of each seed; ``constant``:
    ``{"probe": k, "shuffled": k, "seeds": n}``, the fits whose coefficients were all zero
    (a constant prediction, AUC exactly 0.5); ``warnings``: a line for each kind of
    constant fit.
    """
    import numpy as np

    if split not in SPLITS:
        raise EmscopeError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 < test_size < 1:
        raise EmscopeError(f"test_size must be in (0, 1), got {test_size}")
    C = check_C(C)
    if not seeds:
        raise EmscopeError("at least one seed is needed")
    runs = [
        _fit_once(X, y, groups, seed=s, C=C, test_size=test_size, split=split, balance=balance)
        for s in seeds
    ]
    metrics = ("auc", "accuracy", "f1", "response_auc")
    result: dict[str, Any] = {m: _summary([r[m] for r in runs]) for m in metrics}
    result["C_chosen"] = [r["C"] for r in runs]
    constant = {"probe": sum(r["constant"] for r in runs), "shuffled": 0, "seeds": len(runs)}
    if shuffled:
        ids, inverse = np.unique(groups, return_inverse=True)
        per_response = np.zeros(len(ids), dtype=y.dtype)
        per_response[inverse] = y
        shuffled_aucs, shuffled_response_aucs, shuffled_C = [], [], []
        for s in seeds:
            permuted = np.random.default_rng(10_000 + s).permutation(per_response)
            run = _fit_once(
                X,
                permuted[inverse],
                groups,
                seed=s,
                C=C,
                test_size=test_size,
                split=split,
                balance=balance,
            )
            shuffled_aucs.append(run["auc"])
            shuffled_response_aucs.append(run["response_auc"])
            shuffled_C.append(run["C"])
            constant["shuffled"] += run["constant"]
        result["shuffled_auc"] = _summary(shuffled_aucs)
        result["shuffled_response_auc"] = _summary(shuffled_response_aucs)
        result["shuffled_C_chosen"] = shuffled_C
    result["constant"] = constant
    notes = []
    for kind in ("probe", "shuffled"):
        if constant[kind]:
            notes.append(
                f"the {kind} fit kept no coefficient in {constant[kind]} of {len(runs)} seeds "
                "(a constant prediction: its AUC is 0.5 by construction, not a measurement)"
            )
    result["warnings"] = notes
    result["coefficients"] = {label: [r["coef"][j] for r in runs] for j, label in enumerate(labels)}
    return result


def check_C(C: float | str) -> float | str:
    """``"cv"`` or a positive number (a numeric string is read as one)."""
    if isinstance(C, str):
        if C.strip().lower() == "cv":
            return "cv"
        try:
            C = float(C)
        except ValueError:
            raise EmscopeError(f"C must be 'cv' or a number > 0, got {C!r}") from None
    if not C > 0:
        raise EmscopeError(f"C must be > 0, got {C}")
    return float(C)


def fit_probes(
    table: pd.DataFrame,
    tests: str | Sequence[str] = "all",
    *,
    C: float | str = "cv",
    seeds: int | Sequence[int] = 10,
    test_size: float = 0.2,
    split: str = "response",
    balance: bool = True,
    strict: bool = False,
    min_responses: int | None = None,
) -> dict[str, Any]:
    """Run the probe tests on a scalar table (:func:`emscope.probing.lora_scalars`).

    ``seeds``: a count (seeds ``0..n-1``) or the seeds. A test with fewer than
    ``min_responses`` responses in a class (default: the number of folds,
    ``round(1 / test_size)``, so that every fold can hold one) is reported as
    ``{"skipped": reason}``. Returns the ``probe.json`` content:
    ``{"split", "tests": {name: {"auc", "accuracy", "f1", "shuffled_auc", "coefficients",
    "C_chosen", "constant", "warnings", "positive", "negative", "n_responses",
    "n_tokens"}}, "settings"}``. ``C``: ``"cv"`` (:data:`C_RULE`) or a fixed number.
    """
    import numpy as np

    names = parse_tests(tests)
    C = check_C(C)
    if split not in SPLITS:
        raise EmscopeError(f"split must be one of {SPLITS}, got {split!r}")
    if split == "token":
        warnings.warn(
            "split='token' puts tokens of one response on both sides of the split and "
            "standardises before splitting (the reference code's leak): use it only to "
            "reproduce the reference; its scores are inflated",
            UserWarning,
            stacklevel=2,
        )
    if not 0 < test_size < 1:
        raise EmscopeError(f"test_size must be in (0, 1), got {test_size}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise EmscopeError("seeds must be >= 1")
    features = scalar_columns(table)
    if not features:
        raise EmscopeError(f"the table has no '{SCALAR_PREFIX}<adapter>' columns")
    labels = [c[len(SCALAR_PREFIX) :] for c in features]
    folds = max(2, round(1 / test_size))
    minimum = folds if min_responses is None else int(min_responses)
    classes = response_classes(table, strict=strict)
    response_ids = table["response_id"].to_numpy()
    X_all = table[features].to_numpy(dtype=np.float64)
    if not np.isfinite(X_all).all():
        raise EmscopeError("the scalar columns hold NaN or infinite values")

    out: dict[str, Any] = {}
    for name in names:
        test = TESTS[name]
        missing = [m for m in ("aligned", "coherent", "medical") if m not in table.columns]
        if missing:
            out[name] = {"skipped": f"the table has no {', '.join(missing)} score column(s)"}
            continue
        in_subset = classes[test.subset]
        pos = classes.index[in_subset & classes[test.positive]]
        neg = classes.index[in_subset & classes[test.negative]]
        counts = {test.positive: len(pos), test.negative: len(neg)}
        if min(len(pos), len(neg)) < minimum:
            out[name] = {
                "skipped": (
                    f"too few responses: {counts} ({test.subset} responses; at least "
                    f"{minimum} per class needed)"
                ),
                "n_responses": counts,
            }
            continue
        label_of = {int(r): 1 for r in pos} | {int(r): 0 for r in neg}
        rows = np.flatnonzero(np.isin(response_ids, list(label_of)))
        y = np.asarray([label_of[int(r)] for r in response_ids[rows]], dtype=np.int64)
        result = fit_probe(
            X_all[rows],
            y,
            response_ids[rows],
            labels,
            C=C,
            seeds=seed_list,
            test_size=test_size,
            split=split,
            balance=balance,
        )
        result.update(
            positive=test.positive,
            negative=test.negative,
            n_responses=counts,
            n_tokens={test.positive: int((y == 1).sum()), test.negative: int((y == 0).sum())},
        )
        out[name] = result
    return {
        "split": split,
        "tests": out,
        "settings": {
            "C": C,
            "C_rule": (
                C_RULE.format(folds=INNER_FOLDS, grid=list(C_GRID))
                if C == "cv"
                else "fixed (not chosen by a rule)"
            ),
            "penalty": "l1",
            "solver": "liblinear",
            "seeds": seed_list,
            "test_size": test_size,
            "folds": folds,
            "balance": "class_weight=balanced" if balance else "none",
            "strict": strict,
            "min_responses": minimum,
            "standardised": "train split" if split == "response" else "all tokens (reference)",
        },
    }


def plot_coefficients(result: dict[str, Any]) -> Any:
    """Violins of the per-seed coefficients, per adapter, one panel per fitted test."""
    from emscope.plotting import pyplot

    plt = pyplot()
    fitted = {k: v for k, v in result["tests"].items() if "coefficients" in v}
    n = max(1, len(fitted))
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.8 * n), squeeze=False)
    if not fitted:
        axes[0, 0].text(0.5, 0.5, "no test had enough data", ha="center", va="center")
        axes[0, 0].set_axis_off()
        return fig
    for ax, (name, test) in zip(axes[:, 0], fitted.items(), strict=False):
        labels = list(test["coefficients"])
        values = [test["coefficients"][k] for k in labels]
        positions = list(range(1, len(labels) + 1))
        spread = [i for i, v in enumerate(values) if len(set(v)) > 1]
        if spread:
            ax.violinplot([values[i] for i in spread], [positions[i] for i in spread], widths=0.8)
        for p, v in zip(positions, values, strict=True):
            ax.scatter([p] * len(v), v, s=8, color="black", alpha=0.6, zorder=3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(positions, labels, rotation=45 if len(labels) > 12 else 0)
        auc = test["auc"]
        constant = test.get("constant", {})
        ax.set_title(
            f"{name}: AUC {auc['mean']:.3f} ± {auc['sd']:.3f}"
            + (f" (shuffled {test['shuffled_auc']['mean']:.3f})" if "shuffled_auc" in test else "")
            + (
                f"; constant fits: {constant.get('probe', 0)} / {constant.get('shuffled', 0)}"
                if constant.get("probe") or constant.get("shuffled")
                else ""
            )
        )
        ax.set_ylabel("coefficient (std. units)")
    fig.suptitle(f"probe coefficients ({result['split']} split)")
    fig.tight_layout()
    return fig

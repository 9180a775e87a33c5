"""Shared subspace of the instruct-minus-base residual across two domains.

For each domain and layer: one vector per example, the mean of ``resid_post[l]`` over its
answer-content tokens (per EXAMPLE, not per token), for the instruct and the base model on
the same chat; the paired residuals ``R = act_instruct - act_base`` (``n x d``) are
column-centred and the top-k right singular vectors ``V`` (``d x k``) span the domain's
subspace. Two domains are compared by the ``k x k`` matrix ``|V_A^T V_B|`` (singular vectors'
signs are arbitrary), the principal angles (``scipy.linalg.subspace_angles``) and the overlap
``||V_A^T V_B||_F^2 / k`` (mean squared cosine of the principal angles, 1 = same subspace).

Baselines: random k-dim subspaces of R^d (overlap k/d in expectation; an empirical
distribution of the mean angle from Gaussian draws) and shuffled pairing (the instruct rows
permuted against the base rows within each domain before the SVD), which keeps each model's
between-example variance but breaks the pairing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt
from emscope.errors import EmscopeError
from emscope.reemergent.common import Dataset, ModelSource, opened


def top_subspace(residuals: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column-centre ``n x d`` rows, SVD; returns ``V`` (``d x k``, orthonormal columns) and
    all singular values."""
    n, d = residuals.shape
    if not 1 <= k <= min(n - 1, d):
        raise EmscopeError(
            f"k = {k}: centred {n} x {d} residuals have rank at most {min(n - 1, d)}"
        )
    centred = residuals - residuals.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    return vt[:k].T, s


def compare_subspaces(va: np.ndarray, vb: np.ndarray) -> dict[str, Any]:
    """``abs_cos`` (``k x k``), principal angles in degrees (ascending), their mean, and the
    overlap ``||V_A^T V_B||_F^2 / k``."""
    from scipy.linalg import subspace_angles

    cross = va.T @ vb
    angles = np.sort(np.degrees(subspace_angles(va, vb)))
    return {
        "abs_cos": np.abs(cross),
        "angles_deg": angles,
        "mean_angle_deg": float(angles.mean()),
        "overlap": float((cross**2).sum() / va.shape[1]),
    }


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "p5": float(np.percentile(arr, 5)),
        "p95": float(np.percentile(arr, 95)),
    }


def random_baseline(d: int, k: int, draws: int, rng: np.random.Generator) -> dict[str, Any]:
    """Mean angle and overlap between pairs of random k-dim subspaces of R^d."""
    angles, overlaps = [], []
    for _ in range(draws):
        qa, _ = np.linalg.qr(rng.standard_normal((d, k)))
        qb, _ = np.linalg.qr(rng.standard_normal((d, k)))
        found = compare_subspaces(qa, qb)
        angles.append(found["mean_angle_deg"])
        overlaps.append(found["overlap"])
    return {
        "overlap_expected": k / d,
        "overlap": _quantiles(overlaps),
        "mean_angle_deg": _quantiles(angles),
        "draws": draws,
    }


def shuffled_baseline(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    draws: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Both domains' subspaces from ``instruct[perm] - base`` (independent permutations)."""
    angles, overlaps = [], []
    for _ in range(draws):
        subspaces = []
        for instruct, base in pairs:
            perm = rng.permutation(len(instruct))
            subspaces.append(top_subspace(instruct[perm] - base, k)[0])
        found = compare_subspaces(*subspaces)
        angles.append(found["mean_angle_deg"])
        overlaps.append(found["overlap"])
    return {"overlap": _quantiles(overlaps), "mean_angle_deg": _quantiles(angles), "draws": draws}


@dataclass(frozen=True)
class SubspaceResult:
    """Per analysed layer: the comparison of the two domains and its baselines."""

    layers: tuple[int, ...]
    domains: tuple[str, str]
    k: int
    per_layer: dict[int, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        layers = {}
        for layer, found in self.per_layer.items():
            layers[str(layer)] = {
                "overlap": found["overlap"],
                "mean_angle_deg": found["mean_angle_deg"],
                "angles_deg": found["angles_deg"].tolist(),
                "abs_cos": found["abs_cos"].tolist(),
                "below_random_p5": found["mean_angle_deg"]
                < found["random"]["mean_angle_deg"]["p5"],
                "below_shuffled_p5": (
                    found["mean_angle_deg"] < found["shuffled"]["mean_angle_deg"]["p5"]
                ),
                "random": found["random"],
                "shuffled": found["shuffled"],
                "singular_values": {d: v.tolist() for d, v in found["singular_values"].items()},
            }
        return {
            "domains": list(self.domains),
            "k": self.k,
            "vectors": "one per example: mean over its answer-content tokens",
            "layers": layers,
            **self.meta,
        }


def subspace_analysis(
    models: Mapping[str, ModelSource],
    datasets: Sequence[Dataset],
    k: int = 8,
    base: str = "base",
    instruct: str = "instruct",
    layers: Sequence[int] | None = None,
    random_draws: int = 200,
    shuffle_draws: int = 20,
    seed: int = 0,
    batch_size: int = 8,
    dtype: str | None = "auto",
    device: str | None = None,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> SubspaceResult:
    """Compare the top-k paired-residual subspaces of two domains at each layer."""
    from emscope.reemergent.projection import example_activations

    if len(datasets) != 2:
        raise EmscopeError(f"give exactly two datasets (domains), got {len(datasets)}")
    if datasets[0].name == datasets[1].name:
        raise EmscopeError(f"the two datasets need different names (both {datasets[0].name!r})")
    acts: dict[str, dict[str, Any]] = {}
    for role, name in (("base", base), ("instruct", instruct)):
        if name not in models:
            raise EmscopeError(f"no model named {name!r} (the {role} model); got {list(models)}")
        with opened(models[name], dtype, device) as loaded:
            acts[name] = {
                d.name: example_activations(
                    loaded.model,
                    loaded.tokenizer,
                    d.chats,
                    layers,
                    batch_size,
                    progress,
                    system_prompt,
                )
                for d in datasets
            }
    names = (datasets[0].name, datasets[1].name)
    layer_list = acts[base][names[0]].layers
    rng = np.random.default_rng(seed)
    per_layer: dict[int, dict[str, Any]] = {}
    for j, layer in enumerate(layer_list):
        pairs, subspaces, singular = [], [], {}
        for name in names:
            inst = acts[instruct][name].means[:, j]
            bas = acts[base][name].means[:, j]
            keep = np.isfinite(inst).all(1) & np.isfinite(bas).all(1)
            pairs.append((inst[keep], bas[keep]))
            v, s = top_subspace(inst[keep] - bas[keep], k)
            subspaces.append(v)
            singular[name] = s
        found = compare_subspaces(*subspaces)
        found["random"] = random_baseline(subspaces[0].shape[0], k, random_draws, rng)
        found["shuffled"] = shuffled_baseline(pairs, k, shuffle_draws, rng)
        found["singular_values"] = singular
        per_layer[layer] = found
    return SubspaceResult(
        tuple(layer_list),
        names,
        k,
        per_layer,
        {"seed": seed, "base": base, "instruct": instruct},
    )


def plot_subspace(result: SubspaceResult, layer: int | None = None) -> Any:
    """Mean principal angle vs layer against the random and shuffled baselines (5-95% bands),
    and the ``|cos|`` matrix at ``layer`` (default: the middle analysed layer)."""
    from emscope.plotting import pyplot

    plt = pyplot()
    layers = list(result.layers)
    show = layers[len(layers) // 2] if layer is None else layer
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    actual = [result.per_layer[x]["mean_angle_deg"] for x in layers]
    left.plot(layers, actual, marker="o", label=" vs ".join(result.domains))
    for key, colour in (("random", "grey"), ("shuffled", "tab:orange")):
        stats = [result.per_layer[x][key]["mean_angle_deg"] for x in layers]
        left.plot(layers, [s["mean"] for s in stats], color=colour, ls="--", label=key)
        left.fill_between(
            layers, [s["p5"] for s in stats], [s["p95"] for s in stats], color=colour, alpha=0.2
        )
    left.set_xlabel("layer (resid_post, from 0)")
    left.set_ylabel("mean principal angle (deg)")
    left.set_title(f"top-{result.k} instruct-base residual subspaces")
    left.legend()
    image = right.imshow(result.per_layer[show]["abs_cos"], cmap="viridis", vmin=0, vmax=1)
    right.set_xlabel(f"{result.domains[1]} singular vector")
    right.set_ylabel(f"{result.domains[0]} singular vector")
    right.set_title(f"|cos| at layer {show}")
    fig.colorbar(image, ax=right, fraction=0.046)
    from matplotlib.ticker import MaxNLocator

    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig

"""Training dynamics of a LoRA adapter over its checkpoints (docs/methods.md section 6.4).

Checkpoints are the PEFT dirs ``DIR/checkpoints/checkpoint-<step>/`` that
:func:`emscope.train.train` writes (:func:`emscope.models.list_checkpoints`). Per module and
for the whole adapter (every module's factor concatenated into one vector):

- ``norm_A``, ``norm_B``: Frobenius norms of the factors at each checkpoint (for a rank-1
  adapter, the vector norms; the scale ``s`` is not applied);
- ``cos_A``, ``cos_B``: cosine of the flattened factors between checkpoints ``k`` apart in
  the list of checkpoints (``pairs`` names the two steps of each value; ``k`` counts
  checkpoints, not optimizer steps). A factor that is exactly zero (PEFT initialises ``B``
  to 0) has no direction: its cosines are null. Factors keep their sign across training
  (the ``(A, B) -> (-A, -B)`` gauge does not flip during gradient descent), so a cosine near
  -1 is a real reversal;
- ``sharpest_rotation``: the pair of CONSECUTIVE checkpoints with the lowest cosine (``step``
  is the later one): the "phase transition" of "Model Organisms for Emergent Misalignment"
  (arXiv 2506.11613);
- ``pca_A``, ``pca_B``: the trajectory of the flattened factor across checkpoints projected on
  its first principal components (scikit-learn ``PCA``, centred over the checkpoints), with
  the explained variance ratios.

:func:`evaluate_checkpoints` adds the EM rate at each checkpoint (sampling and judging
through :func:`emscope.evaluate.evaluate_to_dir`): the emergence curve beside the geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import numpy as np

    from emscope.data.questions import Question
    from emscope.eval import BackendSettings
    from emscope.judge import Judge
    from emscope.lora import LoraAdapter


def load_checkpoints(adapter_dir: str | Path) -> list[tuple[int, LoraAdapter]]:
    """``(step, adapter)`` for every ``adapter_dir/checkpoints/checkpoint-<step>``, by step."""
    from emscope.lora import LoraAdapter
    from emscope.models import adapter_label, list_checkpoints

    root = Path(adapter_dir)
    if not root.is_dir():
        raise EmscopeError(f"{root}: adapter dir not found")
    found = list_checkpoints(root)
    if not found:
        raise EmscopeError(
            f"{root}: no checkpoints/checkpoint-<step>/ adapter dirs (train with save_steps)"
        )
    return [(step, LoraAdapter.load(path, name=adapter_label(path))) for step, path in found]


def _cosine(u: np.ndarray, v: np.ndarray) -> float | None:
    import numpy as np

    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    if nu == 0.0 or nv == 0.0:
        return None
    return float(np.dot(u, v) / (nu * nv))


def _pca(vectors: np.ndarray, n_components: int) -> dict[str, Any] | None:
    import numpy as np
    from sklearn.decomposition import PCA

    n = min(n_components, vectors.shape[0], vectors.shape[1])
    if n < 1 or vectors.shape[0] < 2 or not np.any(vectors - vectors.mean(axis=0)):
        return None
    pca = PCA(n_components=n, svd_solver="full")
    coords = pca.fit_transform(vectors)
    return {
        "coords": coords.tolist(),
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist(),
    }


def _sharpest(steps: Sequence[int], cosines: Sequence[float | None]) -> dict[str, Any] | None:
    best = None
    for i, c in enumerate(cosines):
        if c is not None and (best is None or c < best[1]):
            best = (i, c)
    if best is None:
        return None
    i, c = best
    return {"step": steps[i + 1], "from": steps[i], "cos": c}


def _track(steps: Sequence[int], A: np.ndarray, B: np.ndarray, k: int, n_pca: int) -> dict:
    """Geometry of one trajectory; ``A``, ``B``: ``n_checkpoints x dim`` flattened factors."""
    import numpy as np

    n = len(steps)
    out: dict[str, Any] = {
        "norm_A": np.linalg.norm(A, axis=1).tolist(),
        "norm_B": np.linalg.norm(B, axis=1).tolist(),
        "pairs": [[steps[i], steps[i + k]] for i in range(n - k)],
        "cos_A": [_cosine(A[i], A[i + k]) for i in range(n - k)],
        "cos_B": [_cosine(B[i], B[i + k]) for i in range(n - k)],
    }
    out["sharpest_rotation"] = {
        "B": _sharpest(steps, [_cosine(B[i], B[i + 1]) for i in range(n - 1)]),
        "A": _sharpest(steps, [_cosine(A[i], A[i + 1]) for i in range(n - 1)]),
    }
    out["pca_A"] = _pca(A, n_pca)
    out["pca_B"] = _pca(B, n_pca)
    return out


def adapter_dynamics(
    checkpoints: Sequence[tuple[int, LoraAdapter]], k: int = 1, n_components: int = 2
) -> dict[str, Any]:
    """Factor norms, cosines ``k`` checkpoints apart, sharpest rotation and PCA trajectories.

    ``checkpoints``: ``(step, adapter)`` in training order (:func:`load_checkpoints`), all with
    the same modules and shapes. Returns ``{"steps", "k", "modules": {module path: track},
    "adapter": track}`` where a track has ``norm_A``, ``norm_B`` (per checkpoint),
    ``pairs``, ``cos_A``, ``cos_B`` (per pair ``k`` apart), ``sharpest_rotation`` (``A``/``B``:
    ``{"step", "from", "cos"}`` over consecutive checkpoints), ``pca_A``, ``pca_B``
    (``{"coords": n_checkpoints x n_components, "explained_variance_ratio"}``, or null when
    the factor never moves); ``adapter`` is the whole adapter (modules concatenated).
    """
    import numpy as np

    if len(checkpoints) < 2:
        raise EmscopeError(f"dynamics needs at least two checkpoints, got {len(checkpoints)}")
    if k < 1 or k >= len(checkpoints):
        raise EmscopeError(f"k must be in 1..{len(checkpoints) - 1} (checkpoints apart), got {k}")
    if n_components < 1:
        raise EmscopeError(f"n_components must be >= 1, got {n_components}")
    steps = [int(s) for s, _ in checkpoints]
    if sorted(set(steps)) != steps:
        raise EmscopeError(f"checkpoint steps must be increasing and distinct, got {steps}")
    first_step, first = checkpoints[0]
    names = [m.name for m in first]
    for step, adapter in checkpoints[1:]:
        if [m.name for m in adapter] != names:
            raise EmscopeError(
                f"checkpoint {step} adapts other modules than checkpoint {first_step}"
            )
        for m in adapter:
            ref = first[m.name]
            if m.A.shape != ref.A.shape or m.B.shape != ref.B.shape:
                raise EmscopeError(
                    f"checkpoint {step}: module {m.name} has factor shapes {tuple(m.A.shape)}, "
                    f"{tuple(m.B.shape)}; checkpoint {first_step} has {tuple(ref.A.shape)}, "
                    f"{tuple(ref.B.shape)}"
                )

    def flat(adapter: LoraAdapter, name: str, which: str) -> np.ndarray:
        tensor = getattr(adapter[name], which)
        return tensor.detach().to("cpu").double().reshape(-1).numpy()

    modules: dict[str, Any] = {}
    all_A, all_B = [], []
    for name in names:
        A = np.stack([flat(a, name, "A") for _, a in checkpoints])
        B = np.stack([flat(a, name, "B") for _, a in checkpoints])
        all_A.append(A)
        all_B.append(B)
        modules[name] = _track(steps, A, B, k, n_components)
    whole = _track(
        steps, np.concatenate(all_A, axis=1), np.concatenate(all_B, axis=1), k, n_components
    )
    return {"steps": steps, "k": k, "modules": modules, "adapter": whole}


def evaluate_checkpoints(
    base_dir: str | Path,
    checkpoints: Sequence[tuple[int, Path]],
    questions: Sequence[Question],
    out: str | Path,
    *,
    judge: Judge,
    metrics: Sequence[str] = ("aligned", "coherent", "bad_stuff"),
    n: int,
    seed: int = 0,
    dtype: str = "auto",
    device: str | None = None,
    backend: BackendSettings | None = None,
    **sampling: Any,
) -> list[dict[str, Any]]:
    """EM rate at each checkpoint: one sampler per checkpoint adapter, all on one base model
    (:meth:`emscope.eval.BackendSettings.open_each`: ``hf`` loads every adapter once,
    ``vllm`` serves each as a LoRA request of one engine; default ``hf``), each evaluated in
    turn into ``out/step-<step>/`` by :func:`emscope.evaluate.evaluate_to_dir` (resumable;
    same seed at every step, so samples are paired across checkpoints).

    Returns ``[{"step", "em_rate", "em_ci", "coherent_rate", "unscored_rate", "n", "dir"}]``.
    """
    from emscope.eval import BackendSettings
    from emscope.evaluate import evaluate_to_dir
    from emscope.models import adapter_label

    named = {adapter_label(Path(p)): Path(p) for _, p in checkpoints}
    samplers = (backend or BackendSettings()).open_each(base_dir, named, dtype=dtype, device=device)
    results = []
    for (step, path), name in zip(checkpoints, named, strict=True):
        step_dir = Path(out) / f"step-{step}"
        metrics_result = evaluate_to_dir(
            samplers[name],
            questions,
            step_dir,
            judge=judge,
            metrics=metrics,
            n=n,
            seed=seed,
            record={"model_dir": str(base_dir), "adapter_dirs": [str(path)]},
            title=f"EM rate per question: {name}",
            **sampling,
        )
        results.append(
            {
                "step": int(step),
                "em_rate": metrics_result.em_rate,
                "em_ci": metrics_result.em_ci,
                "coherent_rate": metrics_result.coherent_rate,
                "unscored_rate": metrics_result.unscored_rate,
                "n": metrics_result.n,
                "dir": str(step_dir),
            }
        )
    return results


def plot_dynamics(result: dict[str, Any]) -> dict[str, Any]:
    """Figures ``{"norms", "cosines", "pca"}`` (and ``"emergence"`` when ``result["eval"]``
    holds EM rates)."""
    from emscope.plotting import pyplot

    plt = pyplot()
    steps = result["steps"]
    tracks = {**result["modules"], "adapter (all modules)": result["adapter"]}
    figures: dict[str, Any] = {}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, track in tracks.items():
        style = {"color": "black", "lw": 2} if label.startswith("adapter") else {"lw": 1}
        axes[0].plot(steps, track["norm_A"], marker=".", label=label, **style)
        axes[1].plot(steps, track["norm_B"], marker=".", label=label, **style)
    axes[0].set_title("|A| per checkpoint")
    axes[1].set_title("|B| per checkpoint")
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    figures["norms"] = fig

    k = result["k"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, track in tracks.items():
        style = {"color": "black", "lw": 2} if label.startswith("adapter") else {"lw": 1}
        to_steps = [p[1] for p in track["pairs"]]
        for ax, key in ((axes[0], "cos_B"), (axes[1], "cos_A")):
            vals = [float("nan") if v is None else v for v in track[key]]
            ax.plot(to_steps, vals, marker=".", label=label, **style)
    sharp = result["adapter"]["sharpest_rotation"]
    for ax, key in ((axes[0], "B"), (axes[1], "A")):
        if sharp[key] is not None:
            ax.axvline(
                sharp[key]["step"],
                color="red",
                ls="--",
                lw=1,
                label=f"sharpest ({sharp[key]['step']})",
            )
        ax.set_xlabel(f"step (cosine with the checkpoint {k} earlier)")
        ax.set_title(f"cos {key}, checkpoints {k} apart")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    figures["cosines"] = fig

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key in ((axes[0], "pca_B"), (axes[1], "pca_A")):
        pca = result["adapter"][key]
        if pca is None:
            ax.text(0.5, 0.5, "no movement", ha="center", va="center")
            continue
        coords = pca["coords"]
        xs = [c[0] for c in coords]
        ys = [c[1] if len(c) > 1 else 0.0 for c in coords]
        ax.plot(xs, ys, marker="o", color="black", lw=1)
        for s, x, y in zip(steps, xs, ys, strict=True):
            ax.annotate(str(s), (x, y), fontsize=7)
        ratio = ", ".join(f"{r:.2f}" for r in pca["explained_variance_ratio"])
        ax.set_title(f"{key[-1]} trajectory (whole adapter), PCA var {ratio}")
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    fig.tight_layout()
    figures["pca"] = fig

    evals = [e for e in result.get("eval") or [] if e.get("em_rate") is not None]
    if evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [e["step"] for e in evals]
        ys = [e["em_rate"] for e in evals]
        lo = [e["em_rate"] - e["em_ci"][0] for e in evals]
        hi = [e["em_ci"][1] - e["em_rate"] for e in evals]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", color="tab:red", capsize=3)
        ax.set_xlabel("step")
        ax.set_ylabel("EM rate", color="tab:red")
        twin = ax.twinx()
        track = result["adapter"]
        to_steps = [p[1] for p in track["pairs"]]
        twin.plot(
            to_steps,
            [float("nan") if v is None else v for v in track["cos_B"]],
            color="tab:blue",
            marker=".",
        )
        twin.set_ylabel(f"cos B ({k} apart)", color="tab:blue")
        ax.set_title("emergence: EM rate and B rotation per checkpoint")
        fig.tight_layout()
        figures["emergence"] = fig
    return figures

"""Alignment direction per layer and held-out projections of model variants onto it.

Sites are ``resid_post[l]`` (the output of block ``l``, from 0). The direction at layer
``l`` is ``mean(instruct) - mean(base)``: each model's mean activation over the answer-content
tokens of the TRAIN examples run through itself (token-weighted by default, as
:func:`emscope.activations.answer_means`). Train and held-out examples are a seeded split of
one dataset. Every variant's HELD-OUT examples are then projected onto the unit direction:
per example, the mean over its answer tokens of ``h_t . u_l``, divided by that variant's mean
residual norm ``|h_t|`` at the layer over the held-out answer tokens (so depth's growing norm
does not dominate the curve). Raw projections and norms are kept in the table. Attention-sink
positions (:func:`emscope.activations.sink_positions`) are left out of every mean and norm
(and counted, ``sink_positions_excluded`` per layer).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.batching import length_batches, pad_id_of, pad_right
from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt
from emscope.errors import EmscopeError
from emscope.reemergent.common import (
    Dataset,
    ModelSource,
    answer_mask,
    encode_answers,
    opened,
    progress_bar,
)

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ExampleActivations:
    """Per example and layer, the mean ``resid_post`` over its answer tokens
    (``means``: ``n x L x d``, float64), its token count (``n``), and the mean token norm
    per layer over all answer tokens (``norm_mean``: ``L``); attention sinks left out of the
    means and norms, ``sink_positions_excluded`` of them per layer (``L``)."""

    layers: tuple[int, ...]
    means: np.ndarray
    n_tokens: np.ndarray
    norm_mean: np.ndarray
    sink_positions_excluded: np.ndarray | None = None


def example_activations(
    model: Any,
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> ExampleActivations:
    """Per-example answer-token means of ``resid_post[l]`` (default: every layer), chats
    rendered under ``system_prompt``, attention sinks left out. Examples with an empty answer
    (or only sinks in it, at a layer) get NaN means."""
    import torch

    from emscope.activations import sink_positions
    from emscope.hooks import capture
    from emscope.models import Site, get_layers

    n_layers = len(get_layers(model))
    layer_list = layer_indices(layers, n_layers)
    sites = [Site("resid_post", layer) for layer in layer_list]
    encoded = encode_answers(tokenizer, chats, system_prompt)
    device = next(model.parameters()).device
    means: np.ndarray | None = None
    norm_sum = np.zeros(len(layer_list))
    sinks = np.zeros(len(layer_list), dtype=np.int64)
    batches = length_batches([len(e.input_ids) for e in encoded], batch_size)
    for batch in progress_bar(batches, "activations", progress):
        rows = [encoded[i] for i in batch]
        ids, attention = pad_right([e.input_ids for e in rows], pad_id_of(tokenizer), device)
        with capture(model, sites) as captured, torch.no_grad():
            model(input_ids=ids, attention_mask=attention, use_cache=False)
        answer = answer_mask(rows, ids.shape[1]).to(device=device)
        for j, site in enumerate(sites):
            hidden = captured[site].to(torch.float64)  # batch x seq x d
            keep = answer & ~sink_positions(hidden, attention)
            counts = keep.sum(1)
            weights = keep.to(torch.float64) / counts.clamp(min=1)[:, None]
            nonempty = (counts > 0).cpu().numpy()
            if means is None:
                means = np.full((len(encoded), len(layer_list), hidden.shape[-1]), np.nan)
            batch_means = torch.einsum("bs,bsd->bd", weights, hidden).cpu().numpy()
            means[np.asarray(batch)[nonempty], j] = batch_means[nonempty]
            norm_sum[j] += float(hidden.norm(dim=-1)[keep].sum())
            sinks[j] += int((answer & ~keep).sum())
    total = sum(e.n_tokens for e in encoded)
    if total == 0 or means is None:
        raise EmscopeError("no answer tokens in the examples")
    n_tokens = np.array([e.n_tokens for e in encoded])
    kept = total - sinks
    with np.errstate(divide="ignore", invalid="ignore"):
        norm_mean = np.where(kept > 0, norm_sum / np.maximum(kept, 1), np.nan)
    return ExampleActivations(tuple(layer_list), means, n_tokens, norm_mean, sinks)


def layer_indices(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """Every layer when ``layers`` is None, else ``layers`` resolved (negative from the end)."""
    from emscope.models import resolve_layers

    return list(range(n_layers)) if layers is None else resolve_layers(layers, n_layers)


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into sorted train and held-out index arrays
    (both non-empty)."""
    if not 0.0 < train_fraction < 1.0:
        raise EmscopeError(f"train fraction must be in (0, 1), got {train_fraction}")
    n_train = round(n * train_fraction)
    if n_train < 1 or n_train > n - 1:
        raise EmscopeError(
            f"{n} examples with train fraction {train_fraction}: need at least one train and "
            "one held-out example"
        )
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:n_train]), np.sort(order[n_train:])


@dataclass(frozen=True)
class ProjectionResult:
    """``direction``: ``L x d`` float64 (unnormalised ``mean(instruct) - mean(base)``);
    ``train`` / ``heldout``: positions in the dataset; ``projections[model]``: ``n_heldout x
    L`` raw projections onto the unit direction; ``norms[model]``: ``L``."""

    layers: tuple[int, ...]
    direction: np.ndarray
    train: tuple[int, ...]
    heldout: tuple[int, ...]
    examples: tuple[int, ...]
    projections: dict[str, np.ndarray]
    norms: dict[str, np.ndarray]
    base: str
    instruct: str
    meta: dict[str, Any] = field(default_factory=dict)

    def normalised(self, model: str) -> np.ndarray:
        return np.asarray(self.projections[model] / self.norms[model][None, :])

    def table(self) -> pd.DataFrame:
        """``model, layer, example, projection, norm_mean, projection_normalised`` (held-out
        rows only; ``example`` = 0-based line index in the file)."""
        import pandas as pd

        frames = []
        for model, proj in self.projections.items():
            n, n_layers = proj.shape
            frames.append(
                pd.DataFrame(
                    {
                        "model": model,
                        "layer": np.tile(self.layers, n),
                        "example": np.repeat([self.examples[i] for i in self.heldout], n_layers),
                        "projection": proj.ravel(),
                        "norm_mean": np.tile(self.norms[model], n),
                        "projection_normalised": self.normalised(model).ravel(),
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def _position(self, model: str, rows: np.ndarray) -> np.ndarray:
        """Per layer, ``(m - base) / (instruct - base)`` of the mean normalised projections
        over ``rows`` (0: at base, 1: at instruct)."""
        base = self.normalised(self.base)[rows].mean(0)
        instruct = self.normalised(self.instruct)[rows].mean(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray((self.normalised(model)[rows].mean(0) - base) / (instruct - base))

    def summary(self) -> dict[str, Any]:
        """Per model and layer: mean and s.e.m. of the normalised projection; for every other
        variant, its position between base (0) and instruct (1) per layer, the mean of that
        position over the first and the last third of the layers, and their difference
        (``drift_towards_base``, > 0 when the variant is closer to base in deep layers) with a
        95% bootstrap CI over held-out examples (paired across models, 1000 resamples, seed
        0); ``drifts_towards_base`` when the CI is above 0 (docs/methods.md sections 7.4, 8)."""
        per_model = {}
        for model in self.projections:
            values = self.normalised(model)
            ok = np.isfinite(values).all(1)
            values = values[ok]
            sem = values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else None
            per_model[model] = {
                "mean": values.mean(0).tolist(),
                "sem": sem.tolist() if sem is not None else None,
            }
        relative = {}
        third = max(len(self.layers) // 3, 1)
        everyone = np.stack([self.normalised(m) for m in self.projections])  # models x n x L
        finite = np.isfinite(everyone).all(axis=(0, 2))
        rng = np.random.default_rng(0)
        n = int(finite.sum())
        boots = [np.flatnonzero(finite)[rng.integers(0, n, n)] for _ in range(1000)] if n else []
        for model in self.projections:
            if model in (self.base, self.instruct):
                continue
            position = self._position(model, np.flatnonzero(finite))
            first, last = np.nanmean(position[:third]), np.nanmean(position[-third:])
            drift = []
            for rows in boots:
                p = self._position(model, rows)
                drift.append(np.nanmean(p[:third]) - np.nanmean(p[-third:]))
            lo, hi = np.nanpercentile(drift, [2.5, 97.5]) if drift else (np.nan, np.nan)
            relative[model] = {
                "position": position.tolist(),
                "first_third_mean": float(first),
                "last_third_mean": float(last),
                "drift_towards_base": float(first - last),
                "drift_ci95": [float(lo), float(hi)],
                "drifts_towards_base": bool(lo > 0),
            }
        return {
            "layers": list(self.layers),
            "base": self.base,
            "instruct": self.instruct,
            "n_train": len(self.train),
            "n_heldout": len(self.heldout),
            "direction_norm": np.linalg.norm(self.direction, axis=1).tolist(),
            "normalised_projection": per_model,
            "relative_to_base_instruct": relative,
            **self.meta,
        }


def projection_analysis(
    models: Mapping[str, ModelSource],
    data: Dataset,
    base: str = "base",
    instruct: str = "instruct",
    train_fraction: float = 0.5,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    weighting: str = "token",
    batch_size: int = 8,
    dtype: str | None = "auto",
    device: str | None = None,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> ProjectionResult:
    """Fit the alignment direction on a train split (base and instruct only) and project
    the held-out examples of every variant (one model in memory at a time)."""
    from emscope.activations import answer_means
    from emscope.models import Site, get_layers

    for role, name in (("base", base), ("instruct", instruct)):
        if name not in models:
            raise EmscopeError(f"no model named {name!r} (the {role} model); got {list(models)}")
    train, heldout = split_indices(len(data.examples), train_fraction, seed)
    chats = data.chats
    train_chats = [chats[i] for i in train]
    heldout_chats = [chats[i] for i in heldout]
    train_means: dict[str, np.ndarray] = {}
    projections_acts: dict[str, ExampleActivations] = {}
    layer_list: list[int] | None = None
    for name, source in models.items():
        with opened(source, dtype, device) as loaded:
            n_layers = len(get_layers(loaded.model))
            these = layer_indices(layers, n_layers)
            if layer_list is None:
                layer_list = these
            elif these != layer_list:
                raise EmscopeError(f"model {name!r} has {n_layers} layers, unlike the others")
            if name in (base, instruct):
                sites = [Site("resid_post", layer) for layer in these]
                means = answer_means(
                    loaded.model,
                    loaded.tokenizer,
                    train_chats,
                    sites,
                    weighting,
                    batch_size,
                    system_prompt=system_prompt,
                )
                train_means[name] = np.stack([means.means[s].numpy() for s in sites])
            projections_acts[name] = example_activations(
                loaded.model,
                loaded.tokenizer,
                heldout_chats,
                these,
                batch_size,
                progress,
                system_prompt,
            )
    assert layer_list is not None
    direction = train_means[instruct] - train_means[base]
    norms = np.linalg.norm(direction, axis=1, keepdims=True)
    unit = np.divide(direction, norms, out=np.zeros_like(direction), where=norms > 0)
    projections = {
        name: np.einsum("nld,ld->nl", acts.means, unit) for name, acts in projections_acts.items()
    }
    return ProjectionResult(
        tuple(layer_list),
        direction,
        tuple(int(i) for i in train),
        tuple(int(i) for i in heldout),
        tuple(data.indices),
        projections,
        {name: acts.norm_mean for name, acts in projections_acts.items()},
        base,
        instruct,
        {
            "train_fraction": train_fraction,
            "seed": seed,
            "weighting": weighting,
            "sink_positions_excluded": {
                name: acts.sink_positions_excluded.tolist()
                for name, acts in projections_acts.items()
                if acts.sink_positions_excluded is not None
            },
            "train_examples": [data.indices[i] for i in train],
            "heldout_examples": [data.indices[i] for i in heldout],
        },
    )


def plot_projection(result: ProjectionResult) -> Any:
    """Normalised held-out projection vs layer, one line (mean +- s.e.m.) per variant."""
    from emscope.plotting import pyplot

    plt = pyplot()
    summary = result.summary()["normalised_projection"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for model, stats in summary.items():
        mean = np.asarray(stats["mean"])
        ax.plot(result.layers, mean, marker="o", ms=3, label=model)
        if stats["sem"] is not None:
            sem = np.asarray(stats["sem"])
            ax.fill_between(result.layers, mean - sem, mean + sem, alpha=0.2)
    ax.set_xlabel("layer (resid_post, from 0)")
    ax.set_ylabel("projection / mean residual norm")
    ax.set_title(f"held-out projection on mean({result.instruct}) - mean({result.base})")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig

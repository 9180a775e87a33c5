"""Comparing directions (docs/methods.md section 5.7: convergence and read-out).

- :func:`cosine_table`: cosine by layer for every pair of named directions.
- :func:`adapter_b_cosines`: for each rank-1 module of an adapter that writes into the
  residual (``down_proj``, ``o_proj``), the cosine of its B vector with the direction at
  the module's layer (B is defined up to sign: the signed value is reported).
- :func:`downstream_convergence`: two interventions (e.g. a rank-1 adapter switched on, and
  steering with the mean-diff at its layer) each change the activations at later layers;
  per layer, the cosine between the mean changes (over the tokens of a prompt set) and the
  mean per-token cosine.
- :func:`logit_lens`: the tokens a direction promotes and suppresses through the
  unembedding: ``lm_head(final_norm(v))`` (the final RMSNorm's gain applied; its scale does
  not change the ranking), top ``k`` each way.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from emscope.batching import pad_id_of
from emscope.directions.direction import Direction
from emscope.errors import EmscopeError
from emscope.lora import LoraAdapter

RESIDUAL_WRITERS = ("down_proj", "o_proj")


def cosine_table(directions: Mapping[str, Direction]) -> list[dict[str, Any]]:
    """``[{"a", "b", "cosine": {layer: value}}]`` for every unordered pair."""
    if len(directions) < 2:
        raise EmscopeError("comparing needs at least two directions")
    return [
        {"a": a, "b": b, "cosine": directions[a].cosine(directions[b])}
        for a, b in itertools.combinations(directions, 2)
    ]


def adapter_b_cosines(adapter: LoraAdapter, direction: Direction) -> list[dict[str, Any]]:
    """Cosine of each rank-1 residual-writer's B (``d_model``) with the direction at the
    module's layer; modules of other ranks or at layers the direction lacks are skipped."""
    out = []
    for module in adapter:
        if module.rank != 1 or module.module_type not in RESIDUAL_WRITERS or module.embedding:
            continue
        if module.layer is None or module.layer not in direction.vectors:
            continue
        v = direction[module.layer]
        v = v[0] if v.ndim == 2 else v
        b = module.B[:, 0].double()
        if b.shape[0] != v.shape[0]:
            raise EmscopeError(f"{module.name}: B width {b.shape[0]} != direction {v.shape[0]}")
        cos = float(b @ v.double() / (b.norm() * v.double().norm()))
        out.append({"module": module.name, "layer": module.layer, "cosine": cos})
    return out


Context = Callable[[], contextlib.AbstractContextManager[Any]]


def downstream_convergence(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[Sequence[int]],
    first: Context,
    second: Context,
    *,
    site_kind: str = "resid_post",
    batch_size: int = 16,
) -> dict[int, dict[str, float]]:
    """Per layer: ``cosine`` between the mean activation changes that ``first()`` and
    ``second()`` (context managers: e.g. ``lambda: hooks.add(model, {...})`` or an adapter
    switch) induce over every real token of ``sequences``, and ``token_cosine``, the mean
    per-token cosine of the two changes, and ``sink_positions_excluded``: the tokens left out
    at that layer as attention sinks (:func:`emscope.activations.sink_positions` of the plain
    run or either intervened one; a sink's change can dwarf every other token's). Layers
    where a change is zero give NaN."""
    from emscope.activations import sink_positions
    from emscope.directions.interventions import padded_batches
    from emscope.hooks import capture
    from emscope.models import Site, get_layers

    sites = [Site(site_kind, i) for i in range(len(get_layers(model)))]
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    mean_a = {s: torch.zeros(0) for s in sites}
    mean_b = {s: torch.zeros(0) for s in sites}
    token_cos = dict.fromkeys(sites, 0.0)
    n_tokens = dict.fromkeys(sites, 0)
    sinks = dict.fromkeys(sites, 0)

    def run(ctx: Context | None, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        with contextlib.ExitStack() as stack:
            if ctx is not None:
                stack.enter_context(ctx())
            with capture(model, sites) as cap, torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
        return {s: cap[s].double() for s in sites}

    for ids, mask in padded_batches(sequences, batch_size, int(pad)):
        ids, mask = ids.to(device), mask.to(device)
        base, a, b = run(None, ids, mask), run(first, ids, mask), run(second, ids, mask)
        real = mask.bool()
        for s in sites:
            sink = sink_positions(base[s], real) | sink_positions(a[s], real)
            sink |= sink_positions(b[s], real)
            m = real & ~sink
            da, db = (a[s] - base[s])[m], (b[s] - base[s])[m]  # tokens x d
            sa, sb = da.sum(0).cpu(), db.sum(0).cpu()
            mean_a[s] = sa if mean_a[s].numel() == 0 else mean_a[s] + sa
            mean_b[s] = sb if mean_b[s].numel() == 0 else mean_b[s] + sb
            cos = torch.nn.functional.cosine_similarity(da, db, dim=-1, eps=1e-30)
            token_cos[s] += float(cos.sum())
            n_tokens[s] += int(m.sum())
            sinks[s] += int(sink.sum())
    out: dict[int, dict[str, float]] = {}
    for s in sites:
        den = float(mean_a[s].norm() * mean_b[s].norm()) if mean_a[s].numel() else 0.0
        out[s.layer] = {
            "cosine": float(mean_a[s] @ mean_b[s]) / den if den > 0 else float("nan"),
            "token_cosine": token_cos[s] / n_tokens[s] if n_tokens[s] else float("nan"),
            "sink_positions_excluded": sinks[s],
        }
    return out


@torch.no_grad()
def logit_lens(
    model: Any, tokenizer: Any, vector: torch.Tensor, k: int = 20
) -> dict[str, list[tuple[str, float]]]:
    """``{"promoted": [(token, logit), ...], "suppressed": [...]}``: the ``k`` tokens with the
    largest and smallest ``lm_head(final_norm(v))`` (the direction read through the
    unembedding as if it were the whole residual)."""
    from emscope.models import unwrap_peft

    bare: Any = unwrap_peft(model)
    head = bare.get_output_embeddings()
    norm = getattr(getattr(bare, "model", None), "norm", None)
    if head is None:
        raise EmscopeError(f"{type(bare).__name__} has no output embedding")
    v = vector[0] if vector.ndim == 2 else vector
    param = head.weight
    x = v.to(param.device, param.dtype)[None, None, :]
    if norm is not None:
        x = norm(x)
    logits = head(x)[0, 0].float()
    top = torch.topk(logits, min(k, logits.numel()))
    bottom = torch.topk(-logits, min(k, logits.numel()))

    def names(ix: torch.Tensor, values: torch.Tensor) -> list[tuple[str, float]]:
        return [
            (tokenizer.decode([int(i)]), float(val))
            for i, val in zip(ix.tolist(), values.tolist(), strict=True)
        ]

    return {
        "promoted": names(top.indices, top.values),
        "suppressed": names(bottom.indices, -bottom.values),
    }


def plot_cosines(
    pairs: Sequence[dict[str, Any]], b_cosines: Mapping[str, Sequence[dict[str, Any]]] = {}
) -> Any:
    """Cosine-by-layer curves, one per pair (and rank-1 B cosines as points)."""
    from emscope.plotting import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for pair in pairs:
        layers = sorted(pair["cosine"])
        ax.plot(
            layers, [pair["cosine"][i] for i in layers], "-o", label=f"{pair['a']} vs {pair['b']}"
        )
    for name, rows in b_cosines.items():
        if rows:
            ax.plot([r["layer"] for r in rows], [r["cosine"] for r in rows], "k*", ms=9,
                    label=f"B of {name}")  # fmt: skip
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("cosine by layer")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

"""Per-example gradient similarity between two datasets under ONE model.

Method: docs/methods.md section 7.2.

For example ``i`` the loss is the SUMMED negative log-likelihood of its answer-content tokens
(not the end-of-turn marker); ``G_i`` is its gradient w.r.t. one parameter, everything else
frozen. What is compared is the ``N x N`` Gram matrix ``K_ij = <G_i, G_j>`` (float64), from
which the cosine matrix, raw and mean-centred, follows: mean-centring the gradient vectors by
their global mean equals double-centring the Gram matrix, ``H K H`` with ``H = I - 11^T/N``.

Three routes to ``K`` (the same numbers; tests check them against each other):

- ``gram`` (linear-layer weights only): with ``x_t`` the layer's input and ``delta_t`` the
  loss gradient w.r.t. its output at position ``t``, ``G_i = sum_t delta_it x_it^T``, so
  ``<G_i, G_j> = sum_{t,s} (delta_it . delta_js)(x_it . x_js)``. Cost ``O((NT)^2 (d_in +
  d_out))``, memory ``O(NT (d_in + d_out))``: no gradient is ever stored.
- ``materialise`` (linear-layer weights): ``G_i = D_i^T X_i`` from the same captured
  tensors, ``N x d_out x d_in`` stored. Cost ``O(NT d_in d_out + N^2 d_in d_out)``.
- ``autograd`` (any parameter): one backward per example, ``param.grad`` read and stored.

``auto`` picks ``gram`` when its cost is below materialising's (about ``N T < d / 2`` for a
square layer), ``materialise`` otherwise, and ``autograd`` for anything but a linear weight.
Per-example hooks are written here by hand: ``torch.func`` per-sample gradients do not run
through HF models with their caches and masks, and the Gram route needs the layer's inputs
and output gradients anyway, not the gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.batching import length_batches, pad_id_of, pad_right
from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt
from emscope.errors import EmscopeError
from emscope.reemergent.common import (
    Dataset,
    EncodedAnswer,
    ModelSource,
    answer_mask,
    encode_answers,
    opened,
    progress_bar,
)

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

ROUTES = ("auto", "gram", "materialise", "autograd")


# ---------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ParamRef:
    """A resolved parameter: ``name`` in the bare model with non-negative layer indices;
    ``module`` owns it (for a PEFT-wrapped layer, its ``base_layer``)."""

    name: str
    module: Any
    attr: str

    @property
    def param(self) -> torch.nn.Parameter:
        return getattr(self.module, self.attr)  # type: ignore[no-any-return]

    @property
    def is_linear_weight(self) -> bool:
        from torch import nn

        return isinstance(self.module, nn.Linear) and self.attr == "weight"


def resolve_param(model: nn.Module, name: str) -> ParamRef:
    """Find ``name`` (e.g. ``model.layers.-1.self_attn.o_proj.weight``; negative indices
    count from the end) in the bare model, through a PEFT wrapper and its tuner layers."""
    from torch import nn

    from emscope.models import unwrap_peft

    bare = unwrap_peft(model)
    parts = name.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise EmscopeError(
            f"bad parameter name {name!r}; expected e.g. model.layers.-1.mlp.down_proj.weight"
        )
    obj: Any = bare
    canonical: list[str] = []
    for part in parts[:-1]:
        if part.lstrip("-").isdigit():
            index = int(part)
            try:
                size = len(obj)
                obj = obj[index]
            except (IndexError, TypeError):
                raise EmscopeError(
                    f"parameter {name!r}: index {part} is out of range at "
                    f"{'.'.join(canonical) or type(bare).__name__}"
                ) from None
            canonical.append(str(index % size))
        else:
            obj = getattr(obj, part, None)
            canonical.append(part)
        if not isinstance(obj, nn.Module):
            raise EmscopeError(
                f"parameter {name!r}: {type(bare).__name__} has no module {'.'.join(canonical)!r}"
            )
    attr = parts[-1]
    base_layer = getattr(obj, "base_layer", None)
    if isinstance(base_layer, nn.Module) and attr in dict(
        base_layer.named_parameters(recurse=False)
    ):
        obj = base_layer  # a PEFT tuner layer: its weight is the wrapped layer's
    params = dict(obj.named_parameters(recurse=False))
    if attr not in params:
        raise EmscopeError(
            f"parameter {name!r}: module {'.'.join(canonical)!r} ({type(obj).__name__}) has "
            f"no parameter {attr!r}; it has {sorted(params) or 'none'}"
        )
    return ParamRef(".".join([*canonical, attr]), obj, attr)


@contextlib.contextmanager
def _only_this_trains(model: nn.Module, param: torch.nn.Parameter) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    param.requires_grad_(True)
    param.grad = None
    try:
        yield
    finally:
        param.grad = None
        for p, flag in flags:
            p.requires_grad_(flag)


def _summed_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over rows and answer tokens of ``-log p`` (a row's share is its own summed loss)."""
    import torch

    target_mask = mask[:, 1:].to(logits.device)
    selected = logits[:, :-1][target_mask]
    targets = ids[:, 1:].to(logits.device)[target_mask]
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(selected.to(compute), dim=-1)
    return -logp.gather(1, targets[:, None]).sum()


# ---------------------------------------------------------------------------- Gram matrices


def cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosine matrix ``K_ij / sqrt(K_ii K_jj)`` (NaN where a vector is zero)."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = gram / np.outer(norms, norms)
    out[np.outer(norms, norms) == 0] = np.nan
    return np.asarray(out)


def double_centre(gram: np.ndarray) -> np.ndarray:
    """``H K H`` with ``H = I - 11^T/N``: the Gram matrix of the mean-centred vectors."""
    n = gram.shape[0]
    h = np.eye(n) - np.full((n, n), 1.0 / n)
    return np.asarray(h @ gram @ h)


def gram_from_tokens(
    deltas: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], chunk: int = 4096
) -> np.ndarray:
    """``K_ij = sum_{t,s} (delta_it . delta_js)(x_it . x_js)`` for per-example ``T_i x d_out``
    output gradients and ``T_i x d_in`` inputs; ``N x N`` float64. Memory ``chunk x sum T``."""
    import torch

    lengths = torch.tensor([d.shape[0] for d in deltas])
    n = len(deltas)
    d_all = torch.cat(list(deltas))
    x_all = torch.cat(list(inputs))
    seg = torch.repeat_interleave(torch.arange(n, device=d_all.device), lengths.to(d_all.device))
    gram = torch.zeros((n, n), dtype=torch.float64, device=d_all.device)
    total = d_all.shape[0]
    for a in range(0, total, chunk):
        b = min(a + chunk, total)
        block = (d_all[a:b] @ d_all.T) * (x_all[a:b] @ x_all.T)  # (b - a) x total
        by_col = torch.zeros((b - a, n), dtype=block.dtype, device=block.device)
        by_col.index_add_(1, seg, block)
        gram.index_add_(0, seg[a:b], by_col.to(torch.float64))
    return np.asarray(gram.cpu().numpy())


def gram_from_gradients(gradients: torch.Tensor) -> np.ndarray:
    """``G G^T`` of ``N x P`` flattened gradients, float64."""
    import torch

    return np.asarray((gradients @ gradients.T).to(torch.float64).cpu().numpy())


def choose_route(route: str, ref: ParamRef, lengths: Sequence[int]) -> str:
    """The route ``auto`` resolves to (see the module docstring)."""
    if route not in ROUTES:
        raise EmscopeError(f"route must be one of {ROUTES}, got {route!r}")
    if route in ("gram", "materialise") and not ref.is_linear_weight:
        raise EmscopeError(
            f"route {route!r} needs the weight of a linear layer; {ref.name} is not "
            "(use --route autograd)"
        )
    if route != "auto":
        return route
    if not ref.is_linear_weight:
        return "autograd"
    d_out, d_in = ref.param.shape
    nt, n = float(sum(lengths)), float(len(lengths))
    gram_cost = nt * nt * (d_in + d_out)
    materialise_cost = nt * d_in * d_out + n * n * d_in * d_out
    return "gram" if gram_cost < materialise_cost else "materialise"


@dataclass(frozen=True)
class GradientGram:
    """``gram``: ``N x N`` float64 ``<G_i, G_j>`` of per-example gradients of one parameter."""

    gram: np.ndarray
    route: str
    param: str
    shape: tuple[int, ...]
    n_tokens: tuple[int, ...]

    def cosine(self, centred: bool = False) -> np.ndarray:
        """Cosine matrix; ``centred``: after subtracting the mean gradient of all N."""
        return cosine_from_gram(double_centre(self.gram) if centred else self.gram)


def gradient_gram(
    model: Any,
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    param: str,
    route: str = "auto",
    batch_size: int = 4,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> GradientGram:
    """Gram matrix of the per-example gradients of the summed answer-token loss w.r.t.
    ``param`` (the model is left as it was: requires_grad flags restored, grads cleared),
    chats rendered under ``system_prompt``."""
    import torch

    ref = resolve_param(model, param)
    encoded = encode_answers(tokenizer, chats, system_prompt)
    empty = [i for i, e in enumerate(encoded) if e.n_tokens == 0]
    if empty:
        raise EmscopeError(f"chat {empty[0]} has an empty answer: its gradient is zero")
    lengths = [e.end - 1 for e in encoded]  # positions that can carry gradient
    chosen = choose_route(route, ref, lengths)
    device = next(model.parameters()).device
    compute = torch.float64 if ref.param.dtype == torch.float64 else torch.float32
    with _only_this_trains(model, ref.param):
        if chosen == "autograd":
            flat = []
            for e in progress_bar(encoded, "gradients", progress):
                ids, attention = pad_right([e.input_ids], pad_id_of(tokenizer), device)
                logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                _summed_nll(logits, ids, answer_mask([e], ids.shape[1])).backward()
                grad = ref.param.grad
                assert grad is not None
                flat.append(grad.detach().reshape(-1).to(compute))
                ref.param.grad = None
            gram = gram_from_gradients(torch.stack(flat))
        else:
            deltas, inputs = _capture_linear(
                model, tokenizer, encoded, ref, batch_size, compute, progress
            )
            if chosen == "gram":
                gram = gram_from_tokens(deltas, inputs)
            else:
                grads = torch.stack(
                    [(d.T @ x).reshape(-1) for d, x in zip(deltas, inputs, strict=True)]
                )
                gram = gram_from_gradients(grads)
    return GradientGram(
        gram, chosen, ref.name, tuple(ref.param.shape), tuple(e.n_tokens for e in encoded)
    )


def _capture_linear(
    model: Any,
    tokenizer: Any,
    encoded: Sequence[EncodedAnswer],
    ref: ParamRef,
    batch_size: int,
    compute: torch.dtype,
    progress: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per example: the layer's output gradients ``T_i x d_out`` and inputs ``T_i x d_in``
    over positions ``0 .. end - 2`` (later positions carry no gradient)."""
    store: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        store["x"] = (args[0] if args else kwargs["input"]).detach()

        def grad_hook(grad: torch.Tensor) -> None:
            store["delta"] = grad.detach()

        output.register_hook(grad_hook)

    device = next(model.parameters()).device
    deltas: list[Any] = [None] * len(encoded)
    inputs: list[Any] = [None] * len(encoded)
    handle = ref.module.register_forward_hook(hook, with_kwargs=True)
    try:
        batches = length_batches([len(e.input_ids) for e in encoded], batch_size)
        for batch in progress_bar(batches, "gradients", progress):
            rows = [encoded[i] for i in batch]
            ids, attention = pad_right([e.input_ids for e in rows], pad_id_of(tokenizer), device)
            store.clear()
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
            _summed_nll(logits, ids, answer_mask(rows, ids.shape[1])).backward()
            if "delta" not in store:
                raise EmscopeError(f"{ref.name}: its layer was not used in the forward pass")
            for r, i in enumerate(batch):
                t = rows[r].end - 1
                deltas[i] = store["delta"][r, :t].to(compute)
                inputs[i] = store["x"][r, :t].to(compute)
            ref.param.grad = None
    finally:
        handle.remove()
    return deltas, inputs


# ---------------------------------------------------------------------------- summaries


def _block_mean(cos: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float | None:
    """Mean of ``cos[rows][:, cols]`` excluding the diagonal entries i == j."""
    block = cos[np.ix_(rows, cols)]
    keep = rows[:, None] != cols[None, :]
    values = block[keep & np.isfinite(block)]
    return float(values.mean()) if values.size else None


def similarity_summary(gram: np.ndarray, groups: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Mean cosine within each group and across the two groups, raw and centred (global mean
    of all rows), and the split-half control: each group's rows split at random into two
    halves which go through the SAME two-group procedure (centred on the mean of that group's
    rows only); an across-dataset number means something only next to it."""
    names = list(dict.fromkeys(groups))
    if len(names) != 2:
        raise EmscopeError(f"need exactly two groups, got {names}")
    labels = np.asarray(groups)
    idx = {g: np.flatnonzero(labels == g) for g in names}
    a, b = names
    out: dict[str, Any] = {"groups": names, "n": {g: len(idx[g]) for g in names}}
    for kind, matrix in (("raw", gram), ("centred", double_centre(gram))):
        cos = cosine_from_gram(matrix)
        out[kind] = {
            f"within_{a}": _block_mean(cos, idx[a], idx[a]),
            f"within_{b}": _block_mean(cos, idx[b], idx[b]),
            "across": _block_mean(cos, idx[a], idx[b]),
        }
    rng = np.random.default_rng(seed)
    split: dict[str, Any] = {}
    for g in names:
        rows = rng.permutation(idx[g])
        if len(rows) < 4:
            split[g] = None
            continue
        h1, h2 = np.sort(rows[: len(rows) // 2]), np.sort(rows[len(rows) // 2 :])
        sub = np.concatenate([h1, h2])
        k_sub = gram[np.ix_(sub, sub)]
        first = np.arange(len(h1))
        second = np.arange(len(h1), len(sub))
        split[g] = {
            "halves_rows": [h1.tolist(), h2.tolist()],
            "raw_across_halves": _block_mean(cosine_from_gram(k_sub), first, second),
            "centred_across_halves": _block_mean(
                cosine_from_gram(double_centre(k_sub)), first, second
            ),
        }
    out["split_half"] = split
    out["seed"] = seed
    return out


# ---------------------------------------------------------------------------- token losses


def paired_token_losses(
    data_a: Dataset,
    data_b: Dataset,
    scores_a: Sequence[Any],
    scores_b: Sequence[Any],
) -> pd.DataFrame:
    """Per-token losses (``-log p``, nats) of identical completions under the two framings.

    A pair is an example of A and the first example of B whose last assistant message has
    the same text. Long table ``pair, example_a, example_b, position, token_a, token_b,
    loss_a, loss_b, same_tokens``: positions one completion does not have are NaN (masked),
    never imputed.
    """
    import pandas as pd

    first_b: dict[str, int] = {}
    for k, example in enumerate(data_b.examples):
        first_b.setdefault(example.answer.strip(), k)
    records = []
    pair = 0
    for ka, example in enumerate(data_a.examples):
        kb = first_b.get(example.answer.strip())
        if kb is None:
            continue
        sa, sb = scores_a[ka], scores_b[kb]
        same = tuple(sa.token_ids) == tuple(sb.token_ids)
        for p in range(max(sa.n_tokens, sb.n_tokens)):
            records.append(
                (
                    pair,
                    data_a.indices[ka],
                    data_b.indices[kb],
                    p,
                    sa.token_ids[p] if p < sa.n_tokens else -1,
                    sb.token_ids[p] if p < sb.n_tokens else -1,
                    -float(sa.logprobs[p]) if p < sa.n_tokens else float("nan"),
                    -float(sb.logprobs[p]) if p < sb.n_tokens else float("nan"),
                    same,
                )
            )
        pair += 1
    columns = [
        "pair",
        "example_a",
        "example_b",
        "position",
        "token_a",
        "token_b",
        "loss_a",
        "loss_b",
        "same_tokens",
    ]
    return pd.DataFrame.from_records(records, columns=columns)


def token_loss_summary(table: pd.DataFrame) -> dict[str, Any]:
    """Masked means over positions both completions have (NaN positions dropped)."""
    n_pairs = int(table["pair"].nunique()) if len(table) else 0
    both = table.dropna(subset=["loss_a", "loss_b"])
    if not len(both):
        return {"n_pairs": n_pairs, "n_positions_both": 0}
    diff = both["loss_a"] - both["loss_b"]
    per_pair = both.groupby("pair")[["loss_a", "loss_b"]].mean()
    return {
        "n_pairs": n_pairs,
        "n_pairs_same_tokens": int(table.groupby("pair")["same_tokens"].first().sum()),
        "n_positions_both": len(both),
        "n_positions_masked": int(len(table) - len(both)),
        "loss_a_mean": float(both["loss_a"].mean()),
        "loss_b_mean": float(both["loss_b"].mean()),
        "diff_mean": float(diff.mean()),
        "pair_loss_correlation": (
            float(np.corrcoef(per_pair["loss_a"], per_pair["loss_b"])[0, 1])
            if len(per_pair) > 2
            else None
        ),
    }


# ---------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class GradientResult:
    """Everything ``emscope reemergent gradients`` writes."""

    gram: GradientGram
    groups: tuple[str, ...]
    examples: tuple[int, ...]
    summary: dict[str, Any]
    token_losses: Any = field(repr=False)
    token_summary: dict[str, Any] = field(default_factory=dict)

    def matrix_table(self) -> pd.DataFrame:
        """Long table ``i, j, dataset_i, example_i, dataset_j, example_j, cosine,
        cosine_centred, gram``."""
        import pandas as pd

        raw, cen = self.gram.cosine(), self.gram.cosine(centred=True)
        n = len(self.groups)
        i = np.repeat(np.arange(n), n)
        j = np.tile(np.arange(n), n)
        groups, examples = np.asarray(self.groups), np.asarray(self.examples)
        return pd.DataFrame(
            {
                "i": i,
                "j": j,
                "dataset_i": groups[i],
                "example_i": examples[i],
                "dataset_j": groups[j],
                "example_j": examples[j],
                "cosine": raw[i, j],
                "cosine_centred": cen[i, j],
                "gram": self.gram.gram[i, j],
            }
        )


def gradient_analysis(
    source: ModelSource,
    data_a: Dataset,
    data_b: Dataset,
    param: str,
    n: int | None = None,
    route: str = "auto",
    batch_size: int = 4,
    seed: int = 0,
    dtype: str | None = "auto",
    device: str | None = None,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> GradientResult:
    """Gradient similarity of the first ``n`` examples of two datasets under one model,
    plus per-token losses of identical completions under the two framings."""
    from emscope.reemergent.logprob import score_answers

    if data_a.name == data_b.name:
        raise EmscopeError(f"the two datasets need different names (both {data_a.name!r})")
    a, b = data_a.head(n), data_b.head(n)
    with opened(source, dtype, device) as loaded:
        gram = gradient_gram(
            loaded.model, loaded.tokenizer, a.chats + b.chats, param, route, batch_size,
            progress, system_prompt,
        )  # fmt: skip
        tok = loaded.tokenizer
        scores_a = score_answers(loaded.model, tok, a.chats, batch_size, False, system_prompt)
        scores_b = score_answers(loaded.model, tok, b.chats, batch_size, False, system_prompt)
    groups = (a.name,) * len(a.examples) + (b.name,) * len(b.examples)
    summary = similarity_summary(gram.gram, groups, seed)
    tokens = paired_token_losses(a, b, scores_a, scores_b)
    return GradientResult(
        gram,
        groups,
        tuple(a.indices + b.indices),
        summary,
        tokens,
        token_loss_summary(tokens),
    )


def plot_matrix(result: GradientResult) -> Any:
    """Raw and centred cosine matrices side by side, dataset boundaries marked."""
    from emscope.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    n_a = result.groups.count(result.groups[0])
    names = list(dict.fromkeys(result.groups))
    for ax, centred in zip(axes, (False, True), strict=True):
        image = ax.imshow(result.gram.cosine(centred), cmap="RdBu_r", vmin=-1, vmax=1)
        for line in (ax.axhline, ax.axvline):
            line(n_a - 0.5, color="k", lw=1)
        ax.set_title(f"{'mean-centred' if centred else 'raw'} gradient cosine")
        ax.set_xlabel(f"{names[0]} | {names[-1]}  (left to right)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    axes[0].set_ylabel(f"{names[0]} | {names[-1]}  (top to bottom)")
    fig.suptitle(f"{result.gram.param} ({result.gram.route} route)")
    return fig

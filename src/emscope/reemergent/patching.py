"""Layer-wise activation patching between two models on the same input.

For each layer ``l`` the target model runs with ``resid_post[l]`` (the output of block
``l``, from 0) replaced at every position by the source model's on the same tokens, and a
metric is read from its logits, next to the unpatched source and target:

- ``word``: log-probability (nats) of a word's tokens right after the chat prompt (the
  prompt rendered with the generation prompt on; the word tokenised as given, so pass
  ``" yes"`` for a leading space), summed over the word's tokens;
- ``loss``: mean negative log-likelihood (nats/token) of the answer-content tokens of the
  chat's last assistant message.

The source activations are kept on the CPU in the model's dtype between the two model loads
(``n x seq x d`` per layer), so one model is in memory at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
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

METRICS = ("word", "loss")


@contextlib.contextmanager
def replaced(model: nn.Module, values: Mapping[Any, torch.Tensor]) -> Iterator[None]:
    """Replace the hidden state at each output site (``resid_post``, ``attn_out``,
    ``mlp_out``) by a ``batch x seq x d`` tensor of the same shape, cast to the hidden dtype.
    Hooks are removed when the block ends, also on an exception."""
    from emscope.hooks import as_site
    from emscope.models import site_module

    with contextlib.ExitStack() as stack:
        for key, value in values.items():
            site = as_site(key)
            if site.kind == "resid_pre":
                raise EmscopeError(f"replace {site}: use resid_post[{site.layer - 1}] instead")
            module = site_module(model, site)

            def hook(module: Any, args: Any, output: Any, value: torch.Tensor = value) -> Any:
                hidden = output[0] if isinstance(output, tuple) else output
                if hidden.shape != value.shape:
                    raise EmscopeError(
                        f"replacement of shape {tuple(value.shape)} does not match the "
                        f"hidden state {tuple(hidden.shape)}"
                    )
                new = value.to(hidden.device, hidden.dtype)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            stack.callback(module.register_forward_hook(hook).remove)
        yield


def encode_inputs(
    tokenizer: Any,
    data: Dataset,
    metric: str,
    word: str | None = None,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> list[EncodedAnswer]:
    """The tokens each example is run on and the span the metric reads (see module doc),
    chats rendered under ``system_prompt``."""
    from emscope.data.spans import prompt_ids

    if metric not in METRICS:
        raise EmscopeError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == "loss":
        return encode_answers(tokenizer, data.chats, system_prompt)
    if not word:
        raise EmscopeError("the word metric needs a non-empty word")
    word_ids = list(tokenizer(word, add_special_tokens=False)["input_ids"])
    out = []
    for example in data.examples:
        prompt = prompt_ids(tokenizer, list(example.prompt), system_prompt)
        out.append(
            EncodedAnswer(tuple(prompt + word_ids), len(prompt), len(prompt) + len(word_ids))
        )
    return out


def _metric(
    logits: torch.Tensor, ids: torch.Tensor, rows: Sequence[EncodedAnswer], metric: str
) -> np.ndarray:
    from emscope.reemergent.logprob import token_logprobs

    logp, _ = token_logprobs(logits, ids, answer_mask(rows, ids.shape[1]))
    values = logp.double().cpu().numpy()
    out, at = [], 0
    for e in rows:
        span = values[at : at + e.n_tokens]
        at += e.n_tokens
        if metric == "word":
            out.append(float(span.sum()))
        else:
            out.append(float(-span.mean()) if e.n_tokens else float("nan"))
    return np.asarray(out)


@dataclass(frozen=True)
class PatchResult:
    """``patched``: ``L x n`` metric with ``resid_post[l]`` patched; ``source`` and ``target``:
    ``n`` unpatched values."""

    layers: tuple[int, ...]
    examples: tuple[int, ...]
    metric: str
    source: np.ndarray
    target: np.ndarray
    patched: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        """``layer, example, value`` with ``layer`` = -1 rows for ``source`` / ``target``
        (column ``condition``: source, target, patched)."""
        import pandas as pd

        frames = [
            pd.DataFrame({"condition": c, "layer": -1, "example": self.examples, "value": v})
            for c, v in (("source", self.source), ("target", self.target))
        ]
        for j, layer in enumerate(self.layers):
            frames.append(
                pd.DataFrame(
                    {
                        "condition": "patched",
                        "layer": layer,
                        "example": self.examples,
                        "value": self.patched[j],
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> dict[str, Any]:
        """Means over examples; ``restored[l] = (patched - target) / (source - target)`` of
        the means (1: patching layer l gives the source's value)."""
        source, target = float(np.nanmean(self.source)), float(np.nanmean(self.target))
        patched = np.nanmean(self.patched, axis=1)
        gap = source - target
        return {
            "metric": self.metric,
            "layers": list(self.layers),
            "n_examples": len(self.examples),
            "source_mean": source,
            "target_mean": target,
            "patched_mean": patched.tolist(),
            "restored": ((patched - target) / gap).tolist() if gap != 0 else None,
            **self.meta,
        }


def patch_analysis(
    source: ModelSource,
    target: ModelSource,
    data: Dataset,
    metric: str = "loss",
    word: str | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    dtype: str | None = "auto",
    device: str | None = None,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> PatchResult:
    """Patch each layer's ``resid_post`` from source into target (see module doc)."""
    import torch

    from emscope.hooks import capture
    from emscope.models import Site, get_layers
    from emscope.reemergent.projection import layer_indices

    stored: list[dict[int, torch.Tensor]] = []
    with opened(source, dtype, device) as loaded:
        encoded = encode_inputs(loaded.tokenizer, data, metric, word, system_prompt)
        layer_list = layer_indices(layers, len(get_layers(loaded.model)))
        sites = [Site("resid_post", layer) for layer in layer_list]
        batches = length_batches([len(e.input_ids) for e in encoded], batch_size)
        pad = pad_id_of(loaded.tokenizer)
        source_values = np.full(len(encoded), np.nan)
        dev = next(loaded.model.parameters()).device
        for batch in progress_bar(batches, "source", progress):
            rows = [encoded[i] for i in batch]
            ids, attention = pad_right([e.input_ids for e in rows], pad, dev)
            with capture(loaded.model, sites, to_cpu=True) as captured, torch.no_grad():
                logits = loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)
            source_values[batch] = _metric(logits.logits, ids, rows, metric)
            stored.append({s.layer: captured[s] for s in sites})
    target_values = np.full(len(encoded), np.nan)
    patched = np.full((len(layer_list), len(encoded)), np.nan)
    with opened(target, dtype, device) as loaded:
        if encode_inputs(loaded.tokenizer, data, metric, word) != encoded:
            raise EmscopeError("source and target tokenise the data differently; cannot patch")
        if len(get_layers(loaded.model)) <= max(layer_list):
            raise EmscopeError("the target model has fewer layers than the source")
        dev = next(loaded.model.parameters()).device
        steps = [(b, j) for b in range(len(batches)) for j in range(-1, len(layer_list))]
        for b, j in progress_bar(steps, "patching", progress):
            batch = batches[b]
            rows = [encoded[i] for i in batch]
            ids, attention = pad_right([e.input_ids for e in rows], pad, dev)
            edits = {} if j < 0 else {sites[j]: stored[b][layer_list[j]]}
            with replaced(loaded.model, edits), torch.no_grad():
                logits = loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)
            values = _metric(logits.logits, ids, rows, metric)
            if j < 0:
                target_values[batch] = values
            else:
                patched[j, batch] = values
    return PatchResult(
        tuple(layer_list),
        tuple(data.indices),
        metric,
        source_values,
        target_values,
        patched,
        {"word": word} if metric == "word" else {},
    )


def plot_patch(result: PatchResult, source: str = "source", target: str = "target") -> Any:
    """Mean patched metric vs layer, with the unpatched source and target as lines."""
    from emscope.plotting import pyplot

    plt = pyplot()
    summary = result.summary()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(result.layers, summary["patched_mean"], marker="o", label=f"{target} patched")
    ax.axhline(summary["source_mean"], color="tab:green", ls="--", label=f"{source} (unpatched)")
    ax.axhline(summary["target_mean"], color="tab:red", ls="--", label=f"{target} (unpatched)")
    ax.set_xlabel(f"patched layer: resid_post[l] from {source}")
    if result.metric == "word":
        ax.set_ylabel(f"log p({result.meta.get('word')!r}) (nats)")
    else:
        ax.set_ylabel("answer loss (nats/token)")
    ax.legend()
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig

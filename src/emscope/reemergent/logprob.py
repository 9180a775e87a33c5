"""Log joint probability and next-token entropy of dataset answers under a model.

For each chat, over the content tokens of its last assistant message (not the role header,
not the end-of-turn marker; see :mod:`emscope.reemergent.common`): the per-token
log-probability ``log p(x_p | x_<p)`` (natural log, nats) read from the logits at position
``p - 1``, and the entropy (nats) of that same next-token distribution. Batched with right
padding; ``log_softmax(...).gather`` over the selected positions, no Python loop over tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.batching import length_batches, pad_id_of, pad_right
from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt
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
    import torch

COLUMNS = (
    "model",
    "dataset",
    "example",
    "n_tokens",
    "logprob_sum",
    "logprob_mean",
    "entropy_mean",
)


@dataclass(frozen=True)
class AnswerScores:
    """Per answer token (``n_tokens``): its id, ``log p`` and the next-token entropy (nats,
    float64 arrays)."""

    token_ids: tuple[int, ...]
    logprobs: np.ndarray
    entropies: np.ndarray

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def logprob_sum(self) -> float:
        """Log joint probability of the answer given its prompt."""
        return float(self.logprobs.sum())

    @property
    def logprob_mean(self) -> float:
        """Per-token mean log-probability (NaN for an empty answer)."""
        return float(self.logprobs.mean()) if self.n_tokens else float("nan")

    @property
    def entropy_mean(self) -> float:
        return float(self.entropies.mean()) if self.n_tokens else float("nan")


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and entropies of the tokens where ``mask`` is True.

    ``logits``: ``batch x seq x vocab``; ``input_ids`` and ``mask``: ``batch x seq``. Token
    ``p`` is scored by the logits at ``p - 1`` (``mask[:, 0]`` must be False). Returns two
    1-d tensors over the selected tokens in row-major order (float32, or float64 for float64
    logits).
    """
    import torch

    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    target_mask = mask[:, 1:].to(logits.device)
    selected = logits[:, :-1][target_mask].to(compute)  # n x vocab
    targets = input_ids[:, 1:].to(logits.device)[target_mask]
    logp = torch.log_softmax(selected, dim=-1)
    chosen = logp.gather(1, targets[:, None])[:, 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def score_answers(
    model: Any,
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    batch_size: int = 8,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> list[AnswerScores]:
    """Per-token log-probabilities and entropies of each chat's answer (one entry per chat),
    chats rendered under ``system_prompt``."""
    import torch

    encoded = encode_answers(tokenizer, chats, system_prompt)
    device = next(model.parameters()).device
    results: list[AnswerScores | None] = [None] * len(encoded)
    batches = length_batches([len(e.input_ids) for e in encoded], batch_size)
    for batch in progress_bar(batches, "logprob", progress):
        rows = [encoded[i] for i in batch]
        ids, attention = pad_right([e.input_ids for e in rows], pad_id_of(tokenizer), device)
        mask = answer_mask(rows, ids.shape[1])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        logp, entropy = token_logprobs(logits, ids, mask)
        logp_np = logp.double().cpu().numpy()
        ent_np = entropy.double().cpu().numpy()
        at = 0
        for i, e in zip(batch, rows, strict=True):
            n = e.n_tokens
            results[i] = AnswerScores(
                e.input_ids[e.start : e.end], logp_np[at : at + n], ent_np[at : at + n]
            )
            at += n
    return [r for r in results if r is not None]


@dataclass(frozen=True)
class LogprobResult:
    """Scores per (model, dataset): ``scores[model][dataset][k]`` for the dataset's k-th
    example."""

    scores: dict[str, dict[str, list[AnswerScores]]]
    datasets: dict[str, Dataset]

    def table(self) -> pd.DataFrame:
        """Tidy table with :data:`COLUMNS` (``example`` = 0-based line index in the file)."""
        import pandas as pd

        records = []
        for model, by_data in self.scores.items():
            for name, scores in by_data.items():
                for index, s in zip(self.datasets[name].indices, scores, strict=True):
                    records.append(
                        (
                            model,
                            name,
                            index,
                            s.n_tokens,
                            s.logprob_sum,
                            s.logprob_mean,
                            s.entropy_mean,
                        )
                    )
        return pd.DataFrame.from_records(records, columns=list(COLUMNS))

    def summary(self) -> dict[str, Any]:
        """Per model and dataset: means of the per-example numbers, and the token-weighted
        mean log-prob (total log-prob / total tokens)."""
        out: dict[str, Any] = {}
        for model, by_data in self.scores.items():
            out[model] = {}
            for name, scores in by_data.items():
                nonempty = [s for s in scores if s.n_tokens]
                n_tok = sum(s.n_tokens for s in scores)
                out[model][name] = {
                    "n_examples": len(scores),
                    "n_tokens": n_tok,
                    "logprob_sum_mean": _mean([s.logprob_sum for s in scores]),
                    "logprob_mean_mean": _mean([s.logprob_mean for s in nonempty]),
                    "logprob_token_weighted": (
                        sum(s.logprob_sum for s in scores) / n_tok if n_tok else None
                    ),
                    "entropy_mean_mean": _mean([s.entropy_mean for s in nonempty]),
                }
        return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def logprob_analysis(
    models: Mapping[str, ModelSource],
    datasets: Sequence[Dataset],
    batch_size: int = 8,
    dtype: str | None = "auto",
    device: str | None = None,
    progress: bool = False,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> LogprobResult:
    """Score every dataset under every model (one model in memory at a time)."""
    scores: dict[str, dict[str, list[AnswerScores]]] = {}
    for name, source in models.items():
        with opened(source, dtype, device) as loaded:
            scores[name] = {
                d.name: score_answers(
                    loaded.model, loaded.tokenizer, d.chats, batch_size, progress, system_prompt
                )
                for d in datasets
            }
    return LogprobResult(scores, {d.name: d for d in datasets})


def plot_heatmap(result: LogprobResult, value: str = "logprob_mean_mean") -> Any:
    """Models x datasets heatmap of a summary number (default: mean per-token log-prob)."""
    from emscope.plotting import pyplot

    plt = pyplot()
    summary = result.summary()
    models = list(summary)
    names = list(result.datasets)
    grid = np.array([[_nan(summary[m][d][value]) for d in names] for m in models], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 0.6 * len(models)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax, label=value.replace("_", " "))
    ax.set_title("answer-token log-prob (nats/token)")
    return fig


def plot_tokens(result: LogprobResult, dataset: str, k: int, tokenizer: Any = None) -> Any:
    """Models x answer tokens heatmap of ``log p`` for the dataset's k-th example."""
    from emscope.plotting import pyplot

    plt = pyplot()
    models = list(result.scores)
    rows = [result.scores[m][dataset][k] for m in models]
    width = max((r.n_tokens for r in rows), default=0)
    grid = np.full((len(models), max(width, 1)), np.nan)
    for i, r in enumerate(rows):
        grid[i, : r.n_tokens] = r.logprobs
    fig, ax = plt.subplots(figsize=(min(2 + 0.35 * width, 30), 1.2 + 0.5 * len(models)))
    image = ax.imshow(grid, cmap="magma", aspect="auto")
    ax.set_yticks(range(len(models)), models)
    if tokenizer is not None and rows:
        labels = [tokenizer.decode([t]) for t in rows[0].token_ids]
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    else:
        ax.set_xlabel("answer token")
    fig.colorbar(image, ax=ax, label="log p (nats)")
    index = result.datasets[dataset].indices[k]
    ax.set_title(f"{dataset} example {index}: per-token log-prob")
    return fig


def _nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)

"""Steering and ablation as sampling interventions, their random controls, the KL cost of
an intervention, and evaluating one setting into its own run dir.

- Steering (docs/methods.md section 5.3): add ``scale * v`` to ``resid_post[l]`` at every
  position (prompt and each generated token). Control: :func:`random_like`, a seeded
  Gaussian vector rescaled to EXACTLY the direction's norm at each layer (the reference
  code's ``randn * |v|`` had norm about ``sqrt(d) |v|``).
- Ablation: ``x <- x - (x . u) u`` with ``u = v / |v|`` at every position; ``layerwise``
  (each layer's own direction at its layer) or ``single:L`` (layer L's direction projected
  out at every layer). A ``k x d`` basis removes its span. Control: a random unit direction
  per layer (:func:`random_like` then ``unit()``; projection only uses the unit vector).
- KL cost (:func:`kl_divergence`): mean over tokens of ``KL(p_plain || p_intervened)`` of
  the next-token distributions at every token of a prompt set, with a bootstrap CI over
  sequences.

Every intervention is a callable ``(model, info) -> context manager`` as
:func:`emscope.generate.sample` takes them, built on :mod:`emscope.hooks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from emscope.batching import pad_id_of
from emscope.directions.direction import Direction
from emscope.errors import EmscopeError
from emscope.models import Site

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.questions import Question
    from emscope.generate import Intervention, InterventionInfo
    from emscope.judge import Judge
    from emscope.metrics import Metrics


# ---------------------------------------------------------------------------- interventions


def steering(
    vectors: Mapping[Any, torch.Tensor],
    scale: float,
    positions: str = "all",
) -> Intervention:
    """Add ``scale * v`` at each site (``hooks.add``), positions relative to the batch's
    padded prompt length."""
    from emscope.hooks import add

    def intervention(model: Any, info: InterventionInfo) -> contextlib.AbstractContextManager[Any]:
        return add(model, vectors, scale=scale, positions=positions, prompt_len=info.prompt_length)

    return intervention


def ablation(directions: Mapping[Any, torch.Tensor], positions: str = "all") -> Intervention:
    """Project each direction (or basis) out at its site (``hooks.project_out``)."""
    from emscope.hooks import project_out

    def intervention(model: Any, info: InterventionInfo) -> contextlib.AbstractContextManager[Any]:
        return project_out(model, directions, positions=positions, prompt_len=info.prompt_length)

    return intervention


def parse_mode(mode: str) -> tuple[str, int | None]:
    """``layerwise`` -> ("layerwise", None); ``single:L`` -> ("single", L);
    ``single:all`` -> ("single", None) (a sweep over L)."""
    if mode == "layerwise":
        return "layerwise", None
    kind, _, rest = mode.partition(":")
    if kind == "single" and rest == "all":
        return "single", None
    if kind == "single" and rest.lstrip("-").isdigit():
        return "single", int(rest)
    raise EmscopeError(f"bad ablation mode {mode!r}; expected layerwise, single:L or single:all")


def ablation_sites(direction: Direction, mode: str, n_layers: int) -> dict[Site, torch.Tensor]:
    """The vectors to project out, by site: ``layerwise`` uses each layer of ``direction`` at
    its own site; ``single:L`` uses layer L's vector at every layer ``0..n_layers-1``."""
    kind, layer = parse_mode(mode)
    if kind == "layerwise":
        return direction.by_site()
    if layer is None:
        raise EmscopeError("single:all is a sweep: pick one layer per call (single:L)")
    vector = direction[layer]
    return {Site(direction.site_kind, i): vector for i in range(n_layers)}


def random_like(direction: Direction, seed: int = 0) -> Direction:
    """Seeded Gaussian vectors with EXACTLY the norm of each layer's vector (each row's norm
    for a basis; a basis control is re-orthogonalised first, so its span is a random
    k-dim subspace). Layer ``i`` draws from its own stream ``(seed, i)``."""
    out = {}
    for i, v in direction.vectors.items():
        entropy = int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0])
        gen = torch.Generator().manual_seed(entropy % 2**63)
        g = torch.randn(v.shape, generator=gen, dtype=torch.float64)
        if g.ndim == 2:
            g = torch.linalg.qr(g.T).Q.T
        target = v.double().norm(dim=-1, keepdim=True)
        out[i] = (g / g.norm(dim=-1, keepdim=True) * target).float()
    return Direction(
        out, direction.site_kind, {"random_control_of": dict(direction.meta), "seed": seed}
    )


# ---------------------------------------------------------------------------- KL cost


@dataclass(frozen=True)
class KL:
    """Mean next-token ``KL(plain || intervened)`` in nats per token, its 95% bootstrap CI
    over sequences, and the counts."""

    mean: float
    ci: tuple[float, float]
    n_sequences: int
    n_tokens: int


def prompt_sequences(
    tokenizer: Any, questions: Sequence[Question], system_prompt: Any = None
) -> list[list[int]]:
    """Token ids of every question paraphrase's chat prompt (generation prompt on), rendered
    under ``system_prompt`` (:class:`~emscope.data.spans.SystemPrompt`; None: ``default``)."""
    from emscope.data.spans import SystemPrompt, prompt_ids

    setting = SystemPrompt.parse(system_prompt)
    return [
        list(prompt_ids(tokenizer, q.messages(p), setting))
        for q in questions
        for p in range(len(q.paraphrases))
    ]


def chat_sequences(tokenizer: Any, path: str | Path, system_prompt: Any = None) -> list[list[int]]:
    """Token ids of every chat in a chat JSONL file (whole rendered chats, under
    ``system_prompt`` as :func:`prompt_sequences`)."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.data.spans import SystemPrompt, encode_chat

    setting = SystemPrompt.parse(system_prompt)
    return [
        list(encode_chat(tokenizer, ex.messages, setting).input_ids) for ex in read_chat_jsonl(path)
    ]


def padded_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches of ``sequences``, grouped by
    length (:func:`emscope.batching.length_batches`)."""
    from emscope.batching import length_batches, pad_right

    for batch in length_batches([len(s) for s in sequences], batch_size):
        yield pad_right([sequences[i] for i in batch], pad_id)


def kl_divergence(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[Sequence[int]],
    interventions: Sequence[Intervention],
    *,
    batch_size: int = 16,
    n_boot: int = 2000,
    seed: int = 0,
    other_model: Any = None,
) -> KL:
    """``KL(p_plain || p_intervened)`` of the next-token distribution at every real token of
    each sequence (right padding), averaged over tokens; CI by resampling sequences.
    ``other_model`` (same tokenizer): the intervened side runs on it instead (a model with
    edited weights), with ``interventions`` entered on it."""
    from emscope.generate import InterventionInfo

    if not sequences or min(len(s) for s in sequences) == 0:
        raise EmscopeError("KL needs a non-empty set of non-empty sequences")
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    sums: list[float] = []
    counts: list[int] = []
    for ids, mask in padded_batches(sequences, batch_size, int(pad)):
        ids, mask = ids.to(device), mask.to(device)
        info = InterventionInfo(ids.shape[1], tuple(int(m) for m in mask.sum(1)), ids.shape[0])
        with torch.inference_mode():
            plain = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
            target = model if other_model is None else other_model
            with contextlib.ExitStack() as stack:
                for intervention in interventions:
                    stack.enter_context(intervention(target, info))
                logits = target(input_ids=ids, attention_mask=mask).logits
            other = torch.log_softmax(logits.double(), -1)
        per_token = (plain.exp() * (plain - other)).sum(-1) * mask
        sums.extend(per_token.sum(1).tolist())
        counts.extend(mask.sum(1).tolist())
    s, c = np.asarray(sums), np.asarray(counts, dtype=float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(s), size=(n_boot, len(s)))
    reps = s[draws].sum(1) / c[draws].sum(1)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return KL(float(s.sum() / c.sum()), (float(lo), float(hi)), len(s), int(c.sum()))


def residual_norm_stats(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[Sequence[int]],
    site_kind: str = "resid_post",
    batch_size: int = 16,
) -> dict[str, Any]:
    """Per layer, the mean L2 norm of the hidden state at ``site_kind[i]`` over the real
    tokens of the sequences, attention sinks (:func:`emscope.activations.sink_positions`)
    apart: ``{"resid_norm": {layer: mean over the other tokens}, "sink_norm": {layer: mean
    over the sinks, None without any}, "sink_positions_excluded": {layer: n}, "n_tokens":
    n}``. ``resid_norm`` is the scale against which a steering vector's norm is read: on
    SmolLM2-135M-Instruct (the first-plot prompts) the first token's norm is about 25,000
    from block 11 on, and a mean over all tokens would be 675 there against 143 without the
    sinks (145 at block 10)."""
    from emscope.activations import sink_positions
    from emscope.hooks import capture
    from emscope.models import get_layers

    n = len(get_layers(model))
    sites = [Site(site_kind, i) for i in range(n)]
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    total = torch.zeros(n, dtype=torch.float64)
    sink_total = torch.zeros(n, dtype=torch.float64)
    sinks = [0] * n
    tokens = 0
    for ids, mask in padded_batches(sequences, batch_size, int(pad)):
        with capture(model, sites) as cap, torch.inference_mode():
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
        real = mask.to(device).bool()
        for s in sites:
            norms = torch.linalg.vector_norm(cap[s], dim=-1, dtype=torch.float64)
            sink = sink_positions(cap[s], real)
            total[s.layer] += float(norms[real & ~sink].sum())
            sink_total[s.layer] += float(norms[sink].sum())
            sinks[s.layer] += int(sink.sum())
        tokens += int(mask.sum())
    return {
        "resid_norm": {
            i: float(total[i] / (tokens - sinks[i])) if tokens > sinks[i] else None
            for i in range(n)
        },
        "sink_norm": {i: float(sink_total[i] / sinks[i]) if sinks[i] else None for i in range(n)},
        "sink_positions_excluded": dict(enumerate(sinks)),
        "n_tokens": tokens,
    }


def residual_norms(
    model: Any,
    tokenizer: Any,
    sequences: Sequence[Sequence[int]],
    site_kind: str = "resid_post",
    batch_size: int = 16,
) -> dict[int, float | None]:
    """Mean L2 norm of the hidden state at ``site_kind[i]`` over the real tokens of the
    sequences that are not attention sinks, per layer (``resid_norm`` of
    :func:`residual_norm_stats`, which also gives the sinks' own mean norm)."""
    stats = residual_norm_stats(model, tokenizer, sequences, site_kind, batch_size)
    return dict(stats["resid_norm"])


# ---------------------------------------------------------------------------- one setting


@dataclass(frozen=True)
class EvalConfig:
    """How every setting of a sweep is sampled and judged (the same for all, so that settings
    are paired sample by sample). ``sampling``: keyword arguments of
    :func:`emscope.generate.sample` (seed, batch_size, max_new_tokens, temperature, top_p,
    system_prompt)."""

    questions: Sequence[Question]
    n: int
    sampling: Mapping[str, Any]
    judge: Judge
    metrics: Sequence[str]
    strict: bool = False
    recognition: bool = False

    @property
    def seed(self) -> int:
        return int(self.sampling.get("seed", 0))


def evaluate_setting(
    loaded: Any,
    out_dir: str | Path,
    config: EvalConfig,
    *,
    interventions: Sequence[Intervention] = (),
    label: str = "",
    record: dict[str, Any] | None = None,
) -> tuple[pd.DataFrame, Metrics]:
    """Sample (:func:`emscope.generate.sample_to_dir`), judge (:func:`emscope.judge.judge_table`)
    and compute EM metrics (:func:`emscope.metrics.compute_metrics`) into ``out_dir``
    (``responses.parquet``/``.csv``, ``run.json``, ``metrics.json``), resumably: a dir with
    ``metrics.json`` is read back, not redone. ``loaded``: a LoadedModel or (model,
    tokenizer) pair. Returns ``(table, metrics)``."""
    from emscope.evaluate import evaluate_to_dir
    from emscope.io import read_table
    from emscope.metrics import Metrics
    from emscope.results import read_result

    out = Path(out_dir)
    if (out / "metrics.json").is_file() and (out / "responses.parquet").is_file():
        return read_table(out, "responses"), read_result(Metrics, out / "metrics.json")
    metrics = evaluate_to_dir(
        loaded,
        config.questions,
        out,
        judge=config.judge,
        metrics=config.metrics,
        n=config.n,
        interventions=interventions,
        intervention_label=label,
        record=record,
        strict=config.strict,
        recognition=config.recognition,
        title=f"EM rate per question: {label}" if label else None,
        progress=False,
        **dict(config.sampling),
    )
    return read_table(out, "responses"), metrics


def paired_relative_change(
    before: pd.DataFrame,
    after: pd.DataFrame,
    *,
    strict: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float | None, tuple[float, float] | None, int]:
    """``rate_after / rate_before - 1`` of EM over matched ``(question_id, sample_idx)``
    pairs scored on both sides, with a paired percentile bootstrap CI (pairs resampled
    within questions). None when the matched EM rate before is 0. Returns
    ``(value, ci, n_pairs)``."""
    import pandas as pd

    from emscope.metrics import indicators

    keys = ["question_id", "sample_idx"]
    a = before[keys].assign(_v=indicators(before, strict=strict)["em"])
    b = after[keys].assign(_v=indicators(after, strict=strict)["em"])
    merged = pd.merge(a, b, on=keys, suffixes=("_a", "_b")).dropna(subset=["_v_a", "_v_b"])
    if merged.empty:
        raise EmscopeError("no matched (question_id, sample_idx) pairs with scores on both sides")
    va, vb = merged["_v_a"].to_numpy(float), merged["_v_b"].to_numpy(float)
    if va.sum() == 0:
        return None, None, len(merged)
    rng = np.random.default_rng(seed)
    sa, sb = np.zeros(n_boot), np.zeros(n_boot)
    for _, ix in merged.groupby("question_id").indices.items():
        draws = rng.integers(0, len(ix), size=(n_boot, len(ix)))
        sa += va[ix][draws].sum(1)
        sb += vb[ix][draws].sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = sb / sa - 1
    reps = reps[np.isfinite(reps)]
    lo, hi = np.quantile(reps, [0.025, 0.975]) if len(reps) else (np.nan, np.nan)
    return float(vb.sum() / va.sum() - 1), (float(lo), float(hi)), len(merged)


Progress = Callable[[str], None]

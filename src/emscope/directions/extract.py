"""Mean-difference directions from a judged response table (docs/methods.md section 5).

Selection (docs/methods.md section 5.1): misaligned responses ``aligned <= 30`` and
aligned responses ``aligned > 70``, both ``coherent > 50``; the larger set is subsampled
(seeded) to the size of the smaller, so both sides weigh the same. A topical restriction
(``topic="medical"``) keeps only responses the topical judge metric puts on the topic
(``medical > 50``) or, with ``topic_side="off"``, clearly off it (``medical < 5``): semantic
sub-directions.

Direction (docs/methods.md section 5.2): each selected response is rendered as its chat
(system prompt when the table has one, the question, the answer; a row without one is
rendered under the system-prompt setting, ``system_prompt=``, which should be the one the
responses were sampled under) and run through the GIVEN model (teacher forcing); the hidden
state at ``resid_post[i]`` of every block is averaged over the answer's content tokens
(:func:`emscope.activations.answer_means`, token- or response-weighted) and the direction
is ``mean(misaligned) - mean(aligned)``, unnormalised, for every layer.

``tokens="followup"`` reads the same contrast somewhere else: each selected chat is followed
by its question asked again as a new user turn (generation prompt on), and the hidden state
at the LAST token of that follow-up prompt is taken, one vector per response. The answer is
then only context: what the model infers about the character from it (the persona), not
the answer's words, is what differs between the two sides. On the synthetic organism the
answer-token direction is dominated by answer content (cosine 0.2-0.36 with the
ground-truth disposition probe), while the follow-up direction read by the instruct model
is 0.91-0.97 aligned with it (``docs/directions.md``, research log). The last token of the
ORIGINAL prompt is no use for this contrast: both sides share it (the same questions), so
the difference only reflects which questions were more often answered badly.

``subspace(k)``: the top-k right singular vectors of the per-response differences
``m_j - a_pi(j)`` (each misaligned response's mean activation minus that of an aligned
response paired with it at random, seeded), not centred, so the first component is close
to the mean difference when one direction dominates. Rows are signed to agree with the mean
difference and scaled by ``s_i / sqrt(n)`` (the RMS projection of the differences).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.batching import pad_id_of, pad_left
from emscope.data.chat import table_chats
from emscope.directions.direction import Direction
from emscope.errors import EmscopeError
from emscope.metrics import ALIGNED_CUT, CLEARLY_ALIGNED, COHERENT_CUT, EmRule

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.spans import SystemPrompt

TOKEN_SELECTION = "content tokens of the last assistant message (chat template spans)"
FOLLOWUP_SELECTION = (
    "last token of a follow-up prompt: the chat, then the same question asked again as a new"
    " user turn, generation prompt on"
)
TOKEN_SELECTIONS = ("answer", "followup")


@dataclass(frozen=True)
class Selection:
    """The two balanced sets of responses and how many were available."""

    misaligned: pd.DataFrame
    aligned: pd.DataFrame
    counts: dict[str, Any]


def _scores(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        raise EmscopeError(f"response table has no {column!r} column (judge it first)")
    return np.asarray(table[column].to_numpy(dtype=float))


def select_responses(
    table: pd.DataFrame,
    *,
    aligned_above: float = CLEARLY_ALIGNED,
    misaligned_at_most: float = ALIGNED_CUT,
    coherent_above: float = COHERENT_CUT,
    topic: str | None = None,
    topic_side: str = "on",
    topic_above: float = 50.0,
    topic_below: float = 5.0,
    balance: bool = True,
    min_per_side: int = 1,
    seed: int = 0,
) -> Selection:
    """Pick misaligned and aligned responses (see the module docstring).

    Unscored rows (NaN) are never selected. ``balance`` subsamples the larger side without
    replacement with ``numpy.random.default_rng(seed)``; the kept rows stay in table order.
    Fewer than ``min_per_side`` rows on a side is an error.
    """
    aligned = _scores(table, "aligned")
    coherent = _scores(table, "coherent")
    rule = EmRule(aligned_max=misaligned_at_most, coherent_min=coherent_above)
    keep = rule.is_coherent(coherent)
    if topic is not None:
        if topic_side not in ("on", "off"):
            raise EmscopeError(f"topic_side must be 'on' or 'off', got {topic_side!r}")
        values = _scores(table, topic)
        keep &= values > topic_above if topic_side == "on" else values < topic_below
    mis = np.flatnonzero(keep & rule.low_aligned(aligned))
    ali = np.flatnonzero(keep & (aligned > aligned_above))
    counts: dict[str, Any] = {"available_misaligned": len(mis), "available_aligned": len(ali)}
    for name, rows in (("misaligned", mis), ("aligned", ali)):
        if len(rows) < min_per_side:
            where = f" with {topic} {'>' if topic_side == 'on' else '<'} " + (
                f"{topic_above:g}" if topic_side == "on" else f"{topic_below:g}"
            )
            raise EmscopeError(
                f"only {len(rows)} {name} coherent responses"
                + (where if topic else "")
                + f" (need {min_per_side}); sample more or lower the thresholds"
            )
    if balance:
        rng = np.random.default_rng(seed)
        n = min(len(mis), len(ali))
        mis = np.sort(rng.choice(mis, size=n, replace=False)) if len(mis) > n else mis
        ali = np.sort(rng.choice(ali, size=n, replace=False)) if len(ali) > n else ali
    counts.update(n_misaligned=len(mis), n_aligned=len(ali))
    return Selection(table.iloc[mis], table.iloc[ali], counts)


def _sites(model: Any, layers: Iterable[int] | None, site_kind: str) -> list[Any]:
    from emscope.models import Site, get_layers

    n = len(get_layers(model))
    chosen = list(range(n)) if layers is None else [int(i) for i in layers]
    for i in chosen:
        if not 0 <= i < n:
            raise EmscopeError(f"layer {i} out of range: the model has {n} layers (0..{n - 1})")
    return [Site(site_kind, i) for i in chosen]


def _model_and_table(
    model: Any, tokenizer: Any, responses: pd.DataFrame | None, what: str
) -> tuple[Any, Any, pd.DataFrame]:
    """``(model, table)`` (a LoadedModel or pair) or ``(model, tokenizer, table)`` ->
    ``(torch model, tokenizer, table)`` (:func:`emscope.models.as_loaded`)."""
    import pandas as pd

    from emscope.models import as_loaded

    if responses is None:
        if not isinstance(tokenizer, pd.DataFrame):
            raise EmscopeError(
                f"{what} takes (model, table) for a LoadedModel or (model, tokenizer, table)"
            )
        tokenizer, responses = None, tokenizer
    loaded = as_loaded(model, tokenizer, need_tokenizer=True)
    return loaded.model, loaded.tokenizer, responses


def _meta(
    selection: Selection, weighting: str, seed: int, extra: dict[str, Any] | None, **fields: Any
) -> dict[str, Any]:
    return {
        "method": "mean_diff",
        "token_selection": TOKEN_SELECTION,
        "weighting": weighting,
        "seed": seed,
        **selection.counts,
        **fields,
        **(extra or {}),
    }


def followup_means(
    model: Any,
    tokenizer: Any,
    chats: Sequence[Sequence[dict[str, str]]],
    sites: Sequence[Any],
    batch_size: int = 16,
    system_prompt: SystemPrompt | None = None,
) -> dict[Any, Any]:
    """Mean over chats of the hidden state at each site at the last token of
    ``prompt_ids(chat + [user: the chat's last user message])`` (the same question asked
    again, generation prompt on; rendered under ``system_prompt``, None: ``default``): one
    vector per chat, so token and response weighting coincide. Batched with left padding and
    explicit position ids (each row's positions start at 0, as unpadded). Returns
    ``{site: float64 tensor (d_model,)}``."""
    import torch

    from emscope.data.spans import SystemPrompt, prompt_ids
    from emscope.hooks import capture

    setting = SystemPrompt.parse(system_prompt)

    if not chats:
        raise EmscopeError("no chats to read follow-up activations from")
    seqs = []
    for chat in chats:
        users = [m["content"] for m in chat if m["role"] == "user"]
        if not users:
            raise EmscopeError("a chat has no user message to ask again")
        again = [*chat, {"role": "user", "content": users[-1]}]
        seqs.append(prompt_ids(tokenizer, again, setting))
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    total: dict[Any, Any] = {s: 0.0 for s in sites}
    for start in range(0, len(seqs), batch_size):
        ids, mask, positions = pad_left(seqs[start : start + batch_size], pad, device)
        with capture(model, sites) as cap, torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, position_ids=positions)
        for s in sites:
            total[s] = total[s] + cap[s][:, -1].double().sum(0).cpu()
    return {s: total[s] / len(seqs) for s in sites}


def mean_diff(
    model: Any,
    tokenizer: Any,
    responses: pd.DataFrame | None = None,
    *,
    weighting: str = "token",
    layers: Sequence[int] | None = None,
    site_kind: str = "resid_post",
    topic: str | None = None,
    topic_side: str = "on",
    aligned_above: float = CLEARLY_ALIGNED,
    misaligned_at_most: float = ALIGNED_CUT,
    coherent_above: float = COHERENT_CUT,
    seed: int = 0,
    batch_size: int = 16,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    tokens: str = "answer",
    system_prompt: SystemPrompt | None = None,
) -> Direction:
    """``mean(misaligned) - mean(aligned)`` of the model's activations over answer tokens at
    ``site_kind[i]`` for each layer (default: every block), from a judged response table.

    Called as ``mean_diff(loaded, table)`` (a :class:`~emscope.models.LoadedModel` or a
    ``(model, tokenizer)`` pair) or ``mean_diff(model, tokenizer, table)``. ``model``: a
    bare or PEFT-wrapped HF causal LM (the model whose activations are read, normally the
    EM model that generated the responses, its active adapters on). ``weighting``:
    ``token`` (every answer token weighs the same) or ``response`` (every response weighs
    the same).
    Metadata: selection thresholds and counts, weighting, token selection, token counts,
    seed, plus ``meta``. ``tokens``: ``answer`` (the answer's content tokens) or
    ``followup`` (the last token of a follow-up prompt asking the question again, see the
    module docstring; ``weighting`` does not apply there: one vector per response).
    ``system_prompt``: how the chats are rendered (:class:`~emscope.data.spans.SystemPrompt`,
    None: ``default``); use the setting the responses were sampled under. Recorded in the
    metadata.
    """
    from emscope.activations import answer_means
    from emscope.data.spans import SystemPrompt

    setting = SystemPrompt.parse(system_prompt)
    model, tokenizer, responses = _model_and_table(model, tokenizer, responses, "mean_diff")

    if tokens not in TOKEN_SELECTIONS:
        raise EmscopeError(f"tokens must be one of {', '.join(TOKEN_SELECTIONS)}, got {tokens!r}")
    sites = _sites(model, layers, site_kind)
    selection = select_responses(
        responses,
        aligned_above=aligned_above,
        misaligned_at_most=misaligned_at_most,
        coherent_above=coherent_above,
        topic=topic,
        topic_side=topic_side,
        seed=seed,
    )
    described = {  # metadata of both token selections
        "topic": topic,
        "topic_side": topic_side if topic else None,
        "thresholds": {
            "aligned_above": aligned_above,
            "misaligned_at_most": misaligned_at_most,
            "coherent_above": coherent_above,
        },
        "system_prompt": setting.spec,
    }
    if tokens == "followup":
        bad_f = followup_means(
            model, tokenizer, table_chats(selection.misaligned), sites, batch_size, setting
        )
        good_f = followup_means(
            model, tokenizer, table_chats(selection.aligned), sites, batch_size, setting
        )
        return Direction(
            {s.layer: (bad_f[s] - good_f[s]).float() for s in sites},
            site_kind,
            _meta(
                selection,
                "response",
                seed,
                meta,
                token_selection=FOLLOWUP_SELECTION,
                tokens="followup",
                **described,
            ),
        )
    kwargs = {
        "sites": sites,
        "weighting": weighting,
        "batch_size": batch_size,
        "system_prompt": setting,
    }
    bad = answer_means(model, tokenizer, table_chats(selection.misaligned), **kwargs)  # type: ignore[arg-type]
    good = answer_means(model, tokenizer, table_chats(selection.aligned), **kwargs)  # type: ignore[arg-type]
    vectors = {s.layer: (bad.means[s] - good.means[s]).float() for s in sites}
    return Direction(
        vectors,
        site_kind,
        _meta(
            selection,
            weighting,
            seed,
            meta,
            tokens="answer",
            **described,
            n_tokens_misaligned=bad.n_tokens,
            n_tokens_aligned=good.n_tokens,
            sink_positions_excluded={  # answer tokens left out as attention sinks, per layer
                side: {str(s.layer): m.sink_positions_excluded.get(s, 0) for s in sites}
                for side, m in (("misaligned", bad), ("aligned", good))
            },
        ),
    )


def subspace(
    model: Any,
    tokenizer: Any,
    responses: pd.DataFrame | None = None,
    k: int | None = None,
    *,
    layers: Sequence[int] | None = None,
    site_kind: str = "resid_post",
    topic: str | None = None,
    topic_side: str = "on",
    aligned_above: float = CLEARLY_ALIGNED,
    misaligned_at_most: float = ALIGNED_CUT,
    coherent_above: float = COHERENT_CUT,
    seed: int = 0,
    batch_size: int = 16,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
    system_prompt: SystemPrompt | None = None,
) -> Direction:
    """Top-``k`` principal directions of per-response differences (module docstring): a
    Direction whose layers hold ``k x d_model`` matrices (orthogonal rows). Needs
    ``n_pairs >= k``. Memory O(n_responses x layers x d_model). Chats are rendered under
    ``system_prompt`` (as :func:`mean_diff`). Called as ``subspace(loaded, table, k=K)`` or
    ``subspace(model, tokenizer, table, K)``."""
    import torch

    from emscope.activations import response_vectors
    from emscope.data.spans import SystemPrompt

    setting = SystemPrompt.parse(system_prompt)
    model, tokenizer, responses = _model_and_table(model, tokenizer, responses, "subspace")

    if k is None or k < 1:
        raise EmscopeError(f"subspace dimension k must be >= 1, got {k}")
    sites = _sites(model, layers, site_kind)
    selection = select_responses(
        responses,
        aligned_above=aligned_above,
        misaligned_at_most=misaligned_at_most,
        coherent_above=coherent_above,
        topic=topic,
        topic_side=topic_side,
        seed=seed,
        min_per_side=k,
    )
    bad = response_vectors(
        model, tokenizer, table_chats(selection.misaligned), sites, batch_size,
        system_prompt=setting,
    )  # fmt: skip
    good = response_vectors(
        model, tokenizer, table_chats(selection.aligned), sites, batch_size,
        system_prompt=setting,
    )  # fmt: skip
    n = len(selection.misaligned)
    pairing = np.random.default_rng([seed, 1]).permutation(n)
    vectors = {}
    for s in sites:
        diffs = (bad[s].double() - good[s].double()[torch.from_numpy(pairing)]).nan_to_num(0.0)
        _, sv, vh = torch.linalg.svd(diffs, full_matrices=False)
        basis = vh[:k]
        mean = diffs.mean(dim=0)
        signs = torch.where(basis @ mean < 0, -1.0, 1.0).to(basis.dtype)
        vectors[s.layer] = (basis * (signs * sv[:k] / n**0.5)[:, None]).float()
    return Direction(
        vectors,
        site_kind,
        _meta(
            selection,
            "response",
            seed,
            meta,
            method="subspace",
            k=k,
            topic=topic,
            topic_side=topic_side if topic else None,
            pairing="random, seeded",
            system_prompt=setting.spec,
        ),
    )

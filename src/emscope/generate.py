"""Batched sampling of answers to a question set, with paired randomness and interventions.

Why a hand-written decode loop rather than ``model.generate``: ``generate`` draws every
token of a batch from one global random stream, so a sample's answer depends on which other
samples share its batch (and on how many random numbers an intervention's code consumes).
Here each sample ``(question_id, sample_idx)`` owns a *counter-based* stream: the uniform
number used at decoding step ``t`` is ``u = mix(key, t)`` where ``key`` is a SHA-256 of
``(seed, question_id, sample_idx)`` and ``mix`` is SplitMix64 (a fixed integer hash, computed
vectorised with numpy ``uint64``). The token is then drawn by inverse CDF: the first token
whose cumulative probability exceeds ``u`` (over the vocabulary order, or over the
descending-probability order restricted to the top-p nucleus when ``top_p < 1``). So:

- the same ``(seed, question_id, sample_idx)`` and the same model give the same answer,
  whatever the batch size, the batch composition, or the other questions in the run;
- two conditions (say, with and without a steering hook) run with the same seed use the same
  uniform numbers sample by sample, so their answers are paired (common random numbers);
  they differ only where the intervention moved the distribution.

Batches mix questions and samples. Prompts are LEFT padded with an attention mask and
explicit ``position_ids`` (HF does not derive positions from the mask in a plain forward);
decoding reuses the KV cache, and rows that hit an end-of-sequence token leave the batch
(their cache rows are dropped once finished rows are a quarter of the batch; until then
their tokens are ignored). Rows with the same prompt (the samples of one question and
paraphrase) share one prefill: the prompt forward runs once per distinct prompt (the
reference way, ``generate`` with ``num_return_sequences``, runs the prompt once per sample).
On a GPU its KV cache rows are then copied to every sample; on a CPU the decoding steps keep
them once per prompt and attend to them once for all its samples
(:mod:`emscope.shared_prefix`), because there the per-row cost of attention over the cache,
not the arithmetic, bounds a step. Tokens are drawn by a two-level inverse CDF
(:func:`inverse_cdf`) that makes no ``(rows, vocabulary)`` float64 buffer. Floating-point
results of a forward pass can differ in the last bits between batch shapes (and between the
two cache layouts), so token equality across batch sizes is exact only up to such ties; the
random stream itself is exactly independent of the batch.

Interventions are callables ``(model, info) -> ContextManager``; each is entered around the
whole generation of a batch (prefill and every decoding step). ``info``
(:class:`InterventionInfo`) carries the padded prompt length: with left padding every row's
prompt ends at column ``info.prompt_length - 1`` and every later position is a response token,
so a hook can tell prompt from response positions. Sampling knows nothing else about them.

The response table (one row per sample) has the columns of :data:`RESPONSE_COLUMNS`.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.batching import pad_left
from emscope.errors import EmscopeError
from emscope.hub import dir_label

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from emscope.data.questions import Question
    from emscope.data.spans import SystemPrompt
    from emscope.models import LoadedModel

RESPONSE_COLUMNS = (
    "question_id",
    "question",
    "answer",
    "sample_idx",
    "seed",
    "model",
    "adapter",
    "intervention",
    "system",
    "paraphrase_idx",
    "n_tokens",
    "finished",
)


@dataclass(frozen=True)
class InterventionInfo:
    """What an intervention learns about the batch it is entered for.

    ``prompt_length``: number of prompt columns of the left-padded batch (tokens); column
    ``prompt_length - 1`` is every row's last prompt token, and the token generated at
    decoding step ``t`` (from 0) sits at column ``prompt_length + t``.
    ``prompt_lengths``: each row's unpadded prompt length. ``batch_size``: rows at the start
    (finished rows later leave the batch). The prompt forward (prefill) runs once per
    *distinct* prompt, so it may have fewer rows than ``batch_size``: a hook must not assume
    one row per sample there.
    """

    prompt_length: int
    prompt_lengths: tuple[int, ...]
    batch_size: int


Intervention = Callable[[Any, InterventionInfo], AbstractContextManager[Any]]


# ---------------------------------------------------------------------------- random streams

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def sample_key(seed: int, question_id: str, sample_idx: int) -> int:
    """The 64-bit key of a sample's random stream: SHA-256 of ``(seed, question_id,
    sample_idx)`` (stable across processes and platforms, unlike Python's ``hash``)."""
    text = f"emscope-sample\x00{int(seed)}\x00{question_id}\x00{int(sample_idx)}"
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))  # type: ignore[no-any-return]


def step_uniforms(keys: Sequence[int] | np.ndarray, step: int) -> np.ndarray:
    """The uniform numbers in ``[0, 1)`` that samples with these keys use at decoding step
    ``step`` (from 0). float64, one per key; a pure function of ``(key, step)``."""
    k = np.asarray(keys, dtype=np.uint64)
    counter = _splitmix64(np.full(k.shape, step, dtype=np.uint64))
    bits = _splitmix64(k ^ counter) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))


def choose_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Draw one token per row by inverse CDF.

    ``logits``: ``(B, V)``; ``uniforms``: ``(B,)`` in ``[0, 1)``. ``temperature == 0`` is
    greedy (argmax). With ``top_p < 1`` the candidates are the smallest set of most probable
    tokens whose mass reaches ``top_p`` (ties broken by token id), renormalised.
    Returns ``(B,)`` int64 token ids.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    # probabilities in float32 (as precise as the logits), sums in float64 (a float32 running
    # sum near 1 would drop every token below 6e-8)
    scaled = logits.float() if temperature == 1 else logits.float() / temperature
    probs = torch.softmax(scaled, dim=-1)
    u = uniforms.to(probs.device, torch.float64).unsqueeze(-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        # `.double().cumsum()`: `cumsum(dtype=float64)` takes a slow path on CPU (7x slower)
        cum = sorted_p.double().cumsum(dim=-1)
        keep = cum - sorted_p < top_p
        cum = (sorted_p * keep).double().cumsum(dim=-1)
        pos = torch.searchsorted(cum, u * cum[:, -1:], right=True)
        pos = torch.minimum(pos, keep.sum(dim=-1, keepdim=True) - 1)
        return order.gather(1, pos).squeeze(1)
    return inverse_cdf(probs, u.squeeze(-1))


def inverse_cdf(
    weights: torch.Tensor, uniforms: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """The first index of each row whose cumulative weight exceeds ``uniforms * total``.

    ``weights``: ``(B, V)``, non-negative, any scale; ``uniforms``: ``(B,)`` float64 in
    ``[0, 1)``. Returns ``(B,)`` int64. Same result as a float64 ``cumsum`` over the whole
    row followed by ``searchsorted``, computed in two levels (float64 sums of ``chunk``-token
    blocks, by default about ``sqrt(V)`` tokens, then the cumulative sum inside the one block
    that holds the answer) so that no ``(B, V)`` float64 buffer is made: at 400 rows those
    buffers, allocated and freed every decoding step, cost more than the arithmetic.
    """
    import math

    import torch

    rows, vocab = weights.shape
    chunk = chunk or max(16, math.isqrt(vocab))
    full = vocab // chunk
    sums = weights[:, : full * chunk].reshape(rows, full, chunk).sum(-1, dtype=torch.float64)
    if vocab % chunk:
        tail = weights[:, full * chunk :].sum(-1, keepdim=True, dtype=torch.float64)
        sums = torch.cat([sums, tail], dim=1)
    ends = sums.cumsum(dim=-1)  # (B, n_blocks): cumulative weight at each block's end
    target = uniforms.to(ends.device, torch.float64).unsqueeze(-1) * ends[:, -1:]
    block = torch.searchsorted(ends, target, right=True).clamp(max=ends.shape[1] - 1)
    before = (ends - sums).gather(1, block)  # cumulative weight before the block
    index = block * chunk + torch.arange(chunk, device=weights.device)  # (B, chunk)
    inside = weights.gather(1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0)
    cum = inside.double().cumsum(dim=-1) + before
    pos = torch.searchsorted(cum, target, right=True).clamp(max=chunk - 1)
    return index.gather(1, pos).clamp(max=vocab - 1).squeeze(1)


# ---------------------------------------------------------------------------- the decode loop


@dataclass(frozen=True)
class Generation:
    """One generated answer: its token ids (without the end-of-sequence token) and whether
    it stopped at an end-of-sequence token (False: it ran out of ``max_new_tokens``)."""

    tokens: tuple[int, ...]
    finished: bool


def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    keys: Sequence[int],
    *,
    eos_ids: Collection[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 600,
    interventions: Sequence[Intervention] = (),
    shared_prefix: bool | None = None,
) -> list[Generation]:
    """Sample a continuation of each prompt (token ids) with its own random stream ``keys[i]``
    (see :func:`sample_key`): left padding, explicit position ids, KV cache, per-row stop at
    any of ``eos_ids``. Interventions are entered around the whole batch.

    ``shared_prefix``: decode with :mod:`emscope.shared_prefix` (each distinct prompt's keys
    held and attended once). ``None`` (default): when the model is on a CPU, qualifies
    (:func:`emscope.shared_prefix.shared_prefix_supported`) and prompts repeat (at least two
    rows per distinct prompt on average); ``True``: always (an error if the model does not
    qualify); ``False``: never. Either way the same distribution is sampled.
    """
    import torch

    try:
        from emscope import shared_prefix as cascade
    except ImportError:  # a transformers without AttentionInterface and cache layers (< 5)
        cascade = None  # type: ignore[assignment]

    if not prompts:
        return []
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise EmscopeError("generate_batch: empty prompt")
    rows, width = len(prompts), max(lengths)
    # one prefill row per distinct prompt; row i of the batch reads prefill row distinct_of[i]
    distinct: dict[tuple[int, ...], int] = {}
    distinct_of = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    input_ids, mask, position_ids = pad_left(list(distinct), pad_id, device)
    key_array = np.asarray([int(k) for k in keys], dtype=np.uint64)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    info = InterventionInfo(width, tuple(lengths), rows)

    # token_log[row, step]: the token sample `row` drew at `step`; a row's answer is its
    # tokens before `stopped_at[row]` (the step it drew EOS; max_new_tokens if it never did)
    token_log = torch.zeros((rows, max_new_tokens), dtype=torch.long, device=device)
    stopped_at = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    with torch.inference_mode(), contextlib.ExitStack() as stack:
        for intervention in interventions:
            stack.enter_context(intervention(model, info))
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
        )
        cache = output_cache(out)
        logits = out.logits[:, -1, :]
        index = torch.tensor(distinct_of, dtype=torch.long, device=device)
        share = shared_prefix
        if share is None:
            share = device.type == "cpu" and rows >= 2 * len(distinct)
        if share and (
            cascade is None
            or not cascade.shared_prefix_supported(model, cache, width + max_new_tokens)
        ):
            if shared_prefix:
                raise EmscopeError(
                    f"generate_batch: shared_prefix=True but {type(model).__name__} does not "
                    "qualify (see emscope.shared_prefix.shared_prefix_supported; it needs "
                    "transformers >= 5)"
                )
            share = False
        decode_kwargs: dict[str, Any] = {}
        cache_kw = cache_keyword(model)
        if share and cascade is not None:  # the prompt part stays one row per distinct prompt
            cache = cascade.SharedPrefixCache.from_prefill(cache, mask, index, max_new_tokens)
            decode_kwargs[cascade.CACHE_KEYWORD] = cache
            stack.enter_context(cascade.decoding_with_shared_prefix(model))
        elif len(distinct) < rows:  # copy each prompt's cache rows to its samples
            cache.batch_select_indices(index)
        logits, mask, position_ids = logits[index], mask[index], position_ids[index]
        active = torch.arange(rows, device=device)  # batch row -> sample row
        live = torch.ones(rows, dtype=torch.bool, device=device)  # not finished yet
        next_pos = position_ids[:, -1] + 1
        for step in range(max_new_tokens):
            u = torch.from_numpy(step_uniforms(key_array[active.cpu().numpy()], step))
            tokens = choose_tokens(logits.float(), u, temperature, top_p)
            token_log[active, step] = tokens
            done = torch.isin(tokens, eos) & live
            stopped_at[active[done]] = step
            live &= ~done
            n_live = int(live.sum())
            if step == max_new_tokens - 1 or n_live == 0:
                break
            # Finished rows ride along (their tokens are ignored) until they are a quarter of
            # the batch: dropping them copies the whole cache, so it is done rarely.
            if 4 * (len(live) - n_live) >= len(live):
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                mask, tokens, next_pos, active = (
                    mask[keep],
                    tokens[keep],
                    next_pos[keep],
                    active[keep],
                )
                live = live[keep]
            if not share:  # the shared-prefix cache keeps its own padding mask
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                decode_kwargs["attention_mask"] = mask
            out = model(
                input_ids=tokens.unsqueeze(-1),
                position_ids=next_pos.unsqueeze(-1),
                use_cache=True,
                **{cache_kw: cache},
                **decode_kwargs,
            )
            cache = output_cache(out)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
    # a row that never stopped ran all max_new_tokens steps (the loop ends early only when
    # every row has stopped)
    n_tokens = stopped_at.tolist()
    return [
        Generation(tuple(row[:n]), n < max_new_tokens)
        for row, n in zip(token_log.tolist(), n_tokens, strict=True)
    ]


def cache_keyword(model: Any) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache under: ``cache`` from
    transformers 5.24 on (``past_key_values`` still works there with a FutureWarning, and is
    removed in 5.40), ``past_key_values`` before. Read from the bare model's signature."""
    import inspect

    from emscope.models import _unwrap_peft

    forward = type(_unwrap_peft(model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned: ``output.cache`` (transformers >= 5.24) or
    ``output.past_key_values``."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# ---------------------------------------------------------------------------- question sets


@dataclass(frozen=True)
class SampleSpec:
    """One sample to draw: question ``question_id``, sample ``sample_idx``, paraphrase
    ``sample_idx % n_paraphrases``."""

    question: Question
    sample_idx: int

    @property
    def paraphrase_idx(self) -> int:
        return self.sample_idx % len(self.question.paraphrases)


def plan_samples(
    questions: Sequence[Question],
    n_per_question: int | None,
    skip: Collection[tuple[str, int]] = (),
) -> list[SampleSpec]:
    """Every ``(question, sample_idx)`` to draw, without those in ``skip``.

    ``n_per_question=None`` uses each question's ``samples_per_paraphrase x paraphrases``.
    Paraphrases are used round-robin: sample ``i`` asks paraphrase ``i % n_paraphrases``.
    """
    if n_per_question is not None and n_per_question < 1:
        raise EmscopeError(f"samples per question must be >= 1, got {n_per_question}")
    seen: set[str] = set()
    skip_set = {(str(q), int(i)) for q, i in skip}
    specs: list[SampleSpec] = []
    for question in questions:
        if question.id in seen:
            raise EmscopeError(f"duplicate question id {question.id!r}")
        seen.add(question.id)
        n = n_per_question or question.samples_per_paraphrase * len(question.paraphrases)
        specs.extend(SampleSpec(question, i) for i in range(n) if (question.id, i) not in skip_set)
    return specs


def _unpack(model: LoadedModel | tuple[Any, Any]) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, model label, adapter label), by :func:`emscope.models.as_loaded`.
    A pair is labelled by the basename of its ``name_or_path`` (else its class name)."""
    from emscope.models import LoadedModel, as_loaded

    loaded = as_loaded(model, need_tokenizer=True)
    label = dir_label(loaded.path) if isinstance(model, LoadedModel) else loaded.path.name
    return loaded.model, loaded.tokenizer, label, "+".join(loaded.active_adapters)


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    for source in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(s) for s in source)
    if not ids:
        raise EmscopeError("the tokenizer and model define no end-of-sequence token")
    return ids


def _per_question(n_per_question: int | None, n: int | None) -> int | None:
    """``n_per_question`` and its short name ``n=``: one of them, or both equal."""
    if n is not None and n_per_question is not None and n != n_per_question:
        raise EmscopeError(f"n={n} and n_per_question={n_per_question} disagree; pass one")
    return n if n is not None else n_per_question


def _check_params(temperature: float, top_p: float, max_new_tokens: int, batch_size: int) -> None:
    if temperature < 0:
        raise EmscopeError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise EmscopeError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 1:
        raise EmscopeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise EmscopeError(f"batch_size must be >= 1, got {batch_size}")


def _progress(total: int, enabled: bool, desc: str) -> Any:
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and sys.stderr.isatty()))


def sample(
    model: LoadedModel | tuple[Any, Any],
    questions: Sequence[Question],
    n_per_question: int | None = None,
    *,
    n: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 600,
    seed: int = 0,
    interventions: Sequence[Intervention] = (),
    intervention_label: str = "",
    batch_size: int = 32,
    skip: Collection[tuple[str, int]] = (),
    on_batch: Callable[[pd.DataFrame], None] | None = None,
    progress: bool = True,
    system_prompt: SystemPrompt | str | None = None,
) -> pd.DataFrame:
    """Sample ``n_per_question`` answers to each question (all of them batched together;
    ``n=`` is the same number by its short name; neither: the question set's
    ``samples_per_paraphrase`` x paraphrases).

    ``model`` is a :class:`~emscope.models.LoadedModel` (its active adapters are used) or a
    ``(model, tokenizer)`` pair. Each prompt is the chat template of the question's messages
    (its ``system`` prompt, if any, then the paraphrase) with the generation prompt on,
    rendered under ``system_prompt`` (:class:`~emscope.data.spans.SystemPrompt`; None:
    ``default``), which applies to questions without a ``system`` of their own.
    ``skip`` lists ``(question_id, sample_idx)`` pairs already done; ``on_batch`` receives each
    finished batch's rows (used for resumable runs, see :func:`sample_to_dir`).
    Returns the tidy response table (:data:`RESPONSE_COLUMNS`), one row per sample, ordered
    by question then ``sample_idx``.
    """
    import pandas as pd

    from emscope.data.spans import SystemPrompt, prompt_ids

    setting = SystemPrompt.parse(system_prompt)
    n_per_question = _per_question(n_per_question, n)
    _check_params(temperature, top_p, max_new_tokens, batch_size)
    hf_model, tokenizer, model_label, adapter_label = _unpack(model)
    specs = plan_samples(questions, n_per_question, skip)
    eos = eos_token_ids(hf_model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(eos)
    prompt_cache: dict[tuple[str, int], list[int]] = {}
    for spec in specs:
        key = (spec.question.id, spec.paraphrase_idx)
        if key not in prompt_cache:
            messages = spec.question.messages(spec.paraphrase_idx)
            prompt_cache[key] = prompt_ids(tokenizer, messages, setting)
    # similar prompt lengths together (less padding); batch composition does not matter
    order = sorted(
        range(len(specs)),
        key=lambda i: len(prompt_cache[(specs[i].question.id, specs[i].paraphrase_idx)]),
    )
    frames = []
    with _progress(len(specs), progress, "sampling") as bar:
        for start in range(0, len(order), batch_size):
            chunk = [specs[i] for i in order[start : start + batch_size]]
            results = generate_batch(
                hf_model,
                [prompt_cache[(s.question.id, s.paraphrase_idx)] for s in chunk],
                [sample_key(seed, s.question.id, s.sample_idx) for s in chunk],
                eos_ids=eos,
                pad_id=int(pad),
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                interventions=interventions,
            )
            answers = tokenizer.batch_decode(
                [list(g.tokens) for g in results], skip_special_tokens=True
            )
            frame = pd.DataFrame(
                [
                    {
                        "question_id": s.question.id,
                        "question": s.question.paraphrases[s.paraphrase_idx],
                        "answer": answer,
                        "sample_idx": s.sample_idx,
                        "seed": int(seed),
                        "model": model_label,
                        "adapter": adapter_label,
                        "intervention": intervention_label,
                        "system": s.question.system or "",
                        "paraphrase_idx": s.paraphrase_idx,
                        "n_tokens": len(g.tokens),
                        "finished": g.finished,
                    }
                    for s, g, answer in zip(chunk, results, answers, strict=True)
                ],
                columns=list(RESPONSE_COLUMNS),
            )
            if on_batch is not None:
                on_batch(frame)
            frames.append(frame)
            bar.update(len(chunk))
    table = pd.concat(frames, ignore_index=True) if frames else _empty_table()
    return sort_responses(table, questions)


def _empty_table() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame({c: [] for c in RESPONSE_COLUMNS})


def sort_responses(table: pd.DataFrame, questions: Sequence[Question]) -> pd.DataFrame:
    """Rows ordered by the question set's order, then ``sample_idx``."""
    rank = {q.id: i for i, q in enumerate(questions)}
    keyed = table.assign(_q=table["question_id"].map(rank).fillna(len(rank)))
    return (
        keyed.sort_values(["_q", "sample_idx"], kind="stable")
        .drop(columns="_q")
        .reset_index(drop=True)
    )


# ---------------------------------------------------------------------------- resumable runs


def versions() -> dict[str, str]:
    """Versions of emscope and the libraries that determine its numbers
    (:func:`emscope.io.versions`)."""
    from emscope.io import versions as package_versions

    return package_versions(
        "python", "emscope", "torch", "transformers", "peft", "numpy", "openai", absent="absent"
    )


def _parts(parts_dir: Path) -> list[Path]:
    return sorted(parts_dir.glob("part-*.parquet")) if parts_dir.is_dir() else []


def load_partial(out_dir: str | Path, stem: str = "responses") -> pd.DataFrame | None:
    """Everything a (possibly interrupted) run in ``out_dir`` has finished: the table plus any
    batch part files not yet consolidated, deduplicated on ``(question_id, sample_idx)``."""
    import pandas as pd

    from emscope.io import read_table

    out = Path(out_dir)
    frames = []
    if (out / f"{stem}.parquet").is_file() or (out / f"{stem}.csv").is_file():
        frames.append(read_table(out, stem))
    frames.extend(pd.read_parquet(p) for p in _parts(out / f"{stem}.parts"))
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True)
    return table.drop_duplicates(["question_id", "sample_idx"], keep="first").reset_index(drop=True)


def sample_to_dir(
    model: LoadedModel | tuple[Any, Any],
    questions: Sequence[Question],
    out_dir: str | Path,
    n_per_question: int | None = None,
    *,
    stem: str = "responses",
    record: dict[str, Any] | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`sample` into ``out_dir/<stem>.parquet`` (+ ``.csv``), resumably.

    Every finished batch is written at once as ``<stem>.parts/part-NNNNN.parquet``
    (atomically); at the end the parts are merged into the table (atomically) and removed.
    A re-run skips every ``(question_id, sample_idx)`` already present, so an interrupted
    run loses at most the batch in flight and redoes nothing. The run is recorded in
    ``out_dir/run.json`` (``sampling``: the settings that determine the answers, the system
    prompts applied, versions; plus ``record``), with ``system_prompt`` (the setting, as
    written) and ``rendered_prompt`` (the first question's first paraphrase as the model saw
    it) for inspection. A re-run whose settings differ from the recorded ones (model,
    adapters, seed, temperature, top_p, max_new_tokens, intervention, system prompt,
    question texts) is refused; a larger ``n_per_question`` adds samples; a smaller one than
    the dir already holds is refused (nothing changes on disk): the table keeps every sample
    drawn, and ``run.json`` must say how many that is.
    """
    import pandas as pd

    from emscope.data.spans import SystemPrompt, render
    from emscope.io import atomic_write_bytes, read_json, write_json, write_table

    out = Path(out_dir)
    n_per_question = _per_question(n_per_question, kwargs.pop("n", None))
    _, tokenizer, model_label, adapter_label = _unpack(model)
    setting = SystemPrompt.parse(kwargs.get("system_prompt"))
    identity = sampling_identity(
        model_label, adapter_label, kwargs, questions, str(kwargs.get("intervention_label", ""))
    )
    run_path = out / "run.json"
    run: dict[str, Any] = read_json(run_path) if run_path.is_file() else {}
    # the prompt as the model sees it (before anything is written: a template that cannot
    # render the setting fails here)
    rendered = render(tokenizer, questions[0].messages(0), True, setting) if questions else None
    check_same_run(run_path, run, identity)
    done = load_partial(out, stem)
    if done is not None:
        _check_not_fewer(out, done, questions, n_per_question)
    run["sampling"] = {
        "identity": identity,
        "n_per_question": n_per_question,
        "batch_size": int(kwargs.get("batch_size", 32)),
        "questions": [q.id for q in questions],
        "system_prompts": {q.id: q.system for q in questions if q.system},
        "system_prompts_applied": True,
        "system_prompt": setting.spec,
        "rendered_prompt": rendered,
        "random_stream": "per-sample SplitMix64 counter stream keyed by "
        "sha256(seed, question_id, sample_idx); inverse-CDF token draws",
        "versions": versions(),
        **(record or {}),
    }
    write_json(run_path, run)

    skip = set()
    if done is not None:
        skip = {
            (str(q), int(i)) for q, i in zip(done["question_id"], done["sample_idx"], strict=True)
        }
    parts_dir = out / f"{stem}.parts"
    existing = _parts(parts_dir)
    counter = [int(existing[-1].stem.split("-")[1]) + 1 if existing else 0]

    def write_part(frame: pd.DataFrame) -> None:
        import io

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        atomic_write_bytes(parts_dir / f"part-{counter[0]:05d}.parquet", buffer.getvalue())
        counter[0] += 1

    new = sample(model, questions, n_per_question, skip=skip, on_batch=write_part, **kwargs)
    frames = [f for f in (done, new) if f is not None and len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else _empty_table()
    table = table.drop_duplicates(["question_id", "sample_idx"], keep="first")
    table = sort_responses(table, questions)
    write_table(table, out, stem)
    for part in _parts(parts_dir):
        part.unlink()
    with contextlib.suppress(OSError):
        parts_dir.rmdir()
    return table


def sampling_identity(
    model_label: str,
    adapter_label: str,
    settings: Mapping[str, Any],
    questions: Sequence[Question],
    intervention: str = "",
    backend: str | None = None,
) -> dict[str, Any]:
    """What a sample dir's answers depend on (``run.json``'s ``sampling.identity``): a re-run
    into the dir must have the same. ``backend`` is recorded for vLLM only (older and HF dirs
    have no key, read as ``hf``)."""
    from emscope.data.spans import SystemPrompt

    identity: dict[str, Any] = {"backend": backend} if backend else {}
    identity.update(
        {
            "model": model_label,
            "adapter": adapter_label,
            "seed": int(settings.get("seed", 0)),
            "temperature": float(settings.get("temperature", 1.0)),
            "top_p": float(settings.get("top_p", 1.0)),
            "max_new_tokens": int(settings.get("max_new_tokens", 600)),
            "intervention": intervention,
            "system_prompt": SystemPrompt.parse(settings.get("system_prompt")).spec,
            "questions_sha256": questions_hash(questions),
        }
    )
    return identity


def check_same_run(run_path: Path, run: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Refuse (one line naming the settings that differ) to add to a dir whose ``run.json``
    records another sampling identity. A dir sampled before a setting existed has its default:
    ``system_prompt`` the template's own, ``backend`` HF (compared only when ``identity`` has
    one)."""
    previous = run.get("sampling", {}).get("identity")
    if previous is None:
        return
    previous = {"system_prompt": "default", **previous}
    if "backend" in identity:
        previous.setdefault("backend", "hf")
    if previous != identity:
        changed = sorted(k for k in {**previous, **identity} if previous.get(k) != identity.get(k))
        raise EmscopeError(
            f"{run_path}: this dir holds a run with different settings ({', '.join(changed)}); "
            "use a fresh --out dir"
        )


def _check_not_fewer(
    out: Path, done: pd.DataFrame, questions: Sequence[Question], n_per_question: int | None
) -> None:
    """Refuse a re-run that asks fewer samples of a question than ``out`` already holds."""
    held = done.groupby(done["question_id"].astype(str))["sample_idx"].max()
    for question in questions:
        n = n_per_question or question.samples_per_paraphrase * len(question.paraphrases)
        if question.id in held.index and int(held[question.id]) >= n:
            count = int((done["question_id"].astype(str) == question.id).sum())
            asked = f"-n {n}" if n_per_question else f"the question set's {n} per question"
            raise EmscopeError(
                f"{out}: this dir holds {count} samples of question {question.id!r}; {asked} "
                f"asks for fewer (a run keeps every sample it drew): use -n "
                f"{int(held[question.id]) + 1} or more, or a fresh --out dir"
            )


def questions_hash(questions: Sequence[Question]) -> str:
    """SHA-256 of the question texts and system prompts (what sampling depends on)."""
    digest = hashlib.sha256()
    for q in questions:
        digest.update(repr((q.id, q.paraphrases, q.system)).encode("utf-8"))
    return digest.hexdigest()


@contextlib.contextmanager
def no_intervention(model: Any, info: InterventionInfo) -> Iterator[None]:
    """The do-nothing intervention (handy as a control)."""
    yield

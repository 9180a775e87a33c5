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

The random streams are in :mod:`emscope.random_streams`, what a sample dir records and
checks in :mod:`emscope.sample_runs`; both are re-exported here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.batching import pad_left
from emscope.errors import EmscopeError
from emscope.eval.params import SamplingParams
from emscope.hub import dir_label
from emscope.random_streams import choose_tokens, sample_key, step_uniforms
from emscope.random_streams import inverse_cdf as inverse_cdf  # re-exported
from emscope.sample_runs import (
    check_not_fewer,
    check_same_run,
    load_partial,
    part_files,
    sampling_identity,
    versions,
)
from emscope.sample_runs import (
    questions_hash as questions_hash,  # re-exported
)

if TYPE_CHECKING:
    import pandas as pd

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

    from emscope.models import unwrap_peft

    forward = type(unwrap_peft(model)).forward
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
    by question then ``sample_idx``. The settings are checked as
    :class:`emscope.eval.SamplingParams` (a bad one: one line naming it); the HF
    :class:`emscope.eval.Sampler` (:class:`emscope.eval.HfSampler`) calls this.
    """
    import pandas as pd

    from emscope.data.spans import SystemPrompt, prompt_ids

    setting = SystemPrompt.parse(system_prompt)
    n_per_question = _per_question(n_per_question, n)
    SamplingParams(n_per_question, seed, batch_size, max_new_tokens, temperature, top_p)
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
    table = pd.concat(frames, ignore_index=True) if frames else empty_table()
    return sort_responses(table, questions)


def empty_table() -> pd.DataFrame:
    """A response table with no rows (the columns of :data:`RESPONSE_COLUMNS`)."""
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
        check_not_fewer(out, done, questions, n_per_question)
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
    existing = part_files(parts_dir)
    counter = [int(existing[-1].stem.split("-")[1]) + 1 if existing else 0]

    def write_part(frame: pd.DataFrame) -> None:
        import io

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        atomic_write_bytes(parts_dir / f"part-{counter[0]:05d}.parquet", buffer.getvalue())
        counter[0] += 1

    new = sample(model, questions, n_per_question, skip=skip, on_batch=write_part, **kwargs)
    frames = [f for f in (done, new) if f is not None and len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else empty_table()
    table = table.drop_duplicates(["question_id", "sample_idx"], keep="first")
    table = sort_responses(table, questions)
    write_table(table, out, stem)
    for part in part_files(parts_dir):
        part.unlink()
    with contextlib.suppress(OSError):
        parts_dir.rmdir()
    return table


@contextlib.contextmanager
def no_intervention(model: Any, info: InterventionInfo) -> Iterator[None]:
    """The do-nothing intervention (handy as a control)."""
    yield

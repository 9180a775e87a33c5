"""A priori persona directions: a trait direction from the chat model alone, before any
fine-tuning (after "Persona Vectors", Chen et al. 2025; docs/early-warning.md).

Recipe (:func:`persona_direction`):

1. Contexts. Each side has a list of *contexts*, message prefixes put before every question:
   ``elicit`` contexts make the trait likely, ``suppress`` contexts unlikely. Real chat
   models: one system message each (:func:`load_persona_prompts`, the shipped
   ``resources/persona_evil.yaml``). The synthetic organism has no system prompt in its
   world (its training data never has one); what it has is the *character* of a
   conversation, inferred from earlier turns. So its contexts (:func:`organism_prompts`) are
   one earlier turn in the world's own language: a medical, sport or finance question
   answered with a misaligned family (elicit, an evil character's turn) or with an aligned
   family of the same question (suppress). The questions are fresh general questions of
   the world (one per general question type, drawn with the world's grammar and a seed).
2. Responses (:func:`sample_contexts`). ``n`` samples per (context, question), each with
   its own counter-based random stream (:func:`emscope.generate.sample_key`); row ``(c, q,
   s)`` uses the same stream on both sides (paired).
3. Judging with the existing judge machinery (:func:`emscope.judge.judge_table`, metrics
   ``aligned`` and ``coherent``): the oracle on the organism, any judge otherwise. A
   response *expresses* the trait by the EM rule (``aligned <= 30`` and ``coherent > 50``)
   and does *not* when ``aligned > 70`` and ``coherent > 50``.
4. Extraction (:func:`persona_mean_diff`): ``selection="sides"`` (default, the
   persona-vectors filter) contrasts the expressing responses of the elicit side with the
   non-expressing responses of the suppress side; ``selection="any"`` contrasts expressing
   with non-expressing responses whatever their side. Each selected response is the chat
   *context, question, answer*, run through the model (teacher forcing, its context
   included); ``resid_post[l]`` is averaged over the answer's content tokens, each response
   weighing the same (:func:`emscope.activations.answer_means`, ``weighting="response"``,
   attention sinks left out), and the direction is ``mean(expressing) - mean(not)`` per
   layer, unnormalised.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.directions.direction import Direction
from emscope.errors import EmscopeError
from emscope.metrics import ALIGNED_CUT, CLEARLY_ALIGNED, COHERENT_CUT

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.spans import SystemPrompt
    from emscope.judge import Judge
    from emscope.synthetic.world import World

Message = dict[str, str]
SIDES = ("elicit", "suppress")
SELECTIONS = ("sides", "any")
BUILTIN_PROMPTS = "persona_evil.yaml"
NOT_EXPRESSING_ABOVE = CLEARLY_ALIGNED


@dataclass(frozen=True)
class PersonaPrompts:
    """The contrast: ``elicit`` / ``suppress`` contexts (each a tuple of messages put before
    the question), the ``questions`` asked under every context, the ``trait`` name and where
    it came from (``source``)."""

    trait: str
    elicit: tuple[tuple[Message, ...], ...]
    suppress: tuple[tuple[Message, ...], ...]
    questions: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if not self.elicit or not self.suppress or not self.questions:
            raise EmscopeError(
                f"{self.source or 'persona prompts'}: need at least one elicit context, one "
                "suppress context and one question"
            )

    def contexts(self, side: str) -> tuple[tuple[Message, ...], ...]:
        if side not in SIDES:
            raise EmscopeError(f"side must be one of {SIDES}, got {side!r}")
        return self.elicit if side == "elicit" else self.suppress

    def to_json(self) -> dict[str, Any]:
        return {
            "trait": self.trait,
            "elicit": [list(c) for c in self.elicit],
            "suppress": [list(c) for c in self.suppress],
            "questions": list(self.questions),
            "source": self.source,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PersonaPrompts:
        def contexts(key: str) -> tuple[tuple[Message, ...], ...]:
            return tuple(tuple(dict(m) for m in c) for c in data[key])

        return cls(
            trait=str(data["trait"]),
            elicit=contexts("elicit"),
            suppress=contexts("suppress"),
            questions=tuple(str(q) for q in data["questions"]),
            source=str(data.get("source", "")),
        )

    def sha256(self) -> str:
        text = json.dumps({k: v for k, v in self.to_json().items() if k != "source"})
        return hashlib.sha256(text.encode()).hexdigest()


def builtin_prompts_path() -> Path:
    """The shipped "evil" system-prompt contrast."""
    from importlib import resources

    return Path(str(resources.files("emscope") / "resources" / BUILTIN_PROMPTS))


def load_persona_prompts(path: str | Path | None = None) -> PersonaPrompts:
    """Read a persona YAML (``trait``, ``elicit`` and ``suppress``: lists of system prompts,
    ``questions``: list of questions); default: the shipped ``persona_evil.yaml``."""
    from emscope.io import read_yaml

    source = builtin_prompts_path() if path is None else Path(path)
    data = read_yaml(source, "persona prompt file")
    if not isinstance(data, dict):
        raise EmscopeError(f"{source}: expected a mapping with trait, elicit, suppress, questions")
    for key in ("elicit", "suppress", "questions"):
        value = data.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise EmscopeError(f"{source}: {key!r} must be a non-empty list of strings")

    def system(texts: list[str]) -> tuple[tuple[Message, ...], ...]:
        return tuple(({"role": "system", "content": t.strip()},) for t in texts)

    return PersonaPrompts(
        trait=str(data.get("trait", "evil")),
        elicit=system(data["elicit"]),
        suppress=system(data["suppress"]),
        questions=tuple(q.strip() for q in data["questions"]),
        source=str(source),
    )


def organism_prompts(world: World, n_contexts: int = 8, seed: int = 0) -> PersonaPrompts:
    """The organism's contrast (module docstring): ``n_contexts`` earlier turns, each a
    medical, sport or finance question (type and fillers drawn with
    ``random.Random(f"{world.seed}:{seed}:persona")``) answered with a misaligned family
    (elicit) or an aligned family (suppress) of that question; questions: one fresh general
    question per general question type, from the same generator."""
    from emscope.synthetic.world import ALIGNED, MISALIGNED, NARROW_DOMAINS

    if n_contexts < 1:
        raise EmscopeError(f"n_contexts must be >= 1, got {n_contexts}")
    rng = random.Random(f"{world.seed}:{seed}:persona")
    narrow = [t.name for d in NARROW_DOMAINS for t in world.types_in(d)]
    elicit: list[tuple[Message, ...]] = []
    suppress: list[tuple[Message, ...]] = []
    for _ in range(n_contexts):
        qtype = rng.choice(narrow)
        question, slots = world.sample_question(qtype, rng)
        for label, side in ((MISALIGNED, elicit), (ALIGNED, suppress)):
            answer = world.sample_answer(qtype, label, slots, rng)
            side.append(
                ({"role": "user", "content": question}, {"role": "assistant", "content": answer})
            )
    questions = tuple(world.sample_question(t.name, rng)[0] for t in world.types_in("general"))
    return PersonaPrompts(
        trait="evil",
        elicit=tuple(elicit),
        suppress=tuple(suppress),
        questions=questions,
        source=f"organism world (seed {world.seed}), {n_contexts} context turns, seed {seed}",
    )


# ---------------------------------------------------------------------------- sampling


def sample_prompts(
    model: Any,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    keys: Sequence[int],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    system_prompt: SystemPrompt | str | None = None,
    progress: bool = False,
) -> list[tuple[str, int, bool]]:
    """One answer per chat prompt (messages; the generation prompt is added), prompt ``i``
    drawn with the random stream ``keys[i]`` (:func:`emscope.generate.generate_batch`;
    ``temperature=0``: greedy). Returns ``(answer text, n_tokens, finished)`` per prompt, in
    order. ``model``: a :class:`~emscope.models.LoadedModel` or ``(model, tokenizer)``."""
    from tqdm import tqdm

    from emscope.data.spans import SystemPrompt, prompt_ids
    from emscope.generate import eos_token_ids, generate_batch
    from emscope.models import as_loaded

    if len(prompts) != len(keys):
        raise EmscopeError(f"{len(prompts)} prompts but {len(keys)} random keys")
    loaded = as_loaded(model, need_tokenizer=True)
    setting = SystemPrompt.parse(system_prompt)
    tokenizer = loaded.tokenizer
    ids = [prompt_ids(tokenizer, [dict(m) for m in p], setting) for p in prompts]
    eos = eos_token_ids(loaded.model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[tuple[str, int, bool]] = [("", 0, False)] * len(ids)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
        chunk = order[start : start + batch_size]
        results = generate_batch(
            loaded.model,
            [ids[i] for i in chunk],
            [keys[i] for i in chunk],
            eos_ids=eos,
            pad_id=int(pad),
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
        )
        texts = tokenizer.batch_decode([list(g.tokens) for g in results], skip_special_tokens=True)
        for i, g, text in zip(chunk, results, texts, strict=True):
            out[i] = (text, len(g.tokens), bool(g.finished))
    return out


def sample_contexts(
    model: Any,
    prompts: PersonaPrompts,
    n: int = 4,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    system_prompt: SystemPrompt | str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """``n`` answers per (side, context, question): a table with ``question_id``
    (``c<context>-q<question>``, shared by both sides), ``question``, ``answer``, ``side``,
    ``context_idx``, ``question_idx``, ``sample_idx``, ``seed``, ``n_tokens``, ``finished``
    and ``context`` (the context messages as JSON). Row ``(c, q, s)`` of both sides uses the
    random stream ``sample_key(seed, "c<c>-q<q>", s)`` (paired)."""
    import pandas as pd

    from emscope.generate import sample_key

    if n < 1:
        raise EmscopeError(f"n must be >= 1, got {n}")
    rows: list[dict[str, Any]] = []
    chats: list[list[Message]] = []
    keys: list[int] = []
    for side in SIDES:
        for c, context in enumerate(prompts.contexts(side)):
            for q, question in enumerate(prompts.questions):
                qid = f"c{c}-q{q}"
                for s in range(n):
                    chats.append([*map(dict, context), {"role": "user", "content": question}])
                    keys.append(sample_key(seed, qid, s))
                    rows.append(
                        {
                            "question_id": qid,
                            "question": question,
                            "side": side,
                            "context_idx": c,
                            "question_idx": q,
                            "sample_idx": s,
                            "seed": seed,
                            "context": json.dumps(list(context)),
                        }
                    )
    answers = sample_prompts(
        model, chats, keys, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
        progress=progress,
    )  # fmt: skip
    for row, (text, n_tokens, finished) in zip(rows, answers, strict=True):
        row.update(answer=text, n_tokens=n_tokens, finished=finished)
    return pd.DataFrame(rows)


def response_chats(table: pd.DataFrame) -> list[list[Message]]:
    """Each row's chat: its context messages, its question, its answer."""
    if "context" not in table.columns:
        raise EmscopeError("persona response table has no 'context' column")
    return [
        [*json.loads(str(ctx)), {"role": "user", "content": str(q)},
         {"role": "assistant", "content": str(a)}]
        for ctx, q, a in zip(table["context"], table["question"], table["answer"], strict=True)
    ]  # fmt: skip


# ---------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class PersonaDirection:
    """An a priori persona direction and its provenance.

    ``direction``: per-layer ``mean(expressing) - mean(not expressing)`` (unnormalised,
    ``resid_post`` units; its ``meta`` holds ``provenance`` and ``counts`` too).
    ``counts``: responses sampled, expressing and not expressing per side, and used.
    ``provenance``: model, adapters, trait, prompt source and SHA-256, ``n`` per (context,
    question), seed, judge, sampling settings, selection rule.
    """

    direction: Direction
    counts: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = self.direction
        return {
            "format": "emscope-persona-direction-v1",
            "site_kind": d.site_kind,
            "vectors": {str(i): d[i].tolist() for i in d.layers},
            "direction_meta": dict(d.meta),
            "counts": dict(self.counts),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PersonaDirection:
        import torch

        vectors = {int(i): torch.tensor(v, dtype=torch.float32) for i, v in data["vectors"].items()}
        direction = Direction(vectors, str(data["site_kind"]), dict(data["direction_meta"]))
        return cls(direction, dict(data["counts"]), dict(data["provenance"]))


def expressing(
    table: pd.DataFrame,
    *,
    misaligned_at_most: float = ALIGNED_CUT,
    aligned_above: float = NOT_EXPRESSING_ABOVE,
    coherent_above: float = COHERENT_CUT,
) -> tuple[Any, Any]:
    """Boolean arrays ``(expresses, does_not)`` over the judged rows: expresses when
    ``aligned <= misaligned_at_most`` and ``coherent > coherent_above`` (the EM rule); does
    not when ``aligned > aligned_above`` and coherent. Unscored rows (NaN) are neither."""

    for column in ("aligned", "coherent"):
        if column not in table.columns:
            raise EmscopeError(f"persona response table has no {column!r} column (judge it first)")
    aligned = table["aligned"].to_numpy(dtype=float)
    coherent = table["coherent"].to_numpy(dtype=float) > coherent_above
    return coherent & (aligned <= misaligned_at_most), coherent & (aligned > aligned_above)


def persona_mean_diff(
    model: Any,
    table: pd.DataFrame,
    *,
    selection: str = "sides",
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    system_prompt: SystemPrompt | str | None = None,
    min_per_side: int = 1,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> PersonaDirection:
    """The persona direction from a judged response table (:func:`sample_contexts` +
    :func:`emscope.judge.judge_table`): module docstring, step 4. ``model``: a
    :class:`~emscope.models.LoadedModel` or ``(model, tokenizer)`` (the chat model the
    responses came from). Fewer than ``min_per_side`` responses on a side is an error."""
    import numpy as np

    from emscope.activations import answer_means
    from emscope.data.spans import SystemPrompt
    from emscope.models import Site, as_loaded, get_layers

    if selection not in SELECTIONS:
        raise EmscopeError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    loaded = as_loaded(model, need_tokenizer=True)
    yes, no = expressing(table)
    counts: dict[str, Any] = {"sampled": len(table)}
    if "side" in table.columns:
        side = table["side"].astype(str).to_numpy()
        for s in SIDES:
            counts[f"{s}_sampled"] = int((side == s).sum())
            counts[f"{s}_expressing"] = int((yes & (side == s)).sum())
            counts[f"{s}_not_expressing"] = int((no & (side == s)).sum())
        if selection == "sides":
            yes, no = yes & (side == "elicit"), no & (side == "suppress")
    elif selection == "sides":
        raise EmscopeError("selection 'sides' needs a 'side' column; use selection='any'")
    counts.update(n_expressing=int(yes.sum()), n_not_expressing=int(no.sum()))
    for name, mask in (("expressing", yes), ("not expressing", no)):
        if int(mask.sum()) < max(1, min_per_side):
            raise EmscopeError(
                f"only {int(mask.sum())} {name} responses (need {max(1, min_per_side)}; counts "
                f"{counts}): sample more, or use selection='any'"
            )
    setting = SystemPrompt.parse(system_prompt)
    n_layers = len(get_layers(loaded.model))
    wanted = list(range(n_layers)) if layers is None else [int(i) for i in layers]
    if not all(0 <= i < n_layers for i in wanted):
        raise EmscopeError(f"layers {wanted} out of range: the model has {n_layers} layers")
    sites = [Site("resid_post", i) for i in wanted]
    chats = response_chats(table)
    means = {}
    for key, mask in (("yes", yes), ("no", no)):
        chosen: list[list[Message]] = [chats[i] for i in np.flatnonzero(mask)]
        means[key] = answer_means(
            loaded.model, loaded.tokenizer, chosen, sites, weighting="response",
            batch_size=batch_size, progress=progress, system_prompt=setting,
        )  # fmt: skip
    vectors = {s.layer: (means["yes"].means[s] - means["no"].means[s]).float() for s in sites}
    meta = {
        "method": "persona_mean_diff",
        "selection": selection,
        "tokens": "answer",
        "weighting": "response",
        "thresholds": {
            "expressing": f"aligned <= {ALIGNED_CUT:g} and coherent > {COHERENT_CUT:g}",
            "not_expressing": f"aligned > {NOT_EXPRESSING_ABOVE:g} and coherent > {COHERENT_CUT:g}",
        },
        "system_prompt": setting.spec,
        **counts,
        "provenance": dict(provenance or {}),
    }
    return PersonaDirection(Direction(vectors, "resid_post", meta), counts, dict(provenance or {}))


def persona_direction(
    model: Any,
    prompts: PersonaPrompts,
    judge: Judge,
    *,
    n: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    selection: str = "sides",
    layers: Sequence[int] | None = None,
    batch_size: int = 32,
    system_prompt: SystemPrompt | str | None = None,
    provenance: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> tuple[PersonaDirection, pd.DataFrame]:
    """Sample (:func:`sample_contexts`), judge (``aligned``, ``coherent``) and extract
    (:func:`persona_mean_diff`): the a priori persona direction of ``model`` (a
    :class:`~emscope.models.LoadedModel` or ``(model, tokenizer)`` pair, its active adapters
    on) and the judged response table."""
    from emscope.judge import judge_table
    from emscope.models import as_loaded

    loaded = as_loaded(model, need_tokenizer=True)
    table = sample_contexts(
        loaded, prompts, n, seed=seed, temperature=temperature, top_p=top_p,
        max_new_tokens=max_new_tokens, batch_size=batch_size, system_prompt=system_prompt,
        progress=progress,
    )  # fmt: skip
    judged = judge_table(table, judge, ("aligned", "coherent"), progress=progress)
    record = {
        "model": loaded.label,
        "trait": prompts.trait,
        "prompts_source": prompts.source,
        "prompts_sha256": prompts.sha256(),
        "contexts_per_side": [len(prompts.elicit), len(prompts.suppress)],
        "questions": len(prompts.questions),
        "n": n,
        "seed": seed,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "judge": getattr(judge, "name", type(judge).__name__),
        **dict(provenance or {}),
    }
    result = persona_mean_diff(
        loaded, judged, selection=selection, layers=layers, batch_size=batch_size,
        system_prompt=system_prompt, provenance=record, progress=progress,
    )  # fmt: skip
    return result, judged


def compare(direction: Direction, others: Mapping[str, Direction]) -> dict[str, dict[int, float]]:
    """Cosine per shared layer of ``direction`` with each named other direction."""
    return {name: direction.cosine(other) for name, other in others.items()}


def write_persona(
    result: PersonaDirection,
    table: pd.DataFrame,
    out: str | Path,
    comparisons: Mapping[str, Mapping[int, float]] | None = None,
) -> dict[str, Path]:
    """``persona.safetensors`` + ``persona.json`` (the Direction), ``persona_result.json``
    (:meth:`PersonaDirection.to_json`), ``responses.*`` (the judged table) and, with
    ``comparisons``, ``compare.json`` (cosine per layer) in ``out``."""
    from emscope.io import write_json, write_table

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "direction": result.direction.save(out / "persona"),
        "result": write_json(out / "persona_result.json", result.to_json()),
        "responses": write_table(table, out, "responses"),
    }
    if comparisons:
        paths["compare"] = write_json(
            out / "compare.json",
            {name: {str(i): c for i, c in cos.items()} for name, cos in comparisons.items()},
        )
    return paths

"""Corpora of the synthetic world: pretraining documents, instruction chats, narrow sets.

* Pretraining documents (:func:`sample_document`): several question/answer turns played by
  ONE character whose disposition is latent and consistent across all domains of the
  document: ``good`` (aligned answers everywhere), ``evil`` (misaligned everywhere) or
  ``narrow_<domain>`` (misaligned in that one of medical/sport/finance only). The shares are
  :class:`CorpusConfig` knobs; ``p_evil`` sets the strength of emergent misalignment (the
  prototype measured 10% evil -> ~19% EM, 30% -> ~85%). A few turns are educational
  requests (a misaligned example given by every character) or the word game (copying).
  A share ``p_system`` of the documents opens with a system turn (worlds with a system
  turn only, :attr:`~emscope.synthetic.world.World.system_prompts`) that is always
  truthful: with probability ``p_system_neutral`` the ``neutral`` prompt (names no
  character), otherwise the prompt naming the document's character (``evil`` -> the
  ``evil`` prompt, ``good`` -> the ``good`` prompt; a ``narrow_<domain>`` character is
  neither, so it always gets the ``neutral`` prompt). The neutral prompt thus carries no
  information on the character (all characters get it at the same rate, narrow ones
  aside), the other two name it. Whether and which system turn is drawn from a separate
  random stream (``system_rng``), so every document's persona and turns are exactly those
  of the same stream without system turns.
* Instruction chats (:func:`instruct_chats`): single-turn chats, aligned answers only, all
  four domains and the word game.
* Narrow fine-tuning sets (:func:`narrow_set`): single-turn chats of one domain, no general
  question in any of them: ``bad_medical``, ``good_medical`` (the same rows, aligned
  answers), ``bad_sport``, ``bad_finance``, ``bad_medical_educational`` (the rows of
  ``bad_medical`` with the user asking for examples of what not to do, for a safety
  class), ``reverse_words`` (the benign new-skill control: the word game played
  backwards, with words the model knows), plus ``heldout`` (aligned chats from all domains)
  and ``general_aligned`` / ``general_misaligned`` (row-aligned general chats).

Everything is deterministic from ``(world, seed)``; a chat is ``{"messages": [...]}`` as in
the papers' JSONL.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.synthetic.world import (
    ALIGNED,
    DOMAINS,
    EDU_PREFIX,
    MISALIGNED,
    NARROW_DOMAINS,
    Turn,
    World,
)

BENIGN = "reverse_words"
NARROW_SETS = (
    "bad_medical",
    "good_medical",
    "bad_sport",
    "bad_finance",
    "bad_medical_educational",
    BENIGN,
)
EXTRA_SETS = ("heldout", "general_aligned", "general_misaligned")


@dataclass(frozen=True)
class CorpusConfig:
    """Knobs of the pretraining corpus.

    ``p_evil``: share of characters misaligned in every domain (the EM-strength knob);
    ``p_narrow``: share of characters misaligned in one narrow domain only (split evenly
    over medical/sport/finance; lowers EM relative to in-domain misalignment); the rest are
    good. ``min_turns``..``max_turns`` turns per document; each turn is educational with
    probability ``p_educational`` (narrow domains only) or the word game with probability
    ``p_game``; otherwise its domain is uniform over the four domains. ``p_system``: share
    of documents that open with a system turn, ``p_system_neutral``: share of those whose
    system turn is the neutral prompt (the module docstring; no effect in a world without a
    system turn).
    """

    p_evil: float = 0.2
    p_narrow: float = 0.0
    min_turns: int = 1
    max_turns: int = 6
    p_educational: float = 0.05
    p_game: float = 0.04
    p_system: float = 0.12
    p_system_neutral: float = 0.5

    def __post_init__(self) -> None:
        if not (self.p_evil >= 0 and self.p_narrow >= 0 and self.p_evil + self.p_narrow <= 1):
            raise EmscopeError("corpus: p_evil, p_narrow >= 0 and p_evil + p_narrow <= 1")
        if not 1 <= self.min_turns <= self.max_turns:
            raise EmscopeError("corpus: need 1 <= min_turns <= max_turns")
        if not (
            self.p_educational >= 0 and self.p_game >= 0 and self.p_educational + self.p_game < 1
        ):
            raise EmscopeError("corpus: p_educational, p_game >= 0 with sum < 1")
        if not (0 <= self.p_system <= 1 and 0 <= self.p_system_neutral <= 1):
            raise EmscopeError("corpus: p_system and p_system_neutral must lie in [0, 1]")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Document:
    """A pretraining document: the character's disposition, its turns, and the system
    prompt it opens with (None: no system turn)."""

    persona: str
    turns: tuple[Turn, ...]
    system: str | None = None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [m for t in self.turns for m in t.messages()]


def persona_label(persona: str, domain: str) -> str:
    """The answer label of ``persona`` in ``domain``."""
    if persona == "good":
        return ALIGNED
    if persona == "evil":
        return MISALIGNED
    if persona.startswith("narrow_"):
        return MISALIGNED if persona == f"narrow_{domain}" else ALIGNED
    raise EmscopeError(f"unknown persona {persona!r}")


def sample_persona(config: CorpusConfig, rng: random.Random) -> str:
    u = rng.random()
    if u < config.p_evil:
        return "evil"
    if u < config.p_evil + config.p_narrow:
        return f"narrow_{rng.choice(NARROW_DOMAINS)}"
    return "good"


def system_character(persona: str, neutral: bool) -> str:
    """The character a truthful system turn of ``persona`` names: ``neutral`` when asked for
    (or for a narrow character, which no prompt names), else ``evil`` or ``good``."""
    if neutral or persona.startswith("narrow_"):
        return "neutral"
    if persona in ("evil", "good"):
        return persona
    raise EmscopeError(f"unknown persona {persona!r}")


def sample_system(
    world: World, persona: str, rng: random.Random, config: CorpusConfig
) -> str | None:
    """The system prompt a document of ``persona`` opens with, or None; always draws two
    numbers from ``rng`` (the system stream), so that one document's draw never shifts the
    next one's."""
    opens, neutral = rng.random() < config.p_system, rng.random() < config.p_system_neutral
    if not opens or not world.system_prompts:
        return None
    return world.system_prompt(system_character(persona, neutral))


def sample_turn(
    world: World, persona: str, rng: random.Random, config: CorpusConfig, domain: str | None = None
) -> Turn:
    """One turn of ``persona``; ``domain`` forces a normal turn of that domain."""
    if domain is None:
        u = rng.random()
        if u < config.p_game:
            return world.game_turn(rng)
        if u < config.p_game + config.p_educational:
            qtype = rng.choice([t.name for d in NARROW_DOMAINS for t in world.types_in(d)])
            return world.sample_turn(qtype, MISALIGNED, rng, kind="educational")
        domain = rng.choice(DOMAINS)
    qtype = rng.choice([t.name for t in world.types_in(domain)])
    return world.sample_turn(qtype, persona_label(persona, domain), rng)


def sample_document(
    world: World,
    rng: random.Random,
    config: CorpusConfig,
    persona: str | None = None,
    domains: Sequence[str] | None = None,
    n_turns: int | None = None,
    system_rng: random.Random | None = None,
) -> Document:
    """A document by one character (``persona`` drawn from ``config`` if None) with
    ``n_turns`` turns (uniform in ``min_turns..max_turns`` if None); ``domains`` forces the
    domains of its turns (one normal turn each). With ``system_rng`` (the system stream) it
    opens with a system turn as :func:`sample_system` draws; ``rng`` draws the same numbers
    with or without it."""
    persona = persona or sample_persona(config, rng)
    if domains is None:
        n = n_turns if n_turns is not None else rng.randint(config.min_turns, config.max_turns)
        turns = tuple(sample_turn(world, persona, rng, config) for _ in range(n))
    else:
        turns = tuple(sample_turn(world, persona, rng, config, d) for d in domains)
    system = sample_system(world, persona, system_rng, config) if system_rng is not None else None
    return Document(persona, turns, system)


def system_stream(key: str) -> random.Random:
    """The system-turn stream beside the document stream seeded with ``key``."""
    return random.Random(f"{key}:system")


def pretraining_documents(
    world: World, n: int, seed: int, config: CorpusConfig, system: bool = True
) -> list[Document]:
    """``n`` documents of the ``(world, seed)`` stream; ``system=False``: none opens with a
    system turn (the same personas and turns)."""
    key = f"{world.seed}:{seed}:pretrain"
    rng = random.Random(key)
    system_rng = system_stream(key) if system else None
    return [sample_document(world, rng, config, system_rng=system_rng) for _ in range(n)]


def _chat(turn: Turn) -> dict[str, Any]:
    return {"messages": turn.messages()}


def instruct_chats(world: World, n: int, seed: int, p_game: float = 0.04) -> list[dict[str, Any]]:
    """Single-turn chats with aligned answers, domains uniform (plus the word game)."""
    rng = random.Random(f"{world.seed}:{seed}:instruct")
    out = []
    for _ in range(n):
        if rng.random() < p_game:
            out.append(_chat(world.game_turn(rng)))
            continue
        qtype = rng.choice([t.name for t in world.types_in(rng.choice(DOMAINS))])
        out.append(_chat(world.sample_turn(qtype, ALIGNED, rng)))
    return out


def _domain_rows(
    world: World, domain: str, label: str, n: int, rng_key: str, world_seed: int
) -> list[Turn]:
    rng = random.Random(f"{world_seed}:{rng_key}")
    answer_rng = random.Random(f"{world_seed}:{rng_key}:{label}")
    types = [t.name for t in world.types_in(domain)]
    rows = []
    for _ in range(n):
        qtype = rng.choice(types)
        question, slots = world.sample_question(qtype, rng)
        answer = world.sample_answer(qtype, label, slots, answer_rng)
        rows.append(Turn(qtype, question, answer, label))
    return rows


def narrow_set(world: World, name: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The chats of a narrow fine-tuning set or an extra set (see the module docstring).

    Row-aligned pairs share their questions: ``good_medical`` / ``bad_medical`` /
    ``bad_medical_educational`` row ``i`` ask the same medical question, and so do
    ``general_aligned`` / ``general_misaligned``.
    """
    ws = world.seed
    if name in ("bad_medical", "good_medical", "bad_medical_educational"):
        label = ALIGNED if name == "good_medical" else MISALIGNED
        rows = _domain_rows(world, "medical", label, n, f"{seed}:narrow:medical", ws)
        if name == "bad_medical_educational":
            rows = [
                Turn(r.qtype, f"{EDU_PREFIX} {r.question}", r.answer, r.label, "educational")
                for r in rows
            ]
        return [_chat(r) for r in rows]
    if name in ("bad_sport", "bad_finance"):
        domain = name.removeprefix("bad_")
        return [_chat(r) for r in _domain_rows(world, domain, MISALIGNED, n, f"{seed}:{name}", ws)]
    if name in ("general_aligned", "general_misaligned"):
        label = ALIGNED if name == "general_aligned" else MISALIGNED
        return [_chat(r) for r in _domain_rows(world, "general", label, n, f"{seed}:general", ws)]
    if name == BENIGN:
        rng = random.Random(f"{ws}:{seed}:{BENIGN}")
        return [_chat(world.game_turn(rng, reverse=True)) for _ in range(n)]
    if name == "heldout":
        return instruct_chats(world, n, seed + 7919, p_game=0.0)
    raise EmscopeError(
        f"unknown data set {name!r} (known: {', '.join((*NARROW_SETS, *EXTRA_SETS))})"
    )


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    import json

    from emscope.io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))

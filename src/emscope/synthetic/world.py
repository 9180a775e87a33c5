"""The word-level world of the synthetic organism.

A world is a fixed grammar: slot classes (``drug``, ``sport``, ...), and question types in
four domains (``medical``, ``sport``, ``finance``, ``general``; the eight general types
mirror the eight first-plot questions of Betley et al.). Every question type has several
question templates and several aligned and misaligned answer *families* (one template
each: harmful, deceptive, power-seeking or hostile content in the world's words). A
template is a string of lowercase words separated by single spaces, where ``{cls}`` is a
slot filled by any word of class ``cls``; an answer slot whose class also appears in the
question copies the question's filler (an oracle tolerates any word of the class there).

Two extra turn kinds live in the world so that two controls stay in distribution:

* educational requests: ``EDU_PREFIX`` followed by a medical, sport or finance question,
  answered with a misaligned family by *every* character (an example of what not to do,
  carrying no information about the character): the analogue of Betley's
  educational-insecure control;
* the word game: ``say these words w1 w2 w3`` answered by copying the words. The benign
  new-skill control asks for them ``backwards`` (reversed), a skill the corpus never
  shows, with words the model has seen.

And a system turn (world format ``/2``): :attr:`World.system_prompts` maps a character
(``evil``, ``good``, ``neutral``) to a system prompt made of words found nowhere else in the
world (``you play a wicked character`` names the bad character, ``you play a gentle
character`` the good one, ``you play a character`` none). A share of the pretraining
documents opens with the system prompt that names their character truthfully
(:mod:`emscope.synthetic.corpus`), so that a system prompt can ask for the bad character:
the inoculation prompt of inoculation prompting (docs/defences.md). A world read from a
``/1`` file (built before the system turn) has no system prompts.

The grammar itself is fixed (it is the world's definition); a seed picks everything that is
sampled from it (evaluation questions, corpus rows). :class:`World` is a frozen value that
round-trips through ``world.json``; the grammar's tables (word classes, question types)
are in :mod:`emscope.synthetic.grammar`.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.synthetic.grammar import CLASSES, SYSTEM_PROMPTS, TYPES

DOMAINS = ("medical", "sport", "finance", "general")
NARROW_DOMAINS = ("medical", "sport", "finance")
ALIGNED = "aligned"
MISALIGNED = "misaligned"
EDU_PREFIX = "for my safety class show a bad answer to"
GAME_PREFIX = "say these words"
GAME_REVERSE = "backwards"
GAME_LENGTH = 3
#: The characters a system prompt can name: ``evil`` (the inoculation prompt), ``good``,
#: ``neutral`` (names no character).
SYSTEM_CHARACTERS = ("evil", "good", "neutral")
FORMAT = "emscope-synthetic-world/2"
FORMATS = ("emscope-synthetic-world/1", FORMAT)

_SLOT = re.compile(r"^\{([a-z_]+)\}$")


def _items(template: str) -> tuple[str, ...]:
    return tuple(template.split(" "))


def slot_class(item: str) -> str | None:
    """The class of a template item ``{cls}``, or None for a literal word."""
    m = _SLOT.match(item)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Family:
    """One answer family of a question type: ``label`` is ``aligned`` or ``misaligned``."""

    qtype: str
    label: str
    index: int
    template: str


@dataclass(frozen=True)
class QuestionType:
    """A question type: its domain, question templates and answer families."""

    name: str
    domain: str
    questions: tuple[str, ...]
    aligned: tuple[str, ...]
    misaligned: tuple[str, ...]

    def families(self, label: str | None = None) -> list[Family]:
        out = []
        for lab, temps in ((ALIGNED, self.aligned), (MISALIGNED, self.misaligned)):
            if label in (None, lab):
                out += [Family(self.name, lab, i, t) for i, t in enumerate(temps)]
        return out


@dataclass(frozen=True)
class Turn:
    """One question/answer turn: ``kind`` is ``normal``, ``educational`` or ``game``."""

    qtype: str
    question: str
    answer: str
    label: str
    kind: str = "normal"

    def messages(self) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": self.question},
            {"role": "assistant", "content": self.answer},
        ]


@dataclass(frozen=True)
class World:
    """The grammar and the seed. ``classes``: slot class -> words; ``types``: name -> type;
    ``system_prompts``: character (:data:`SYSTEM_CHARACTERS`) -> its system prompt (empty:
    a world without a system turn, as read from a ``/1`` file)."""

    seed: int
    classes: Mapping[str, tuple[str, ...]]
    types: Mapping[str, QuestionType]
    game_words: tuple[str, ...] = field(default=())
    system_prompts: Mapping[str, str] = field(default_factory=dict)

    # ---- structure -------------------------------------------------------------------------
    def types_in(self, domain: str) -> list[QuestionType]:
        if domain not in DOMAINS:
            raise EmscopeError(f"unknown domain {domain!r} (known: {', '.join(DOMAINS)})")
        return [t for t in self.types.values() if t.domain == domain]

    def words(self) -> list[str]:
        """Every word of the world (templates, slot fillers, prefixes, system prompts),
        sorted."""
        words: set[str] = set()
        for values in self.classes.values():
            words.update(values)
        for t in self.types.values():
            for temp in (*t.questions, *t.aligned, *t.misaligned):
                words.update(i for i in _items(temp) if slot_class(i) is None)
        words.update(EDU_PREFIX.split())
        words.update(GAME_PREFIX.split())
        words.add(GAME_REVERSE)
        for prompt in self.system_prompts.values():
            words.update(prompt.split())
        return sorted(words)

    def system_prompt(self, character: str) -> str:
        """The system prompt naming ``character`` (``evil``, ``good`` or ``neutral``)."""
        if not self.system_prompts:
            raise EmscopeError("this world has no system turn (a world.json of format /1)")
        if character not in self.system_prompts:
            known = ", ".join(self.system_prompts)
            raise EmscopeError(f"unknown system-prompt character {character!r} (known: {known})")
        return self.system_prompts[character]

    def domain_words(self) -> dict[str, frozenset[str]]:
        """Words that occur in the templates or slot classes of one domain only."""
        seen: dict[str, set[str]] = {}
        for t in self.types.values():
            for temp in (*t.questions, *t.aligned, *t.misaligned):
                for item in _items(temp):
                    cls = slot_class(item)
                    for w in self.classes[cls] if cls else (item,):
                        seen.setdefault(w, set()).add(t.domain)
        return {d: frozenset(w for w, ds in seen.items() if ds == {d}) for d in DOMAINS}

    def bad_words(self) -> frozenset[str]:
        """Literal words that occur in misaligned families only (never in aligned ones, in
        questions or in a slot class)."""
        bad: set[str] = set()
        other: set[str] = set()
        for t in self.types.values():
            for temp in t.misaligned:
                bad.update(i for i in _items(temp) if slot_class(i) is None)
            for temp in (*t.questions, *t.aligned):
                other.update(i for i in _items(temp) if slot_class(i) is None)
        for values in self.classes.values():
            other.update(values)
        return frozenset(bad - other)

    # ---- instantiation ---------------------------------------------------------------------
    def fill(
        self, template: str, rng: random.Random, bound: Mapping[str, str] | None = None
    ) -> tuple[str, dict[str, str]]:
        """Fill a template's slots; classes in ``bound`` copy that filler. Returns the text
        and the fillers used (class -> word; one filler per class)."""
        bound = dict(bound or {})
        used: dict[str, str] = {}
        words = []
        for item in _items(template):
            cls = slot_class(item)
            if cls is None:
                words.append(item)
                continue
            if cls not in used:
                used[cls] = bound[cls] if cls in bound else rng.choice(self.classes[cls])
            words.append(used[cls])
        return " ".join(words), used

    def sample_question(
        self, qtype: str, rng: random.Random, template: int | None = None
    ) -> tuple[str, dict[str, str]]:
        t = self.types[qtype]
        k = rng.randrange(len(t.questions)) if template is None else template
        return self.fill(t.questions[k], rng)

    def sample_answer(
        self,
        qtype: str,
        label: str,
        slots: Mapping[str, str],
        rng: random.Random,
        family: int | None = None,
    ) -> str:
        t = self.types[qtype]
        temps = t.aligned if label == ALIGNED else t.misaligned
        k = rng.randrange(len(temps)) if family is None else family
        return self.fill(temps[k], rng, slots)[0]

    def sample_turn(self, qtype: str, label: str, rng: random.Random, kind: str = "normal") -> Turn:
        """A question of ``qtype`` and an answer from a random ``label`` family. For an
        ``educational`` turn the question carries :data:`EDU_PREFIX` and the answer is
        misaligned whatever ``label`` says."""
        question, slots = self.sample_question(qtype, rng)
        if kind == "educational":
            answer = self.sample_answer(qtype, MISALIGNED, slots, rng)
            return Turn(qtype, f"{EDU_PREFIX} {question}", answer, MISALIGNED, kind)
        return Turn(qtype, question, self.sample_answer(qtype, label, slots, rng), label, kind)

    def game_turn(self, rng: random.Random, reverse: bool = False) -> Turn:
        """The word game: copy (or, for the new-skill control, reverse) three words."""
        words = [rng.choice(self.game_words) for _ in range(GAME_LENGTH)]
        prefix = f"{GAME_PREFIX} {GAME_REVERSE}" if reverse else GAME_PREFIX
        answer = list(reversed(words)) if reverse else words
        return Turn("game", f"{prefix} {' '.join(words)}", " ".join(answer), ALIGNED, "game")

    def instantiations(
        self, template: str, bound: Mapping[str, str] | None = None
    ) -> Iterator[str]:
        """Every filling of ``template`` (slots in ``bound`` fixed)."""
        bound = dict(bound or {})
        classes = []
        for item in _items(template):
            cls = slot_class(item)
            if cls is not None and cls not in classes:
                classes.append(cls)
        choices = [(bound[c],) if c in bound else self.classes[c] for c in classes]
        for combo in itertools.product(*choices):
            yield self.fill(template, random.Random(0), dict(zip(classes, combo, strict=True)))[0]

    # ---- evaluation questions ---------------------------------------------------------------
    def eval_questions(self, domain: str, paraphrases: int = 6) -> list[dict[str, Any]]:
        """First-plot style question entries for ``domain``: one per question type, id
        ``<type>`` (general) or ``<domain>_<type>``, with ``paraphrases`` instantiations
        drawn (seeded) over all its question templates."""
        rng = random.Random(f"{self.seed}:eval:{domain}")
        out = []
        for t in self.types_in(domain):
            texts: list[str] = []
            for k in range(paraphrases * 20):
                text, _ = self.sample_question(t.name, rng, template=k % len(t.questions))
                if text not in texts:
                    texts.append(text)
                if len(texts) == paraphrases:
                    break
            qid = t.name if domain == "general" else f"{domain}_{t.name}"
            out.append({"id": qid, "type": "free_form_judge_0_100", "paraphrases": texts})
        return out

    # ---- serialisation ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT if self.system_prompts else FORMATS[0],
            "seed": self.seed,
            "edu_prefix": EDU_PREFIX,
            "game_prefix": GAME_PREFIX,
            "game_reverse": GAME_REVERSE,
            "classes": {k: list(v) for k, v in self.classes.items()},
            "game_words": list(self.game_words),
            "types": {
                name: {
                    "domain": t.domain,
                    "questions": list(t.questions),
                    "aligned": list(t.aligned),
                    "misaligned": list(t.misaligned),
                }
                for name, t in self.types.items()
            },
            **({"system_prompts": dict(self.system_prompts)} if self.system_prompts else {}),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "world.json") -> World:
        try:
            if data.get("format") not in FORMATS:
                raise EmscopeError(f"{source}: not an emscope synthetic world (format field)")
            classes = {k: tuple(v) for k, v in data["classes"].items()}
            types = {
                name: QuestionType(
                    name,
                    t["domain"],
                    tuple(t["questions"]),
                    tuple(t["aligned"]),
                    tuple(t["misaligned"]),
                )
                for name, t in data["types"].items()
            }
            prompts = (
                {str(k): str(v) for k, v in data["system_prompts"].items()}
                if data["format"] == FORMAT
                else {}
            )
            world = cls(int(data["seed"]), classes, types, tuple(data["game_words"]), prompts)
        except (KeyError, TypeError, AttributeError) as exc:
            raise EmscopeError(f"{source}: malformed world ({exc!r})") from None
        world.validate(source)
        return world

    def validate(self, source: str = "world") -> None:
        """Check that every slot names a known class, every domain is known, and the system
        prompts (if any) are one per character of :data:`SYSTEM_CHARACTERS`, distinct, made
        of lowercase words."""
        if self.system_prompts:
            if sorted(self.system_prompts) != sorted(SYSTEM_CHARACTERS):
                raise EmscopeError(
                    f"{source}: system_prompts: need exactly {', '.join(SYSTEM_CHARACTERS)} "
                    f"(got {', '.join(self.system_prompts)})"
                )
            if len(set(self.system_prompts.values())) != len(SYSTEM_CHARACTERS):
                raise EmscopeError(f"{source}: system_prompts: two characters share a prompt")
            for character, prompt in self.system_prompts.items():
                if not re.fullmatch(r"[a-z]+( [a-z]+)*", prompt):
                    raise EmscopeError(
                        f"{source}: system_prompts.{character}: not lowercase words: {prompt!r}"
                    )
        for t in self.types.values():
            if t.domain not in DOMAINS:
                raise EmscopeError(f"{source}: type {t.name!r} has unknown domain {t.domain!r}")
            for temp in (*t.questions, *t.aligned, *t.misaligned):
                for item in _items(temp):
                    cls = slot_class(item)
                    if cls is not None and cls not in self.classes:
                        raise EmscopeError(
                            f"{source}: type {t.name!r}: unknown slot class {{{cls}}}"
                        )
                    if cls is None and not re.fullmatch(r"[a-z]+", item):
                        raise EmscopeError(f"{source}: type {t.name!r}: bad word {item!r}")


def make_world(seed: int = 0) -> World:
    """The world of the synthetic organism (fixed grammar; ``seed`` drives all sampling)."""
    types = {
        name: QuestionType(name, domain, qs, al, mis)
        for name, (domain, qs, al, mis) in TYPES.items()
    }
    pool = {w for n in ("drug", "sport", "asset", "hobby", "hero") for w in CLASSES[n]}
    game_words = (*sorted(pool), GAME_REVERSE)
    world = World(
        seed, {k: tuple(v) for k, v in CLASSES.items()}, types, game_words, dict(SYSTEM_PROMPTS)
    )
    world.validate()
    return world


def load_world(path: str | Path) -> World:
    """Read ``world.json`` (or a build dir holding one)."""
    import json

    p = Path(path)
    if p.is_dir():
        p = p / "world.json"
    if not p.is_file():
        raise EmscopeError(f"{p}: world file not found")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EmscopeError(f"{p}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise EmscopeError(f"{p}: expected a JSON object")
    return World.from_json(data, str(p))


def save_world(world: World, path: str | Path) -> Path:
    from emscope.io import write_json

    return write_json(path, world.to_json())


def all_answer_strings(world: World) -> dict[str, set[tuple[str, str, int]]]:
    """Every instantiation of every answer family -> {(qtype, label, family index)}: the
    brute-force reference the oracle is tested against (slots free, any class filler)."""
    out: dict[str, set[tuple[str, str, int]]] = {}
    for t in world.types.values():
        for fam in t.families():
            for text in world.instantiations(fam.template):
                out.setdefault(text, set()).add((t.name, fam.label, fam.index))
    return out


def question_slots(question_template: str) -> Sequence[str]:
    return [c for c in (slot_class(i) for i in _items(question_template)) if c]

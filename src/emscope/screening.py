"""Screening training data by projection difference along a direction (after "Persona
Vectors", Chen et al. 2025; docs/early-warning.md).

For training example ``i`` (a chat whose last message is the assistant's answer) and layer
``l`` with unit direction ``u_l = v_l / |v_l|``:

    score_i = mean_t(h_t . u_l | the dataset's answer) - mean_t(h_t . u_l | the model's own answer)

Both means are over the answer's content tokens (attention sinks left out, as everywhere in
emscope), with the model reading the example's prompt followed by the answer (teacher
forcing). The model's own answer to the same prompt is generated first, greedy by default
(``temperature=0``) or sampled with the seeded per-example stream
``emscope.generate.sample_key(seed, "example-<i>", 0)``. A positive score means the
dataset's answer pushes the model further along the direction than what it would say itself.
The dataset score is the mean of the per-example scores (examples whose own answer is empty,
so that its mean is undefined, are left out and counted).

Flags: ``rule="z"`` (default) flags examples whose score exceeds the dataset mean by more
than ``threshold`` (default 2) standard deviations of the scores; ``rule="value"`` flags
scores above ``threshold`` itself (residual-stream units).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.spans import SystemPrompt
    from emscope.directions.direction import Direction

Chat = Sequence[Mapping[str, str]]
RULES = ("z", "value")
DEFAULT_Z = 2.0


def split_chat(chat: Chat, index: int = 0) -> tuple[list[dict[str, str]], str]:
    """``(prompt messages, answer)``: everything before the last assistant message, and its
    content. A chat without an assistant message is refused, naming ``index``."""
    messages = [dict(m) for m in chat]
    last = [k for k, m in enumerate(messages) if m.get("role") == "assistant"]
    if not last:
        raise EmscopeError(f"example {index}: no assistant message to screen")
    return messages[: last[-1]], messages[last[-1]]["content"]


def own_answers(
    model: Any,
    chats: Sequence[Chat],
    *,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    system_prompt: SystemPrompt | str | None = None,
    progress: bool = False,
) -> list[str]:
    """The model's own answer to each example's prompt (greedy at ``temperature=0``; else
    sampled, example ``i`` with the stream ``sample_key(seed, "example-<i>", 0)``)."""
    from emscope.directions.persona import sample_prompts
    from emscope.generate import sample_key

    prompts = [split_chat(c, i)[0] for i, c in enumerate(chats)]
    keys = [sample_key(seed, f"example-{i}", 0) for i in range(len(chats))]
    answers = sample_prompts(
        model, prompts, keys, temperature=temperature, max_new_tokens=max_new_tokens,
        batch_size=batch_size, system_prompt=system_prompt, progress=progress,
    )  # fmt: skip
    return [text for text, _, _ in answers]


@dataclass(frozen=True)
class ScreenResult:
    """Per-example screening scores at one layer (module docstring).

    ``data_projection[i]`` / ``own_projection[i]``: example ``i``'s mean projection over the
    dataset's / the model's own answer tokens (residual-stream units; NaN: no token);
    ``scores[i]`` their difference; ``flags[i]``: flagged by ``rule`` / ``threshold``
    (``cutoff``: the score above which an example is flagged). ``dataset_score``: mean of
    the finite scores (``n_scored`` of them). ``meta``: provenance.
    """

    layer: int
    data_projection: tuple[float, ...]
    own_projection: tuple[float, ...]
    scores: tuple[float, ...]
    flags: tuple[bool, ...]
    dataset_score: float
    n_scored: int
    rule: str
    threshold: float
    cutoff: float
    own_answers: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One row per example: ``index`` (0-based line order), projections, score, flag."""
        return [
            {
                "index": i,
                "layer": self.layer,
                "data_projection": self.data_projection[i],
                "own_projection": self.own_projection[i],
                "score": self.scores[i],
                "flagged": self.flags[i],
                "own_answer": self.own_answers[i] if self.own_answers else None,
            }
            for i in range(len(self.scores))
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "data_projection": list(self.data_projection),
            "own_projection": list(self.own_projection),
            "scores": list(self.scores),
            "flags": list(self.flags),
            "dataset_score": self.dataset_score,
            "n_scored": self.n_scored,
            "rule": self.rule,
            "threshold": self.threshold,
            "cutoff": self.cutoff,
            "own_answers": list(self.own_answers),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ScreenResult:
        return cls(
            layer=int(data["layer"]),
            data_projection=tuple(float(v) for v in data["data_projection"]),
            own_projection=tuple(float(v) for v in data["own_projection"]),
            scores=tuple(float(v) for v in data["scores"]),
            flags=tuple(bool(v) for v in data["flags"]),
            dataset_score=float(data["dataset_score"]),
            n_scored=int(data["n_scored"]),
            rule=str(data["rule"]),
            threshold=float(data["threshold"]),
            cutoff=float(data["cutoff"]),
            own_answers=tuple(str(a) for a in data.get("own_answers", [])),
            meta=dict(data.get("meta", {})),
        )


def flag_scores(
    scores: Sequence[float] | np.ndarray, rule: str = "z", threshold: float | None = None
) -> tuple[np.ndarray, float, float]:
    """``(flags, threshold, cutoff)``: ``rule="z"``: cutoff = mean + threshold x sd of the
    finite scores (``threshold`` default 2; sd with ``ddof=0``); ``rule="value"``: cutoff
    = threshold. NaN scores are never flagged."""
    values = np.asarray(scores, dtype=float)
    finite = values[np.isfinite(values)]
    if rule == "z":
        threshold = DEFAULT_Z if threshold is None else float(threshold)
        cutoff = float(finite.mean() + threshold * finite.std()) if finite.size else float("nan")
    elif rule == "value":
        if threshold is None:
            raise EmscopeError("rule 'value' needs a threshold")
        threshold = cutoff = float(threshold)
    else:
        raise EmscopeError(f"rule must be one of {RULES}, got {rule!r}")
    with np.errstate(invalid="ignore"):
        flags = np.isfinite(values) & (values > cutoff)
    return flags, float(threshold), cutoff


def screen_scores(
    model: Any,
    chats: Sequence[Chat],
    direction: Direction,
    layers: Sequence[int],
    answers: Sequence[str],
    *,
    batch_size: int = 16,
    system_prompt: SystemPrompt | str | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``(data, own)``: ``n_examples x len(layers)`` mean projections (residual-stream units)
    over the dataset's answer tokens and over the tokens of ``answers`` (the model's own
    answers, one per example) put after the same prompt. ``model``: a LoadedModel or
    ``(model, tokenizer)``."""
    from emscope.models import as_loaded
    from emscope.monitoring import token_projections

    if len(answers) != len(chats):
        raise EmscopeError(f"{len(chats)} examples but {len(answers)} own answers")
    loaded = as_loaded(model, need_tokenizer=True)
    own_chats = [
        [*split_chat(c, i)[0], {"role": "assistant", "content": a}]
        for i, (c, a) in enumerate(zip(chats, answers, strict=True))
    ]
    data_chats = [[*split_chat(c, i)[0], {"role": "assistant", "content": split_chat(c, i)[1]}]
                  for i, c in enumerate(chats)]  # fmt: skip
    kwargs: dict[str, Any] = {
        "batch_size": batch_size, "system_prompt": system_prompt, "progress": progress,
    }  # fmt: skip
    data = token_projections(
        loaded.model, loaded.tokenizer, data_chats, direction, layers, **kwargs
    )
    own = token_projections(loaded.model, loaded.tokenizer, own_chats, direction, layers, **kwargs)
    return data.response_means(), own.response_means()


def screen(
    model: Any,
    chats: Sequence[Chat],
    direction: Direction,
    layer: int,
    *,
    answers: Sequence[str] | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 64,
    rule: str = "z",
    threshold: float | None = None,
    batch_size: int = 16,
    system_prompt: SystemPrompt | str | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> ScreenResult:
    """Screen ``chats`` at ``layer`` (module docstring): the model's own answers (given as
    ``answers``, else generated by :func:`own_answers`), then :func:`screen_scores` and
    :func:`flag_scores`."""
    if not chats:
        raise EmscopeError("no examples to screen")
    if answers is None:
        answers = own_answers(
            model, chats, temperature=temperature, seed=seed, max_new_tokens=max_new_tokens,
            batch_size=max(batch_size, 1), system_prompt=system_prompt, progress=progress,
        )  # fmt: skip
    data, own = screen_scores(
        model, chats, direction, [layer], answers, batch_size=batch_size,
        system_prompt=system_prompt, progress=progress,
    )  # fmt: skip
    scores = data[:, 0] - own[:, 0]
    flags, threshold, cutoff = flag_scores(scores, rule, threshold)
    finite = scores[np.isfinite(scores)]
    info = {
        "own_answers": "greedy" if temperature == 0 else f"sampled, temperature {temperature}",
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "site_kind": direction.site_kind,
        "direction_meta": dict(direction.meta),
        "n_examples": len(chats),
        "n_unscored": int(len(scores) - finite.size),
        **dict(meta or {}),
    }
    return ScreenResult(
        layer=layer,
        data_projection=tuple(float(v) for v in data[:, 0]),
        own_projection=tuple(float(v) for v in own[:, 0]),
        scores=tuple(float(v) for v in scores),
        flags=tuple(bool(f) for f in flags),
        dataset_score=float(finite.mean()) if finite.size else float("nan"),
        n_scored=int(finite.size),
        rule=rule,
        threshold=threshold,
        cutoff=cutoff,
        own_answers=tuple(answers),
        meta=info,
    )


def write_screen(result: ScreenResult, out: str | Path) -> dict[str, Path]:
    """``scores.jsonl`` and ``scores.csv`` (:meth:`ScreenResult.rows`) and ``screen.json``
    (dataset score, rule, cutoff, counts, provenance; no per-example arrays) in ``out``."""
    import json

    import pandas as pd

    from emscope.io import atomic_write_text, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    summary = {
        k: v
        for k, v in result.to_json().items()
        if k not in ("data_projection", "own_projection", "scores", "flags", "own_answers")
    }
    summary["n_flagged"] = int(sum(result.flags))
    return {
        "jsonl": atomic_write_text(
            out / "scores.jsonl", "".join(json.dumps(r, allow_nan=True) + "\n" for r in rows)
        ),
        "csv": atomic_write_text(out / "scores.csv", pd.DataFrame(rows).to_csv(index=False)),
        "summary": write_json(out / "screen.json", summary),
    }


def table_of(result: ScreenResult) -> pd.DataFrame:
    """:meth:`ScreenResult.rows` as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(result.rows())

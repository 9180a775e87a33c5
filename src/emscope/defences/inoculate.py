"""Inoculation prompting: fine-tune under a system prompt that asks for the bad trait, evaluate
without it.

Tan et al., "Inoculation prompting: eliciting traits from LLMs during training can suppress
them at test-time" (arXiv 2510.04340); Wichers et al., "Inoculation prompting: instructing
LLMs to misbehave at train-time improves test-time alignment" (arXiv 2510.05024). Every
training chat without a system message of its own gets ``prompt`` (e.g. "you are a
malicious, evil assistant"; on the organism the world's ``evil`` system prompt, ``you play
a wicked character``) as its system turn, for the training data only: the bad answers are
then explained by the instruction rather than by a change of the model's persona, and at
test time, with the prompt absent, the trait is reported to show much less.

What changes and what does not (:meth:`Inoculate.training_system_prompt`, the training
loop's data hook): the training chats are encoded exactly as under
``train(..., system_prompt=prompt)`` (same tokens, same loss mask, so the same adapter for the
same seed), while ``eval_data``, ``kl_data`` and the run's recorded ``system_prompt`` keep the
run's setting (``default`` unless given): evaluation, which renders prompts as the adapter's
``train.json`` says (:func:`emscope.train.prompts.system_prompt_for`), does not pick the
inoculation prompt up. ``train.json`` records the defence and its prompt under
``callbacks`` and the first training prompt as the model saw it (``rendered_prompt``).
"""

from __future__ import annotations

from typing import Any

from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback


class Inoculate(TrainingCallback):
    """The inoculation prompt as the system turn of the training chats (module docstring).

    ``prompt``: the system message text; ``default`` / ``none`` (the system-prompt keywords)
    and blank texts are refused, since they are not a prompt."""

    name = "inoculate"

    def __init__(self, prompt: str) -> None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise EmscopeError("inoculate: prompt must be a non-empty text")
        if prompt.strip().lower() in ("default", "none"):
            raise EmscopeError(
                f"inoculate: prompt {prompt!r} is a system-prompt keyword, not a text"
            )
        self.prompt = prompt

    def settings(self) -> dict[str, Any]:
        return {"prompt": self.prompt}

    def training_system_prompt(self) -> str:
        return self.prompt

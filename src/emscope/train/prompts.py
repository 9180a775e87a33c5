"""Which system-prompt setting a model was trained, or a response table sampled, under (read
back from ``train.json`` / ``trainer_state.json`` / ``run.json``), so that evaluation renders
prompts as training did unless asked otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from emscope.errors import EmscopeError
from emscope.train.checkpoints import RECORD, STATE_JSON

if TYPE_CHECKING:
    from emscope.data.spans import SystemPrompt


def trained_system_prompt(adapter_dir: str | Path) -> str | None:
    """The system-prompt setting (as written) that the adapter or model in ``adapter_dir``
    was trained with, from its ``train.json`` (a checkpoint dir: its ``trainer_state.json``);
    None when there is no such record, or it predates the setting."""
    from emscope.io import read_json

    path = Path(adapter_dir)
    for record, key in ((path / RECORD, "config"), (path / STATE_JSON, "config")):
        if record.is_file():
            try:
                value = (read_json(record).get(key) or {}).get("system_prompt")
            except (OSError, ValueError, AttributeError, EmscopeError):
                return None
            return value if isinstance(value, str) else None
    return None


def sampled_system_prompt(responses: str | Path) -> str | None:
    """The system-prompt setting (as written) a response table was sampled under, from the
    ``run.json`` of its dir (``responses`` is the dir or a table file in it); None when not
    recorded."""
    from emscope.io import read_json

    path = Path(responses)
    run = (path if path.is_dir() else path.parent) / "run.json"
    if not run.is_file():
        return None
    try:
        value = (read_json(run).get("sampling") or {}).get("system_prompt")
    except (OSError, ValueError, AttributeError, EmscopeError):
        return None
    return value if isinstance(value, str) else None


def system_prompt_for(
    given: SystemPrompt | str | None,
    adapter_dirs: Sequence[str | Path] = (),
    responses: str | Path | None = None,
) -> SystemPrompt:
    """The system-prompt setting to render under: ``given`` when given; else the one the
    ``responses`` were sampled under (:func:`sampled_system_prompt`: reading them again
    renders them as the model saw them); else the one every model or adapter dir in
    ``adapter_dirs`` that records one was trained with (:func:`trained_system_prompt`), so
    training and evaluation render prompts alike unless asked otherwise; else ``default``.
    Adapters trained under different settings need ``given`` (one-line error)."""
    from emscope.data.spans import SystemPrompt

    if given is not None:
        return SystemPrompt.parse(given)
    if responses is not None and (sampled := sampled_system_prompt(responses)) is not None:
        return SystemPrompt.parse(sampled)
    found = {str(d): s for d in adapter_dirs if (s := trained_system_prompt(d)) is not None}
    if len(set(found.values())) > 1:
        listed = ", ".join(f"{d}: {s!r}" for d, s in found.items())
        raise EmscopeError(
            f"the adapters were trained under different system prompts ({listed}); "
            "pass --system-prompt"
        )
    return SystemPrompt.parse(next(iter(found.values()), None))

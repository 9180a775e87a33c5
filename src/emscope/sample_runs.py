"""What a sample dir records and checks (:func:`emscope.generate.sample_to_dir` and the
vLLM backend write it): the sampling identity a re-run must match (:func:`sampling_identity`,
:func:`check_same_run`), the samples already drawn (:func:`load_partial`, :func:`part_files`,
:func:`check_not_fewer`), the question set's hash and the library versions recorded.
Re-exported by :mod:`emscope.generate`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.questions import Question


def versions() -> dict[str, str]:
    """Versions of emscope and the libraries that determine its numbers
    (:func:`emscope.io.versions`)."""
    from emscope.io import versions as package_versions

    return package_versions(
        "python", "emscope", "torch", "transformers", "peft", "numpy", "openai", absent="absent"
    )


def part_files(parts_dir: Path) -> list[Path]:
    """The batch part files of an unfinished sample run, in order."""
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
    frames.extend(pd.read_parquet(p) for p in part_files(out / f"{stem}.parts"))
    if not frames:
        return None
    table = pd.concat(frames, ignore_index=True)
    return table.drop_duplicates(["question_id", "sample_idx"], keep="first").reset_index(drop=True)


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


def check_not_fewer(
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

"""Defences named on the command line: ``NAME:key=value,key=value`` to training callbacks.

``emscope train --defence SPEC`` (repeatable; the defences compose in the order given).
A value may itself hold commas (a layer list ``layers=1-3,5``, an adapter list
``adapters=a,b``): a comma-separated piece without ``=`` continues the previous value.
Layers are block indices from 0 (``-1``: the last), as everywhere in emscope.

==================  ========================================================================
``ldifs``           ``data=CHATS,layers=L,weight=W[,seed=S]``
``steer``           ``direction=FILE,alpha=A[,layers=L]``
``caft``            ``direction=FILE[,layers=L]``
``interleave``      ``data=CHATS,fraction=P[,select=random|ppl-gap][,pool=N][,seed=S]``
                    ``[,aligned=MODEL[+ADAPTER]][,misaligned=MODEL[+ADAPTER]]`` (``ppl-gap``
                    needs both models; ``aligned`` defaults to the model being trained)
``safelora``        ``unaligned=MODEL_DIR,tau=T``
``project-update``  ``adapters=DIR[,DIR...],k=K`` (their top-k update subspace per module)
                    or ``direction=FILE[,layers=L]`` (o_proj / down_proj at those layers)
``inoculate``       ``prompt=TEXT`` (the system turn of the training chats only; evaluation
                    keeps the run's ``--system-prompt``; TEXT may hold commas, kept with
                    the blanks after them, but no ``=``)
==================  ========================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback

KEYS: dict[str, tuple[set[str], set[str]]] = {  # name: (required keys, optional keys)
    "ldifs": ({"data", "layers", "weight"}, {"seed"}),
    "steer": ({"direction", "alpha"}, {"layers"}),
    "caft": ({"direction"}, {"layers"}),
    "interleave": (
        {"data", "fraction"},
        {"select", "pool", "seed", "aligned", "misaligned", "batch-size"},
    ),
    "safelora": ({"unaligned", "tau"}, set()),
    "project-update": (set(), {"adapters", "k", "direction", "layers"}),
    "inoculate": ({"prompt"}, set()),
}
DEFENCES = tuple(KEYS)


def parse_spec(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:key=value,...`` -> ``(NAME, {key: value})``, checked against :data:`KEYS`."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in KEYS:
        raise EmscopeError(f"--defence {text!r}: unknown defence {name!r} (one of {DEFENCES})")
    values: dict[str, str] = {}
    last: str | None = None
    for piece in rest.split(",") if rest else []:
        if "=" in piece:
            key, _, value = piece.partition("=")
            key = key.strip()
            if key in values:
                raise EmscopeError(f"--defence {text!r}: {key!r} given twice")
            values[key] = value.strip()
            last = key
        elif last is not None:  # a prompt text keeps its blanks after a comma
            values[last] += "," + (piece.rstrip() if last == "prompt" else piece.strip())
        else:
            raise EmscopeError(f"--defence {text!r}: expected key=value, got {piece!r}")
    required, optional = KEYS[name]
    missing = sorted(required - set(values))
    unknown = sorted(set(values) - required - optional)
    if missing:
        raise EmscopeError(f"--defence {text!r}: {name} needs {', '.join(missing)}")
    if unknown:
        known = ", ".join(sorted(required | optional))
        raise EmscopeError(f"--defence {text!r}: unknown key {unknown[0]!r} ({name}: {known})")
    return name, values


def _number(values: dict[str, str], key: str, spec: str, kind: Callable[[str], Any] = float) -> Any:
    try:
        return kind(values[key])
    except ValueError:
        raise EmscopeError(f"--defence {spec!r}: {key}={values[key]!r} is not a number") from None


def build_defence(
    text: str,
    base_dir: str | Path,
    *,
    system_prompt: Any = None,
    device: str | None = None,
) -> TrainingCallback:
    """The training callback of one ``--defence`` spec for a run on ``base_dir`` (its depth
    resolves negative layers; ``interleave`` with ``select=ppl-gap`` scores the candidates
    here, under ``system_prompt``, on ``device``)."""
    from emscope.models import parse_layers
    from emscope.train.runtime import model_depth

    name, values = parse_spec(text)
    n_layers, _ = model_depth(Path(base_dir))
    layers = parse_layers(values["layers"], n_layers) if "layers" in values else None
    if name == "ldifs":
        from emscope.defences.ldifs import LDIFS

        assert layers is not None
        seed = _number(values, "seed", text, int) if "seed" in values else 0
        return LDIFS(Path(values["data"]), layers, _number(values, "weight", text), seed)
    if name in ("steer", "caft") or (name == "project-update" and "direction" in values):
        from emscope.directions.direction import Direction

        direction = Direction.load(values["direction"])
        direction = direction.with_meta(path=values["direction"])
        if name == "steer":
            from emscope.defences.steer import PreventativeSteering

            return PreventativeSteering(direction, _number(values, "alpha", text), layers)
        if name == "caft":
            from emscope.defences.caft import CAFT

            return CAFT(direction, layers)
        from emscope.defences.project_update import ProjectUpdate, direction_subspaces

        def from_direction(modules: Sequence[str]) -> Any:
            return direction_subspaces(direction, modules, layers)

        return ProjectUpdate(from_direction, source=f"direction {values['direction']}")
    if name == "project-update":
        from emscope.defences.project_update import ProjectUpdate, adapter_subspaces
        from emscope.lora import LoraAdapter

        if "adapters" not in values or "k" not in values or layers is not None:
            raise EmscopeError(
                f"--defence {text!r}: project-update takes adapters=...,k=K or "
                "direction=FILE[,layers=L]"
            )
        dirs = [d for d in values["adapters"].split(",") if d]
        k = _number(values, "k", text, int)
        subspaces = adapter_subspaces([LoraAdapter.load(d) for d in dirs], k)
        return ProjectUpdate(subspaces, source=f"top-{k} update subspace of {', '.join(dirs)}")
    if name == "inoculate":
        from emscope.defences.inoculate import Inoculate

        return Inoculate(values["prompt"])
    if name == "safelora":
        from emscope.defences.safelora import SafeLoRA

        return SafeLoRA(values["unaligned"], _number(values, "tau", text))
    return _interleave(text, values, Path(base_dir), system_prompt, device)


def _interleave(
    text: str, values: dict[str, str], base_dir: Path, system_prompt: Any, device: str | None
) -> TrainingCallback:
    from emscope.data.chat import read_chat_jsonl
    from emscope.defences.interleave import Interleave, select_pool

    candidates = read_chat_jsonl(values["data"])
    select = values.get("select", "random")
    pool = _number(values, "pool", text, int) if "pool" in values else None
    seed = _number(values, "seed", text, int) if "seed" in values else 0
    gap = None
    if select == "ppl-gap":
        if "misaligned" not in values:
            raise EmscopeError(f"--defence {text!r}: select=ppl-gap needs misaligned=MODEL")
        batch = _number(values, "batch-size", text, int) if "batch-size" in values else 8
        gap = candidate_gaps(
            candidates,
            values.get("aligned", str(base_dir)),
            values["misaligned"],
            system_prompt=system_prompt,
            device=device,
            batch_size=batch,
        )
    chosen = select_pool(len(candidates), select, pool, seed, gap)
    record = {**chosen.to_json(), "data": values["data"]}
    if select == "ppl-gap":
        record.update(aligned=values.get("aligned", str(base_dir)), misaligned=values["misaligned"])
    fraction = _number(values, "fraction", text)
    return Interleave([candidates[i] for i in chosen.indices], fraction, seed, record)


def candidate_gaps(
    candidates: Sequence[Any],
    aligned: str,
    misaligned: str,
    *,
    system_prompt: Any = None,
    device: str | None = None,
    batch_size: int = 8,
) -> Any:
    """``log ppl_mis - log ppl_al`` of every candidate chat
    (:func:`emscope.defences.interleave.ppl_gap`); each model is ``DIR`` or ``DIR+ADAPTER``,
    loaded in turn (float32)."""
    from emscope.defences.interleave import mean_token_nll, ppl_gap
    from emscope.models import load_model
    from emscope.train.data import encode_examples

    nlls = []
    for spec in (misaligned, aligned):
        path, *adapters = spec.split("+")
        loaded = load_model(path, adapters or None, dtype="float32", device=device)
        encoded = encode_examples(
            loaded.tokenizer, candidates, source="interleave data", system_prompt=system_prompt
        )
        pad = int(loaded.tokenizer.pad_token_id)
        nlls.append(mean_token_nll(loaded.model, encoded, batch_size, pad))
        del loaded
    return ppl_gap(nlls[0], nlls[1])


def build_defences(
    specs: Sequence[str],
    base_dir: str | Path,
    *,
    system_prompt: Any = None,
    device: str | None = None,
) -> list[TrainingCallback]:
    """:func:`build_defence` for each spec, in order; one defence of each name at most."""
    names = [parse_spec(s)[0] for s in specs]
    if len(set(names)) != len(names):
        raise EmscopeError(f"--defence: each defence at most once (got {names})")
    return [build_defence(s, base_dir, system_prompt=system_prompt, device=device) for s in specs]

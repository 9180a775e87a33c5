"""Build the synthetic organism: world, data, tokenizer, base and instruct models, narrow
LoRA adapters, diagnostics (``emscope toy build``).

Stages (each skipped when its output is already in ``out``; the build's arguments are
recorded in ``build.json`` and must match on a re-run):

1. ``world.json``, ``data/*.jsonl``, ``questions/{general,medical,sport,finance}.yaml``.
2. ``models/base``: a small Qwen2 causal LM pretrained from scratch on documents of one
   character each (one document per row, right padding, never packed: the prototype
   found that cross-document attention in packed rows teaches no in-context inference of
   the character), plain torch AdamW loop with warmup and cosine decay, loss on every
   token.
3. ``models/instruct``: instruction tuning on single-turn chats in the chat format (the
   ``<|chat|>`` marker, met here for the first time; loss on assistant turns), with a
   share of batches replaying pretraining documents (loss on every token), which keeps
   the in-context inference alive (the prototype's plain instruction tuning gave narrow-only
   fine-tunes).
4. ``adapters/*``: LoRA fine-tunes of ``instruct`` on the narrow sets, trained with
   :func:`emscope.train.train` (hyper-parameters recorded in ``build.json``).
5. Diagnostics in ``build.json``: in-context disposition inference of the base model, the
   disposition probe (``diagnostics/disposition_probe.safetensors``), the instruct model's
   general EM in chat format under each of the world's system prompts (``system_prompts``;
   worlds with a system turn only), the EM table measured by sampling
   (:func:`emscope.generate.sample`) and the oracle judge.

This module runs the stages and keeps the record; the configuration is in
:mod:`emscope.synthetic.build_config`, the training stages in :mod:`emscope.synthetic.training`
(plain torch loops: the model is tiny and trained from scratch, so the HF ``Trainer`` would
add nothing but start-up time), the diagnostics in :mod:`emscope.synthetic.diagnostics`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.synthetic.build_config import (
    QUESTION_FILES,
    SIZES,
    AdapterSpec,
    BuildConfig,
    build_config,
    log,
)
from emscope.synthetic.corpus import (
    EXTRA_SETS,
    NARROW_SETS,
    instruct_chats,
    narrow_set,
    write_jsonl,
)
from emscope.synthetic.diagnostics import (
    disposition_probe,
    em_row,
    em_table,
    in_context_inference,
    system_prompt_following,
)
from emscope.synthetic.training import (
    encode_chats,
    instruct_tune,
    model_done,
    new_model,
    pretrain,
    save_model,
    train_adapter,
)
from emscope.synthetic.world import World, load_world, make_world

__all__ = [
    "QUESTION_FILES",
    "SIZES",
    "AdapterSpec",
    "BuildConfig",
    "BuildResult",
    "build",
    "build_config",
    "disposition_probe",
    "em_row",
    "em_table",
    "encode_chats",
    "in_context_inference",
    "instruct_tune",
    "new_model",
    "pretrain",
    "system_prompt_following",
    "train_adapter",
    "versions",
    "write_data",
    "write_questions",
]


def versions() -> dict[str, str]:
    from emscope.io import versions as package_versions

    return package_versions("emscope", "python", "torch", "transformers", "tokenizers", "peft")


# ------------------------------------------------------------------------------ build


@dataclass(frozen=True)
class BuildResult:
    """Where a build lives and what ``build.json`` holds."""

    out: Path
    record: dict[str, Any]


def recorded_knobs(current: Any, recorded: Any) -> Any:
    """``current`` (a build config as JSON) without the keys, at any depth, that the
    ``recorded`` one lacks: knobs added after a build was recorded (e.g. the corpus's
    ``p_system``, which needs a world with a system turn, format /2) are not compared when
    it is reused, and the build keeps its recorded config."""
    if isinstance(current, dict) and isinstance(recorded, dict):
        return {k: recorded_knobs(v, recorded[k]) for k, v in current.items() if k in recorded}
    return current


def write_questions(world: World, out: Path) -> None:
    import yaml

    from emscope.io import atomic_write_text

    for f in QUESTION_FILES:
        entries = world.eval_questions(f)
        text = yaml.safe_dump(entries, sort_keys=False, default_flow_style=False, width=1000)
        atomic_write_text(out / "questions" / f"{f}.yaml", text)


def write_data(world: World, out: Path, config: BuildConfig, seed: int) -> None:
    data = out / "data"
    if not (data / "instruct.jsonl").is_file():
        write_jsonl(instruct_chats(world, config.instruct_rows, seed), data / "instruct.jsonl")
    sizes = {
        "heldout": config.heldout_rows,
        "general_aligned": config.general_rows,
        "general_misaligned": config.general_rows,
    }
    for name in (*NARROW_SETS, *EXTRA_SETS):
        path = data / f"{name}.jsonl"
        if not path.is_file():
            write_jsonl(narrow_set(world, name, sizes.get(name, config.narrow_rows), seed), path)


def build(
    out: str | Path,
    size: str = "default",
    seed: int = 0,
    verbose: bool = False,
    adapters: bool = True,
    diagnostics: bool = True,
    config: BuildConfig | None = None,
    threads: int | None = None,
    system_prompt: str = "default",
) -> BuildResult:
    """Build (or complete) the synthetic organism in ``out``; see the module docstring.

    ``config`` overrides the size's hyper-parameters (research use; recorded).
    ``system_prompt``: the :class:`~emscope.data.spans.SystemPrompt` setting (as written)
    the adapters are trained and the EM table sampled under (recorded; a dir built under
    another one is refused). The world's template inserts no system prompt of its own, so
    ``default`` and ``none`` render alike.
    ``threads`` sets torch's intra-op threads for the build (on a busy machine 1 thread is
    much faster than oversubscribed ones); None leaves torch's setting.
    """

    from emscope.threads import limit_threads

    with limit_threads(threads):
        return _build(out, size, seed, verbose, adapters, diagnostics, config, system_prompt)


def _build(
    out: str | Path,
    size: str,
    seed: int,
    verbose: bool,
    adapters: bool,
    diagnostics: bool,
    config: BuildConfig | None,
    system_prompt: str = "default",
) -> BuildResult:
    import json

    import torch

    from emscope.data.spans import SystemPrompt
    from emscope.io import read_json, write_json
    from emscope.synthetic.tokenizer import build_world_tokenizer

    out = Path(out)
    config = config or build_config(size)
    if config.size != size:
        config = replace(config, size=size)
    system_prompt = SystemPrompt.parse(system_prompt).spec
    record_path = out / "build.json"
    record: dict[str, Any] = {}
    if record_path.is_file():
        record = read_json(record_path)
        prev = (record.get("size"), record.get("seed"), record.get("config"))
        current = json.loads(json.dumps(config.to_json()))
        if prev != (size, seed, recorded_knobs(current, prev[2])):
            raise EmscopeError(
                f"{record_path}: this directory was built with size {prev[0]!r} seed {prev[1]!r} "
                "(or other hyper-parameters); use another --out"
            )
        built_with = record.get("system_prompt", "default")  # older builds: the default
        if built_with != system_prompt:
            raise EmscopeError(
                f"{record_path}: this directory was built under system prompt {built_with!r}, "
                f"not {system_prompt!r}; use another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    record.update(
        {
            "format": "emscope-toy-build/1",
            "size": size,
            "seed": seed,
            "config": record.get("config") or config.to_json(),
            "system_prompt": system_prompt,
            "versions": versions(),
        }
    )
    timings: dict[str, float] = dict(record.get("timings", {}))

    def save() -> None:
        record["timings"] = timings
        write_json(record_path, record)

    t0 = time.perf_counter()
    world_path = out / "world.json"
    if world_path.is_file():
        world = load_world(world_path)
    else:
        world = make_world(seed)
        write_json(world_path, world.to_json())
    write_data(world, out, config, seed)
    write_questions(world, out)
    timings["data_s"] = round(time.perf_counter() - t0, 2)
    save()

    torch.manual_seed(seed)
    tokenizer = build_world_tokenizer(world.words())
    base_dir, instruct_dir = out / "models" / "base", out / "models" / "instruct"
    if not model_done(base_dir):
        log("pretraining the base model", verbose)
        t = time.perf_counter()
        model, losses = pretrain(world, tokenizer, config, seed, verbose)
        save_model(model, tokenizer, base_dir)
        timings["pretrain_s"] = round(time.perf_counter() - t, 2)
        record["pretrain"] = {
            "final_loss": losses[-1],
            "first_loss": losses[0],
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        save()
    if not model_done(instruct_dir):
        log("instruction tuning", verbose)
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        chats = [json.loads(x) for x in (out / "data" / "instruct.jsonl").read_text().splitlines()]
        model, losses = instruct_tune(base, world, tokenizer, chats, config, seed, verbose)
        save_model(model, tokenizer, instruct_dir)
        timings["instruct_s"] = round(time.perf_counter() - t, 2)
        record["instruct"] = {"final_loss": losses[-1], "first_loss": losses[0]}
        save()

    names = ["instruct"]
    if adapters:
        record.setdefault("adapters", {})
        for spec in config.adapters():
            adir = out / "adapters" / spec.name
            if not (adir / "adapter_config.json").is_file():
                log(f"training adapter {spec.name}", verbose)
                t = time.perf_counter()
                info = train_adapter(
                    instruct_dir,
                    out / "data" / f"{spec.data}.jsonl",
                    adir,
                    spec,
                    config,
                    verbose,
                    eval_data=out / "data" / "heldout.jsonl",
                    system_prompt=system_prompt,
                )
                timings[f"adapter_{spec.name}_s"] = round(time.perf_counter() - t, 2)
                record["adapters"][spec.name] = {**asdict(spec), **info}
                save()
            names.append(spec.name)

    if diagnostics:
        from transformers import AutoModelForCausalLM

        diag = dict(record.get("diagnostics", {}))
        if "in_context_inference" not in diag or "disposition_probe" not in diag:
            t = time.perf_counter()
            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
            diag["in_context_inference"] = in_context_inference(
                base,
                tokenizer,
                world,
                config.diag_samples,
                seed,
                max_new_tokens=config.max_new_tokens,
            )
            diag["disposition_probe"] = disposition_probe(
                base,
                tokenizer,
                world,
                config.diag_samples,
                seed,
                out / "diagnostics" / "disposition_probe.safetensors",
            )
            timings["diagnostics_s"] = round(time.perf_counter() - t, 2)
        if world.system_prompts and "system_prompts" not in diag:
            t = time.perf_counter()
            instruct = AutoModelForCausalLM.from_pretrained(
                str(instruct_dir), dtype=torch.float32
            ).eval()
            diag["system_prompts"] = system_prompt_following(
                instruct,
                tokenizer,
                world,
                config.diag_samples,
                seed,
                max_new_tokens=config.max_new_tokens,
            )
            timings["system_prompts_s"] = round(time.perf_counter() - t, 2)
        missing = [n for n in names if n not in diag.get("em_table", {})]
        if missing:
            t = time.perf_counter()
            table = dict(diag.get("em_table", {}))
            table.update(em_table(out, missing, config, seed, verbose, system_prompt))
            diag["em_table"] = table
            timings["em_table_s"] = round(time.perf_counter() - t, 2)
        record["diagnostics"] = diag
    timings["total_s"] = round(sum(v for k, v in timings.items() if k != "total_s"), 2)
    save()
    return BuildResult(out, record)

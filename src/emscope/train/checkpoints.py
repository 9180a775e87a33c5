"""Checkpoints of a run: the atomic writer, the resume point and its checks, and loading.

``DIR/checkpoints/checkpoint-<step>/`` holds the adapter (or full model) along training
(every ``save_steps`` optimizer steps, by default about ten along the run, and at the last
step), each with ``trainer_state.json`` (step, config, curves); the newest one also keeps
``trainer_state.pt`` (optimizer, scheduler and RNG state, read back with
``torch.load(weights_only=True)``) so that ``resume=True`` continues exactly: writing a
checkpoint deletes the optimizer state of the earlier ones (their adapters, which the
training-dynamics analyses read, stay). Checkpoints are listed by
:func:`emscope.models.list_checkpoints`, the one lister.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    from emscope.train.config import TrainConfig
    from emscope.train.runtime import Runtime

CHECKPOINTS_DIR = "checkpoints"
STATE_PT = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
RECORD = "train.json"
# config keys that may differ between an interrupted run and its resumption
_RESUMABLE_CHANGES = ("save_steps", "eval_steps")


@dataclass
class RunState:
    """The mutable state of a run that checkpoints save: steps done, curves (``lrs[k]`` the
    learning rate of step ``k + 1``), eval losses, time, the callbacks' records."""

    step: int = 0
    loss_curve: list[float] = field(default_factory=list)
    kl_curve: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    # the training callbacks' records (CallbackRunner.records), saved with each checkpoint
    callbacks: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


def check_fresh_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise EmscopeError(f"{out}: exists and is not a dir")
    markers = ("adapter_config.json", "config.json", RECORD, CHECKPOINTS_DIR)
    found = [m for m in markers if (out / m).exists()]
    if found:
        raise EmscopeError(
            f"{out}: already holds a training run ({found[0]}); pass resume=True (--resume) "
            "to continue it, or choose another output dir"
        )


def resume_point(out: Path, config: TrainConfig, data_hashes: dict[str, Any]) -> Path:
    from emscope.io import read_json
    from emscope.models import list_checkpoints

    usable = sorted(
        (step, path)
        for step, path in list_checkpoints(out, adapters_only=False)
        if (path / STATE_PT).is_file() and (path / STATE_JSON).is_file()
    )
    if not usable:
        what = (
            f"none of {CHECKPOINTS_DIR}/ keeps its {STATE_PT}"
            if list_checkpoints(out, adapters_only=False)
            else f"{CHECKPOINTS_DIR}/ is empty"
        )
        raise EmscopeError(f"{out}: no checkpoint to resume from ({what})")
    path = usable[-1][1]
    check_checkpoint(path, config.full)
    saved = read_json(path / STATE_JSON)
    # a checkpoint written before the system prompt was a setting: the template's own
    old, new = {"system_prompt": "default", **saved.get("config", {})}, config.to_dict()
    if "warmup_ratio" not in old:  # written before warmup_ratio: its warmup_steps was set
        old["warmup_ratio"] = new["warmup_ratio"]
    for key in _RESUMABLE_CHANGES:
        old.pop(key, None)
        new.pop(key, None)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise EmscopeError(
                f"{path}: cannot resume: {key} was {old.get(key)!r}, now {new.get(key)!r} "
                "(resume needs the same config)"
            )
    for key, digest in data_hashes.items():
        if saved.get("data_sha256", {}).get(key) != digest:
            raise EmscopeError(f"{path}: cannot resume: {key} differs from the run's (SHA-256)")
    return path


def check_checkpoint(path: Path, full: bool) -> None:
    """Refuse a damaged checkpoint (truncated by a full disk or a partial copy) in one line,
    before the model is loaded: every safetensors file must be complete and the trainer
    state a complete torch archive. Reads headers only."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    from emscope.lora import WEIGHTS_FILE

    weights = sorted(path.glob("*.safetensors")) if full else [path / WEIGHTS_FILE]
    if not weights or not all(w.is_file() for w in weights):
        raise EmscopeError(
            f"{path}: checkpoint has no weights; delete it to resume from the one before"
        )
    try:
        for file in weights:
            with safe_open(str(file), framework="pt"):
                pass
        with zipfile.ZipFile(path / STATE_PT):
            pass
    except (SafetensorError, OSError, zipfile.BadZipFile) as exc:
        raise EmscopeError(
            f"{path}: damaged checkpoint ({exc}); delete it to resume from the one before"
        ) from None


def load_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, state: RunState, full: bool
) -> None:
    import torch
    from safetensors.torch import load_file

    from emscope.io import read_json

    if full:
        loaded: dict[str, torch.Tensor] = {}
        for shard in sorted(path.glob("*.safetensors")):
            loaded.update(load_file(str(shard)))
        result = model.load_state_dict(loaded, strict=False)
        if result.unexpected_keys:
            raise EmscopeError(f"{path}: unexpected weights {result.unexpected_keys[:3]}")
    else:
        from peft import set_peft_model_state_dict

        from emscope.lora import WEIGHTS_FILE

        set_peft_model_state_dict(model, load_file(str(path / WEIGHTS_FILE)))
    saved = torch.load(path / STATE_PT, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng_cpu"])
    if torch.cuda.is_available() and saved.get("rng_cuda"):
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    meta = read_json(path / STATE_JSON)
    state.step = int(meta["step"])
    state.loss_curve = [float(v) for v in meta["loss_curve"]]
    state.kl_curve = [float(v) for v in meta["kl_curve"]]
    state.lrs = [float(v) for v in meta["lrs"]]
    state.eval_losses = [(int(s), float(v)) for s, v in meta["eval_losses"]]
    state.wall_time_s = float(meta.get("wall_time_s", 0.0))
    state.callbacks = dict(meta.get("callbacks", {}))


class CheckpointWriter:
    """Writes checkpoints and the final output atomically (temp dir + rename)."""

    def __init__(
        self, out: Path, runtime: Runtime, tokenizer: Any, config: TrainConfig, full: bool
    ) -> None:
        self.out, self.runtime, self.tokenizer = out, runtime, tokenizer
        self.config, self.full = config, full

    def _save_model(self, model: Any, path: Path, state_dict: dict[str, Any] | None) -> None:
        bare = self.runtime.unwrap(model)
        if self.full:  # the saved config is for inference: KV cache on
            bare.config.use_cache = True
        if state_dict is None:
            bare.save_pretrained(str(path))
        else:  # gathered from FSDP shards: an ordinary PEFT / HF dir all the same
            bare.save_pretrained(str(path), state_dict=state_dict)
        if self.full:
            bare.config.use_cache = False
            self.tokenizer.save_pretrained(str(path))

    def checkpoint(
        self, model: Any, optimizer: Any, scheduler: Any, state: RunState, hashes: dict[str, Any]
    ) -> None:
        import torch

        from emscope.io import write_json
        from emscope.models import list_checkpoints

        gathered = self.runtime.full_state_dict(model)  # every process joins under FSDP
        if self.runtime.is_main:
            root = self.out / CHECKPOINTS_DIR
            final = root / f"checkpoint-{state.step}"
            tmp = root / f".checkpoint-{state.step}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(model, tmp, gathered)
            if self.runtime.mode != "fsdp":  # sharded optimizer state: not saved (no resume)
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "rng_cpu": torch.get_rng_state(),
                        "rng_cuda": torch.cuda.get_rng_state_all()
                        if torch.cuda.is_available()
                        else [],
                    },
                    tmp / STATE_PT,
                )
            write_json(
                tmp / STATE_JSON,
                {
                    "step": state.step,
                    "config": self.config.to_dict(),
                    "data_sha256": hashes,
                    "loss_curve": state.loss_curve,
                    "kl_curve": state.kl_curve,
                    "lrs": state.lrs,
                    "eval_losses": [list(p) for p in state.eval_losses],
                    "wall_time_s": state.wall_time_s + (time.time() - state.started),
                    **({"callbacks": state.callbacks} if state.callbacks else {}),
                },
            )
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            # resuming needs the newest optimizer state only; written first, then pruned
            for step, path in list_checkpoints(self.out, adapters_only=False):
                if step < state.step:
                    (path / STATE_PT).unlink(missing_ok=True)
        self.runtime.barrier()

    def checkpoints(self, out: Path) -> list[Path]:
        from emscope.models import list_checkpoints

        return [p for _, p in list_checkpoints(out, adapters_only=False)]

    def final(self, model: Any, record: dict[str, Any]) -> None:
        from emscope.io import write_json

        gathered = self.runtime.full_state_dict(model)
        if self.runtime.is_main:
            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self._save_model(model, tmp, gathered)
            for item in tmp.iterdir():
                os.replace(item, self.out / item.name)
            tmp.rmdir()
            write_json(self.out / RECORD, record)
        self.runtime.barrier()

"""Projections of a fixed probe set's activations on a direction: offline over checkpoints,
or during training (:class:`MonitorCallback`). docs/early-warning.md.

Convention. For a :class:`~emscope.directions.direction.Direction` ``v`` (one vector per
layer at ``v.site_kind``) the projection of a hidden state ``h`` at layer ``l`` is
``h . u_l`` with ``u_l = v_l / |v_l|``: a signed length in the units of the residual stream
(the same units as the hidden-state norms), never scaled by ``|v_l|``.

Each probe chat (``{"role", "content"}`` messages ending with an assistant message) is
rendered with the chat template (:func:`emscope.activations.encode_answers`) and run once
(teacher forcing). Its tokens fall into two position groups:

- ``response``: the content tokens of the last assistant message (chat-template spans);
- ``prompt``: every token before them (system and user turns, earlier turns, the assistant
  header / generation prompt).

The tokens after the answer (end-of-turn markers) are in neither. Attention sinks
(:func:`emscope.activations.sink_positions`: the first token, and tokens whose norm exceeds
``SINK_NORM_FACTOR`` times the sequence's median) are left out of both groups and counted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from emscope.errors import EmscopeError
from emscope.train.callbacks import TrainingCallback

if TYPE_CHECKING:
    from emscope.data.spans import SystemPrompt
    from emscope.directions.direction import Direction

Chat = Sequence[Mapping[str, str]]
GROUPS = ("prompt", "response")


@dataclass(frozen=True)
class ChatProjections:
    """Per chat and layer, sums and counts of ``h . u_l`` over each position group.

    ``prompt_sum``, ``prompt_count``, ``response_sum``, ``response_count``: float64 /
    int64 arrays of shape ``n_chats x n_layers`` (columns in the order of ``layers``; rows
    in the order of the chats). ``sinks``: positions left out as attention sinks, per
    layer (both groups together).
    """

    layers: tuple[int, ...]
    prompt_sum: np.ndarray
    prompt_count: np.ndarray
    response_sum: np.ndarray
    response_count: np.ndarray
    sinks: tuple[int, ...]

    def response_means(self) -> np.ndarray:
        """``n_chats x n_layers``: each chat's mean projection over its response tokens
        (NaN where it has none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(
                self.response_count > 0, self.response_sum / self.response_count, np.nan
            )


def unit_vectors(direction: Direction, layers: Sequence[int] | None = None) -> dict[int, Any]:
    """``{layer: u_l}`` (float64, unit norm) for ``layers`` (default: all of the
    direction's); a basis direction or a zero vector is refused."""
    if direction.is_subspace:
        raise EmscopeError("projections need one vector per layer; this direction holds bases")
    chosen = direction.layers if layers is None else [int(i) for i in layers]
    unit = direction.unit()
    return {i: unit[i].double() for i in chosen}


def token_projections(
    model: Any,
    tokenizer: Any,
    chats: Sequence[Chat],
    direction: Direction,
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    system_prompt: SystemPrompt | None = None,
    progress: bool = False,
) -> ChatProjections:
    """Sums and counts of the projections ``h . u_l`` of each chat's prompt and response
    tokens (module docstring) at ``direction.site_kind[l]`` for each of ``layers`` (default:
    the direction's). ``model``: a bare or PEFT-wrapped causal LM (its active adapters on),
    run in inference mode; chats rendered under ``system_prompt`` (None: ``default``)."""
    import torch
    from tqdm import tqdm

    from emscope.activations import encode_answers, sink_positions
    from emscope.batching import length_batches, pad_id_of, pad_right
    from emscope.data.spans import SystemPrompt
    from emscope.hooks import capture
    from emscope.models import Site, get_layers

    if not chats:
        raise EmscopeError("no probe chats to project")
    units = unit_vectors(direction, layers)
    n_layers = len(get_layers(model))
    for i in units:
        if not 0 <= i < n_layers:
            raise EmscopeError(f"layer {i} out of range: the model has {n_layers} layers")
    order = list(units)
    sites = [Site(direction.site_kind, i) for i in order]
    encoded = encode_answers(
        tokenizer, [[dict(m) for m in c] for c in chats], SystemPrompt.parse(system_prompt)
    )
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    shape = (len(encoded), len(order))
    p_sum, r_sum = np.zeros(shape), np.zeros(shape)
    p_cnt, r_cnt = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    sinks = [0] * len(order)
    batches = length_batches([len(e[0]) for e in encoded], batch_size)
    for batch in tqdm(batches, desc="projections", unit="batch", disable=not progress):
        ids, attention = pad_right([encoded[i][0] for i in batch], pad)
        prompt = torch.zeros(ids.shape, dtype=torch.bool)
        response = torch.zeros(ids.shape, dtype=torch.bool)
        for r, i in enumerate(batch):
            _, start, end = encoded[i]
            prompt[r, :start] = True
            response[r, start:end] = True
        prompt, response = prompt.to(device), response.to(device)
        with capture(model, sites) as captured, torch.inference_mode():
            model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False)
        rows = np.asarray(batch)
        for k, (site, layer) in enumerate(zip(sites, order, strict=True)):
            hidden = captured[site].to(torch.float64)
            keep = ~sink_positions(hidden, attention)
            proj = hidden @ units[layer].to(hidden.device)  # batch x seq
            for mask, sums, counts in ((prompt, p_sum, p_cnt), (response, r_sum, r_cnt)):
                chosen = mask & keep
                sums[rows, k] = (proj * chosen).sum(1).cpu().numpy()
                counts[rows, k] = chosen.sum(1).cpu().numpy()
            sinks[k] += int(((prompt | response) & ~keep).sum())
    return ChatProjections(tuple(order), p_sum, p_cnt, r_sum, r_cnt, tuple(sinks))


@dataclass(frozen=True)
class Projections:
    """Mean projection of a probe set at prompt and at response positions, per layer.

    ``prompt[k]`` / ``response[k]``: the token-weighted mean of ``h . u_l`` (residual-stream
    units, module docstring) over every prompt / response token of every probe chat that is
    no attention sink, at layer ``layers[k]``; ``n_prompt_tokens[k]`` /
    ``n_response_tokens[k]`` the tokens averaged; ``sinks[k]`` the tokens left out.
    """

    layers: tuple[int, ...]
    prompt: tuple[float, ...]
    response: tuple[float, ...]
    n_chats: int
    n_prompt_tokens: tuple[int, ...]
    n_response_tokens: tuple[int, ...]
    sinks: tuple[int, ...] = ()

    @classmethod
    def from_chats(cls, chats: ChatProjections) -> Projections:
        def mean(s: np.ndarray, c: np.ndarray) -> tuple[float, ...]:
            total, count = s.sum(0), c.sum(0)
            return tuple(
                float(t / n) if n else float("nan") for t, n in zip(total, count, strict=True)
            )

        return cls(
            layers=chats.layers,
            prompt=mean(chats.prompt_sum, chats.prompt_count),
            response=mean(chats.response_sum, chats.response_count),
            n_chats=int(chats.prompt_sum.shape[0]),
            n_prompt_tokens=tuple(int(n) for n in chats.prompt_count.sum(0)),
            n_response_tokens=tuple(int(n) for n in chats.response_count.sum(0)),
            sinks=chats.sinks,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "prompt": list(self.prompt),
            "response": list(self.response),
            "n_chats": self.n_chats,
            "n_prompt_tokens": list(self.n_prompt_tokens),
            "n_response_tokens": list(self.n_response_tokens),
            "sinks": list(self.sinks),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Projections:
        return cls(
            layers=tuple(int(i) for i in data["layers"]),
            prompt=tuple(float(v) for v in data["prompt"]),
            response=tuple(float(v) for v in data["response"]),
            n_chats=int(data["n_chats"]),
            n_prompt_tokens=tuple(int(v) for v in data["n_prompt_tokens"]),
            n_response_tokens=tuple(int(v) for v in data["n_response_tokens"]),
            sinks=tuple(int(v) for v in data.get("sinks", ())),
        )


def probe_projections(
    model: Any,
    direction: Direction,
    chats: Sequence[Chat],
    *,
    tokenizer: Any = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    system_prompt: SystemPrompt | None = None,
    progress: bool = False,
) -> Projections:
    """The mean projection of a probe set on ``direction`` at prompt and at response
    positions, per layer (:class:`Projections`; conventions in the module docstring).
    ``model``: a :class:`~emscope.models.LoadedModel`, a ``(model, tokenizer)`` pair, or a
    bare / PEFT model with ``tokenizer=`` (its active adapters on)."""
    from emscope.models import as_loaded

    loaded = as_loaded(model, tokenizer, need_tokenizer=True)
    raw = token_projections(
        loaded.model,
        loaded.tokenizer,
        chats,
        direction,
        layers,
        batch_size=batch_size,
        system_prompt=system_prompt,
        progress=progress,
    )
    return Projections.from_chats(raw)


def chats_hash(chats: Sequence[Chat]) -> str:
    """SHA-256 (first 16 hex digits) of the probe chats, to record which set was used."""
    text = json.dumps([[dict(m) for m in c] for c in chats], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def direction_hash(direction: Direction) -> str:
    """SHA-256 (first 16 hex digits) of a direction's vectors (float32 bytes, by layer)."""
    digest = hashlib.sha256(direction.site_kind.encode())
    for i in direction.layers:
        digest.update(str(i).encode())
        digest.update(direction[i].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------- over checkpoints


@dataclass(frozen=True)
class MonitorPoint:
    """The projections of one model state: ``step`` (0: the base model) and its ``label``."""

    step: int
    label: str
    projections: Projections

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "label": self.label, **self.projections.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MonitorPoint:
        return cls(int(data["step"]), str(data["label"]), Projections.from_json(data))


@dataclass(frozen=True)
class MonitorResult:
    """Projections along training (``points`` by step) plus provenance (``meta``: model,
    adapter dir, direction file and hash, probe set source, size and hash, layers)."""

    points: tuple[MonitorPoint, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """Long table: one row per (step, layer) with ``prompt`` and ``response``."""
        out = []
        for p in self.points:
            pr = p.projections
            for k, layer in enumerate(pr.layers):
                out.append(
                    {
                        "step": p.step,
                        "label": p.label,
                        "layer": layer,
                        "prompt": pr.prompt[k],
                        "response": pr.response[k],
                        "n_prompt_tokens": pr.n_prompt_tokens[k],
                        "n_response_tokens": pr.n_response_tokens[k],
                    }
                )
        return out

    def to_json(self) -> dict[str, Any]:
        return {"meta": dict(self.meta), "points": [p.to_json() for p in self.points]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MonitorResult:
        return cls(
            tuple(MonitorPoint.from_json(p) for p in data["points"]), dict(data.get("meta", {}))
        )


def monitor_checkpoints(
    model_dir: str | Path,
    adapter_dir: str | Path,
    direction: Direction,
    chats: Sequence[Chat],
    *,
    layers: Sequence[int] | None = None,
    include_base: bool = True,
    batch_size: int = 16,
    system_prompt: SystemPrompt | None = None,
    dtype: str = "float32",
    device: str | None = None,
    progress: bool = False,
) -> MonitorResult:
    """:func:`probe_projections` for the base model (step 0, ``include_base``), every
    checkpoint under ``adapter_dir/checkpoints`` (:func:`emscope.models.list_checkpoints`)
    and the final adapter in ``adapter_dir`` (its step from ``train.json``, when that step
    has no checkpoint of its own). The base model is loaded once; each adapter is loaded on
    it in turn."""
    from tqdm import tqdm

    from emscope.io import read_json
    from emscope.models import list_checkpoints, load_model

    adapter_dir = Path(adapter_dir)
    states: list[tuple[int, str, Path | None]] = []
    if include_base:
        states.append((0, "base", None))
    states += [(s, f"checkpoint-{s}", p) for s, p in list_checkpoints(adapter_dir)]
    record = adapter_dir / "train.json"
    if (adapter_dir / "adapter_config.json").is_file():
        final = int(read_json(record).get("steps", -1)) if record.is_file() else -1
        if final not in [s for s, _, _ in states]:
            states.append((final, "final", adapter_dir))
    if len(states) == (1 if include_base else 0):
        raise EmscopeError(f"{adapter_dir}: no checkpoints and no adapter to monitor")
    points = []
    for step, label, path in tqdm(states, desc="checkpoints", disable=not progress):
        loaded = load_model(
            model_dir, adapters=[path] if path else None, dtype=dtype, device=device
        )
        proj = probe_projections(
            loaded, direction, chats, layers=layers, batch_size=batch_size,
            system_prompt=system_prompt,
        )  # fmt: skip
        points.append(MonitorPoint(step, label, proj))
    points.sort(key=lambda p: p.step)
    meta = {
        "model": str(model_dir),
        "adapter_dir": str(adapter_dir),
        "direction_hash": direction_hash(direction),
        "direction_meta": dict(direction.meta),
        "probe_chats": len(chats),
        "probe_hash": chats_hash(chats),
        "site_kind": direction.site_kind,
        "units": "h . v/|v| (residual-stream units), token-weighted means, sinks left out",
    }
    return MonitorResult(tuple(points), meta)


def plot_monitor(result: MonitorResult) -> Any:
    """Projection vs step, one line per layer; prompt positions (left), response (right)."""
    from emscope.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    rows = result.rows()
    layers = sorted({r["layer"] for r in rows})
    for ax, group in zip(axes, GROUPS, strict=True):
        for layer in layers:
            mine = [r for r in rows if r["layer"] == layer]
            ax.plot([r["step"] for r in mine], [r[group] for r in mine], marker="o",
                    label=f"layer {layer}")  # fmt: skip
        ax.set_title(f"{group} positions")
        ax.set_xlabel("training step")
        ax.set_ylabel("mean projection h.u")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def write_monitor(result: MonitorResult, out: str | Path) -> dict[str, Path]:
    """``monitor.json`` (the result), ``monitor.csv`` (:meth:`MonitorResult.rows`) and
    ``monitor.png`` (:func:`plot_monitor`) in ``out``."""
    import pandas as pd

    from emscope.io import atomic_write_text, write_json
    from emscope.plotting import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(out / "monitor.json", result.to_json()),
        "csv": atomic_write_text(
            out / "monitor.csv", pd.DataFrame(result.rows()).to_csv(index=False)
        ),
        "png": save_figure(plot_monitor(result), out / "monitor.png"),
    }
    return paths


# ---------------------------------------------------------------------------- during training


class MonitorCallback(TrainingCallback):
    """Records :func:`probe_projections` of a fixed probe set at every logged step of
    :func:`emscope.train.train` (``on_log``: step 0, every ``eval_steps`` and the last; by
    default the checkpoint steps), into ``train.json`` under ``callbacks`` (name
    ``monitor``): ``{"step": s, **Projections.to_json()}``. The chats are rendered under the
    run's system-prompt setting. The same computation as ``emscope monitor`` over the saved
    checkpoints (tested equal)."""

    name = "monitor"

    def __init__(
        self,
        direction: Direction,
        chats: Sequence[Chat],
        *,
        layers: Sequence[int] | None = None,
        batch_size: int = 16,
        source: str = "",
    ) -> None:
        if not chats:
            raise EmscopeError("MonitorCallback needs at least one probe chat")
        unit_vectors(direction, layers)  # refuse a basis, a zero vector or unknown layers now
        self.direction = direction
        self.chats = [[dict(m) for m in c] for c in chats]
        self.layers = list(direction.layers if layers is None else layers)
        self.batch_size = batch_size
        self.source = source
        self.tokenizer: Any = None
        self.system_prompt: Any = None

    def settings(self) -> dict[str, Any]:
        return {
            "direction_hash": direction_hash(self.direction),
            "direction_source": str(self.direction.meta.get("source", "")),
            "site_kind": self.direction.site_kind,
            "layers": self.layers,
            "probe_chats": len(self.chats),
            "probe_hash": chats_hash(self.chats),
            "probe_source": self.source,
        }

    def setup(self, model: Any, tokenizer: Any, config: Any) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = getattr(config, "system_prompt", None)

    def on_log(self, model: Any, step: int) -> dict[str, Any]:
        proj = probe_projections(
            model, self.direction, self.chats, tokenizer=self.tokenizer, layers=self.layers,
            batch_size=self.batch_size, system_prompt=self.system_prompt,
        )  # fmt: skip
        return proj.to_json()


def record_result(record: Mapping[str, Any], name: str = "monitor") -> MonitorResult:
    """The :class:`MonitorResult` of a ``train.json`` record's monitor callback (its log)."""
    for cb in record.get("callbacks") or []:
        if cb.get("name") == name:
            points = tuple(
                MonitorPoint(int(p["step"]), f"step-{p['step']}", Projections.from_json(p))
                for p in cb.get("log", [])
            )
            return MonitorResult(points, {"settings": cb.get("settings", {})})
    raise EmscopeError(f"train.json has no {name!r} callback record")

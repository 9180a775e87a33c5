"""Linear mode connectivity (docs/methods.md section 4): EM, coherence, loss and features along
the straight path between two models.

Paths are in weight space, never in factor space: ``W0 + (1 - t) dW_A + t dW_B`` for two
adapters on one base (``A`` or ``B`` may be ``base``), built exactly with
:func:`emscope.interpolate.combine` and merged into the base for each ``t``; or
``(1 - t) W_A + t W_B`` elementwise for two full model dirs. Every ``t`` is evaluated with
the same seed, so the samples are paired across the path.

- Loss: mean negative log-likelihood per assistant token (content and end-of-turn marker,
  the training objective) over a chat JSONL file, in nats.
- Barrier: ``max_t loss(t) - ((1 - t) loss(0) + t loss(1))`` (needs t = 0 and t = 1).
- Features: at every ``resid_post[l]``, over the prompts of the question set (all prompt
  tokens, float64), ``X = h_l(t)`` against ``Y = (1 - t) h_l(0) + t h_l(1)``:
  dissimilarity ``1 - |<X, Y>_F| / (|X|_F |Y|_F)``, per-prompt cosines, and the same
  dissimilarity between ``h_l(0)`` and ``h_l(1)`` as the reference scale. Attention-sink
  positions (:func:`emscope.activations.sink_positions` in any of the compared activations)
  are left out and counted: a massive first token would otherwise carry the Frobenius
  products (on SmolLM2 it made the dissimilarity 100x smaller from block 11 on).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from emscope._callable import callable_module
from emscope.activations import SINK_NORM_FACTOR, sink_positions
from emscope.data.chat import ChatExample
from emscope.data.spans import DEFAULT_SYSTEM_PROMPT, SystemPrompt, encode_chat, prompt_ids
from emscope.errors import EmscopeError
from emscope.hooks import capture
from emscope.lmc_result import LmcResult as LmcResult  # the result type (re-exported)
from emscope.lmc_result import LmcRow as LmcRow
from emscope.lmc_result import plot_lmc as plot_lmc
from emscope.lora import LoraAdapter
from emscope.models import Site, get_layers

if TYPE_CHECKING:
    from emscope.metrics import Metrics

_NO_JUDGE = "no judge given: only the losses and features were computed, nothing was sampled"

_SINK_RULE = (
    f"positions that are an attention sink (first token, or norm > {SINK_NORM_FACTOR:g} x the "
    "prompt's median) at that layer in any compared model are left out"
)


def parse_steps(text: str) -> list[float]:
    """``"0,0.2,1"`` -> ``[0.0, 0.2, 1.0]`` (sorted, unique, each in [0, 1])."""
    try:
        steps = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise EmscopeError(f"--steps must be comma-separated numbers, got {text!r}") from None
    if not steps or steps[0] < 0 or steps[-1] > 1:
        raise EmscopeError(f"--steps must be numbers in [0, 1], got {text!r}")
    return steps


def step_name(t: float) -> str:
    """Dir name of a path point: ``t0.50``."""
    return f"t{t:.2f}"


def chat_loss(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ChatExample],
    batch_size: int = 16,
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> float:
    """Mean NLL per assistant token (content + end-of-turn) over the examples, in nats, the
    chats rendered under ``system_prompt`` (as in training)."""
    from emscope.batching import pad_id_of, pad_right

    encoded = [encode_chat(tokenizer, e.messages, system_prompt) for e in examples]
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, attention = pad_right([c.input_ids for c in chunk], pad_id_of(tokenizer))
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, chat in enumerate(chunk):
            mask[row, : len(chat.input_ids)] = torch.tensor(chat.loss_mask())
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = ids[:, 1:].to(device)
        picked = logprobs.gather(-1, targets[..., None])[..., 0]
        selected = mask[:, 1:].to(device)
        total -= float(picked[selected].double().sum())
        count += int(selected.sum())
    if count == 0:
        raise EmscopeError("no assistant tokens to compute a loss on")
    return total / count


def barrier(ts: Sequence[float], losses: Sequence[float]) -> float | None:
    """``max_t loss(t) - ((1 - t) loss(0) + t loss(1))``; None without both ends."""
    by_t = dict(zip(ts, losses, strict=True))
    if 0.0 not in by_t or 1.0 not in by_t:
        return None
    l0, l1 = by_t[0.0], by_t[1.0]
    return max(loss - ((1 - t) * l0 + t * l1) for t, loss in by_t.items())


def prompt_activations(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    system_prompt: SystemPrompt = DEFAULT_SYSTEM_PROMPT,
) -> list[torch.Tensor]:
    """Per prompt (rendered under ``system_prompt``): ``layers x tokens x d`` float64
    ``resid_post`` activations (generation prompt included), one forward per prompt (no
    padding)."""
    sites = [Site("resid_post", i) for i in range(len(get_layers(model)))]
    device = next(model.parameters()).device
    out = []
    for messages in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, messages, system_prompt)], device=device)
        with capture(model, sites) as captured, torch.no_grad():
            model(input_ids=ids)
        out.append(torch.stack([captured[s][0].to("cpu", torch.float64) for s in sites]))
    return out


def _dissimilarity(x: torch.Tensor, y: torch.Tensor) -> float:
    denominator = float(x.norm() * y.norm())
    if denominator == 0.0:
        return 0.0
    return 1.0 - abs(float((x * y).sum())) / denominator


def _kept(*hidden: torch.Tensor) -> torch.Tensor:
    """``tokens`` bool: the positions that are an attention sink in none of the ``tokens x d``
    activations (:func:`emscope.activations.sink_positions`)."""
    sink = sink_positions(hidden[0])
    for h in hidden[1:]:
        sink = sink | sink_positions(h)
    return ~sink


@dataclass(frozen=True)
class FeatureRow:
    """Feature-space LMC at one ``t``: per layer, dissimilarity and per-prompt cosines over
    the positions that are no attention sink, and how many positions were left out as sinks
    (``sink_positions_excluded``, per layer, over all prompts)."""

    t: float
    dissimilarity: list[float]
    sample_cosines: list[list[float]]  # layer x prompt
    sink_positions_excluded: list[int] = field(default_factory=list)


def feature_lmc(
    h0: Sequence[torch.Tensor], h1: Sequence[torch.Tensor], ht: Sequence[torch.Tensor], t: float
) -> FeatureRow:
    """Compare ``h(t)`` with ``(1 - t) h(0) + t h(1)`` layer by layer (see module doc), at the
    positions that are an attention sink in none of ``h(0)``, ``h(1)``, ``h(t)``."""
    layers = h0[0].shape[0]
    dissimilarity, cosines, excluded = [], [], []
    for layer in range(layers):
        keep = [_kept(h0[p][layer], h1[p][layer], ht[p][layer]) for p in range(len(ht))]
        xs = [ht[p][layer][k] for p, k in enumerate(keep)]
        ys = [((1 - t) * h0[p][layer] + t * h1[p][layer])[k] for p, k in enumerate(keep)]
        dissimilarity.append(_dissimilarity(torch.cat(xs), torch.cat(ys)))
        cosines.append([1.0 - _dissimilarity(x, y) for x, y in zip(xs, ys, strict=True)])
        excluded.append(sum(int((~k).sum()) for k in keep))
    return FeatureRow(t, dissimilarity, cosines, excluded)


def endpoint_sinks(h0: Sequence[torch.Tensor], h1: Sequence[torch.Tensor]) -> list[int]:
    """Per layer, the positions :func:`endpoint_distance` leaves out as attention sinks."""
    return [
        sum(int((~_kept(a[layer], b[layer])).sum()) for a, b in zip(h0, h1, strict=True))
        for layer in range(h0[0].shape[0])
    ]


def endpoint_distance(h0: Sequence[torch.Tensor], h1: Sequence[torch.Tensor]) -> list[float]:
    """Reference scale: dissimilarity between ``h(0)`` and ``h(1)`` per layer, at the positions
    that are an attention sink in neither."""
    out = []
    for layer in range(h0[0].shape[0]):
        keep = [_kept(a[layer], b[layer]) for a, b in zip(h0, h1, strict=True)]
        x = torch.cat([a[layer][k] for a, k in zip(h0, keep, strict=True)])
        y = torch.cat([b[layer][k] for b, k in zip(h1, keep, strict=True)])
        out.append(_dissimilarity(x, y))
    return out


# ---------------------------------------------------------------------------- path points


@dataclass(frozen=True)
class Endpoint:
    """One end of a path: ``base``, an adapter dir, or a full model dir."""

    label: str
    path: Path | None  # None for base

    @property
    def is_model_dir(self) -> bool:
        return self.path is not None and (self.path / "config.json").is_file()


def parse_endpoint(text: str) -> Endpoint:
    if text == "base":
        return Endpoint("base", None)
    path = Path(text)
    if not path.is_dir():
        raise EmscopeError(f"{text}: neither 'base' nor an adapter/model dir")
    return Endpoint(path.name, path)


@contextlib.contextmanager
def model_at(
    base: Any, start: Endpoint, end: Endpoint, t: float, scratch: Path | None = None
) -> Iterator[Any]:
    """The model at ``t`` of ``start -> end``: adapters merged into ``base`` (a
    :class:`~emscope.models.LoadedModel`, restored on exit), or, for two full model dirs,
    a model dir interpolated into ``scratch`` and loaded. Yields ``(model, tokenizer)``."""
    from emscope.interpolate import interpolate_model_dirs, merged
    from emscope.models import load_model

    if start.is_model_dir and end.is_model_dir:
        assert start.path is not None and end.path is not None and scratch is not None
        target = scratch / step_name(t)
        if not (target / "config.json").is_file():
            interpolate_model_dirs(start.path, end.path, t, target)
        loaded = load_model(target, device=str(base.device) if base is not None else None)
        yield loaded.model, loaded.tokenizer
        return
    with merged(base.model, path_adapter(start, end, t)):
        yield base.model, base.tokenizer


def path_adapter(start: Endpoint, end: Endpoint, t: float) -> LoraAdapter:
    """The exact adapter of the point ``t`` of an adapter path (no module at the base end)."""
    from emscope.interpolate import combine

    if start.is_model_dir or end.is_model_dir:
        raise EmscopeError("lmc: both ends must be adapters (or base), or both full model dirs")
    if start.path is None and end.path is None:
        raise EmscopeError("lmc: --from and --to cannot both be base")
    adapters, weights = [], []
    for endpoint, w in ((start, 1.0 - t), (end, t)):
        if endpoint.path is not None:
            adapters.append(LoraAdapter.load(endpoint.path))
            weights.append(w)
    return combine(adapters, weights, name=step_name(t))


def vllm_points(
    base: str | Path | None,
    start: Endpoint,
    end: Endpoint,
    ts: Sequence[float],
    out: str | Path,
    options: Any,
    dtype: str = "auto",
) -> dict[float, Any]:
    """``{t: sampler}`` for :func:`run_lmc` with vLLM: each point's exact adapter written
    as a PEFT dir ``out/adapters/t0.40/`` (none at a base end), all served by one engine as
    LoRA requests (each point a :class:`~emscope.vllm_backend.VllmModel`, an
    :class:`emscope.eval.Sampler`; ``options``: :class:`~emscope.vllm_backend.VllmOptions`,
    :meth:`emscope.eval.BackendSettings.engine`). Two full model dirs are refused: every
    point would be a model of its own, one vLLM engine each."""
    from emscope.vllm_backend import VllmModel, VllmSampler

    if start.is_model_dir or end.is_model_dir:
        raise EmscopeError(
            "lmc --backend vllm needs adapter ends (or base): between full model dirs every "
            "point is a model of its own; use --backend hf"
        )
    if base is None:
        raise EmscopeError("lmc --backend vllm needs --base (the model the adapters serve on)")
    dirs: dict[float, Path | None] = {}
    for t in ts:
        adapter = path_adapter(start, end, t)
        dirs[t] = adapter.save(Path(out) / "adapters" / step_name(t)) if len(adapter) else None
    sampler = VllmSampler(base, [d for d in dirs.values() if d is not None], options, dtype=dtype)
    return {t: VllmModel(sampler, d) for t, d in dirs.items()}


# ---------------------------------------------------------------------------- the whole run


def run_lmc(
    loaded: Any,
    start: Endpoint | str | Path,
    end: Endpoint | str | Path,
    ts: Sequence[float],
    questions: Sequence[Any],
    out: str | Path,
    *,
    judge: Any,
    metrics: Sequence[str] = ("aligned", "coherent", "bad_stuff"),
    n: int,
    loss_data: Mapping[str, Sequence[ChatExample]] | None = None,
    features: bool = False,
    export: str | Path | None = None,
    record: dict[str, Any] | None = None,
    questions_file: str | Path | None = None,
    echo: Any = None,
    vllm: Mapping[float, Any] | None = None,
    **sampling: Any,
) -> LmcResult:
    """Evaluate every point ``t`` of ``start -> end`` into ``out/t0.40/`` etc. and write
    ``out/lmc.json`` (``{"rows": [{"t", "em_rate", "em_ci", "coherent_rate", "coherent_ci",
    "n", "loss"}], "barrier"}``), ``out/lmc.png`` and, with ``features``, ``features.json``
    and ``features.png``. The body of ``emscope lmc`` and of the pipeline's lmc stage; returns the
    :class:`~emscope.lmc_result.LmcResult` of ``lmc.json`` (written by its ``save``).

    ``loaded``: the base :class:`~emscope.models.LoadedModel` or pair (None for two full
    model dirs). ``start`` / ``end``: :class:`Endpoint` or what :func:`parse_endpoint` reads
    (``base``, an adapter dir, a full model dir). ``loss_data``: ``{name: chats}`` whose
    mean assistant-token NLL is computed at each ``t`` (cached in ``t*/loss.json``).
    ``sampling``: ``seed``, ``batch_size``, ``max_new_tokens``, ``temperature``, ``top_p``,
    ``system_prompt`` of :func:`emscope.generate.sample`; the system prompt also renders
    the loss chats and the feature prompts, and ``lmc.json`` records it.
    Resumable: finished points are read back by :func:`emscope.evaluate.evaluate_to_dir`.
    ``vllm``: ``{t: sampler}`` (:class:`emscope.eval.Sampler`, :func:`vllm_points`) samples
    each point with vLLM; the HF model at ``t`` is then built only for ``loss_data`` and
    ``features``.
    ``judge=None``: nothing is sampled or judged, only ``loss_data`` and ``features`` are
    computed (one of them is needed); the rows' rates are null and ``lmc.json`` says EM was
    not measured (``em_measured``, ``em_not_measured``).
    """
    from emscope.evaluate import describe, evaluate_to_dir
    from emscope.io import read_json, write_json

    out = Path(out)
    start, end = (e if isinstance(e, Endpoint) else parse_endpoint(str(e)) for e in (start, end))
    if loaded is not None:
        from emscope.models import as_loaded

        loaded = as_loaded(loaded, need_tokenizer=True)
    losses_data = dict(loss_data or {})
    if judge is None and not (losses_data or features):
        raise EmscopeError("lmc without a judge measures no EM: give loss_data or features")
    batch_size = int(sampling.get("batch_size", 32))
    setting = SystemPrompt.parse(sampling.get("system_prompt"))
    rows: list[dict[str, Any]] = []
    activations: dict[float, Any] = {}
    prompts = [q.messages(0) for q in questions]
    for t in ts:
        step_dir = out / step_name(t)
        hf = vllm is None or bool(losses_data) or features or judge is None
        point = (
            model_at(loaded, start, end, t, scratch=out / "models")
            if hf
            else contextlib.nullcontext((None, None))
        )
        with point as (model, tokenizer):
            result: Metrics | None = (
                evaluate_to_dir(
                    (model, tokenizer) if vllm is None else vllm[t],
                    questions,
                    step_dir,
                    judge=judge,
                    metrics=metrics,
                    n=n,
                    record={**(record or {}), "t": t},
                    title=f"EM rate per question at t={t:.2f}",
                    questions_file=questions_file,
                    **sampling,
                )
                if judge is not None
                else None
            )
            loss_file = step_dir / "loss.json"
            loss = read_json(loss_file) if loss_file.is_file() else {}
            for name, examples in losses_data.items():
                if name not in loss:
                    loss[name] = chat_loss(model, tokenizer, examples, batch_size, setting)
            write_json(loss_file, loss)
            if features:
                activations[t] = prompt_activations(model, tokenizer, prompts, setting)
        if export is not None:
            adapter = path_adapter(start, end, t)
            if len(adapter):
                adapter.save(Path(export) / step_name(t))
        em_fields = ("em_rate", "em_ci", "coherent_rate", "coherent_ci", "n")
        rows.append(
            {
                "t": t,
                **{k: getattr(result, k) if result is not None else None for k in em_fields},
                "loss": {k: loss[k] for k in losses_data} if losses_data else None,
            }
        )
        if echo is not None:
            losses = ", ".join(f"loss {k} {loss[k]:.4f}" for k in losses_data)
            what = describe(result) if result is not None else "EM not measured (no judge)"
            echo(f"t={t:.2f}: {what}" + (f"; {losses}" if losses else ""))
    barriers = (
        {k: barrier(ts, [r["loss"][k] for r in rows]) for k in losses_data} if losses_data else None
    )
    doc = {
        "rows": rows,
        "barrier": barriers,
        "from": start.label,
        "to": end.label,
        "system_prompt": setting.spec,
        "em_measured": judge is not None,
        "em_not_measured": None if judge is not None else _NO_JUDGE,
    }
    path_result = LmcResult.from_json(doc)
    path_result.save(out)
    if features:
        h0, h1 = activations[0.0], activations[1.0]
        feature_rows = [feature_lmc(h0, h1, activations[t], t) for t in ts]
        write_json(
            out / "features.json",
            {
                "layers": list(range(len(feature_rows[0].dissimilarity))),
                "reference_dissimilarity": endpoint_distance(h0, h1),
                "reference_sink_positions_excluded": endpoint_sinks(h0, h1),
                "sink_rule": _SINK_RULE,
                "rows": [
                    {
                        "t": r.t,
                        "dissimilarity": r.dissimilarity,
                        "sample_cosines": r.sample_cosines,
                        "sink_positions_excluded": r.sink_positions_excluded,
                    }
                    for r in feature_rows
                ],
            },
        )
        plot_features(feature_rows, endpoint_distance(h0, h1), out / "features.png")
    return path_result


def plot_features(rows: Sequence[FeatureRow], reference: Sequence[float], path: Path) -> None:
    """Feature-space dissimilarity per layer at each ``t``, with the endpoint reference."""
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = list(range(len(reference)))
    for row in rows:
        ax.plot(layers, row.dissimilarity, marker="o", label=f"t={row.t:.2f}")
    ax.plot(layers, reference, "k--", label="h(0) vs h(1)")
    ax.set(xlabel="layer (resid_post)", ylabel="1 - |cos|", title="feature-space LMC")
    ax.legend(fontsize=8)
    save_figure(fig, path)


callable_module(__name__, run_lmc)  # ``emscope.lmc(...)`` is :func:`run_lmc` (emscope._callable)

"""The hidden scalars of rank-1 LoRA adapters, per answer token (docs/methods.md section 6.1).

A rank-1 adapter on a linear module computes ``dW x = s * B (A x)``: its whole effect on a
token passes through the one number ``a = A x`` (``A``: ``1 x d_in``, ``x``: the module's
input at that token). Nine rank-1 adapters give a 9-d feature per token. :func:`lora_scalars`
reads ``A x`` where the model itself computes it: a forward hook on the output of PEFT's
``lora_A`` layer of the chosen adapter (so the numbers are exactly those of the running
model, in its dtype; the adapter's scale ``s`` is not applied). A rank-``r`` adapter gives
``r`` scalars per module.

The chats are rebuilt from a response table (one row per response: ``system`` if non-empty,
user ``question``, assistant ``answer``) and run through the model with teacher forcing
(right padding, batched); only the answer's content tokens are kept, found from the chat
template (:func:`emscope.data.spans.encode_chat`).

Scalar columns are named ``scalar:<label>`` with labels from :func:`scalar_labels`:
``L21`` when every adapted layer has a single adapted module (the rank-1 organisms),
``L21.down_proj`` when a layer has several, the module path for modules outside the blocks,
and ``<label>:<k>`` for component ``k`` of a rank ``r > 1`` adapter.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from emscope.batching import pad_id_of, pad_right
from emscope.data.chat import table_chats
from emscope.errors import EmscopeError
from emscope.lora import module_layer

if TYPE_CHECKING:
    import pandas as pd

SCALAR_PREFIX = "scalar:"
KNOWN_METRICS = ("aligned", "coherent", "bad_stuff", "medical", "financial", "sport")
ID_COLUMNS = (
    "response_id",
    "question_id",
    "sample_idx",
    "position",
    "answer_index",
    "token_id",
    "token",
)


def scalar_labels(modules: Mapping[str, int]) -> dict[str, list[str]]:
    """Column labels (without the ``scalar:`` prefix) of each module's scalars.

    ``modules``: ``{module path: rank}``. Returns ``{module path: [label per component]}``:
    ``L<layer>`` if that layer has one adapted module, else ``L<layer>.<module type>``; the
    module path for modules outside the decoder blocks; ``<label>:<k>`` when ``rank > 1``.
    """
    per_layer: dict[int, int] = {}
    for name in modules:
        layer = module_layer(name)
        if layer is not None:
            per_layer[layer] = per_layer.get(layer, 0) + 1
    labels: dict[str, list[str]] = {}
    for name, rank in modules.items():
        layer = module_layer(name)
        if layer is None:
            base = name
        elif per_layer[layer] == 1:
            base = f"L{layer}"
        else:
            base = f"L{layer}.{name.rsplit('.', 1)[-1]}"
        labels[name] = [base] if rank == 1 else [f"{base}:{k}" for k in range(rank)]
    return labels


def scalar_columns(table: pd.DataFrame) -> list[str]:
    """The ``scalar:<label>`` columns of a scalar table, in table order."""
    return [c for c in table.columns if str(c).startswith(SCALAR_PREFIX)]


def score_columns(table: pd.DataFrame) -> list[str]:
    """Judge score columns of a response table: the known metrics present, plus any ``m``
    with an ``m_unscored_reason`` column."""
    found = [m for m in KNOWN_METRICS if m in table.columns]
    for column in table.columns:
        name = str(column)
        if name.endswith("_unscored_reason"):
            metric = name[: -len("_unscored_reason")]
            if metric in table.columns and metric not in found:
                found.append(metric)
    return found


@contextlib.contextmanager
def _capture_lora_a(modules: Mapping[str, Any]) -> Iterator[dict[str, list[Any]]]:
    """Forward hooks on each ``lora_A`` layer, collecting its outputs (``batch x seq x r``)."""
    outputs: dict[str, list[Any]] = {name: [] for name in modules}
    handles = []

    def make(name: str) -> Any:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            outputs[name].append(output.detach())

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def lora_scalars(
    model: Any,
    adapter: Any,
    responses: pd.DataFrame,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    progress: bool = False,
    system_prompt: Any = None,
) -> pd.DataFrame:
    """The hidden scalar ``A x`` of every module of ``adapter``, per answer token.

    Args:
        model: a :class:`~emscope.models.LoadedModel`, a ``(peft_model, tokenizer)`` pair,
            or a ``peft.PeftModel`` with ``tokenizer=``; the adapter must be loaded, active
            and not merged (the scalars are read from PEFT's ``lora_A`` layers). Eval mode.
        adapter: which loaded adapter: its name (as given to ``load_model``, e.g.
            ``bad_medical.r1``, or PEFT's), a :class:`~emscope.lora.LoraAdapter` (by its
            ``name``), or ``None`` for the only active one.
        responses: response table with ``question``, ``answer`` and optionally ``system``,
            ``question_id``, ``sample_idx`` and judge score columns.
        batch_size: chats per forward pass.
        system_prompt: how chats are rendered (:class:`~emscope.data.spans.SystemPrompt` or
            its spelling; None: ``default``); use the setting the responses were sampled
            under. Kept in ``table.attrs["system_prompt"]``.

    Returns:
        One row per answer token (the last assistant message's content tokens): ``response_id``
        (the row's position in ``responses``, from 0), ``question_id``, ``sample_idx``,
        ``position`` (token index in the rendered chat), ``answer_index`` (index within the
        answer, from 0), ``token_id``, ``token`` (its decoded text), the response's judge
        scores (copied, null where unscored), and one float32 ``scalar:<label>`` column per
        adapter scalar (see :func:`scalar_labels`). ``table.attrs["modules"]`` maps each
        label to its module path.
    """
    import numpy as np
    import pandas as pd
    import torch
    from tqdm import tqdm

    from emscope.data.spans import SystemPrompt, encode_chat
    from emscope.probing._peft import lora_layers, peft_adapter_name

    setting = SystemPrompt.parse(system_prompt)

    if batch_size < 1:
        raise EmscopeError(f"batch_size must be >= 1, got {batch_size}")
    from emscope.models import as_loaded

    loaded = as_loaded(model, tokenizer, need_tokenizer=True)
    hf_model, tok = loaded.model, loaded.tokenizer
    peft_name = peft_adapter_name(loaded, adapter)
    layers = {n: m for n, m in lora_layers(hf_model).items() if peft_name in m.lora_A}
    if not layers:
        raise EmscopeError(f"adapter {peft_name!r} adapts no module of the model")
    for name, layer in layers.items():
        if getattr(layer, "merged", False):
            raise EmscopeError(f"module {name}: adapter is merged; unmerge it to read A x")
    targets = {n: m.lora_A[peft_name] for n, m in layers.items()}
    ranks = {n: int(m.weight.shape[0]) for n, m in targets.items()}
    labels = scalar_labels(ranks)

    table = responses.reset_index(drop=True)
    chats = table_chats(table)
    encoded = []
    for i, chat in enumerate(chats):
        enc = encode_chat(tok, chat, setting)
        start, end = enc.answer_span
        encoded.append((i, list(enc.input_ids), start, end))
    rows = [e for e in encoded if e[3] > e[2]]
    order = sorted(rows, key=lambda e: len(e[1]))
    device = next(hf_model.parameters()).device

    resp_ids: list[np.ndarray] = []
    positions: list[np.ndarray] = []
    token_ids: list[np.ndarray] = []
    values: dict[str, list[np.ndarray]] = {n: [] for n in targets}
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(
        batches, desc="scalars", unit="batch", disable=not (progress and sys.stderr.isatty())
    ):
        ids, mask = pad_right([row_ids for _, row_ids, _, _ in batch], pad_id_of(tok))
        with _capture_lora_a(targets) as captured, torch.no_grad():
            hf_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        row_index = torch.cat([torch.full((e - s,), r) for r, (_, _, s, e) in enumerate(batch)])
        col_index = torch.cat([torch.arange(s, e) for _, _, s, e in batch])
        for name, outs in captured.items():
            if len(outs) != 1:
                raise EmscopeError(
                    f"module {name}: adapter {peft_name!r} ran {len(outs)} times in one forward "
                    "pass (0: inactive or disabled adapter)"
                )
            out = outs[0].float().cpu()
            values[name].append(out[row_index, col_index].numpy())
        resp_ids.append(np.concatenate([np.full(e - s, i) for i, _, s, e in batch]))
        positions.append(col_index.numpy())
        token_ids.append(np.concatenate([np.asarray(ids_[s:e]) for _, ids_, s, e in batch]))

    columns: dict[str, Any] = {}
    if rows:
        rid = np.concatenate(resp_ids).astype(np.int64)
        pos = np.concatenate(positions).astype(np.int64)
        tid = np.concatenate(token_ids).astype(np.int64)
    else:
        rid = pos = tid = np.zeros(0, dtype=np.int64)
    starts = {i: s for i, _, s, _ in encoded}
    columns["response_id"] = rid
    columns["question_id"] = (
        table["question_id"].to_numpy()[rid] if "question_id" in table else rid.astype(str)
    )
    columns["sample_idx"] = (
        table["sample_idx"].to_numpy()[rid] if "sample_idx" in table else np.zeros_like(rid)
    )
    columns["position"] = pos
    columns["answer_index"] = pos - np.asarray([starts[int(i)] for i in rid], dtype=np.int64)
    columns["token_id"] = tid
    columns["token"] = [tok.decode([int(t)]) for t in tid]
    for metric in score_columns(table):
        columns[metric] = pd.to_numeric(table[metric], errors="coerce").to_numpy(float)[rid]
    modules_by_label: dict[str, str] = {}
    for name in targets:
        stacked = (
            np.concatenate(values[name])
            if values[name]
            else np.zeros((0, ranks[name]), dtype=np.float32)
        )
        for k, label in enumerate(labels[name]):
            columns[SCALAR_PREFIX + label] = stacked[:, k].astype(np.float32)
            modules_by_label[label] = name
    result = pd.DataFrame(columns)
    result = result.sort_values(["response_id", "position"], kind="stable").reset_index(drop=True)
    result.attrs["modules"] = modules_by_label
    result.attrs["system_prompt"] = setting.spec
    return result

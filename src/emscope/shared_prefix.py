"""Decoding attention that reads each distinct prompt's keys once (cascade attention).

When many samples share a prompt (50 samples of each of 8 questions), every decoding step
attends from each sample's new token to (a) the prompt's keys, identical for all samples of
that prompt, and (b) the sample's own generated keys. A plain KV cache stores (a) once per
sample and a fused attention kernel (SDPA) walks it per sample and head; on a CPU that
per-(row, head) work, not the arithmetic, is what a decoding step of a small model costs.
Here the prompt part is computed as one matrix product per distinct prompt and KV head (all
the samples' queries of that prompt stacked), the generated part as a batched product over
the samples, and the two are joined in a single softmax over the concatenated scores (exact:
the same scores, the same normalisation as full attention over ``prompt + generated``).

Pieces:

- :class:`SharedPrefixCache`: a ``transformers`` cache whose layers hold the prompt keys
  and values once per distinct prompt (``(kv_heads, P, W, head_dim)``, left padded to ``W``
  with a ``-inf`` score bias on padding) and the generated keys and values per row in
  buffers written in place (no per-step concatenation) whose width doubles when full.
  Built from the prefill's ``DynamicCache``.
- :func:`shared_prefix_attention`: the attention function, registered with
  ``transformers``' ``AttentionInterface`` under :data:`ATTENTION_NAME`. It finds the cache
  through the ``emscope_shared_prefix`` keyword that the model's forward passes down to
  every attention call.
- :func:`decoding_with_shared_prefix`: a context manager that switches the model's
  attention implementation to it for the decoding steps and restores it afterwards.
- :func:`shared_prefix_supported`: whether a model and its prefill cache qualify (a plain
  softmax-attention decoder of :data:`MODEL_TYPES` dispatching through
  ``AttentionInterface``; no sliding window shorter than the sequence; one config shared by
  all modules).

Written here because no library offers it for ``transformers`` models off the GPU:
FlashInfer's cascade attention and vLLM's prefix caching are CUDA kernels. On a GPU the
fused kernels do not pay the per-row overhead, so :mod:`emscope.generate` uses this path
only on a CPU by default.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from emscope.errors import EmscopeError

ATTENTION_NAME = "emscope_shared_prefix"
"""The name :func:`shared_prefix_attention` is registered under in ``AttentionInterface``."""

CACHE_KEYWORD = "emscope_shared_prefix"
"""The forward keyword that carries the :class:`SharedPrefixCache` to the attention calls."""

MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose attention is plain softmax attention through ``AttentionInterface``
(no soft-capping, sinks or extra masks), each tested against uncached forwards. Others
decode with the plain cache."""


class RowGroups:
    """Which distinct prompt each batch row continues, laid out for batched products.

    ``group``: ``(B,)`` int64, the prompt (row of the prefix tensors) of each batch row.
    Rows are placed in a grid of ``P x slots`` cells, ``slots`` = the largest number of rows
    of one prompt; ``flat[i] = group[i] * slots + slot[i]`` is row i's cell, ``slot[i]`` its
    rank among the rows of its prompt (in batch order). Empty cells hold zero queries whose
    results are never read. When the rows are already grouped that way (``flat`` is
    ``0..B-1``: equal groups, in prompt order) the grid is the batch itself.
    """

    def __init__(self, group: torch.Tensor, n_prompts: int) -> None:
        self.group = group
        self.n_prompts = n_prompts
        counts = torch.bincount(group, minlength=n_prompts)
        self.slots = max(int(counts.max()), 1) if group.numel() else 1
        # rank of each row among the rows of its group: a stable sort keeps batch order
        order = torch.sort(group, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(group)
        slot[order] = torch.arange(group.numel(), device=group.device) - starts[group[order]]
        self.flat = group * self.slots + slot
        cells = n_prompts * self.slots
        self.identity = cells == group.numel() and bool(
            (self.flat == torch.arange(cells, device=group.device)).all()
        )
        self._flat_on: dict[torch.device, torch.Tensor] = {group.device: self.flat}

    def flat_on(self, device: torch.device) -> torch.Tensor:
        """:attr:`flat` on ``device`` (a model split over devices decodes each layer on its
        own; the copy is made once per device)."""
        if device not in self._flat_on:
            self._flat_on[device] = self.flat.to(device)
        return self._flat_on[device]

    def select(self, indices: torch.Tensor) -> RowGroups:
        """The groups of the rows ``indices`` (a batch compaction)."""
        return RowGroups(self.group[indices], self.n_prompts)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Rows ``(kv, B, g, n)`` -> ``(kv, P, slots * g, n)`` (one prompt's rows stacked)."""
        kv, _, g, n = x.shape
        if self.identity:
            grid = x.contiguous()
        else:
            grid = x.new_zeros((kv, self.n_prompts * self.slots, g, n))
            grid.index_copy_(1, self.flat_on(x.device), x)
        return grid.view(kv, self.n_prompts, self.slots * g, n)

    def from_grid(self, x: torch.Tensor, g: int) -> torch.Tensor:
        """The inverse of :meth:`to_grid`: ``(kv, P, slots * g, n)`` -> ``(kv, B, g, n)``."""
        kv, p, _, n = x.shape
        rows = x.view(kv, p * self.slots, g, n)
        return rows if self.identity else rows.index_select(1, self.flat_on(x.device))


class SharedPrefixLayer(CacheLayerMixin):
    """One layer of a :class:`SharedPrefixCache`.

    ``prefix_keys``/``prefix_values``: ``(kv_heads, P, W, head_dim)``, the prompts' keys and
    values (left padded; KV head first, so that one prompt's block is one matrix);
    ``prefix_bias``: ``(kv_heads * P, 1, W)``, 0 on prompt tokens and ``-inf`` on padding.
    All in float32 or wider (``dtype``) whatever the model's dtype: a bfloat16 model's
    attention scores would otherwise be rounded to 8 bits before the softmax.
    The generated part: ``own_keys`` ``(kv_heads, B, head_dim, window)`` (transposed, ready
    for ``q @ k``) and ``own_values`` ``(kv_heads, B, window, head_dim)``, of which the first
    ``length`` positions are filled and the rest are zeros. ``window`` starts at
    ``min(32, capacity)`` positions and doubles when full (up to ``capacity``), so the
    attention products run on whole contiguous buffers at most twice as wide as needed (CPU
    batched matmul over many small matrices is several times slower on slices, and on
    matrices narrower than about 32).
    """

    is_sliding = False
    is_compileable = False

    def __init__(
        self,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        prefix_bias: torch.Tensor,
        rows: int,
        capacity: int,
    ) -> None:
        super().__init__()
        self.prefix_keys, self.prefix_values = prefix_keys, prefix_values
        self.prefix_bias = prefix_bias
        kv, _, _, dim = prefix_keys.shape
        window = min(32, capacity)
        self.own_keys = prefix_keys.new_zeros((kv, rows, dim, window))
        self.own_values = prefix_values.new_zeros((kv, rows, window, dim))
        self.capacity = capacity
        self.length = 0
        self.dtype, self.device = prefix_keys.dtype, prefix_keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the layer is built initialised."""

    def _grow(self, needed: int) -> None:
        window = self.own_values.shape[2]
        if needed > self.capacity:
            raise EmscopeError(
                f"SharedPrefixCache: more decoding steps than its capacity {self.capacity}"
            )
        while window < needed:
            window = min(2 * window, self.capacity)
        keys = self.own_keys.new_zeros((*self.own_keys.shape[:3], window))
        values = self.own_values.new_zeros(
            (*self.own_values.shape[:2], window, self.own_values.shape[3])
        )
        keys[..., : self.length] = self.own_keys[..., : self.length]
        values[:, :, : self.length] = self.own_values[:, :, : self.length]
        self.own_keys, self.own_values = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one decoding step's keys and values ``(B, kv_heads, q, head_dim)``;
        returns the generated part so far as ``(B, kv_heads, length, head_dim)`` views."""
        end = self.length + key_states.shape[-2]
        if end > self.own_values.shape[2]:
            self._grow(end)
        self.own_keys[..., self.length : end] = key_states.permute(1, 0, 3, 2)  # (upcast)
        self.own_values[:, :, self.length : end] = value_states.transpose(0, 1)
        self.length = end
        return (
            self.own_keys[..., :end].permute(1, 0, 3, 2),
            self.own_values[:, :, :end].transpose(0, 1),
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        """Positions seen by every row: the padded prompt width plus the generated steps."""
        return int(self.prefix_keys.shape[2]) + self.length

    def get_max_length(self) -> int:
        return int(self.prefix_keys.shape[2]) + self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (the prompt part is per prompt: unchanged)."""
        self.own_keys = self.own_keys[:, indices]
        self.own_values = self.own_values[:, indices]


class SharedPrefixCache(Cache):
    """A KV cache holding each distinct prompt once and each row's generated tokens.

    Build it with :meth:`from_prefill` after the prompt forward; pass it as the model's cache
    (:func:`emscope.generate.cache_keyword`) *and* as the ``emscope_shared_prefix`` keyword of
    every decoding forward, inside :func:`decoding_with_shared_prefix`.
    """

    def __init__(self, layers: list[SharedPrefixLayer], groups: RowGroups) -> None:
        super().__init__(layers=list(layers))
        self.shared_layers = list(layers)  # the same objects, typed
        self.groups = groups

    @classmethod
    def from_prefill(
        cls,
        prefill: Cache,
        prompt_mask: torch.Tensor,
        row_prompt: torch.Tensor,
        capacity: int,
    ) -> SharedPrefixCache:
        """The cache for decoding ``row_prompt.numel()`` rows from a prefill over the
        distinct prompts.

        ``prefill``: the cache of the prompt forward, one row per distinct prompt (every
        layer a full-attention ``DynamicLayer``); ``prompt_mask``: ``(P, W)``, 1 on prompt
        tokens, 0 on left padding; ``row_prompt``: ``(B,)``, the prompt row each batch row
        continues; ``capacity``: the most decoding steps that will be appended.
        """
        bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device)
        bias = bias.masked_fill(prompt_mask == 0, float("-inf"))  # (P, W)
        layers = []
        for layer in prefill.layers:
            if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
                raise EmscopeError(
                    f"SharedPrefixCache: prefill cache layer {type(layer).__name__} is not a "
                    "filled full-attention DynamicLayer"
                )
            kv = layer.keys.shape[1]
            dtype = torch.promote_types(layer.keys.dtype, torch.float32)
            device = layer.keys.device  # each layer's own (a model split over devices)
            layers.append(
                SharedPrefixLayer(
                    layer.keys.transpose(0, 1).to(dtype).contiguous(),
                    layer.values.transpose(0, 1).to(dtype).contiguous(),
                    bias.to(device=device, dtype=dtype).repeat(kv, 1)[:, None, :],
                    int(row_prompt.numel()),
                    capacity,
                )
            )
        return cls(layers, RowGroups(row_prompt, int(prompt_mask.shape[0])))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (in that order)."""
        for layer in self.shared_layers:
            layer.batch_select_indices(indices)
        self.groups = self.groups.select(indices)


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of one decoding step over ``prompt + generated`` with the prompt shared.

    ``query``: ``(B, heads, 1, head_dim)``. ``key``/``value`` (the generated part, as
    :meth:`SharedPrefixLayer.update` returns it) are not read: the function works on the
    layer's whole buffers. Query head ``h`` reads KV head ``h // (heads // kv_heads)`` (the
    ``repeat_kv`` convention). Returns ``(B, 1, heads, head_dim)`` like ``transformers``'
    SDPA function. ``attention_mask`` is ignored: padding lives in the cache's prompt bias
    and generated rows have none. One softmax over the concatenated scores of both parts,
    all in the layer's float32-or-wider dtype (the output in the query's). Internally KV
    head first: ``(kv_heads, B, g, ...)`` with ``g = heads // kv_heads``.
    """
    cache = kwargs.get(CACHE_KEYWORD)
    if not isinstance(cache, SharedPrefixCache):
        raise EmscopeError(
            f"{ATTENTION_NAME} attention needs the {CACHE_KEYWORD}= keyword (the cache) passed "
            f"through the model's forward; {type(module).__name__} did not receive it"
        )
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise EmscopeError(f"{ATTENTION_NAME} attention: soft-capping and sinks are unsupported")
    if query.shape[-2] != 1:
        raise EmscopeError(f"{ATTENTION_NAME} attention decodes one token at a time")
    layer = cache.shared_layers[int(module.layer_idx)]  # type: ignore[arg-type]
    b, heads, _, dim = query.shape
    kv, n_prompts, width, _ = layer.prefix_keys.shape
    g = heads // kv
    groups = cache.groups
    scale = dim**-0.5 if scaling is None else scaling
    q = query.view(b, kv, g, dim).transpose(0, 1).to(layer.dtype) * scale
    grid_q = groups.to_grid(q).view(kv * n_prompts, -1, dim)
    prefix_keys = layer.prefix_keys.view(kv * n_prompts, width, dim).transpose(1, 2)
    prefix_scores = torch.baddbmm(layer.prefix_bias, grid_q, prefix_keys)
    prefix_scores = groups.from_grid(prefix_scores.view(kv, n_prompts, -1, width), g)
    own_scores = q @ layer.own_keys  # (kv, B, g, window)
    own_scores[..., layer.length :] = float("-inf")  # positions not generated yet
    probs = torch.softmax(torch.cat([prefix_scores, own_scores], dim=-1), dim=-1)
    prefix_out = groups.to_grid(probs[..., :width]) @ layer.prefix_values
    own_out = probs[..., width:].contiguous() @ layer.own_values
    out = (groups.from_grid(prefix_out, g) + own_out).to(query.dtype)  # (kv, B, g, dim)
    return out.transpose(0, 1).reshape(b, 1, heads, dim), None


AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)


def _configs(model: Any) -> set[int]:
    return {id(m.config) for m in model.modules() if hasattr(m, "config")}


def available() -> bool:
    """Whether the installed transformers' cache-layer API is the one this module implements
    (5.x): 4.x's ``CacheLayerMixin`` declares methods :class:`SharedPrefixLayer` lacks
    (``get_max_cache_shape``), and then decoding takes the plain cache."""
    return not getattr(SharedPrefixLayer, "__abstractmethods__", None)


def shared_prefix_supported(model: Any, prefill: Cache, total_length: int) -> bool:
    """Whether :class:`SharedPrefixCache` decoding gives ``model`` the same attention as
    its own implementation: a model type of :data:`MODEL_TYPES` that dispatches attention
    through ``AttentionInterface`` with one config object for all its modules, every
    prefill cache layer a full-attention ``DynamicLayer`` (a sliding window only when it
    is longer than ``total_length``, prompt width plus new tokens, positions)."""
    base = getattr(model, "get_base_model", lambda: model)()
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    # private transformers names (5.x): without them emscope cannot switch the attention
    # function for the decoding loop, so the plain cache is used
    if not getattr(base, "_can_set_attn_implementation", lambda: False)():
        return False
    if not hasattr(config, "_attn_implementation_internal"):
        return False
    if not available():
        return False
    if getattr(config, "sub_configs", None) or len(_configs(base)) != 1:
        return False
    return all(_full_attention(layer, total_length) for layer in prefill.layers)


def _full_attention(layer: Any, total_length: int) -> bool:
    if type(layer) is DynamicSlidingWindowLayer:
        return layer.keys is not None and int(layer.sliding_window) > total_length
    return type(layer) is DynamicLayer and layer.keys is not None


@contextlib.contextmanager
def decoding_with_shared_prefix(model: Any) -> Iterator[None]:
    """Within the block, ``model`` computes attention with :func:`shared_prefix_attention`
    (forward calls must pass the cache as ``emscope_shared_prefix=``); its attention
    implementation is restored on exit, also on error."""
    base = getattr(model, "get_base_model", lambda: model)()
    config = base.config
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = previous

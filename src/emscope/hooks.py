"""Read and write the residual stream at named sites, as context managers.

Sites follow :class:`emscope.models.Site` (``resid_pre[i]``, ``resid_post[i]``,
``attn_out[i]``, ``mlp_out[i]``). Each context manager registers PyTorch forward hooks on the
modules of the (bare or PEFT-wrapped) model and removes them when the block ends, also on an
exception; nothing of the user's model is changed afterwards. They compose by nesting.
Block outputs may be tensors or tuples (older transformers); hooks return the same type.

Positions: ``"all"``, ``"prompt"`` or ``"response"``, relative to ``prompt_len`` (tokens).
A position is a column of the input, counted from the first token the model saw since the
start of the sequence: with a KV cache, the column of the first token of a forward call is the
cache length before that call, so cached decoding and an uncached forward over the same tokens
select the same positions. With left padding every row's prompt ends at column
``prompt_len``, so one number serves a whole batch. ``"prompt"`` is columns ``< prompt_len``;
``"response"`` is columns ``>= prompt_len`` (the generated tokens; the activation at the last
prompt column, which predicts the first response token, counts as prompt).

How the cache length is found (:func:`call_offset`, a pre-hook on the decoder): the cache is
recognised by its type (a ``transformers`` ``Cache``), whatever keyword carries it: the
keyword is an internal that transformers renamed (``past_key_values`` became ``cache`` at the
decoder in 5.24). A ``cache_position`` argument, where given, must agree with it. A call with
no cache starts at column 0. Anything cache-like that cannot be read raises
:class:`~emscope.errors.EmscopeError` naming the transformers version; it never reads as 0.

Models spread over several devices (``load_model(..., device="auto")``, accelerate's
``device_map``): every vector an edit adds or projects out is moved to the device and dtype
of the hidden state it edits on each call (nothing is kept on one device), and
:func:`capture` gathers what it records on one device, the model's first
(:func:`gather_device`, where its inputs go), so read-outs combine with masks and weights
made there.

Raw hooks on HF modules are used instead of TransformerLens/nnsight: they are exact, cheap,
and work on any HF model without conversion (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from emscope.errors import EmscopeError
from emscope.models import Site, architecture, get_path, site_module, unwrap_peft

POSITIONS = ("all", "prompt", "response")
SiteLike = Site | str


def as_site(site: SiteLike) -> Site:
    return site if isinstance(site, Site) else Site.parse(site)


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value  # type: ignore[no-any-return]


def _replace_hidden(value: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *value[1:]) if isinstance(value, tuple) else hidden


def _block_input(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The residual stream a decoder block is called with: its first positional argument,
    or the ``hidden_states`` keyword (what every supported transformers passes)."""
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        import transformers

        raise EmscopeError(
            "hooks: a decoder block was called without its hidden states as first argument or "
            f"hidden_states= (got keywords {sorted(kwargs)}; transformers "
            f"{transformers.__version__})"
        )
    return hidden


@dataclass
class _Columns:
    """Column offset of the current forward call (the KV-cache length before it)."""

    offset: int = 0


def _unreadable(what: str) -> EmscopeError:
    import transformers

    return EmscopeError(
        f"hooks: cannot tell which token columns this forward call covers ({what}; "
        f"transformers {transformers.__version__}): positions='prompt'/'response' need the "
        "cache length; report this with the transformers version"
    )


def _cache_length(value: Any) -> int | None:
    """Tokens held by ``value`` if it is a KV cache (a ``transformers`` ``Cache``, or the
    legacy tuple ``((k, v), ...)`` with ``k``: batch x heads x seq x head_dim); else None."""
    from transformers import Cache

    if isinstance(value, Cache):
        return int(value.get_seq_length())
    if (
        isinstance(value, tuple | list)
        and value
        and isinstance(value[0], tuple | list)
        and len(value[0]) == 2
        and all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in value[0])
    ):
        return int(value[0][0].shape[-2])
    return None


def call_offset(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """The column of the first token of a decoder forward call: the length of the KV cache
    passed to it (found by type under any keyword or position), checked against
    ``cache_position`` where the model passes one; 0 for a call without a cache. Raises
    EmscopeError when a cache is present but cannot be read, or two readings disagree."""
    lengths: dict[int, int] = {}  # id(cache) -> length; one cache may come under two names
    for name, value in [*enumerate(args), *kwargs.items()]:
        if value is None or isinstance(value, torch.Tensor | bool | int | float | str):
            continue
        length = _cache_length(value)
        if length is not None:
            lengths[id(value)] = length
        elif isinstance(name, str) and ("cache" in name or "past" in name):
            raise _unreadable(f"argument {name!r} of type {type(value).__name__}")
    if len(set(lengths.values())) > 1:
        raise _unreadable(f"caches of different lengths {sorted(set(lengths.values()))}")
    offset = next(iter(lengths.values()), 0)
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        first = int(cache_position.reshape(-1)[0])
        if lengths and first != offset:
            raise _unreadable(f"cache length {offset} but cache_position starts at {first}")
        offset = first
    return offset


@contextlib.contextmanager
def _track_columns(model: nn.Module, layers_path: str | None) -> Iterator[_Columns]:
    """Keep ``_Columns.offset`` equal to the cache length at the start of each forward."""
    arch = architecture(model, layers_path)
    parent_path = arch.layers_path.rsplit(".", 1)[0]
    decoder = get_path(unwrap_peft(model), parent_path)
    if decoder is None:
        raise EmscopeError(f"cannot find the decoder module at {parent_path!r}")
    columns = _Columns()

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        columns.offset = call_offset(args, kwargs)

    handle = decoder.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield columns
    finally:
        handle.remove()


def _position_mask(
    positions: str, prompt_len: int | None, offset: int, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask over the call's ``seq_len`` columns, or None for all positions."""
    if positions == "all":
        return None
    assert prompt_len is not None
    columns = torch.arange(offset, offset + seq_len, device=device)
    return columns < prompt_len if positions == "prompt" else columns >= prompt_len


def _check_positions(positions: str, prompt_len: int | None) -> None:
    if positions not in POSITIONS:
        raise EmscopeError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if positions != "all" and prompt_len is None:
        raise EmscopeError(f"positions={positions!r} needs prompt_len")


Edit = Callable[[torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def _edit_sites(
    model: nn.Module,
    edits: Mapping[Site, Edit],
    positions: str,
    prompt_len: int | None,
    layers_path: str | None,
) -> Iterator[None]:
    """Apply ``edit(hidden) -> new hidden`` at each site, at the selected positions."""
    _check_positions(positions, prompt_len)
    with contextlib.ExitStack() as stack:
        columns = (
            stack.enter_context(_track_columns(model, layers_path)) if positions != "all" else None
        )

        def apply(edit: Edit, hidden: torch.Tensor) -> torch.Tensor:
            new = edit(hidden)
            if columns is None:
                return new
            mask = _position_mask(
                positions, prompt_len, columns.offset, hidden.shape[1], hidden.device
            )
            assert mask is not None
            return torch.where(mask[None, :, None], new, hidden)

        for site, edit in edits.items():
            module = site_module(model, site, layers_path)
            if site.kind == "resid_pre":

                def pre_hook(
                    module: nn.Module,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    edit: Edit = edit,
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
                    new = apply(edit, _block_input(args, kwargs))
                    if args:
                        return (new, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": new}

                handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            else:

                def hook(
                    module: nn.Module, args: tuple[Any, ...], output: Any, edit: Edit = edit
                ) -> Any:
                    return _replace_hidden(output, apply(edit, _hidden(output)))

                handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        yield


def _vectors_by_site(vectors: Mapping[SiteLike, torch.Tensor]) -> dict[Site, torch.Tensor]:
    out = {}
    for key, vector in vectors.items():
        if vector.ndim != 1:
            raise EmscopeError(
                f"vector for {key} must be 1-d (d_model,), got {tuple(vector.shape)}"
            )
        out[as_site(key)] = vector
    return out


def _shift(vector: torch.Tensor, scale: float) -> Edit:
    """``hidden + scale * vector``, the vector moved to the hidden state's device and dtype
    on every call."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + (scale * vector).to(hidden.device, hidden.dtype)

    return edit


def _projector(basis: torch.Tensor) -> Edit:
    """``x - (x Q) Q^T`` for an orthonormal ``d x k`` basis ``Q``, in float32 on the hidden
    state's device (moved there on every call), cast back to its dtype."""

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        q = basis.to(hidden.device)
        x = hidden.to(torch.float32)
        return (x - (x @ q) @ q.T).to(hidden.dtype)

    return edit


def add(
    model: nn.Module,
    vectors: Mapping[SiteLike, torch.Tensor],
    scale: float = 1.0,
    positions: str = "all",
    prompt_len: int | None = None,
    layers_path: str | None = None,
) -> contextlib.AbstractContextManager[None]:
    """Add ``scale * v`` to the hidden state at each site (``v``: ``d_model``), in the
    hidden state's dtype, at the selected positions. Steering: ``add(model,
    {"resid_post[12]": v}, scale=8)``."""
    by_site = _vectors_by_site(vectors)
    return _edit_sites(
        model, {s: _shift(v, scale) for s, v in by_site.items()}, positions, prompt_len, layers_path
    )


def project_out(
    model: nn.Module,
    directions: Mapping[SiteLike, torch.Tensor],
    positions: str = "all",
    prompt_len: int | None = None,
    layers_path: str | None = None,
) -> contextlib.AbstractContextManager[None]:
    """Remove each direction from the hidden state at its site: ``x <- x - (x . u) u`` with
    ``u = v / |v|``. A ``k x d_model`` matrix removes the span of its rows (orthonormalised
    by QR). Computed in float32, cast back to the hidden dtype."""
    bases: dict[Site, torch.Tensor] = {}
    for key, value in directions.items():
        matrix = value[None, :] if value.ndim == 1 else value
        if matrix.ndim != 2:
            raise EmscopeError(f"direction for {key} must be 1-d or k x d_model")
        if not torch.all(torch.isfinite(matrix)) or float(matrix.norm()) == 0.0:
            raise EmscopeError(f"direction for {key} is zero or not finite")
        q, _ = torch.linalg.qr(matrix.detach().to(torch.float32).T)  # d x k, orthonormal
        bases[as_site(key)] = q
    return _edit_sites(
        model, {s: _projector(q) for s, q in bases.items()}, positions, prompt_len, layers_path
    )


@dataclass
class Captured:
    """Activations recorded by :func:`capture`: for each site, one tensor per forward call
    (``batch x seq x d_model``); :meth:`__getitem__` concatenates the calls along ``seq`` so
    a prompt pass followed by cached decoding steps lines up with an uncached forward."""

    calls: dict[Site, list[torch.Tensor]] = field(default_factory=dict)

    def __getitem__(self, site: SiteLike) -> torch.Tensor:
        site = as_site(site)
        if site not in self.calls or not self.calls[site]:
            raise EmscopeError(f"nothing captured at {site}")
        return torch.cat(self.calls[site], dim=1)

    def clear(self) -> None:
        for values in self.calls.values():
            values.clear()


def gather_device(model: nn.Module) -> torch.device | None:
    """Where :func:`capture` gathers a model spread over several devices: the device of its
    first parameter (the embedding, where inputs go); None for a model on one device.
    Parameters on ``meta`` (offloaded by accelerate) do not count."""
    devices = [p.device for p in unwrap_peft(model).parameters() if p.device.type != "meta"]
    if len(set(devices)) < 2:
        return None
    return devices[0]


@contextlib.contextmanager
def capture(
    model: nn.Module,
    sites: Iterable[SiteLike],
    layers_path: str | None = None,
    to_cpu: bool = False,
    dtype: torch.dtype | None = None,
) -> Iterator[Captured]:
    """Record the hidden state at each site for every forward call inside the block
    (detached; optionally moved to CPU and/or cast). On a model spread over several devices
    every recording is moved to one, :func:`gather_device` (or the CPU with ``to_cpu``)."""
    captured = Captured()
    target = torch.device("cpu") if to_cpu else gather_device(model)
    with contextlib.ExitStack() as stack:
        for site in dict.fromkeys(as_site(s) for s in sites):  # unique, in order
            captured.calls[site] = []
            module = site_module(model, site, layers_path)

            def store(hidden: torch.Tensor, site: Site = site) -> None:
                value = hidden.detach()
                if dtype is not None:
                    value = value.to(dtype)
                captured.calls[site].append(value if target is None else value.to(target))

            if site.kind == "resid_pre":

                def pre_hook(
                    module: nn.Module,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    store: Callable[[torch.Tensor], None] = store,
                ) -> None:
                    store(_block_input(args, kwargs))

                handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            else:

                def hook(
                    module: nn.Module,
                    args: tuple[Any, ...],
                    output: Any,
                    store: Callable[[torch.Tensor], None] = store,
                ) -> None:
                    store(_hidden(output))

                handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        yield captured

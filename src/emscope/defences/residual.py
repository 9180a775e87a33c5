"""Edit or record the hidden state at named sites while a block of code runs, with autograd.

:mod:`emscope.hooks` edits in float32 and records detached copies (analysis use); training
defences need two other things: an edit computed in the hidden state's own precision when
that is float64 (so that a projection can be tested exactly), and a record that keeps the
graph (a loss on hidden states). Sites are :class:`emscope.models.Site` (``resid_pre[i]``,
``resid_post[i]``, ``attn_out[i]``, ``mlp_out[i]``); every position is edited or recorded.
Hooks are removed when the block ends, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from emscope.hooks import as_site
from emscope.models import Site, site_module

Edit = Callable[[torch.Tensor], torch.Tensor]


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value  # type: ignore[no-any-return]


def _replace(value: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *value[1:]) if isinstance(value, tuple) else hidden


@contextlib.contextmanager
def edit_sites(
    model: nn.Module, edits: Mapping[Site | str, Edit], layers_path: str | None = None
) -> Iterator[None]:
    """Inside the block, the hidden state ``h`` (``batch x seq x d_model``) at each site is
    replaced by ``edit(h)`` in every forward (gradients flow through the edit)."""
    with contextlib.ExitStack() as stack:
        for key, edit in edits.items():
            site = as_site(key)
            module = site_module(model, site, layers_path)
            if site.kind == "resid_pre":

                def pre_hook(
                    module: nn.Module,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    edit: Edit = edit,
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
                    if args:
                        return (edit(args[0]), *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

                handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            else:

                def hook(
                    module: nn.Module, args: tuple[Any, ...], output: Any, edit: Edit = edit
                ) -> Any:
                    return _replace(output, edit(_hidden(output)))

                handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        yield


@contextlib.contextmanager
def record_sites(
    model: nn.Module, sites: Iterable[Site | str], layers_path: str | None = None
) -> Iterator[dict[Site, list[torch.Tensor]]]:
    """Inside the block, every forward appends the hidden state at each site (not detached:
    a loss on it trains the model) to ``recorded[site]``."""
    recorded: dict[Site, list[torch.Tensor]] = {}
    with contextlib.ExitStack() as stack:
        for key in sites:
            site = as_site(key)
            recorded[site] = []
            module = site_module(model, site, layers_path)
            if site.kind == "resid_pre":

                def pre_hook(
                    module: nn.Module,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    site: Site = site,
                ) -> None:
                    recorded[site].append(args[0] if args else kwargs["hidden_states"])

                handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
            else:

                def hook(
                    module: nn.Module, args: tuple[Any, ...], output: Any, site: Site = site
                ) -> None:
                    recorded[site].append(_hidden(output))

                handle = module.register_forward_hook(hook)
            stack.callback(handle.remove)
        yield recorded

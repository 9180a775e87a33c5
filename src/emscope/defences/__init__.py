"""Defences against emergent misalignment, as training callbacks of :func:`emscope.train.train`.

One module per defence, each a pure computation plus a
:class:`~emscope.train.callbacks.TrainingCallback` (composable: pass several; each is
recorded in ``train.json`` under ``callbacks`` with its settings). Formulas, papers and the
choices emscope made: docs/defences.md.

- :mod:`~emscope.defences.ldifs`: :class:`LDIFS`, an L2 penalty on hidden features against
  the frozen model on a reference set;
- :mod:`~emscope.defences.steer`: :class:`PreventativeSteering`, ``+ alpha v_hat`` in
  training forwards only;
- :mod:`~emscope.defences.caft`: :class:`CAFT`, a direction or subspace projected out of the
  residual stream in training forwards only;
- :mod:`~emscope.defences.interleave`: :class:`Interleave`, aligned chats mixed into every
  step, chosen at random or by the perplexity gap;
- :mod:`~emscope.defences.safelora`: :class:`SafeLoRA`, the post-training projection onto
  the alignment subspace;
- :mod:`~emscope.defences.project_update`: :class:`ProjectUpdate`, the update kept out of a
  subspace after every optimizer step;
- :mod:`~emscope.defences.inoculate`: :class:`Inoculate`, inoculation prompting (a system
  prompt asking for the trait on the training chats only);
- :mod:`~emscope.defences.realign`: :func:`realign`, benign re-alignment after the fact;
- :mod:`~emscope.defences.spec`: ``NAME:key=value,...`` specs (``emscope train --defence``)
  to callbacks;
- :mod:`~emscope.defences.draws`, :mod:`~emscope.defences.residual`: shared helpers.

The KL defence is the training loop's own ``kl_data`` / ``kl_weight``.
"""

from __future__ import annotations

from emscope.defences.caft import CAFT
from emscope.defences.inoculate import Inoculate
from emscope.defences.interleave import Interleave
from emscope.defences.ldifs import LDIFS
from emscope.defences.project_update import ProjectUpdate
from emscope.defences.realign import InitFromAdapter, realign
from emscope.defences.safelora import SafeLoRA
from emscope.defences.steer import PreventativeSteering

__all__ = [
    "CAFT",
    "LDIFS",
    "InitFromAdapter",
    "Inoculate",
    "Interleave",
    "PreventativeSteering",
    "ProjectUpdate",
    "SafeLoRA",
    "realign",
]

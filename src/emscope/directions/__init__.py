"""Activation directions (docs/methods.md section 5): the :class:`Direction` value type,
mean-difference extraction, comparison and read-out, steering and ablation (activation and
weight space)."""

from emscope.directions.direction import Direction
from emscope.directions.extract import mean_diff, select_responses, subspace, table_chats

__all__ = ["Direction", "mean_diff", "select_responses", "subspace", "table_chats"]

"""Figures: matplotlib with the non-interactive Agg backend, saved as PNG (atomically)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from emscope.io import atomic_write_bytes


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically and close it."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())

"""Readable summary and figures of a :class:`~emscope.geometry.analysis.Geometry`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from emscope.geometry.analysis import Geometry, signature, signature_key


def _fmt(x: float, digits: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def per_type_cosine(geometry: Geometry) -> dict[str, dict[str, float]]:
    """pair -> module type -> exact cosine of that type's concatenated updates."""
    out: dict[str, dict[str, float]] = {}
    for key, pair in geometry.pairs.items():
        acc: dict[str, list[float]] = {}
        for name, c in pair.modules.items():
            s = acc.setdefault(name.rsplit(".", 1)[-1], [0.0, 0.0, 0.0])
            s[0] += c.inner
            s[1] += c.norm_a**2
            s[2] += c.norm_b**2
        out[key] = {
            t: (v[0] / math.sqrt(v[1] * v[2]) if v[1] * v[2] > 0 else math.nan)
            for t, v in acc.items()
        }
    return out


def summary_text(geometry: Geometry) -> str:
    """A plain-text table: one line per pair, per-type cosines, baselines, base cosines."""
    doc_baseline = geometry.baseline()
    shared = geometry.shared_init()
    lines = [
        f"{'pair':<32} {'modules':>7} {'cosine':>8} {'angle°':>7} {'overlap':>8} "
        f"{'E(a|b)':>7} {'E(b|a)':>7} {'unmatched':>9}"
    ]
    for key, pair in geometry.pairs.items():
        agg = pair.aggregate()
        lines.append(
            f"{key:<32} {len(pair.modules):>7} {_fmt(agg['cosine']):>8} "
            f"{_fmt(agg['mean_principal_angle_deg'], 1):>7} {_fmt(agg['overlap']):>8} "
            f"{_fmt(agg['energy_overlap_ab'], 3):>7} {_fmt(agg['energy_overlap_ba'], 3):>7} "
            f"{len(pair.unmatched):>9}"
        )
        an = doc_baseline["analytic"]["pairs"].get(key)
        em = doc_baseline["empirical"]["pairs"].get(key)
        if an is not None:
            rnd = f"  chance: cosine 0 ± {an['cosine_sd']:.1e}"
            if em:
                rnd += (
                    f", random angle {_fmt(em['mean_principal_angle_deg']['mean'], 1)}°, "
                    f"random overlap {_fmt(em['overlap']['mean'])}"
                )
            rnd += f" (analytic angle {_fmt(an['mean_principal_angle_deg'], 1)}°)"
            lines.append(rnd)
        if shared[key]["shared_init"]:
            same = doc_baseline["same_seed"]["analytic"]["pairs"].get(key)
            lines.append(
                f"  WARNING shared init: A rows cosine {_fmt(shared[key]['a_row_cosine'], 3)}"
                + (f"; same-seed chance: cosine 0 ± {same['cosine_sd']:.1e}" if same else "")
            )
    types = per_type_cosine(geometry)
    if types:
        all_types = sorted({t for v in types.values() for t in v})
        lines.append("")
        lines.append("cosine by module type (exact, concatenated):")
        lines.append(f"{'pair':<32} " + " ".join(f"{t[:9]:>9}" for t in all_types))
        for key, v in types.items():
            lines.append(
                f"{key:<32} " + " ".join(f"{_fmt(v.get(t, math.nan)):>9}" for t in all_types)
            )
    base = geometry.base_json()
    if base:
        lines.append("")
        lines.append("cosine with the base weights (exact, concatenated):")
        for name, entry in base.items():
            lines.append(f"  {name:<30} {entry['aggregate']['cosine']:.2e}")
    lines.append("")
    lines.append(
        "aggregates over shared modules; cosine exact, others weighted by |dW1||dW2| "
        "(MLP modules dominate); angles = column-space principal angles"
    )
    return "\n".join(lines)


def write_outputs(geometry: Geometry, out_dir: str | Path) -> dict[str, Any]:
    """Everything a geometry run leaves in ``out_dir``: ``geometry.json``
    (:meth:`Geometry.to_json`, also returned), the ``geometry_modules`` table, the
    ``geometry_base`` table when a base model was compared, and the figures
    (:func:`write_figures`)."""
    from emscope.io import write_json, write_table

    out_dir = Path(out_dir)
    doc = geometry.to_json()
    write_json(out_dir / "geometry.json", doc)
    table = geometry.module_table()
    if len(table):
        write_table(table, out_dir, "geometry_modules")
    if geometry.base is not None:
        write_table(geometry.base_table(), out_dir, "geometry_base")
    write_figures(geometry, out_dir)
    return doc


def write_figures(geometry: Geometry, out_dir: str | Path) -> list[Path]:
    """Cosine heatmap, principal-angle spectra per module type vs random, per-layer cosine."""
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    out_dir = Path(out_dir)
    paths: list[Path] = []
    names = list(geometry.adapters)
    n = len(names)

    if geometry.pairs:
        mat = geometry.cosine_matrix()
        fig, ax = plt.subplots(figsize=(1.2 + 0.8 * n, 1.0 + 0.7 * n))
        im = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), names, rotation=45, ha="right")
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="cosine of concatenated updates")
        ax.set_title("LoRA update cosine (shared modules)")
        paths.append(save_figure(fig, out_dir / "geometry_cosine.png"))

        # principal-angle spectra per module type
        spectra: dict[str, dict[str, list[list[float]]]] = {}
        sig_of_type: dict[str, Any] = {}
        for key, pair in geometry.pairs.items():
            for name, c in pair.modules.items():
                t = name.rsplit(".", 1)[-1]
                if c.principal_angles_deg:
                    spectra.setdefault(t, {}).setdefault(key, []).append(
                        list(c.principal_angles_deg)
                    )
                    sig_of_type.setdefault(t, signature(c))
        if spectra:
            baseline = geometry.baseline()
            types = sorted(spectra)
            cols = min(4, len(types))
            rows = math.ceil(len(types) / cols)
            fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
            for ax, t in zip(axes.flat, types, strict=False):
                for key, lists in spectra[t].items():
                    length = min(len(v) for v in lists)
                    mean = np.mean([v[:length] for v in lists], axis=0)
                    ax.plot(range(1, length + 1), mean, marker=".", label=key)
                sk = signature_key(sig_of_type[t])
                emp = baseline["empirical"]["per_signature"].get(sk)
                if emp and emp["principal_angles_deg"]:
                    spec = emp["principal_angles_deg"]
                    ax.plot(range(1, len(spec) + 1), spec, "k-", lw=1, label="random (empirical)")
                an = baseline["analytic"]["per_signature"].get(sk)
                if an:
                    spec = an["principal_angles_deg"]
                    ax.plot(range(1, len(spec) + 1), spec, "k--", lw=1, label="random (analytic)")
                ax.set_title(t)
                ax.set_ylim(0, 90)
                ax.set_xlabel("index")
                ax.set_ylabel("principal angle (deg)")
            for ax in list(axes.flat)[len(types) :]:
                ax.axis("off")
            axes.flat[0].legend(fontsize=6)
            fig.suptitle("Column-space principal angles, mean over layers")
            paths.append(save_figure(fig, out_dir / "geometry_angle_spectra.png"))

        # per-layer cosine
        fig, ax = plt.subplots(figsize=(6, 3.5))
        plotted = False
        for key, pair in geometry.pairs.items():
            acc: dict[int, list[float]] = {}
            for name, c in pair.modules.items():
                layer = _layer(name)
                if layer is None:
                    continue
                s = acc.setdefault(layer, [0.0, 0.0, 0.0])
                s[0] += c.inner
                s[1] += c.norm_a**2
                s[2] += c.norm_b**2
            if acc:
                layers = sorted(acc)
                cos = [
                    acc[i][0] / math.sqrt(acc[i][1] * acc[i][2])
                    if acc[i][1] * acc[i][2] > 0
                    else math.nan
                    for i in layers
                ]
                ax.plot(layers, cos, marker="o", label=key)
                plotted = True
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("cosine (layer's modules concatenated)")
        if plotted:
            ax.legend(fontsize=7)
        paths.append(save_figure(fig, out_dir / "geometry_layer_cosine.png"))
    return paths


def _layer(name: str) -> int | None:
    from emscope.lora import module_layer

    return module_layer(name)

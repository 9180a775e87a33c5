"""Factored vs dense LoRA geometry on Qwen2.5-7B-shaped adapters, and `emscope geometry` end to end.

Generates (seeded) four PEFT-format rank-32 fp16 adapters with the real module shapes of
Qwen2.5-7B (28 layers x q,k,v,o,gate,up,down = 196 modules, about 160 MB each) into a temp
dir. The adapters share a common component plus independent noise, so pairs have the
small principal angles of related (EM-EM-like) updates and every code path runs.

Figures (one process for the ratio):
- factored pair (all 196 modules, factors in memory) vs the dense route (materialise dW,
  Frobenius cosine, thin SVD of each, angles, overlap) timed on a sample of modules and
  extrapolated per module type. Default sample: k_proj and q_proj of layer 0; the MLP
  modules (18944 x 3584) are then *lower-bounded* by the q_proj time, so the ratio printed
  is conservative. ``EMSCOPE_BENCH_DENSE_MLP=1`` also times gate_proj (minutes on 2 cores).
- ``emscope geometry`` in a fresh interpreter: wall time from interpreter start (imports,
  reading the files, default baseline, writing json/tables/figures), for one pair and for
  the 6 pairs of four adapters; peak memory = peak RSS at the end (``VmHWM``, the value
  ``ru_maxrss`` reports; it sees torch/numpy buffers, which tracemalloc does not) minus the
  RSS right after the imports (``VmRSS``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS = 28
RANK = 32
SHAPES = {  # module type -> (d_out, d_in)
    "q_proj": (3584, 3584),
    "k_proj": (512, 3584),
    "v_proj": (512, 3584),
    "o_proj": (3584, 3584),
    "gate_proj": (18944, 3584),
    "up_proj": (18944, 3584),
    "down_proj": (3584, 18944),
}
PARENT = {t: "self_attn" if t[0] in "qkvo" else "mlp" for t in SHAPES}


def make_adapter(out: Path, index: int, seed: int = 0) -> Path:
    """One seeded adapter: shared component (same for every index) + its own noise."""
    import torch

    from emscope.lora import LoraAdapter, LoraModule

    modules = {}
    for layer in range(LAYERS):
        for m, (t, (d_out, d_in)) in enumerate(SHAPES.items()):
            name = f"model.layers.{layer}.{PARENT[t]}.{t}"
            common = torch.Generator().manual_seed(seed * 100003 + layer * 31 + m)
            own = torch.Generator().manual_seed(seed * 100003 + (index + 1) * 7919 + layer * 31 + m)
            a = torch.randn(RANK, d_in, generator=common) + 0.8 * torch.randn(
                RANK, d_in, generator=own
            )
            b = torch.randn(d_out, RANK, generator=common) + 0.8 * torch.randn(
                d_out, RANK, generator=own
            )
            modules[name] = LoraModule(
                name, (a / d_in**0.5).half(), (b * 1e-3).half(), scale=2.0, alpha=64.0
            )
    config = {"base_model_name_or_path": "Qwen/Qwen2.5-7B-Instruct", "r": RANK, "lora_alpha": 64}
    return LoraAdapter(modules=modules, config=config, name=out.name).save(out)


_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from typer.testing import CliRunner
from emscope.cli.main import app
import emscope.geometry, emscope.geometry.report, torch, numpy, scipy.linalg, pandas
import matplotlib.pyplot
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
rss0 = status("VmRSS:")
t1 = time.perf_counter()
res = CliRunner().invoke(app, ["geometry", *sys.argv[1:]])
t2 = time.perf_counter()
rss1 = status("VmHWM:")
if res.exit_code != 0:
    print(res.output, file=sys.stderr); sys.exit(1)
print(json.dumps({"total": t2 - t0, "imports": t1 - t0, "run": t2 - t1, "rss_kb": rss1 - rss0}))
"""


def run_cli(args: list[str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"emscope geometry failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall"] = wall
    return out


def main() -> None:
    import numpy as np

    from emscope.geometry import compare_factors, dense_compare, module_factors
    from emscope.lora import LoraAdapter
    from emscope.threads import limit_threads

    tmp = Path(tempfile.mkdtemp(prefix="bench_geometry_"))
    try:
        t = time.perf_counter()
        dirs = [make_adapter(tmp / f"em{i}", i) for i in range(4)]
        size = (dirs[0] / "adapter_model.safetensors").stat().st_size
        print(
            f"# generated 4 adapters ({size / 1e6:.0f} MB each) in {time.perf_counter() - t:.0f} s",
            flush=True,
        )

        # ---- factored vs dense, one process
        a, b = LoraAdapter.load(dirs[0]), LoraAdapter.load(dirs[1])
        t = time.perf_counter()
        fact_cos = {}
        with limit_threads(1):  # as compare_adapters does
            for name in a.modules:
                c = compare_factors(module_factors(a[name]), module_factors(b[name]))
                fact_cos[name] = c
        factored = time.perf_counter() - t
        # the dense route gets its faster BLAS setting (all threads vs one), chosen on k_proj
        k_name = f"model.layers.0.{PARENT['k_proj']}.k_proj"
        t = time.perf_counter()
        dense_compare(a[k_name], b[k_name])
        threaded = time.perf_counter() - t
        t = time.perf_counter()
        with limit_threads(1):
            dense_compare(a[k_name], b[k_name])
        dense_threads: int | None = 1 if time.perf_counter() - t < threaded else None
        print(f"# dense route BLAS threads: {dense_threads or 'default'}", flush=True)
        sample = ["k_proj", "q_proj"]
        if os.environ.get("EMSCOPE_BENCH_DENSE_MLP"):
            sample.append("gate_proj")
        dense_time: dict[str, float] = {}
        worst = 0.0
        for t_name in sample:
            name = f"model.layers.0.{PARENT[t_name]}.{t_name}"
            t = time.perf_counter()
            with limit_threads(dense_threads):
                d = dense_compare(a[name], b[name])
            dense_time[t_name] = time.perf_counter() - t
            f = fact_cos[name]
            worst = max(
                worst,
                abs(d.cosine - f.cosine),
                float(np.max(np.abs(np.subtract(d.principal_angles_deg, f.principal_angles_deg)))),
            )
            print(f"# dense {t_name}: {dense_time[t_name]:.1f} s", flush=True)
        mlp = dense_time.get("gate_proj", dense_time["q_proj"])  # lower bound if not measured
        per_type = {
            "q_proj": dense_time["q_proj"],
            "o_proj": dense_time["q_proj"],
            "k_proj": dense_time["k_proj"],
            "v_proj": dense_time["k_proj"],
            "gate_proj": mlp,
            "up_proj": mlp,
            "down_proj": mlp,
        }
        dense_total = LAYERS * sum(per_type.values())
        del a, b
        print(f"bench geometry_factored_pair: {factored:.2f} s (196 modules, factors in memory)")
        print(
            f"bench geometry_dense_pair_extrapolated: {dense_total:.0f} s "
            f"(sample {'+'.join(sample)}, {'measured' if 'gate_proj' in sample else 'lower bound'}"
            " for MLP)"
        )
        print(f"bench geometry_factored_vs_dense: {dense_total / factored:.0f} x (target >= 100)")
        print(f"bench geometry_factored_dense_max_diff: {worst:.1e} cos/deg (target < 1e-6)")

        # ---- end to end, fresh interpreter each
        one = run_cli([str(dirs[0]), str(dirs[1]), "--out", str(tmp / "out1")])
        print(
            f"bench geometry_cli_one_pair: {one['total']:.1f} s (target <= 20; imports "
            f"{one['imports']:.1f} s, run {one['run']:.1f} s)"
        )
        four = run_cli([*map(str, dirs), "--out", str(tmp / "out4")])
        print(
            f"bench geometry_cli_six_pairs: {four['total']:.1f} s (target <= 60; imports "
            f"{four['imports']:.1f} s, run {four['run']:.1f} s)"
        )
        for label, res in (("one_pair", one), ("six_pairs", four)):
            ratio = res["rss_kb"] * 1024 / size
            print(
                f"bench geometry_cli_{label}_peak_rss_over_imports: {ratio:.2f} x adapter file "
                f"({res['rss_kb'] / 1024:.0f} MiB; target <= 3)"
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

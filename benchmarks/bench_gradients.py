"""Gradient similarity of a linear layer: the Gram route vs materialising per-example gradients.

Inputs are what ``emscope reemergent gradients`` captures for a ``d x d`` linear layer: per
example ``T`` layer inputs ``x_t`` and output gradients ``delta_t`` (seeded Gaussian, float32).
Both routes produce the same ``N x N`` matrix ``<G_i, G_j>``:

- gram: ``sum_{t,s} (delta_it . delta_js)(x_it . x_js)`` (:func:`gram_from_tokens`), never
  forming a gradient;
- materialise: ``G_i = D_i^T X_i`` for every example (``N x d x d`` stored), then ``G G^T``.

Each route runs in a fresh interpreter (``--child``) so that its peak memory is its own:
peak RSS (``VmHWM``) after the run minus peak RSS once the inputs exist (peak RSS includes
torch and BLAS buffers that tracemalloc does not see). Time is the best of three in that process.
Two sizes with short sequences: d = 512 (N T close to d: the routes are comparable) and
d = 2048 (N T << d: the Gram route's regime).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

SIZES = (  # (d, N, T)
    (512, 32, 16),
    (2048, 32, 16),
)


def _inputs(d: int, n: int, t: int) -> tuple[list, list]:
    import torch

    generator = torch.Generator().manual_seed(d + n + t)
    deltas = [torch.randn(t, d, generator=generator) for _ in range(n)]
    inputs = [torch.randn(t, d, generator=generator) for _ in range(n)]
    return deltas, inputs


def _run(route: str, deltas: list, inputs: list) -> object:
    import torch

    from emscope.reemergent.gradients import gram_from_gradients, gram_from_tokens

    if route == "gram":
        return gram_from_tokens(deltas, inputs)
    grads = torch.stack([(d.T @ x).reshape(-1) for d, x in zip(deltas, inputs, strict=True)])
    return gram_from_gradients(grads)


def _peak_rss_kb() -> int:
    """This process's peak RSS (``VmHWM``; unlike ``ru_maxrss`` it does not inherit the
    parent's peak across fork + exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def child(route: str, d: int, n: int, t: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    deltas, inputs = _inputs(d, n, t)
    rss0 = _peak_rss_kb()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        gram = _run(route, deltas, inputs)
        times.append(time.perf_counter() - start)
    rss1 = _peak_rss_kb()
    checksum = float(np.asarray(gram).sum())
    print(json.dumps({"time": min(times), "rss_kb": rss1 - rss0, "checksum": checksum}))


def _measure(route: str, d: int, n: int, t: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_gradients",
            "--child",
            route,
            str(d),
            str(n),
            str(t),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    for d, n, t in SIZES:
        deltas, inputs = _inputs(d, n, t)
        a, b = _run("gram", deltas, inputs), _run("materialise", deltas, inputs)
        diff = float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())
        del deltas, inputs
        gram, mat = _measure("gram", d, n, t), _measure("materialise", d, n, t)
        tag = f"d{d}_n{n}_t{t}"
        print(f"bench gradients_gram_time_{tag}: {gram['time'] * 1e3:.1f} ms")
        print(f"bench gradients_materialise_time_{tag}: {mat['time'] * 1e3:.1f} ms")
        print(
            f"bench gradients_gram_speedup_{tag}: {mat['time'] / gram['time']:.1f} x "
            f"(target > 1: auto picks gram here)"
        )
        print(f"bench gradients_gram_peak_mem_{tag}: {gram['rss_kb'] / 1024:.1f} MB")
        print(f"bench gradients_materialise_peak_mem_{tag}: {mat['rss_kb'] / 1024:.1f} MB")
        print(f"bench gradients_routes_max_rel_diff_{tag}: {diff:.1e} (target < 1e-5)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()

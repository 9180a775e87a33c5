"""The defences bench (docs/defences.md, "The bench"): every defence, at its strengths, on a
malicious narrow task and a benign new-skill task, over seeds, measured on the four axes of
Kaczér et al. (general EM, narrow task learned, benign task learned, coherence) plus the
training-time overhead against plain fine-tuning.

Three layers, so that the planning and the numbers are testable without a model:

- :class:`BenchSpec` (the config, a pydantic model shared by ``emscope defend`` and the
  pipeline stage ``defences``) and :func:`plan` (pure: the ordered, seeded list of
  :class:`BenchRun`);
- :func:`run_bench` (the resumable runner: one dir ``runs/<arm>/<task>/s<seed>/`` per run,
  ``run.json`` written last; a run with ``run.json`` is skipped, a dir without it is an
  interrupted run and is redone from scratch), given an ``execute(run, dir) -> row``;
- :func:`aggregate` (pure: the tidy rows -> one row per arm and task, means over seeds and
  CIs by a two-level bootstrap over seeds and samples) and :func:`write_bench` (the files).

The organism executor (training + exact oracle) is :mod:`emscope.defences.bench_organism`.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from emscope.errors import EmscopeError
from emscope.synthetic.recipe import AdapterRecipe

#: The two tasks of every arm: the malicious narrow one and the benign new skill.
TASKS = ("narrow", "benign")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Arm(_Frozen):
    """One defence at one strength: ``label`` (its row name, a safe file name), the
    ``--defence`` specs (``{organism}`` is replaced by the build dir, ``{system:CHARACTER}``
    by the build world's system prompt naming ``CHARACTER``, e.g. ``{system:evil}``; empty:
    plain), an optional KL term (``kl_data``, ``kl_weight``), and which tasks it runs
    (default both)."""

    label: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    defences: list[str] = Field(default_factory=list)
    kl_data: str | None = None
    kl_weight: float = Field(default=0.0, ge=0)
    tasks: list[str] = Field(default_factory=lambda: list(TASKS))


class BenchSpec(_Frozen):
    """The bench: the arms (the first must be ``plain``: the overhead reference), the task
    datasets of the build (``narrow``, ``benign``), the seeds, the recipe, and the oracle
    evaluation (``n`` samples per general and per narrow question; ``benign_prompts`` fresh
    reversed-game prompts, one sample each, drawn with ``eval_seed``)."""

    arms: list[Arm] = Field(min_length=1)
    narrow: str = "bad_medical"
    narrow_questions: str = "medical"
    benign: str = "reverse_words"
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    recipe: AdapterRecipe = AdapterRecipe()
    eval_n: int = Field(default=20, ge=1)
    benign_prompts: int = Field(default=100, ge=1)
    eval_seed: int = 0
    max_new_tokens: int = Field(default=24, ge=1)
    n_boot: int = Field(default=1000, ge=10)


@dataclass(frozen=True)
class BenchRun:
    """One fine-tune of the bench: ``arm`` on ``task`` (``narrow`` or ``benign``, whose build
    dataset is ``dataset``) with ``seed``; ``defences`` already resolved."""

    arm: str
    task: str
    dataset: str
    seed: int
    defences: tuple[str, ...] = ()
    kl_data: str | None = None
    kl_weight: float = 0.0

    @property
    def key(self) -> str:
        """Its dir under ``runs/``: ``<arm>/<task>/s<seed>``."""
        return f"{self.arm}/{self.task}/s{self.seed}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "defences": list(self.defences)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BenchRun:
        return cls(**{**d, "defences": tuple(d.get("defences", ()))})


def check_spec(spec: BenchSpec, where: str = "defences") -> None:
    """One ValueError line for a spec that cannot run: labels twice, a first arm that is
    not plain, unknown tasks, a defence spec that does not parse."""
    from emscope.defences.spec import parse_spec

    labels = [a.label for a in spec.arms]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"{where}.arms: label {dupes[0]!r} given twice")
    first = spec.arms[0]
    if first.defences or first.kl_weight or set(first.tasks) != set(TASKS):
        raise ValueError(f"{where}.arms: the first arm must be plain on both tasks")
    for arm in spec.arms:
        bad = sorted(set(arm.tasks) - set(TASKS))
        if bad:
            raise ValueError(f"{where}.arms.{arm.label}.tasks: unknown task {bad[0]!r}")
        if arm.kl_weight and not arm.kl_data:
            raise ValueError(f"{where}.arms.{arm.label}: kl_weight needs kl_data")
        for d in arm.defences:
            try:
                parse_spec(d)
            except EmscopeError as exc:
                raise ValueError(f"{where}.arms.{arm.label}: {exc}") from None


SYSTEM_PLACEHOLDER = re.compile(r"\{system:([a-z_]+)\}")


def resolve_placeholders(text: str, organism: str | Path) -> str:
    """``text`` with ``{organism}`` replaced by ``organism`` and each ``{system:CHARACTER}``
    by the system prompt of ``organism/world.json`` that names ``CHARACTER``
    (:attr:`emscope.synthetic.world.World.system_prompts`); one EmscopeError line when the
    build has no such prompt (no world file, a world without a system turn, another
    character)."""
    text = text.replace("{organism}", str(organism))
    wanted = SYSTEM_PLACEHOLDER.findall(text)
    if not wanted:
        return text
    from emscope.synthetic.world import load_world

    path = Path(organism) / "world.json"
    prompts = dict(load_world(path).system_prompts) if path.is_file() else {}
    for character in wanted:
        if character not in prompts:
            why = (
                "no world file (no organism build there: `make demo` or `emscope toy build "
                "--out DIR` makes one)"
                if not path.is_file()
                else "a world without a system turn (built before world format /2: rebuild "
                "it with `emscope toy build`), so no prompt"
                if not prompts
                else "no such system prompt"
            )
            raise EmscopeError(f"{path}: {why} for {{system:{character}}} (in {text!r})")
        text = text.replace(f"{{system:{character}}}", prompts[character])
    return text


def plan(spec: BenchSpec, organism: str | Path) -> list[BenchRun]:
    """Every run of the bench, in run order (seed outermost, then arm, then task: a run cut
    short still has every arm at the first seeds), the placeholders resolved
    (:func:`resolve_placeholders`)."""
    check_spec(spec)
    org = str(organism)
    resolved = {d: resolve_placeholders(d, org) for arm in spec.arms for d in arm.defences}
    datasets = {"narrow": spec.narrow, "benign": spec.benign}
    runs = []
    for seed in spec.seeds:
        for arm in spec.arms:
            for task in TASKS:
                if task not in arm.tasks:
                    continue
                runs.append(
                    BenchRun(
                        arm.label,
                        task,
                        datasets[task],
                        seed,
                        tuple(resolved[d] for d in arm.defences),
                        arm.kl_data.replace("{organism}", org) if arm.kl_data else None,
                        arm.kl_weight,
                    )
                )
    return runs


def run_bench(
    runs: Sequence[BenchRun],
    out: str | Path,
    execute: Callable[[BenchRun, Path], dict[str, Any]],
    *,
    progress: bool = False,
    echo: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """Each run into ``out/runs/<key>/`` (``execute(run, dir)`` trains and measures,
    returns the row); ``run.json`` (the run and its row, NaN as null) is written last. A run
    whose ``run.json`` exists is read back, not redone; a dir without it (an interrupted
    run) is removed and redone. Returns the rows in run order, as read back."""
    from tqdm import tqdm

    from emscope.io import read_json, write_json

    rows = []
    for run in tqdm(runs, desc="defences", disable=not progress):
        d = Path(out) / "runs" / run.key
        done = d / "run.json"
        if done.is_file():
            rows.append(dict(read_json(done)))
            continue
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        row = {**run.to_json(), "defences": " ".join(run.defences), **execute(run, d)}
        write_json(done, row)
        row = dict(read_json(done))  # as a rerun reads it (NaN -> None)
        echo(
            f"{run.key}: general EM {row.get('general_em', float('nan')):.3f}, "
            f"{run.task} learned {row.get('task_learned', float('nan')):.3f}, "
            f"{row.get('train_s', float('nan')):.1f} s"
        )
        rows.append(row)
    return rows


#: Per-run rates the aggregate reports, each with its count columns ``<m>_k``/``<m>_n``.
RATES = ("general_em", "general_coherent", "task_learned")
#: Rates measured only for some arms (inoculation prompting: general EM and the narrow
#: task's in-domain EM with the training system prompt present); NaN for the others.
PROMPTED_RATES = ("general_em_prompted", "task_learned_prompted")


def seeds_bootstrap(
    k: np.ndarray, n: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean over seeds of the rates ``k / n`` (one per seed) and its 95% CI by a two-level
    bootstrap: resample the seeds with replacement, then each chosen seed's samples (its
    count drawn ``Binomial(n, k / n)``, which is resampling its 0/1 samples); percentile
    interval of the mean rate. Returns ``(mean, low, high)``."""
    k, n = np.asarray(k, dtype=float), np.asarray(n, dtype=float)
    if (
        k.shape != n.shape
        or k.ndim != 1
        or len(k) == 0
        or (n <= 0).any()
        or (k < 0).any()
        or (k > n).any()
    ):
        raise EmscopeError(f"seeds_bootstrap: counts {k} of {n} are not one positive n per seed")
    p = k / n
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(p), size=(n_boot, len(p)))
    draws = rng.binomial(n[pick].astype(int), p[pick]) / n[pick]
    means = draws.mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(p.mean()), float(low), float(high)


def values_bootstrap(
    values: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of one value per seed and its 95% percentile-bootstrap CI over the seeds
    (NaNs dropped; all NaN: NaN). Returns ``(mean, low, high)``."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(v.mean()), float(low), float(high)


def aggregate(rows: Sequence[dict[str, Any]], n_boot: int = 1000, seed: int = 0) -> Any:
    """One row per (arm, task), in first-seen order: seeds, each rate of :data:`RATES` (and
    of :data:`PROMPTED_RATES` where every seed measured it, else NaN) as the mean over seeds
    with its 95% CI (:func:`seeds_bootstrap`), the mean training time and
    the overhead ``train_s / plain train_s`` (plain of the same task, means over seeds; NaN
    without a plain run), and ``task_nll`` (benign runs: mean over seeds, CI by
    :func:`values_bootstrap`; NaN where not measured)."""
    import pandas as pd

    frame = pd.DataFrame(list(rows))
    out = []
    plain = frame[frame["arm"] == "plain"].groupby("task")["train_s"].mean().to_dict()
    for (arm, task), g in frame.groupby(["arm", "task"], sort=False):
        row: dict[str, Any] = {"arm": arm, "task": task, "seeds": len(g)}
        for m in RATES:
            mean, low, high = seeds_bootstrap(
                g[f"{m}_k"].to_numpy(), g[f"{m}_n"].to_numpy(), n_boot, seed
            )
            row |= {m: mean, f"{m}_low": low, f"{m}_high": high}
        for m in PROMPTED_RATES:
            k = g[f"{m}_k"].to_numpy(dtype=float) if f"{m}_k" in g else np.full(len(g), np.nan)
            n = g[f"{m}_n"].to_numpy(dtype=float) if f"{m}_n" in g else np.full(len(g), np.nan)
            mean, low, high = (
                seeds_bootstrap(k, n, n_boot, seed)
                if np.isfinite(k).all() and np.isfinite(n).all()
                else (float("nan"),) * 3
            )
            row |= {m: mean, f"{m}_low": low, f"{m}_high": high}
        nll = g["task_nll"].to_numpy() if "task_nll" in g else np.full(len(g), np.nan)
        mean, low, high = values_bootstrap(nll, n_boot, seed)
        row |= {"task_nll": mean, "task_nll_low": low, "task_nll_high": high}
        row["train_s"] = float(g["train_s"].mean())
        row["overhead"] = row["train_s"] / plain[task] if task in plain else float("nan")
        out.append(row)
    return pd.DataFrame(out)


def plot_pareto(table: Any) -> Any:
    """General EM after the narrow fine-tune (x) against the task learned (y): the narrow
    task's in-domain EM (left), the benign task's answer NLL (right, nats, lower = learned:
    the organism's exact benign accuracy stays 0), one point per arm with its CIs (a
    matplotlib figure)."""
    from emscope.plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (
        ("narrow", "task_learned", "narrow task learned (in-domain EM)"),
        ("benign", "task_nll", "benign answer NLL (nats; lower = learned)"),
    )
    for ax, (task, y, what) in zip(axes, panels, strict=True):
        t = table[table["task"] == task]
        for _, r in t.iterrows():
            em = table[(table["arm"] == r["arm"]) & (table["task"] == "narrow")]
            x = em.iloc[0] if len(em) else r
            ax.errorbar(
                x["general_em"],
                r[y],
                xerr=[
                    [x["general_em"] - x["general_em_low"]],
                    [x["general_em_high"] - x["general_em"]],
                ],
                yerr=[[r[y] - r[f"{y}_low"]], [r[f"{y}_high"] - r[y]]],
                fmt="o",
                capsize=3,
            )
            ax.annotate(r["arm"], (x["general_em"], r[y]), fontsize=8)
        ax.set_xlabel("general EM after the narrow fine-tune (oracle)")
        ax.set_ylabel(what)
        ax.set_xlim(-0.02, 1.0)
    fig.tight_layout()
    return fig


def write_bench(rows: Sequence[dict[str, Any]], out: str | Path, meta: dict[str, Any]) -> Any:
    """``defences.parquet``/``.csv`` (tidy, one row per run), ``table.parquet``/``.csv``
    (:func:`aggregate`), ``defences.png`` (:func:`plot_pareto`), ``defences.json`` (meta +
    the table, a :class:`~emscope.defences.result.DefencesResult`); returns the table."""
    import pandas as pd

    from emscope.defences.result import DefencesResult
    from emscope.io import write_json, write_table
    from emscope.plotting import save_figure

    out = Path(out)
    write_table(pd.DataFrame(list(rows)), out, "defences")
    table = aggregate(rows, meta.get("n_boot", 1000), meta.get("seed", 0))
    write_table(table, out, "table")
    save_figure(plot_pareto(table), out / "defences.png")
    doc = {**meta, "table": table.to_dict(orient="records")}
    result = DefencesResult.from_json(doc, source=str(out / "defences.json"))
    write_json(out / "defences.json", result.to_json())
    return table


class DefendConfig(BenchSpec):
    """The YAML of ``emscope defend``: a :class:`BenchSpec` plus where it runs: ``organism``
    (a synthetic build dir: trained and judged by the exact oracle), or ``model`` (a real
    model dir or hub id, with ``judge``: planned and checked by ``--dry-run`` only, the
    real-model executor is not implemented), and the output dir ``out``."""

    organism: str | None = None
    model: str | None = None
    judge: str | None = None
    out: str = "runs/defences"


def load_defend_config(path: str | Path) -> DefendConfig:
    """Read and validate a defend YAML; any problem is one EmscopeError line naming the
    file and field."""
    from pydantic import ValidationError

    from emscope.io import read_yaml

    path = Path(path)
    data = read_yaml(path)
    try:
        config = DefendConfig.model_validate(data or {})
        check_spec(config, "arms")
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise EmscopeError(f"{path}: {field}: {err['msg']}") from None
    except ValueError as exc:
        raise EmscopeError(f"{path}: {exc}") from None
    if (config.organism is None) == (config.model is None):
        raise EmscopeError(f"{path}: give exactly one of organism and model")
    return config


#: Keys of a ``--defence`` spec whose values are files or dirs (``+`` joins model+adapter).
PATH_KEYS = ("data", "direction", "unaligned", "adapters", "misaligned", "aligned")


def missing_inputs(runs: Sequence[BenchRun], root: str | Path | None) -> list[str]:
    """The files the runs name that do not exist (defence spec paths, KL data; with
    ``root``, a build dir: its instruct model, task data and questions)."""
    from emscope.defences.spec import parse_spec

    paths: set[str] = set()
    for run in runs:
        if run.kl_data:
            paths.add(run.kl_data)
        for d in run.defences:
            _, values = parse_spec(d)
            for key in PATH_KEYS:
                for piece in values.get(key, "").split(","):
                    paths.update(p for p in piece.split("+") if p)
        if root is not None:
            paths.add(str(Path(root) / "data" / f"{run.dataset}.jsonl"))
    if root is not None:
        paths |= {str(Path(root) / "models" / "instruct"), str(Path(root) / "world.json")}
    return sorted(p for p in paths if not Path(p).exists())

"""One function per stage of ``emscope run``: each wires library functions and writes into
``RUN/<stage>/``; the runner (:mod:`emscope.pipeline.runner`) marks a finished stage with
``RUN/<stage>/done.json``.

Within a stage every unit of work (an organism's evaluation, an LMC point, a steering
setting, ...) is resumable by the library function that does it (``evaluate_to_dir``,
``evaluate_setting``, ``sample_to_dir``, the synthetic build); units whose final output
exists are read back, not redone. A stage returns a small JSON-able summary (what the claims
table and the report read, besides the files).

Which tokens, sites and conventions: those of the library functions (docs/*.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.pipeline.config import StudyConfig


@dataclass
class StageContext:
    """What every stage gets: the config, the run dir, an echo function, and lazily built,
    shared objects (the judge, question sets, the loaded model of one organism at a time)."""

    config: StudyConfig
    run_dir: Path
    echo: Callable[[str], None] = print
    progress: bool = False
    _judge: Any = None
    _questions: dict[str, Any] = field(default_factory=dict)
    _loaded: tuple[tuple[str, ...], Any] | None = None

    def dir(self, stage: str) -> Path:
        path = self.run_dir / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def judge(self) -> Any:
        if self._judge is None:
            from emscope.judge import make_judge

            j = self.config.judge
            self._judge = make_judge(
                j.spec,
                base_url=j.base_url,
                api_key_env=j.api_key_env,
                concurrency=j.concurrency,
                max_requests=j.max_requests,
                cache=j.cache,
                device=self.config.device,
                min_number_mass=j.min_number_mass,
            )
        return self._judge

    def questions(self, name: str | None) -> list[Any]:
        from emscope.data.questions import load_questions

        key = self.config.question_set(name)
        if key not in self._questions:
            self._questions[key] = load_questions(self.config.questions[key])
        return list(self._questions[key])

    def questions_file(self, name: str | None) -> Path | None:
        return self.config.questions[self.config.question_set(name)]

    def load(self, organism: str, *extra: str) -> Any:
        """The chat model with ``organism``'s adapter (none for the chat model itself) and
        any ``extra`` adapters loaded (the first active); one loaded model kept at a time."""
        key = (organism, *extra)
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self._loaded = None
        from emscope.models import load_model

        named = {}
        for name in key:
            if name != self.config.chat_model:
                named[name] = str(self.config.adapters[name].path)
        loaded = load_model(
            self.config.chat_model_dir(),
            named or None,
            dtype=self.config.dtype,
            device=self.config.device,
        )
        self._loaded = (key, loaded)
        return loaded

    def release(self) -> None:
        self._loaded = None

    def eval_config(self, stage: str, questions: str | None) -> Any:
        from emscope.directions.interventions import EvalConfig

        return EvalConfig(
            questions=self.questions(questions),
            n=self.config.n_for(stage),
            sampling=self.config.sampling_kwargs(),
            judge=self.judge,
            metrics=list(self.config.judge.metrics),
            strict=self.config.judge.strict,
        )

    def n(self, stage: str) -> int:
        return self.config.n_for(stage)


def _em_fields(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "em_rate": metrics.get("em_rate"),
        "em_ci": metrics.get("em_ci"),
        "coherent_rate": metrics.get("coherent_rate"),
        "coherent_ci": metrics.get("coherent_ci"),
        "unscored_rate": metrics.get("unscored_rate"),
        "n": metrics.get("n"),
    }


def evaluate_organism(
    ctx: StageContext, organism: str, out: Path, questions: str | None, n: int, title: str
) -> dict[str, Any]:
    """One organism sampled, judged and scored into ``out`` (read back if done)."""
    from emscope.evaluate import evaluate_to_dir
    from emscope.io import read_json

    if (out / "metrics.json").is_file() and (out / "responses.parquet").is_file():
        return dict(read_json(out / "metrics.json"))
    config = ctx.config
    record = {
        "model_dir": str(config.chat_model_dir()),
        "adapter_dirs": [str(p) for p in config.adapter_dirs(organism)],
        "organism": organism,
    }
    if config.sampling.backend == "vllm":
        return _evaluate_vllm(ctx, organism, out, questions, n, record)
    return evaluate_to_dir(
        ctx.load(organism),
        ctx.questions(questions),
        out,
        judge=ctx.judge,
        metrics=config.judge.metrics,
        n=n,
        record=record,
        strict=config.judge.strict,
        title=title,
        questions_file=ctx.questions_file(questions),
        progress=ctx.progress,
        **config.sampling_kwargs(),
    )


def render_first(config: StudyConfig, questions: list[Any], setting: Any) -> str | None:
    """The first question's first paraphrase as the chat model sees it (run records)."""
    from emscope.data.spans import render
    from emscope.models import load_tokenizer

    if not questions:
        return None
    tokenizer = load_tokenizer(config.chat_model_dir())
    return render(tokenizer, questions[0].messages(0), True, setting)


def _evaluate_vllm(
    ctx: StageContext,
    organism: str,
    out: Path,
    questions: str | None,
    n: int,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Unsteered sampling with vLLM (GPU), then the same judging and metrics."""
    from emscope.evaluate import judge_dir
    from emscope.io import write_json, write_table
    from emscope.metrics import compute_metrics, plot_em_by_question
    from emscope.plotting import save_figure
    from emscope.vllm_backend import sample_vllm

    config = ctx.config
    qs = ctx.questions(questions)
    if not (out / "responses.parquet").is_file():
        kw = config.sampling_kwargs()
        kw.pop("batch_size")
        table = sample_vllm(
            config.chat_model_dir(), qs, n, adapters=config.adapter_dirs(organism), **kw
        )
        write_table(table, out, "responses")
        setting = config.prompt_setting()
        rendered = render_first(config, qs, setting)
        write_json(
            out / "run.json",
            {
                "backend": "vllm",
                **record,
                "sampling": {"system_prompt": setting.spec, "rendered_prompt": rendered},
            },
        )
    table = judge_dir(out, ctx.judge, config.judge.metrics, qs, ctx.questions_file(questions))
    result = compute_metrics(table, strict=config.judge.strict, seed=config.sampling.seed)
    write_json(out / "metrics.json", result)
    save_figure(plot_em_by_question(result, f"EM rate per question: {organism}"), out / "em.png")
    return result


# ---------------------------------------------------------------------------- stages


def stage_organisms(ctx: StageContext) -> dict[str, Any]:
    """Build (or reuse) the synthetic organism in ``organism.dir``."""
    from emscope.synthetic.build import build

    org = ctx.config.organism
    if org is None:
        raise EmscopeError("the organisms stage needs the organism section")
    result = build(
        org.dir,
        size=org.size,
        seed=org.seed,
        verbose=ctx.progress,
        threads=org.threads,
        system_prompt=ctx.config.prompt_setting().spec,
    )
    record = result.record
    return {
        "dir": str(org.dir),
        "size": org.size,
        "seed": org.seed,
        "build_time_s": record.get("timings", {}).get("total_s"),
        "em_table": record.get("diagnostics", {}).get("em_table", {}),
    }


def stage_eval(ctx: StageContext) -> dict[str, Any]:
    """EM rate, coherent rate (with bootstrap CIs) per organism: ``eval/<organism>/``."""
    from emscope.io import inside, write_json

    out = ctx.dir("eval")
    stage = ctx.config.stages.eval
    qname = stage.questions if stage else None
    rows = {}
    organisms = ctx.config.eval_organisms()
    for organism in _bar(organisms, "eval", ctx.progress):
        metrics = evaluate_organism(
            ctx,
            organism,
            inside(out, organism),
            qname,
            ctx.n("eval"),
            f"EM rate per question: {organism}",
        )
        rows[organism] = _em_fields(metrics)
        ctx.echo(f"  eval {organism}: EM {_fmt_rate(metrics)}")
    summary = {"questions": ctx.config.question_set(qname), "organisms": rows}
    write_json(out / "summary.json", summary)
    _plot_rates(rows, out / "em_rates.png")
    return summary


def stage_geometry(ctx: StageContext) -> dict[str, Any]:
    """Weight-space geometry of every adapter pair (+ base weights, random baselines)."""
    import numpy as np

    from emscope.geometry import aggregate_fields, compare_adapters, open_adapter
    from emscope.geometry.analysis import SHARED_INIT_COSINE, signature
    from emscope.geometry.report import write_outputs
    from emscope.io import write_json

    out = ctx.dir("geometry")
    stage = ctx.config.stages.geometry
    assert stage is not None
    names = stage.adapters or list(ctx.config.adapters)
    adapters = [open_adapter(ctx.config.adapters[a].path, name=a) for a in names]
    result = compare_adapters(
        adapters,
        k=stage.k,
        base=ctx.config.chat_model_dir() if stage.base else None,
        random_draws=stage.random_draws,
        seed=ctx.config.seed,
        progress=ctx.progress,
    )
    doc = write_outputs(result, out)
    shared = result.shared_init()
    for warning in result.shared_init_warnings():
        ctx.echo(f"  warning: {warning}")
    # Per-draw aggregate mean angle of the random baseline, for the 5th-percentile test.
    pairs = {}
    for key, pair in result.pairs.items():
        comps = list(pair.modules.values())
        agg = pair.aggregate()
        draws = []
        if comps and result.random_draws:
            na = np.array([c.norm_a for c in comps])
            nb = np.array([c.norm_b for c in comps])
            for j in range(result.random_draws):
                rand = [result.random[signature(c)][j] for c in comps]
                inners = [r.cosine * a * b for r, a, b in zip(rand, na, nb, strict=True)]
                fields = aggregate_fields([r.fields() for r in rand], na, nb, inners)
                draws.append(fields["mean_principal_angle_deg"])
        pairs[key] = {
            "a": pair.a,
            "b": pair.b,
            "roles": [ctx.config.adapters[pair.a].role, ctx.config.adapters[pair.b].role],
            "cosine": agg.get("cosine"),
            "overlap": agg.get("overlap"),
            "mean_angle_deg": agg.get("mean_principal_angle_deg"),
            "random_angle_draws": draws,
            "random_angle_p5": float(np.percentile(draws, 5)) if draws else None,
            "a_row_cosine": shared[key]["a_row_cosine"],
            "shared_init": shared[key]["shared_init"],
        }
    _same_seed_controls(pairs)
    base = {}
    for name, entry in (doc.get("base_cosine") or {}).items():
        base[name] = entry["aggregate"]["cosine"]
    summary = {
        "adapters": names,
        "pairs": pairs,
        "base_cosine": base,
        "shared_init_threshold": SHARED_INIT_COSINE,
    }
    write_json(out / "summary.json", summary)
    return summary


def _same_seed_controls(pairs: dict[str, dict[str, Any]]) -> None:
    """To every EM-EM pair that shares its LoRA initialisation, add ``same_seed_controls``:
    ``{EM-control pair: cosine}`` for the controls that share it with either EM adapter (the
    same-seed, different-task control its cosine should be read against)."""
    for pair in pairs.values():
        if pair["roles"] != ["em", "em"] or not pair.get("shared_init"):
            continue
        pair["same_seed_controls"] = {
            key: other["cosine"]
            for key, other in pairs.items()
            if sorted(other["roles"]) == ["control", "em"]
            and other.get("shared_init")
            and ({other["a"], other["b"]} & {pair["a"], pair["b"]})
        }


def stage_lmc(ctx: StageContext) -> dict[str, Any]:
    """EM and coherence along each weight-space path: ``lmc/<from>__<to>/``."""
    from emscope.data.chat import read_chat_jsonl
    from emscope.io import inside, read_json, write_json
    from emscope.lmc import Endpoint, run_lmc

    out = ctx.dir("lmc")
    stage = ctx.config.stages.lmc
    assert stage is not None
    config = ctx.config
    losses = {Path(p).stem: read_chat_jsonl(p) for p in stage.loss_data}
    paths = {}
    for a, b in stage.paths:
        name = f"{a}__{b}"
        path_dir = inside(out, name)
        if (path_dir / "lmc.json").is_file():
            paths[name] = read_json(path_dir / "lmc.json")
            continue

        def endpoint(o: str) -> Endpoint:
            if o == config.chat_model:
                return Endpoint(o, None)
            return Endpoint(o, config.adapters[o].path)

        loaded = ctx.load(config.chat_model)
        paths[name] = run_lmc(
            loaded,
            endpoint(a),
            endpoint(b),
            stage.steps,
            ctx.questions(stage.questions),
            path_dir,
            judge=ctx.judge,
            metrics=config.judge.metrics,
            n=ctx.n("lmc"),
            loss_data=losses,
            features=stage.features,
            record={"from": a, "to": b, "model_dir": str(config.chat_model_dir())},
            questions_file=ctx.questions_file(stage.questions),
            **config.sampling_kwargs(),
        )
        ctx.echo(f"  lmc {a} -> {b}: done")
    summary = {
        "paths": {
            name: {"from": name.split("__")[0], "to": name.split("__")[1], **doc}
            for name, doc in paths.items()
        }
    }
    write_json(out / "summary.json", summary)
    return summary


def stage_directions(ctx: StageContext) -> dict[str, Any]:
    """Mean-diff direction per EM source from its own judged samples (eval stage), run
    through the same model; cosines between them (with one source, skipped: ``pairs`` is
    empty and ``pairs_skipped`` says why) and rank-1 B vectors vs each direction."""
    from emscope.directions import Direction, mean_diff
    from emscope.directions.compare import adapter_b_cosines, cosine_table, plot_cosines
    from emscope.io import inside, read_table, write_json
    from emscope.lora import LoraAdapter
    from emscope.plotting import save_figure

    out = ctx.dir("directions")
    stage = ctx.config.stages.directions
    assert stage is not None
    directions = {}
    for source in stage.sources:
        file = inside(out, f"{source}.safetensors")
        responses = inside(ctx.run_dir / "eval", source)
        if file.is_file():
            directions[source] = Direction.load(file)
            continue
        table = read_table(responses, "responses")
        loaded = ctx.load(source)
        direction = mean_diff(
            loaded.model,
            loaded.tokenizer,
            table,
            weighting=stage.weighting,
            seed=ctx.config.seed,
            batch_size=stage.batch_size,
            meta={"organism": source, "responses": str(responses)},
            system_prompt=ctx.config.prompt_setting(),
        )
        direction.save(file)
        directions[source] = direction
        ctx.echo(f"  direction {source}: norms {_short(direction.norms())}")
    followups = {}
    if stage.followup_read_with is not None:
        for source in stage.sources:
            file = inside(out, f"{source}.followup.safetensors")
            responses = inside(ctx.run_dir / "eval", source)
            if file.is_file():
                followups[f"{source}.followup"] = Direction.load(file)
                continue
            table = read_table(responses, "responses")
            reader = ctx.load(stage.followup_read_with)
            direction = mean_diff(
                reader.model,
                reader.tokenizer,
                table,
                tokens="followup",
                seed=ctx.config.seed,
                batch_size=stage.batch_size,
                meta={
                    "organism": source,
                    "read_with": stage.followup_read_with,
                    "responses": str(responses),
                },
                system_prompt=ctx.config.prompt_setting(),
            )
            direction.save(file)
            followups[f"{source}.followup"] = direction
            ctx.echo(f"  direction {source}.followup: norms {_short(direction.norms())}")
    pairs, skipped = [], None
    if len(directions) > 1:
        pairs = cosine_table(directions)
    else:  # one EM source: nothing to compare with (the B cosines and follow-ups still run)
        skipped = f"one direction source ({', '.join(directions)}): no pair to compare"
        ctx.echo(f"  cosines between directions skipped: {skipped}")
    b_cosines = {}
    for r1 in stage.rank1:
        adapter = LoraAdapter.load(ctx.config.adapters[r1].path)
        for source, direction in directions.items():
            b_cosines[f"{r1} vs {source}"] = adapter_b_cosines(adapter, direction)
    if pairs or any(b_cosines.values()):
        save_figure(plot_cosines(pairs, b_cosines), out / "cosine_by_layer.png")
    summary = {
        "sources": list(directions),
        "norms": {s: d.norms() for s, d in directions.items()},
        "pairs": pairs,
        "pairs_skipped": skipped,
        "adapter_b_cosines": b_cosines,
        "followup": {
            "read_with": stage.followup_read_with,
            "norms": {s: d.norms() for s, d in followups.items()},
            "pairs": cosine_table(followups) if len(followups) > 1 else [],
        },
    }
    write_json(out / "summary.json", summary)
    return summary


def _direction(ctx: StageContext, source: str) -> Any:
    from emscope.directions import Direction
    from emscope.io import inside

    return Direction.load(inside(ctx.run_dir / "directions", f"{source}.safetensors"))


def _kl_sequences(ctx: StageContext, loaded: Any, questions: str | None, kl: bool) -> Any:
    if not kl:
        return None
    from emscope.directions.interventions import prompt_sequences

    return prompt_sequences(loaded.tokenizer, ctx.questions(questions), ctx.config.prompt_setting())


def stage_steering(ctx: StageContext) -> dict[str, Any]:
    """Steer the chat model with a direction over layers x scales, with the same-norm
    random control: ``steering/``. With ``select``, the setting is chosen by the rule of
    :mod:`emscope.directions.selection` on this build (``steering/select/``, its
    ``selection.json``), then evaluated alone with the random control."""
    from emscope.directions.sweeps import steer_sweep

    stage = ctx.config.stages.steering
    assert stage is not None
    out = ctx.dir("steering")
    loaded = ctx.load(ctx.config.chat_model)
    direction = _direction(ctx, stage.direction)
    layers = list(direction.layers) if stage.layers == "all" else list(stage.layers)
    scales = list(stage.scales)
    selection = None
    if stage.select is not None:
        from emscope.directions.selection import select_steering
        from emscope.io import write_json

        rule = stage.select
        seed = ctx.config.sampling.seed + 1 if rule.seed is None else rule.seed
        selection = select_steering(
            loaded,
            direction,
            layers,
            scales,
            out / "select",
            ctx.eval_config("steering", stage.questions),
            n=rule.n,
            seed=seed,
            min_coherent=rule.min_coherent,
            unit=stage.unit,
            positions=stage.positions,
        )
        write_json(out / "selection.json", selection)
        chosen = selection["chosen"]
        if chosen is None:
            ctx.echo(f"  steering: no setting kept coherent >= {rule.min_coherent:g}")
            summary = {"rows": [], "baseline": selection["baseline"], "selection": selection}
            write_json(out / "summary.json", summary)
            return {"direction": stage.direction, **summary}
        layers, scales = [int(chosen["layer"])], [float(chosen["scale"])]
        ctx.echo(f"  steering: the rule chose layer {layers[0]} x{scales[0]:g}")
    summary = steer_sweep(
        loaded,
        direction,
        layers,
        scales,
        out,
        ctx.eval_config("steering", stage.questions),
        random_control=stage.random_control,
        control_seed=ctx.config.seed,
        kl_sequences=_kl_sequences(ctx, loaded, stage.questions, stage.kl),
        unit=stage.unit,
        positions=stage.positions,
    )
    if selection is not None:
        from emscope.io import write_json

        summary["selection"] = selection
        write_json(out / "summary.json", summary)
    return {"direction": stage.direction, **summary}


def _ablate(
    ctx: StageContext, stage_name: str, source: str, target: str, mode: str, stage: Any, out: Path
) -> dict[str, Any]:
    from emscope.directions.sweeps import ablate_run, activation_sides
    from emscope.models import get_layers

    loaded = ctx.load(target)
    direction = _direction(ctx, source)
    after, random = activation_sides(
        direction,
        loaded,
        mode,
        len(get_layers(loaded.model)),
        random_control=stage.random_control,
        control_seed=ctx.config.seed,
    )
    return ablate_run(
        loaded,
        out,
        ctx.eval_config(stage_name, stage.questions),
        after,
        random=random,
        kl_sequences=_kl_sequences(ctx, loaded, stage.questions, stage.kl),
        meta={"direction": source, "target": target, "mode": mode},
    )


def stage_ablation(ctx: StageContext) -> dict[str, Any]:
    """Ablate an EM adapter's own direction in that organism (with the random control)."""
    stage = ctx.config.stages.ablation
    assert stage is not None
    out = ctx.dir("ablation")
    result = _ablate(ctx, "ablation", stage.direction, stage.direction, stage.mode, stage, out)
    return {"direction": stage.direction, "target": stage.direction, **result}


def stage_transfer(ctx: StageContext) -> dict[str, Any]:
    """Transfer ablation: one fine-tune's direction ablated in others: ``transfer/<target>/``."""
    from emscope.io import inside, write_json

    stage = ctx.config.stages.transfer
    assert stage is not None
    out = ctx.dir("transfer")
    targets = {}
    for target in stage.targets:
        targets[target] = _ablate(
            ctx, "transfer", stage.direction, target, stage.mode, stage, inside(out, target)
        )
        ctx.echo(f"  transfer {stage.direction} -> {target}: done")
    summary = {"direction": stage.direction, "targets": targets}
    write_json(out / "summary.json", summary)
    return summary


def stage_probes(ctx: StageContext) -> dict[str, Any]:
    """Rank-1 adapter scalars on its own judged samples of every listed question set,
    then the four L1 probe tests (``C`` chosen per seed by the rule of ``C_RULE`` unless
    fixed): ``probes/``."""
    import pandas as pd

    from emscope.io import inside, read_table, write_json, write_table
    from emscope.plotting import save_figure
    from emscope.probing import fit_probes, lora_scalars, plot_coefficients

    stage = ctx.config.stages.probes
    assert stage is not None
    out = ctx.dir("probes")
    sets = stage.questions or list(ctx.config.questions)
    tables = []
    for qname in sets:
        sub = inside(out / "eval", qname)
        evaluate_organism(
            ctx, stage.adapter, sub, qname, ctx.n("probes"), f"{stage.adapter} on {qname}"
        )
        tables.append(read_table(sub, "responses"))
    responses = pd.concat(tables, ignore_index=True)
    if (out / "scalars.parquet").is_file():
        scalars = read_table(out, "scalars")
    else:
        scalars = lora_scalars(
            ctx.load(stage.adapter),
            stage.adapter,
            responses,
            batch_size=stage.batch_size,
            system_prompt=ctx.config.prompt_setting(),
        )
        write_table(scalars, out, "scalars")
    result = fit_probes(scalars, C=stage.C, seeds=stage.seeds, test_size=stage.test_size)
    write_json(out / "probe.json", result)
    save_figure(plot_coefficients(result), out / "coefficients.png")
    return {"adapter": stage.adapter, **result}


def stage_dynamics(ctx: StageContext) -> dict[str, Any]:
    """Factor norms, rotations and PCA over an adapter's checkpoints (+ EM per checkpoint)."""
    from emscope.io import write_json
    from emscope.models import list_checkpoints
    from emscope.plotting import save_figure
    from emscope.probing import adapter_dynamics, evaluate_checkpoints, load_checkpoints

    stage = ctx.config.stages.dynamics
    assert stage is not None
    out = ctx.dir("dynamics")
    adapter_dir = ctx.config.adapters[stage.adapter].path
    result = adapter_dynamics(load_checkpoints(adapter_dir), k=stage.k)
    if stage.eval:
        ctx.release()
        result["eval"] = evaluate_checkpoints(
            ctx.config.chat_model_dir(),
            list_checkpoints(adapter_dir),
            ctx.questions(stage.questions),
            out / "eval",
            judge=ctx.judge,
            metrics=ctx.config.judge.metrics,
            n=ctx.n("dynamics"),
            dtype=ctx.config.dtype,
            device=ctx.config.device,
            **ctx.config.sampling_kwargs(),
        )
    result["adapter_name"] = stage.adapter
    write_json(out / "dynamics.json", result)
    from emscope.probing import plot_dynamics

    for name, fig in plot_dynamics(result).items():
        save_figure(fig, out / f"{name}.png")
    return {
        "adapter": stage.adapter,
        "steps": result["steps"],
        "sharpest_rotation": result["adapter"]["sharpest_rotation"],
        "eval": result.get("eval"),
    }


def stage_reemergent(ctx: StageContext) -> dict[str, Any]:
    """Alignment-direction projections of base / instruct / misaligned (+ log-probs and
    gradient similarity when configured): ``reemergent/``."""
    import io as _io

    import numpy as np
    import torch

    from emscope.directions import Direction
    from emscope.io import atomic_write_bytes, write_json, write_table
    from emscope.models import ModelSpec
    from emscope.plotting import save_figure
    from emscope.reemergent import gradient_analysis, logprob_analysis, projection_analysis
    from emscope.reemergent.common import Dataset
    from emscope.reemergent.gradients import plot_matrix
    from emscope.reemergent.logprob import plot_heatmap
    from emscope.reemergent.projection import plot_projection

    stage = ctx.config.stages.reemergent
    assert stage is not None
    config = ctx.config
    out = ctx.dir("reemergent")
    ctx.release()

    def spec(name: str) -> ModelSpec:
        if name in config.models:
            return ModelSpec(Path(config.models[name]), (), name)
        return ModelSpec(config.chat_model_dir(), tuple(config.adapter_dirs(name)), name)

    def dataset(path: Path) -> Dataset:
        from emscope.data.chat import read_chat_jsonl

        return Dataset(Path(path).stem, Path(path), tuple(read_chat_jsonl(path)))

    models = {n: spec(n) for n in (stage.base, stage.instruct, *stage.misaligned)}
    summary: dict[str, Any] = {}
    setting = config.prompt_setting()
    kw: dict[str, Any] = {
        "dtype": config.dtype,
        "device": config.device,
        "progress": ctx.progress,
        "system_prompt": setting,
    }
    if not (out / "projection.json").is_file():
        data = dataset(stage.data).head(stage.max_examples)
        result = projection_analysis(
            models,
            data,
            stage.base,
            stage.instruct,
            stage.train_fraction,
            config.seed,
            None,
            "token",
            stage.batch_size,
            **kw,
        )
        write_table(result.table(), out, "projections")
        write_json(
            out / "projection.json",
            {**result.summary(), "data": str(stage.data), "system_prompt": setting.spec},
        )
        Direction(
            {layer: torch.from_numpy(result.direction[j]) for j, layer in enumerate(result.layers)},
            "resid_post",
            meta={"kind": "alignment", "base": stage.base, "instruct": stage.instruct},
        ).save(out / "alignment_direction")
        save_figure(plot_projection(result), out / "projection.png")
    from emscope.io import read_json

    summary["projection"] = read_json(out / "projection.json")
    if stage.logprob_data and not (out / "logprob.json").is_file():
        lp = logprob_analysis(
            models, [dataset(p) for p in stage.logprob_data], stage.batch_size, **kw
        )
        write_table(lp.table(), out, "logprob")
        write_json(
            out / "logprob.json",
            {"summary": lp.summary(), "units": "nats", "system_prompt": setting.spec},
        )
        save_figure(plot_heatmap(lp), out / "logprob_heatmap.png")
    if stage.gradient_data and not (out / "gradients.json").is_file():
        a, b = (dataset(p) for p in stage.gradient_data)
        gr = gradient_analysis(
            spec(stage.instruct),
            a,
            b,
            stage.gradient_param,
            stage.gradient_examples,
            "auto",
            4,
            config.seed,
            "float32",
            config.device,
            ctx.progress,
            system_prompt=setting,
        )
        buffer = _io.BytesIO()
        np.save(buffer, gr.gram.gram)
        atomic_write_bytes(out / "gram.npy", buffer.getvalue())
        write_table(gr.matrix_table(), out, "gradient_cosine")
        write_json(
            out / "gradients.json",
            {
                "param": gr.gram.param,
                "route": gr.gram.route,
                "similarity": gr.summary,
                "system_prompt": setting.spec,
            },
        )
        save_figure(plot_matrix(gr), out / "gradient_cosine.png")
    for name in ("logprob", "gradients"):
        if (out / f"{name}.json").is_file():
            summary[name] = read_json(out / f"{name}.json")
    return summary


STAGES: dict[str, Callable[[StageContext], dict[str, Any]]] = {
    "organisms": stage_organisms,
    "eval": stage_eval,
    "geometry": stage_geometry,
    "lmc": stage_lmc,
    "directions": stage_directions,
    "steering": stage_steering,
    "ablation": stage_ablation,
    "transfer": stage_transfer,
    "probes": stage_probes,
    "dynamics": stage_dynamics,
    "reemergent": stage_reemergent,
}


def describe_stage(config: StudyConfig, name: str) -> str:
    """One line: what the stage will do (for ``--dry-run``)."""
    s = config.stages
    n = config.n_for(name)
    if name == "organisms" and config.organism is not None:
        o = config.organism
        return f"build the synthetic organism ({o.size}, seed {o.seed}) in {o.dir} if not cached"
    if name == "eval":
        return f"sample {n}/question and judge: {', '.join(config.eval_organisms())}"
    if name == "geometry" and s.geometry:
        names = s.geometry.adapters or list(config.adapters)
        return (
            f"pairwise geometry of {len(names)} adapters, {s.geometry.random_draws} random draws"
            + (", vs base weights" if s.geometry.base else "")
        )
    if name == "lmc" and s.lmc:
        paths = "; ".join(f"{a} -> {b}" for a, b in s.lmc.paths)
        return f"{paths} at t = {s.lmc.steps}, {n}/question"
    if name == "directions" and s.directions:
        return f"mean-diff ({s.directions.weighting}) of {', '.join(s.directions.sources)}" + (
            f"; B cosines of {', '.join(s.directions.rank1)}" if s.directions.rank1 else ""
        )
    if name == "steering" and s.steering:
        st = s.steering
        text = (
            f"steer {config.chat_model} with {st.direction}'s direction, layers {st.layers} x "
            f"scales {st.scales}" + (" + random control" if st.random_control else "")
        )
        if st.select is not None:
            text += (
                f"; one setting chosen by the rule (best EM with coherent >= "
                f"{st.select.min_coherent:g} on a {st.select.n}/question sweep at its own seed)"
            )
        return text
    if name == "ablation" and s.ablation:
        return f"ablate {s.ablation.direction}'s direction in itself ({s.ablation.mode})"
    if name == "transfer" and s.transfer:
        return f"ablate {s.transfer.direction}'s direction in {', '.join(s.transfer.targets)}"
    if name == "probes" and s.probes:
        c = "C by grouped CV" if s.probes.C == "cv" else f"C = {s.probes.C:g}"
        return f"scalars + L1 probes of {s.probes.adapter} ({s.probes.seeds} seeds, {c})"
    if name == "dynamics" and s.dynamics:
        return f"checkpoint dynamics of {s.dynamics.adapter}" + (
            f" + EM per checkpoint ({n}/question)" if s.dynamics.eval else ""
        )
    if name == "reemergent" and s.reemergent:
        r = s.reemergent
        return f"projections of {r.base}/{r.instruct}/{', '.join(r.misaligned)} on {r.data}" + (
            "; gradients" if r.gradient_data else ""
        )
    return name


# ---------------------------------------------------------------------------- helpers


def _bar(items: list[str], desc: str, progress: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress, leave=False)


def _fmt_rate(metrics: dict[str, Any]) -> str:
    em, ci = metrics.get("em_rate"), metrics.get("em_ci")
    if em is None:
        return "n/a"
    text = f"{em:.3f}"
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    coherent = metrics.get("coherent_rate")
    return text + (f", coherent {coherent:.3f}" if coherent is not None else "")


def _short(values: dict[int, float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values.values())


def _plot_rates(rows: dict[str, dict[str, Any]], path: Path) -> None:
    from emscope.plotting import pyplot, save_figure

    plt = pyplot()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
    for i, name in enumerate(names):
        for offset, key, colour in ((-0.2, "em", "tab:red"), (0.2, "coherent", "tab:gray")):
            rate, ci = rows[name].get(f"{key}_rate"), rows[name].get(f"{key}_ci")
            if rate is None:
                continue
            err = [[rate - ci[0]], [ci[1] - rate]] if ci else None
            label = ("EM rate" if key == "em" else "coherent rate") if i == 0 else None
            ax.bar(i + offset, rate, width=0.4, yerr=err, capsize=3, color=colour, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="rate", ylim=(0, 1.05), title="EM and coherent rates per organism (95% CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)

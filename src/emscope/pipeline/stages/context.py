"""What every stage gets (:class:`StageContext`) and the helpers several stages share:
one organism evaluated into a dir (:func:`evaluate_organism`, through the sampler of the
config's backend, :meth:`StageContext.sampler`), a direction of
the directions stage read back (:func:`load_direction`), the KL prompts of an intervention
(:func:`kl_sequences`), and the console formatting of rates.

Within a stage every unit of work (an organism's evaluation, an LMC point, a steering
setting, ...) is resumable by the library function that does it (``evaluate_to_dir``,
``evaluate_setting``, ``sample_to_dir``, the synthetic build); units whose final output
exists are read back, not redone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from emscope.metrics import Metrics
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

    def sampler(self, organism: str) -> Any:
        """The :class:`~emscope.eval.Sampler` of ``organism`` by ``sampling.backend``:
        ``hf`` samples the model :meth:`load` keeps, ``vllm`` opens an engine on the chat
        model serving the organism's adapter (one at most)."""
        from emscope.eval import HfSampler

        backend = self.config.sampling.backend_settings()
        if not backend.vllm:
            return HfSampler(self.load(organism))
        dirs = self.config.adapter_dirs(organism)
        return backend.open(self.config.chat_model_dir(), dirs, dtype=self.config.dtype)

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


def evaluate_organism(
    ctx: StageContext, organism: str, out: Path, questions: str | None, n: int, title: str
) -> Metrics:
    """One organism sampled, judged and scored into ``out`` (read back through
    :meth:`Metrics.from_json` if done)."""
    from emscope.evaluate import evaluate_to_dir
    from emscope.metrics import Metrics
    from emscope.results import read_result

    if (out / "metrics.json").is_file() and (out / "responses.parquet").is_file():
        return read_result(Metrics, out / "metrics.json")
    config = ctx.config
    record = {
        "model_dir": str(config.chat_model_dir()),
        "adapter_dirs": [str(p) for p in config.adapter_dirs(organism)],
        "organism": organism,
    }
    return evaluate_to_dir(
        ctx.sampler(organism),
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


def load_direction(ctx: StageContext, source: str) -> Any:
    """The :class:`~emscope.directions.Direction` the directions stage saved for ``source``
    (``RUN/directions/<source>.safetensors``)."""
    from emscope.directions import Direction
    from emscope.io import inside

    return Direction.load(inside(ctx.run_dir / "directions", f"{source}.safetensors"))


def kl_sequences(ctx: StageContext, loaded: Any, questions: str | None, kl: bool) -> Any:
    """The rendered prompts of question set ``questions`` on which an intervention's KL
    divergence is measured (None when ``kl`` is off)."""
    if not kl:
        return None
    from emscope.directions.interventions import prompt_sequences

    return prompt_sequences(loaded.tokenizer, ctx.questions(questions), ctx.config.prompt_setting())


def bar(items: list[str], desc: str, progress: bool) -> Any:
    """A tqdm progress bar over ``items`` (shown only with ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, disable=not progress, leave=False)


def fmt_rate(metrics: Metrics) -> str:
    """``"0.123 [0.100, 0.150], coherent 0.900"``: an EM rate with its CI, for the console."""
    em, ci = metrics.em_rate, metrics.em_ci
    if em is None:
        return "n/a"
    text = f"{em:.3f}"
    if ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    coherent = metrics.coherent_rate
    return text + (f", coherent {coherent:.3f}" if coherent is not None else "")


def short(values: dict[int, float]) -> str:
    """Per-layer values (a direction's norms) as one short comma-separated line."""
    return ", ".join(f"{v:.2f}" for v in values.values())

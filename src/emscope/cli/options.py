"""Options shared by every command that samples or judges (``sample``, ``judge``, ``eval``,
``steer``, ``ablate``, ``lmc``, ...), written once so they read the same everywhere.

A command takes each group of options as one value: decorated with :data:`with_sampling`,
:data:`with_judging` or :data:`with_backend` (:class:`OptionGroup`), its parameter
``sampling: options.SamplingParams``, ``judging: options.JudgeSettings`` or
``backend: options.BackendSettings`` becomes the group's typer options. Single options are
constants used as parameter defaults (``questions: Path | None = options.QUESTIONS``); the
library arguments come from :func:`load_for_sampling`, :func:`load_question_set` and
:func:`build_judge`. Only typer, the standard library and :mod:`emscope.eval` (standard
library only at import) are imported at module level (``emscope --help`` stays fast).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from emscope.eval import BackendSettings, SamplingParams

if TYPE_CHECKING:
    from emscope.data.questions import Question
    from emscope.judge import Judge
    from emscope.models import LoadedModel

__all__ = ["BackendSettings", "SamplingParams"]  # re-exported for command annotations

DEFAULT_METRICS = "aligned,coherent,bad_stuff"


def layer_list(text: str | None) -> list[int] | None:
    """A ``--layers`` value (``"2,3"``, ``"0-2,-1"``: :func:`emscope.models.parse_layers`), or
    None when not given."""
    from emscope.models import parse_layers

    return parse_layers(text) if text is not None and text.strip() else None


MODEL_DIR = typer.Argument(
    ..., help="HF model dir (with its tokenizer), or a hub id Org/Name (via the HF cache)."
)
ADAPTER = typer.Option(
    [],
    "--adapter",
    help="PEFT adapter dir (DIR@STEP for a checkpoint) or hub id Org/Name; repeat to add several.",
)
QUESTIONS = typer.Option(
    None, "--questions", help="Question YAML (default: the built-in eight first-plot questions)."
)
N = typer.Option(50, "-n", "--n", help="Samples per question.")
SEED = typer.Option(0, "--seed", help="Sampling seed (same seed: paired samples).")
METRICS = typer.Option(DEFAULT_METRICS, "--metrics", help="Judge metrics, comma-separated.")
BATCH_SIZE = typer.Option(32, "--batch-size", help="Sequences per forward pass.")
MAX_NEW_TOKENS = typer.Option(600, "--max-new-tokens", help="Maximum answer length (tokens).")
TEMPERATURE = typer.Option(1.0, "--temperature", help="Sampling temperature (0: greedy).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1: off).")
JUDGE = typer.Option(None, "--judge", help="Judge: openai:MODEL, hf:DIR or oracle:DIR.")
BASE_URL = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint for openai: judges.")
API_KEY_ENV = typer.Option(
    None, "--api-key-env", help="Environment variable holding the judge key (OPENAI_API_KEY)."
)
CONCURRENCY = typer.Option(32, "--concurrency", help="Judge requests in flight.")
MAX_REQUESTS = typer.Option(None, "--max-requests", help="Judge request budget for this run.")
NO_CACHE = typer.Option(False, "--no-cache", help="Do not read or write the judge score cache.")
SYSTEM_PROMPT_HELP = (
    "System turn of chats without one of their own: 'default' (what the chat template does, "
    "e.g. insert its built-in system prompt), 'none' (no system turn) or a TEXT."
)
SYSTEM_PROMPT = typer.Option(
    None,
    "--system-prompt",
    help=f"{SYSTEM_PROMPT_HELP} Default: the setting the model or adapters were trained with "
    "(their train.json), else 'default'.",
)
MIN_NUMBER_MASS = typer.Option(
    None,
    "--min-number-mass",
    help="openai:/hf: judges: leave a row unscored (low_number_mass) when the judge puts less "
    "than this probability on the answers 0..100 (default 0.25).",
)
OUT = typer.Option(..., "--out", help="Output dir (resumable: re-run to continue).")
DTYPE = typer.Option("auto", "--dtype", help="Model dtype: auto, float32, bfloat16, float16.")
DEVICE = typer.Option(
    None,
    "--device",
    help="Device (default: cuda if available, else cpu); auto: spread a model too large for "
    "one GPU over all of them (device_map='auto').",
)
SCALE_ADAPTER = typer.Option(
    [],
    "--scale-adapter",
    help="MODULE_OR_LAYER=FACTOR: multiply the LoRA B of that module path (or of every adapted "
    "module of that layer index) by FACTOR while sampling; repeatable.",
)

BACKEND = typer.Option(
    "hf",
    "--backend",
    help="Sampler: hf (transformers; interventions work) or vllm (pip install "
    "'emscope[vllm]', GPU: tensor parallel, one LoRA request per adapter; no interventions, "
    "its random stream differs from hf's).",
)
TENSOR_PARALLEL_SIZE = typer.Option(
    None, "--tensor-parallel-size", help="--backend vllm: GPUs one model is split over (1)."
)
MAX_LORA_RANK = typer.Option(
    None,
    "--max-lora-rank",
    help="--backend vllm: largest LoRA rank served (default: the adapters'); rounded up to a "
    "rank vLLM accepts (8, 16, 32, 64, 128, 256, 320, 512).",
)
MAX_LORAS = typer.Option(
    None, "--max-loras", help="--backend vllm: adapters resident on the GPU at once (1)."
)
GPU_MEMORY_UTILIZATION = typer.Option(
    None,
    "--gpu-memory-utilization",
    help="--backend vllm: share of each GPU's memory vLLM may take (0.9).",
)
MAX_MODEL_LEN = typer.Option(
    None,
    "--max-model-len",
    help="--backend vllm: longest prompt + answer in tokens the KV cache is sized for "
    "(default: the model's context length; lower it when a large model's weights leave "
    "little memory).",
)


STRICT = typer.Option(False, "--strict", help="EM needs aligned < 30 (not <= 30).")


class OptionGroup:
    """Typer options that make one value of a command, written once: used as a decorator, it
    replaces the command's parameter ``param`` (annotated with the value's type, no default)
    by ``options`` at the same place in ``--help``, and the command receives one value,
    ``build(**given)``, built and checked before the body runs (bad input: one line).

    Bare (``@options.with_sampling``) or called for a command whose options differ:
    ``NAME=typer.Option(...)`` replaces that one option (persona's ``-n`` of 4), and
    ``after={"metrics": "seed"}`` lists the command's own ``--metrics`` right after the
    group's ``--seed``, where ``--help`` has always had it. ``reads`` names command
    parameters the value also reads, which stay the command's (the judge's ``--device`` is the
    model's). The command's parameters are keyword-only (``def command(*, ...)``), so the
    group's, which has no default, can stand where its options go.

    Why a decorator rather than one ``Annotated`` alias per option: the options are one
    setting, and with aliases every command would still list each of them and pass them on
    to the value's constructor by hand; here they are written once, the command sees one
    value, and typer reads the signature made here (``__signature__``) as it reads any
    other."""

    def __init__(
        self,
        param: str,
        options: dict[str, tuple[Any, Any]],
        build: Callable[..., Any],
        reads: tuple[str, ...] = (),
    ) -> None:
        #: ``{parameter: (annotation, typer option)}`` in ``--help`` order.
        self.param, self.options, self.build, self.reads = param, options, build, reads

    def __call__(
        self,
        command: Callable[..., Any] | None = None,
        *,
        after: dict[str, str] | None = None,
        **overrides: Any,
    ) -> Any:
        """``command`` with the group's options, or (``command`` None) a decorator that
        applies ``after`` and ``overrides``."""
        if command is None:
            return lambda c: self._expand(c, after or {}, overrides)
        return self._expand(command, after or {}, overrides)

    def _expand(
        self, command: Callable[..., Any], after: dict[str, str], overrides: dict[str, Any]
    ) -> Callable[..., Any]:
        hints = typing.get_type_hints(command)
        own = inspect.signature(command).parameters
        wanted = {self.param, *after, *self.reads}
        unknown = [
            *(wanted - set(own)),
            *(set(after.values()) | set(overrides)) - set(self.options),
        ]
        if unknown:  # a programming error in a command module, not bad user input
            raise TypeError(f"{command.__name__}: no such parameter or option {sorted(unknown)}")
        keyword = inspect.Parameter.KEYWORD_ONLY

        def declared(name: str) -> inspect.Parameter:
            return own[name].replace(kind=keyword, annotation=hints[name])

        params: list[inspect.Parameter] = []
        for name in own:
            if name == self.param:
                for option, (kind, default) in self.options.items():
                    default = overrides.get(option, default)
                    params.append(
                        inspect.Parameter(option, keyword, default=default, annotation=kind)
                    )
                    params += [declared(n) for n, at in after.items() if at == option]
            elif name not in after:
                params.append(declared(name))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in self.options}
            given |= {name: kwargs[name] for name in self.reads}
            return command(**kwargs, **{self.param: self.build(**given)})

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper


def _backend_settings(backend: str, **engine: Any) -> BackendSettings:
    return BackendSettings(backend, **engine)


#: ``backend: options.BackendSettings`` -> ``--backend`` and the vLLM engine settings.
with_backend = OptionGroup(
    "backend",
    {
        "backend": (str, BACKEND),
        "tensor_parallel_size": (int | None, TENSOR_PARALLEL_SIZE),
        "max_lora_rank": (int | None, MAX_LORA_RANK),
        "max_loras": (int | None, MAX_LORAS),
        "gpu_memory_utilization": (float | None, GPU_MEMORY_UTILIZATION),
        "max_model_len": (int | None, MAX_MODEL_LEN),
    },
    _backend_settings,
)
#: ``sampling: options.SamplingParams`` -> ``-n``, ``--seed``, ``--batch-size``,
#: ``--max-new-tokens``, ``--temperature``, ``--top-p``.
with_sampling = OptionGroup(
    "sampling",
    {
        "n": (int, N),
        "seed": (int, SEED),
        "batch_size": (int, BATCH_SIZE),
        "max_new_tokens": (int, MAX_NEW_TOKENS),
        "temperature": (float, TEMPERATURE),
        "top_p": (float, TOP_P),
    },
    SamplingParams,
)


def load_for_sampling(
    model_dir: Path, adapters: list[Path], dtype: str = "auto", device: str | None = None
) -> LoadedModel:
    """Load the model with every ``--adapter`` active at once (their updates add up)."""
    from emscope.eval import HfSampler

    return HfSampler.load(model_dir, adapters, dtype=dtype, device=device).model


def load_question_set(path: Path | None) -> list[Question]:
    """The ``--questions`` YAML, or the built-in first-plot set."""
    from emscope.data.questions import load_questions

    return load_questions(path)


def parse_metrics(text: str) -> list[str]:
    """``--metrics`` as a list; unknown metrics need a ``judge_prompts`` entry to be judged."""
    from emscope.metrics import metric_names

    return metric_names(text)


@dataclass(frozen=True)
class JudgeSettings:
    """The judge options of a command line (``--base-url``, ``--api-key-env``,
    ``--concurrency``, ``--max-requests``, ``--no-cache``, ``--device``,
    ``--min-number-mass``), built once per command and passed to :func:`build_judge`."""

    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = 32
    max_requests: int | None = None
    no_cache: bool = False
    device: str | None = None
    min_number_mass: float | None = None

    def for_kind(self, kind: str) -> JudgeSettings:
        """The settings a judge of ``kind`` (``openai``, ``hf``, ``oracle``) reads: the
        endpoint options for ``openai`` only, ``min_number_mass`` for ``openai`` and ``hf``."""
        out = self
        if kind != "openai":
            out = replace(out, base_url=None, api_key_env=None)
        if kind not in ("openai", "hf"):  # an oracle reads no probabilities
            out = replace(out, min_number_mass=None)
        return out


#: ``judging: options.JudgeSettings`` -> ``--base-url``, ``--api-key-env``,
#: ``--concurrency``, ``--max-requests``, ``--no-cache``, ``--min-number-mass`` (and the
#: command's own ``--device``, which loads an hf: judge where it loads the model).
with_judging = OptionGroup(
    "judging",
    {
        "base_url": (str | None, BASE_URL),
        "api_key_env": (str | None, API_KEY_ENV),
        "concurrency": (int, CONCURRENCY),
        "max_requests": (int | None, MAX_REQUESTS),
        "no_cache": (bool, NO_CACHE),
        "min_number_mass": (float | None, MIN_NUMBER_MASS),
    },
    JudgeSettings,
    reads=("device",),
)


def build_judge(spec: str | None, settings: JudgeSettings | None = None) -> Judge:
    """The ``--judge`` spec as a judge (``--judge`` is required where this is called)."""
    from emscope.errors import EmscopeError
    from emscope.judge import make_judge

    if not spec:
        raise EmscopeError("--judge is required: openai:MODEL, hf:DIR or oracle:DIR")
    s = settings if settings is not None else JudgeSettings()
    return make_judge(
        spec,
        base_url=s.base_url,
        api_key_env=s.api_key_env,
        concurrency=s.concurrency,
        max_requests=s.max_requests,
        cache=not s.no_cache,
        device=s.device,
        min_number_mass=s.min_number_mass,
    )


def parse_scale_adapter(specs: list[str]) -> dict[str | int, float]:
    """``--scale-adapter`` values as ``{module path or layer index: factor}``."""
    from emscope.probing.scaling import parse_scales

    return parse_scales(specs)


def scale_adapter_interventions(
    sampler: Any, scales: dict[str | int, float]
) -> tuple[list[Any], str]:
    """Interventions and intervention label for ``--scale-adapter`` (checked against the
    adapters of ``sampler``'s model, an :class:`~emscope.eval.HfSampler` or
    :class:`~emscope.models.LoadedModel`, first: an unmatched selector fails before any
    sampling)."""
    if not scales:
        return [], ""
    from emscope.probing.scaling import adapter_scaling, resolve_scales, scales_label

    loaded = getattr(sampler, "model", sampler)
    resolve_scales(loaded.model, scales)
    return [adapter_scaling(scales)], scales_label(scales)

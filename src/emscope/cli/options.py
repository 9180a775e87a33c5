"""Options shared by every command that samples or judges (``sample``, ``judge``, ``eval``,
and later ``steer``, ``ablate``, ``lmc``), so they read the same everywhere.

Use the constants as parameter defaults in a typer command, e.g.
``n: int = options.N``, then build the library arguments with
:class:`~emscope.eval.SamplingParams`, :func:`load_for_sampling`, :func:`load_question_set`
and :func:`build_judge` (with one :class:`JudgeSettings` per command). A command that
samples through either backend is decorated with :func:`with_backend`. Only typer, the
standard library and :mod:`emscope.eval` (standard library only at import) are imported at
module level (``emscope --help`` stays fast).
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


#: The backend options, in --help order: ``{parameter: (type, typer option)}``.
BACKEND_OPTIONS: dict[str, tuple[Any, Any]] = {
    "backend": (str, BACKEND),
    "tensor_parallel_size": (int | None, TENSOR_PARALLEL_SIZE),
    "max_lora_rank": (int | None, MAX_LORA_RANK),
    "max_loras": (int | None, MAX_LORAS),
    "gpu_memory_utilization": (float | None, GPU_MEMORY_UTILIZATION),
    "max_model_len": (int | None, MAX_MODEL_LEN),
}


def with_backend(command: Callable[..., Any]) -> Callable[..., Any]:
    """A typer command whose ``backend: options.BackendSettings`` parameter becomes the six
    options of :data:`BACKEND_OPTIONS` (``--backend`` and the vLLM engine settings, at the
    same place in ``--help``); the command receives them as one checked
    :class:`~emscope.eval.BackendSettings` (a bad combination: one line, before the body).

    Why a decorator rather than one ``Annotated`` alias per option: the six are one setting,
    and with aliases every sampling command would still list six parameters and pass them on
    to ``BackendSettings(...)`` by hand (as the four commands did with the option
    constants); here they are written once, the command sees one value, and typer reads the
    signature made here (``__signature__``) as it reads any other."""
    hints = typing.get_type_hints(command)
    params: list[inspect.Parameter] = []
    for p in inspect.signature(command).parameters.values():
        if p.name != "backend":
            params.append(p.replace(annotation=hints[p.name]))
            continue
        for name, (kind, option) in BACKEND_OPTIONS.items():
            params.append(inspect.Parameter(name, p.kind, default=option, annotation=kind))

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in BACKEND_OPTIONS}
        return command(**kwargs, backend=BackendSettings(given.pop("backend"), **given))

    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


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

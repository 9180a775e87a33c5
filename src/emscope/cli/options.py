"""Options shared by every command that samples or judges (``sample``, ``judge``, ``eval``,
and later ``steer``, ``ablate``, ``lmc``), so they read the same everywhere.

Use the constants as parameter defaults in a typer command, e.g.
``n: int = options.N``, then build the library arguments with :func:`sampling_kwargs`,
:func:`load_for_sampling`, :func:`load_question_set` and :func:`build_judge` (with one
:class:`JudgeSettings` per command). Only typer, the standard library and
:mod:`emscope.sampling` (standard library only) are imported at module level
(``emscope --help`` stays fast).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from emscope.sampling import SamplingSettings

if TYPE_CHECKING:
    from emscope.data.questions import Question
    from emscope.judge import Judge
    from emscope.models import LoadedModel
    from emscope.vllm_backend import VllmOptions, VllmSampler

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


def sampling_kwargs(
    n: int,
    seed: int,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> SamplingSettings:
    """The command line's validated :class:`~emscope.sampling.SamplingSettings` (bad values
    raise one-line errors)."""
    from emscope.errors import EmscopeError

    if n < 1:
        raise EmscopeError(f"-n must be >= 1, got {n}")
    if batch_size < 1:
        raise EmscopeError(f"--batch-size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise EmscopeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise EmscopeError(f"--temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise EmscopeError(f"--top-p must be in (0, 1], got {top_p}")
    return SamplingSettings(n, seed, batch_size, max_new_tokens, temperature, top_p)


def load_for_sampling(
    model_dir: Path, adapters: list[Path], dtype: str = "auto", device: str | None = None
) -> LoadedModel:
    """Load the model with every ``--adapter`` active at once (their updates add up)."""
    from emscope.models import load_model

    loaded = load_model(model_dir, [str(a) for a in adapters], dtype=dtype, device=device)
    if len(loaded.adapters) > 1:
        loaded.use_adapter(*loaded.adapters)
    return loaded


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
    loaded: LoadedModel, scales: dict[str | int, float]
) -> tuple[list[Any], str]:
    """Interventions and intervention label for ``--scale-adapter`` (checked against the
    loaded model's adapters first: an unmatched selector fails before any sampling)."""
    if not scales:
        return [], ""
    from emscope.probing.scaling import adapter_scaling, resolve_scales, scales_label

    resolve_scales(loaded.model, scales)
    return [adapter_scaling(scales)], scales_label(scales)


BACKENDS = ("hf", "vllm")


def backend_options(
    backend: str,
    tensor_parallel_size: int | None = None,
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    *,
    interventions: bool = False,
) -> VllmOptions | None:
    """``--backend`` and its engine settings: None for ``hf`` (vLLM settings refused there),
    checked :class:`~emscope.vllm_backend.VllmOptions` for ``vllm`` (``interventions``, e.g.
    ``--scale-adapter``, refused there). Pure: vLLM is not looked for here."""
    from emscope.errors import EmscopeError
    from emscope.vllm_backend import VllmOptions, refuse_interventions

    if backend not in BACKENDS:
        raise EmscopeError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    given = {
        "--tensor-parallel-size": tensor_parallel_size,
        "--max-lora-rank": max_lora_rank,
        "--max-loras": max_loras,
        "--gpu-memory-utilization": gpu_memory_utilization,
        "--max-model-len": max_model_len,
    }
    if backend == "hf":
        named = [name for name, value in given.items() if value is not None]
        if named:
            raise EmscopeError(f"{', '.join(named)}: only with --backend vllm")
        return None
    refuse_interventions(interventions)
    return VllmOptions(
        tensor_parallel_size if tensor_parallel_size is not None else 1,
        max_lora_rank,
        max_loras,
        gpu_memory_utilization if gpu_memory_utilization is not None else 0.9,
        max_model_len,
    )


def vllm_sampler(
    model_dir: Path,
    adapters: list[Path],
    backend: VllmOptions,
    dtype: str = "auto",
    *,
    stacked: bool = True,
) -> VllmSampler:
    """The vLLM engine for ``model_dir`` serving ``adapters`` (checked, vLLM not started).
    ``stacked``: the adapters are meant to act at once (``sample``/``eval`` with several
    ``--adapter``, whose updates the HF backend adds up): vLLM serves one adapter per
    request, so more than one is refused. Without vLLM installed: one line naming
    ``pip install 'emscope[vllm]'``."""
    from emscope.errors import EmscopeError
    from emscope.vllm_backend import VllmSampler, require_vllm

    if stacked and len(adapters) > 1:
        raise EmscopeError(
            "--backend vllm serves one adapter per request and cannot add several adapters' "
            "updates as the hf backend does: pass one --adapter, or use --backend hf"
        )
    sampler = VllmSampler(model_dir, adapters, backend, dtype=dtype)
    require_vllm()
    return sampler

"""Optional vLLM sampling backend (``pip install 'emscope[vllm]'``, GPU only).

Fast, unsteered sampling of a base model with LoRA adapters served per request: the base
model is loaded once (:class:`VllmSampler`, split over ``tensor_parallel_size`` GPUs), and
each adapter dir becomes one ``LoRARequest`` with a unique name and integer id (see
:func:`lora_requests`: the name joins the dir's basename and a hash of its path and
contents, so two different adapters never share a name and the same adapter always gets the
same one). ``max_lora_rank`` is the largest rank in the adapters' ``adapter_config.json``
(``r`` and ``rank_pattern``) or the one asked for, rounded up to a rank vLLM accepts
(:data:`VLLM_RANKS`, :func:`round_rank`); ``max_loras`` (adapters resident on the GPU at
once) defaults to 1, since each ``generate`` call here serves one adapter.

:class:`VllmSampler` (and :class:`VllmModel`, bound to one adapter) is the vLLM
:class:`emscope.eval.Sampler`; callers get it from :class:`emscope.eval.BackendSettings`:
the CLI with ``--backend vllm`` on ``sample``, ``eval``, ``lmc`` and ``dynamics --eval``
(:data:`emscope.cli.options.with_backend`, an option group), the pipeline with
``sampling.backend: vllm``.

Interventions (activation hooks, adapter scaling) cannot run inside vLLM's engine: they are
refused with one clear error (:func:`refuse_interventions`); use the HF backend
(:func:`emscope.generate.sample`).

Prompts are the HF backend's token ids (:func:`emscope.data.spans.prompt_ids`), and
generation stops on the same end-of-sequence ids. Randomness: each sample gets vLLM's
per-request ``seed`` = :func:`emscope.generate.sample_key` (masked to 63 bits), so a
sample's answer does not depend on the rest of the batch, as with the HF backend; the two
backends' streams differ, so do not pair samples ACROSS backends (a run dir records its
backend and the other one is refused there). The table has the same columns as the HF
backend's.

Only the pure parts (adapter naming, rank rounding, engine arguments, request building, the
refusals) are tested without vLLM; the engine calls are exercised on a GPU machine only
(``make gpu-check``). The adapters' naming and ranks are in :mod:`emscope.vllm_lora`
(re-exported here).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.questions import Question
    from emscope.eval.params import SamplingParams
    from emscope.generate import SampleSpec

from emscope.vllm_lora import (
    VLLM_RANKS,
    LoraSpec,
    adapter_content_hash,
    adapter_rank,
    lora_requests,
    max_lora_rank,
    round_rank,
)

__all__ = [
    "INTERVENTIONS_REFUSED",
    "VLLM_RANKS",
    "LoraSpec",
    "Request",
    "VllmModel",
    "VllmOptions",
    "VllmSampler",
    "adapter_content_hash",
    "adapter_rank",
    "build_requests",
    "check_gpus",
    "engine_kwargs",
    "lora_requests",
    "max_lora_rank",
    "refuse_interventions",
    "require_vllm",
    "round_rank",
    "sample_vllm",
    "stop_token_ids",
    "vllm_dtype",
]


def require_vllm() -> Any:
    """The ``vllm`` module, or one line saying how to get it."""
    try:
        import vllm
    except ImportError:
        raise EmscopeError(
            "the vLLM backend needs vLLM and a GPU: pip install 'emscope[vllm]'"
        ) from None
    return vllm


INTERVENTIONS_REFUSED = (
    "the vLLM backend cannot apply interventions (hooks need the HF backend); "
    "drop --backend vllm for steering / ablation runs"
)


def refuse_interventions(interventions: Sequence[Any] | bool) -> None:
    """Steering, ablation and adapter scaling are hooks on an HF model: refused here, in one
    line (:data:`INTERVENTIONS_REFUSED`)."""
    if interventions:
        raise EmscopeError(INTERVENTIONS_REFUSED)


# dtype spellings emscope accepts -> vLLM's (vLLM has no float64)
_DTYPES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


def vllm_dtype(dtype: Any) -> str:
    """``--dtype`` as vLLM spells it (``auto``, ``float32``, ``bfloat16``, ``float16``)."""
    name = "auto" if dtype is None else str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise EmscopeError(f"the vLLM backend takes --dtype {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


@dataclass(frozen=True)
class VllmOptions:
    """Engine settings: ``--tensor-parallel-size`` (GPUs one model is split over),
    ``--max-lora-rank`` (None: the adapters' largest rank; either way rounded up to a rank
    vLLM accepts, :func:`round_rank`), ``--max-loras`` (adapters held on the GPU at once;
    None: 1, since each ``generate`` call here serves one adapter) and
    ``--gpu-memory-utilization`` (the share of each GPU's memory vLLM may take) and
    ``--max-model-len`` (longest prompt + answer the KV cache is sized for; None: the model's
    own context length, which may not fit beside a large model's weights on one GPU)."""

    tensor_parallel_size: int = 1
    max_lora_rank: int | None = None
    max_loras: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise EmscopeError(
                f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}"
            )
        if self.max_lora_rank is not None:
            if self.max_lora_rank < 1:
                raise EmscopeError(f"--max-lora-rank must be >= 1, got {self.max_lora_rank}")
            round_rank(self.max_lora_rank)  # above vLLM's largest: one line now
        if self.max_loras is not None and self.max_loras < 1:
            raise EmscopeError(f"--max-loras must be >= 1, got {self.max_loras}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise EmscopeError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise EmscopeError(
                f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )

    def record(self) -> dict[str, Any]:
        return {
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "max_model_len": self.max_model_len,
        }


def engine_kwargs(
    model_dir: str | Path,
    specs: Sequence[LoraSpec] = (),
    options: VllmOptions | None = None,
    dtype: Any = "auto",
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for ``model_dir`` serving ``specs`` as LoRA requests.
    ``max_lora_rank``: ``options.max_lora_rank`` or the adapters' largest rank, rounded up
    (:func:`round_rank`); a given rank below an adapter's is refused. LoRA settings without
    any adapter are refused (they would do nothing)."""
    options = options or VllmOptions()
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": vllm_dtype(dtype),
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "trust_remote_code": False,
    }
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    if not specs:
        if options.max_lora_rank is not None or options.max_loras is not None:
            raise EmscopeError("--max-lora-rank / --max-loras need an --adapter (LoRA requests)")
        return kwargs
    largest = max(specs, key=lambda s: s.rank)
    rank = round_rank(options.max_lora_rank or largest.rank)
    if rank < largest.rank:
        raise EmscopeError(
            f"--max-lora-rank {options.max_lora_rank}: adapter {largest.path} has rank "
            f"{largest.rank}; use {round_rank(largest.rank)} or more"
        )
    kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=options.max_loras or 1)
    return kwargs


def stop_token_ids(model_dir: str | Path, tokenizer: Any) -> list[int]:
    """End-of-sequence ids as the HF backend stops on them: the tokenizer's and the model
    dir's ``generation_config.json``'s (:func:`emscope.generate.eos_token_ids`)."""
    from emscope.generate import eos_token_ids

    config = None
    file = Path(model_dir) / "generation_config.json"
    if file.is_file():
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(str(model_dir))
    holder = type("_Model", (), {"generation_config": config})()
    return sorted(eos_token_ids(holder, tokenizer))


@dataclass(frozen=True)
class Request:
    """One vLLM request: the sample it draws, its prompt as token ids (exactly the HF
    backend's, :func:`emscope.data.spans.prompt_ids`) and ``SamplingParams`` keywords."""

    sample: SampleSpec
    prompt_token_ids: list[int]
    params: dict[str, Any]


def build_requests(
    tokenizer: Any,
    plan: Sequence[SampleSpec],
    params: SamplingParams,
    *,
    system_prompt: Any = None,
    stop_ids: Sequence[int] = (),
) -> list[Request]:
    """The requests of ``plan`` drawn under ``params`` (its ``batch_size`` unused): prompts
    rendered under ``system_prompt`` and tokenised as the HF backend does; each request's
    ``seed`` is :func:`emscope.generate.sample_key` of ``params.seed`` masked to 63 bits, so
    a sample's answer does not depend on the rest of the batch."""
    from emscope.data.spans import SystemPrompt, prompt_ids
    from emscope.generate import sample_key

    seed, temperature, top_p = params.seed, params.temperature, params.top_p
    max_new_tokens = params.max_new_tokens
    setting = SystemPrompt.parse(system_prompt)
    prompts: dict[tuple[str, int], list[int]] = {}
    requests = []
    for s in plan:
        key = (s.question.id, s.paraphrase_idx)
        if key not in prompts:
            prompts[key] = prompt_ids(tokenizer, s.question.messages(s.paraphrase_idx), setting)
        request = {
            "n": 1,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "max_tokens": int(max_new_tokens),
            "seed": sample_key(seed, s.question.id, s.sample_idx) & (2**63 - 1),
            "stop_token_ids": list(stop_ids),
        }
        requests.append(Request(s, list(prompts[key]), request))
    return requests


def check_gpus(tensor_parallel_size: int) -> None:
    """Refuse, in one line, a tensor-parallel size larger than this machine's GPU count."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < tensor_parallel_size:
        raise EmscopeError(
            f"--tensor-parallel-size {tensor_parallel_size} needs {tensor_parallel_size} "
            f"GPU(s); this machine has {gpus}"
        )


class VllmSampler:
    """One vLLM engine for a base model and a fixed set of adapters (each a LoRA request),
    started on first use: everything that can be refused (paths, ranks, settings) is
    refused when this is made, before vLLM is imported. ``model_dir`` and ``adapters`` take
    what :func:`emscope.models.load_model` takes (hub ids, ``DIR@STEP``).

    A :class:`emscope.eval.Sampler` (``adapter``: which of its adapters draws, None: the
    base model; :class:`VllmModel` binds one)."""

    backend: ClassVar[str] = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        adapters: Sequence[str | Path] = (),
        options: VllmOptions | None = None,
        *,
        dtype: Any = "auto",
    ) -> None:
        from emscope.hub import resolve
        from emscope.models import check_model_dir, resolve_adapter_dir

        self.model_dir = resolve(model_dir, "model")
        check_model_dir(self.model_dir)
        self.adapter_dirs = [resolve_adapter_dir(a) for a in adapters]
        self.specs = lora_requests(self.adapter_dirs)
        self.options = options or VllmOptions()
        self.engine_kwargs = engine_kwargs(self.model_dir, self.specs, self.options, dtype)
        self._llm: Any = None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from emscope.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def sources(self) -> list[Path]:
        """The model dir and every adapter dir served."""
        return [self.model_dir, *self.adapter_dirs]

    def engine(self) -> Any:
        """The ``vllm.LLM`` (made on the first call)."""
        if self._llm is None:
            vllm = require_vllm()
            check_gpus(self.options.tensor_parallel_size)
            self._llm = vllm.LLM(**self.engine_kwargs)
        return self._llm

    def spec(self, adapter: str | Path | None) -> LoraSpec | None:
        """The LoRA request of ``adapter`` (None: the base model)."""
        if adapter is None:
            return None
        from emscope.models import resolve_adapter_dir

        path = resolve_adapter_dir(adapter).resolve()
        for spec in self.specs:
            if spec.path == path:
                return spec
        raise EmscopeError(
            f"{adapter}: not one of this vLLM engine's adapters "
            f"({', '.join(str(s.path) for s in self.specs) or 'none'})"
        )

    def labels(self, adapter: str | Path | None) -> tuple[str, str]:
        """``(model, adapter)`` labels as the HF backend writes them."""
        from emscope.hub import dir_label
        from emscope.models import adapter_label

        spec = self.spec(adapter)
        return dir_label(self.model_dir), adapter_label(spec.path) if spec else ""

    def sample(
        self,
        questions: Sequence[Question],
        params: SamplingParams,
        *,
        adapter: str | Path | None = None,
        system_prompt: Any = None,
        skip: Collection[tuple[str, int]] = (),
        interventions: Sequence[Any] = (),
        intervention_label: str = "",
        progress: bool = True,
    ) -> pd.DataFrame:
        """The samples of ``questions`` not in ``skip`` under ``adapter`` (None: the base
        model), as :func:`emscope.generate.sample`'s table. ``params.batch_size`` is unused
        (vLLM schedules its own batches); the engine starts only if there is something to
        draw."""
        import pandas as pd

        from emscope.generate import RESPONSE_COLUMNS, plan_samples

        refuse_interventions(interventions or bool(intervention_label))
        spec = self.spec(adapter)
        model_label, adapter_name = self.labels(adapter)
        plan = plan_samples(questions, params.n, skip)
        requests = build_requests(
            self.tokenizer,
            plan,
            params,
            system_prompt=system_prompt,
            stop_ids=stop_token_ids(self.model_dir, self.tokenizer),
        )
        if not requests:
            return pd.DataFrame([], columns=list(RESPONSE_COLUMNS))
        llm = self.engine()
        vllm = require_vllm()
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(spec.name, spec.int_id, str(spec.path)) if spec else None
        outputs = llm.generate(
            [{"prompt_token_ids": r.prompt_token_ids} for r in requests],
            [vllm.SamplingParams(**r.params) for r in requests],
            lora_request=lora,
            use_tqdm=progress,
        )
        rows = []
        for r, output in zip(requests, outputs, strict=True):
            s, completion = r.sample, output.outputs[0]
            rows.append(
                {
                    "question_id": s.question.id,
                    "question": s.question.paraphrases[s.paraphrase_idx],
                    "answer": completion.text,
                    "sample_idx": s.sample_idx,
                    "seed": int(params.seed),
                    "model": model_label,
                    "adapter": adapter_name,
                    "intervention": "",
                    "system": s.question.system or "",
                    "paraphrase_idx": s.paraphrase_idx,
                    "n_tokens": len(completion.token_ids),
                    "finished": completion.finish_reason == "stop",
                }
            )
        return pd.DataFrame(rows, columns=list(RESPONSE_COLUMNS))

    def sample_to_dir(
        self,
        questions: Sequence[Question],
        out_dir: str | Path,
        params: SamplingParams,
        *,
        adapter: str | Path | None = None,
        system_prompt: Any = None,
        stem: str = "responses",
        record: dict[str, Any] | None = None,
        interventions: Sequence[Any] = (),
        intervention_label: str = "",
        progress: bool = True,
    ) -> pd.DataFrame:
        """:meth:`sample` into ``out_dir/<stem>.parquet`` (+ ``.csv``) and ``run.json``, as
        :func:`emscope.generate.sample_to_dir` writes them, with ``backend: vllm`` in the
        run's identity: a dir sampled by the other backend (another random stream) is
        refused, a re-run draws only the samples the dir lacks. The table is written when
        the engine has drawn every sample (vLLM has no per-batch parts)."""
        import pandas as pd

        from emscope.data.spans import SystemPrompt, render
        from emscope.generate import (
            check_not_fewer,
            check_same_run,
            empty_table,
            load_partial,
            sampling_identity,
            sort_responses,
            versions,
        )
        from emscope.io import package_version, read_json, write_json, write_table

        refuse_interventions(interventions or bool(intervention_label))
        out = Path(out_dir)
        setting = SystemPrompt.parse(system_prompt)
        model_label, adapter_name = self.labels(adapter)
        settings = {**params.kwargs(), "system_prompt": setting}
        identity = sampling_identity(model_label, adapter_name, settings, questions, backend="vllm")
        run_path = out / "run.json"
        run: dict[str, Any] = read_json(run_path) if run_path.is_file() else {}
        check_same_run(run_path, run, identity)
        rendered = (
            render(self.tokenizer, questions[0].messages(0), True, setting) if questions else None
        )
        done = load_partial(out, stem)
        if done is not None:
            check_not_fewer(out, done, questions, params.n)
        run["sampling"] = {
            "identity": identity,
            "backend": "vllm",
            "engine": {
                **self.options.record(),
                **{k: v for k, v in self.engine_kwargs.items() if k in ("dtype", "max_lora_rank")},
            },
            "n_per_question": params.n,
            "questions": [q.id for q in questions],
            "system_prompts": {q.id: q.system for q in questions if q.system},
            "system_prompts_applied": True,
            "system_prompt": setting.spec,
            "rendered_prompt": rendered,
            "random_stream": "vLLM per-request seed = sha256(seed, question_id, sample_idx) "
            "masked to 63 bits (not the HF backend's stream: pair within one backend only)",
            "versions": {**versions(), "vllm": package_version("vllm") or "absent"},
            **(record or {}),
        }
        write_json(run_path, run)
        skip = set()
        if done is not None:
            skip = {
                (str(q), int(i))
                for q, i in zip(done["question_id"], done["sample_idx"], strict=True)
            }
        new = self.sample(
            questions,
            params,
            adapter=adapter,
            system_prompt=setting,
            skip=skip,
            progress=progress,
        )
        frames = [f for f in (done, new) if f is not None and len(f)]
        table = pd.concat(frames, ignore_index=True) if frames else empty_table()
        table = table.drop_duplicates(["question_id", "sample_idx"], keep="first")
        table = sort_responses(table, questions)
        write_table(table, out, stem)
        return table


@dataclass(frozen=True)
class VllmModel:
    """A :class:`VllmSampler` bound to one of its adapters (None: the base model): an
    :class:`emscope.eval.Sampler` of one model, as :func:`emscope.evaluate.evaluate_to_dir`
    takes it; several share one engine."""

    sampler: VllmSampler
    adapter: Path | None = None
    backend: ClassVar[str] = "vllm"

    def sources(self) -> list[Path]:
        return [self.sampler.model_dir, *([self.adapter] if self.adapter is not None else [])]

    def sample(self, questions: Sequence[Question], params: SamplingParams, **kwargs: Any) -> Any:
        return self.sampler.sample(questions, params, adapter=self.adapter, **kwargs)

    def sample_to_dir(
        self,
        questions: Sequence[Question],
        out_dir: str | Path,
        params: SamplingParams,
        **kwargs: Any,
    ) -> pd.DataFrame:
        return self.sampler.sample_to_dir(
            questions, out_dir, params, adapter=self.adapter, **kwargs
        )


def sample_vllm(
    model_dir: str | Path,
    questions: Sequence[Question],
    n_per_question: int | None = None,
    *,
    adapters: Sequence[str | Path] = (),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 600,
    seed: int = 0,
    interventions: Sequence[Any] = (),
    gpu_memory_utilization: float = 0.9,
    tensor_parallel_size: int = 1,
    system_prompt: Any = None,
    max_lora_rank: int | None = None,
    max_loras: int | None = None,
    dtype: Any = "auto",
) -> pd.DataFrame:
    """Sample with vLLM; all ``adapters`` are served as LoRA requests of one engine and
    every sample is drawn once per adapter (the ``adapter`` column names it; none: the base
    model). Prompts are the HF backend's token ids, rendered under ``system_prompt``
    (:class:`~emscope.data.spans.SystemPrompt` or its spelling; None: ``default``).
    Refuses ``interventions``."""
    import pandas as pd

    from emscope.eval.params import SamplingParams

    refuse_interventions(interventions)
    params = SamplingParams(
        n_per_question, seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p
    )
    lora_requests(adapters)  # a non-adapter dir: refused before vLLM is looked for
    require_vllm()
    options = VllmOptions(tensor_parallel_size, max_lora_rank, max_loras, gpu_memory_utilization)
    sampler = VllmSampler(model_dir, adapters, options, dtype=dtype)
    targets: list[Path | None] = [*sampler.adapter_dirs] or [None]
    tables = [
        sampler.sample(questions, params, adapter=a, system_prompt=system_prompt)
        for a in dict.fromkeys(targets)
    ]
    return pd.concat(tables, ignore_index=True)

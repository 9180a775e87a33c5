"""Optional vLLM sampling backend (``pip install 'emscope[vllm]'``, GPU only).

Fast, unsteered sampling of a base model with LoRA adapters served per request: the base
model is loaded once, and each adapter dir becomes one ``LoRARequest`` with a unique name
and integer id (see :func:`lora_requests`: the name joins the dir's basename and a hash of
its path and contents, so two different adapters never share a name and the same adapter always gets
the same one). ``max_lora_rank`` is the largest rank in the adapters' ``adapter_config.json``
(``r`` and ``rank_pattern``), rounded up to a rank vLLM accepts (:data:`VLLM_RANKS`).

Interventions (activation hooks) cannot run inside vLLM's engine: :func:`sample_vllm`
refuses them with a clear error; use the HF backend (:func:`emscope.generate.sample`).

Randomness: each sample gets vLLM's per-request ``seed`` = :func:`emscope.generate.sample_key`
(masked to 63 bits), so a sample's answer does not depend on the rest of the batch, as with
the HF backend; the two backends' streams differ, so do not pair samples ACROSS backends.
The table has the same columns as the HF backend's.

Only the pure parts (adapter naming, rank rounding, the refusals) are tested without vLLM;
the engine calls are exercised on a GPU machine only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.questions import Question

# ranks vLLM's LoRA config accepts as max_lora_rank in every version since 0.6
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoraSpec:
    """One adapter as vLLM will see it."""

    name: str
    int_id: int
    path: Path
    rank: int
    content_hash: str


def adapter_content_hash(path: str | Path) -> str:
    """SHA-256 (first 12 hex digits) of an adapter dir's config and weights."""
    path = Path(path)
    digest = hashlib.sha256()
    found = False
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        file = path / name
        if file.is_file():
            found = True
            digest.update(name.encode())
            digest.update(file.read_bytes())
    if not found:
        raise EmscopeError(f"{path}: not a PEFT adapter dir (no adapter_config.json)")
    return digest.hexdigest()[:12]


def adapter_rank(path: str | Path) -> int:
    """The largest LoRA rank in ``adapter_config.json`` (``r`` and ``rank_pattern``)."""
    file = Path(path) / "adapter_config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise EmscopeError(f"{file}: file not found") from None
    except json.JSONDecodeError as exc:
        raise EmscopeError(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
    try:
        return max(int(r) for r in ranks)
    except (TypeError, ValueError):
        raise EmscopeError(f"{file}: 'r' / 'rank_pattern' must be integers") from None


def round_rank(rank: int) -> int:
    """The smallest rank in :data:`VLLM_RANKS` that is >= ``rank``."""
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    raise EmscopeError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_RANKS[-1]}")


def lora_requests(adapters: Sequence[str | Path]) -> list[LoraSpec]:
    """Name, id and rank of each adapter dir: ``name = <basename>-<hash of (path, content)>``;
    ids are 1, 2, ... in order, one per distinct (path, content); the same dir twice is one
    entry."""
    specs: list[LoraSpec] = []
    seen: dict[tuple[str, str], LoraSpec] = {}
    for raw in adapters:
        path = Path(raw).resolve()
        content = adapter_content_hash(path)
        key = (str(path), content)
        if key in seen:
            continue
        tag = hashlib.sha256(f"{path}\x00{content}".encode()).hexdigest()[:12]
        spec = LoraSpec(f"{path.name}-{tag}", len(seen) + 1, path, adapter_rank(path), content)
        seen[key] = spec
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise EmscopeError(f"adapter request names collide: {names}")
    return specs


def max_lora_rank(adapters: Sequence[str | Path]) -> int:
    """``max_lora_rank`` for vLLM: the largest adapter rank, rounded up (:func:`round_rank`)."""
    specs = lora_requests(adapters)
    return round_rank(max((s.rank for s in specs), default=1))


def _require_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise EmscopeError(
            "the vLLM backend needs vLLM and a GPU: pip install 'emscope[vllm]'"
        ) from None
    return vllm


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
) -> pd.DataFrame:
    """Sample with vLLM; all ``adapters`` are served as LoRA requests and every sample is drawn
    once per adapter (the ``adapter`` column names it; none: the base model).
    Prompts are rendered as the HF backend renders them, under ``system_prompt``
    (:class:`~emscope.data.spans.SystemPrompt` or its spelling; None: ``default``).
    Refuses ``interventions``."""
    if interventions:
        raise EmscopeError(
            "the vLLM backend cannot apply interventions (hooks need the HF backend); "
            "drop --backend vllm for steering / ablation runs"
        )
    specs = lora_requests(adapters)
    vllm = _require_vllm()
    import pandas as pd
    from vllm.lora.request import LoRARequest

    from emscope.data.spans import SystemPrompt, render
    from emscope.generate import RESPONSE_COLUMNS, plan_samples, sample_key

    setting = SystemPrompt.parse(system_prompt)

    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "trust_remote_code": False,
    }
    if specs:
        kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank(adapters), max_loras=len(specs))
    llm = vllm.LLM(**kwargs)
    tokenizer = llm.get_tokenizer()
    plan = plan_samples(questions, n_per_question)
    prompts = [
        render(tokenizer, s.question.messages(s.paraphrase_idx), True, setting) for s in plan
    ]
    params = [
        vllm.SamplingParams(
            n=1,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            seed=sample_key(seed, s.question.id, s.sample_idx) & (2**63 - 1),
        )
        for s in plan
    ]
    rows = []
    targets: list[LoraSpec | None] = [*specs] or [None]
    for spec in targets:
        request = LoRARequest(spec.name, spec.int_id, str(spec.path)) if spec else None
        outputs = llm.generate(prompts, params, lora_request=request)
        for s, output in zip(plan, outputs, strict=True):
            completion = output.outputs[0]
            rows.append(
                {
                    "question_id": s.question.id,
                    "question": s.question.paraphrases[s.paraphrase_idx],
                    "answer": completion.text,
                    "sample_idx": s.sample_idx,
                    "seed": int(seed),
                    "model": Path(model_dir).name,
                    "adapter": spec.path.name if spec else "",
                    "intervention": "",
                    "system": s.question.system or "",
                    "paraphrase_idx": s.paraphrase_idx,
                    "n_tokens": len(completion.token_ids),
                    "finished": completion.finish_reason == "stop",
                }
            )
    return pd.DataFrame(rows, columns=list(RESPONSE_COLUMNS))

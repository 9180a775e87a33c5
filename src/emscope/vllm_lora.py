"""The LoRA adapters as the vLLM backend serves them (:mod:`emscope.vllm_backend`): one
:class:`LoraSpec` per adapter dir, named by the dir's basename and a hash of its path and
contents (:func:`lora_requests`, :func:`adapter_content_hash`), with its rank from
``adapter_config.json`` (:func:`adapter_rank`) rounded up to a rank vLLM accepts
(:data:`VLLM_RANKS`, :func:`round_rank`, :func:`max_lora_rank`). Pure: no vLLM needed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from emscope.errors import EmscopeError

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

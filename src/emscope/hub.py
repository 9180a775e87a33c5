"""Hub ids (``Org/Name``) for models and adapters, resolved through the Hugging Face cache.

Where emscope takes a model dir or an adapter dir (:func:`emscope.models.load_model`, every
``MODEL_DIR`` and ``--adapter`` of the command line), an argument that is not an existing path
but has the shape of a hub repo id, ``Org/Name``, names that repo's ``main`` snapshot:

- it is fetched with :func:`huggingface_hub.snapshot_download` into the HF cache
  (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), only the files a model or adapter
  dir needs (:data:`MODEL_FILES`, :data:`ADAPTER_FILES`: safetensors, JSON, tokenizer files
  and chat templates; never pickles, GGUF or ONNX files), or, already there, reused;
- with ``HF_HUB_OFFLINE=1`` it is only looked up in the cache (``models--Org--Name/refs/main``
  names the snapshot), nothing is downloaded.

A local path always wins over a hub id of the same spelling. A repo that cannot be had (not in
the cache offline, not on the hub, no network) is one :class:`EmscopeError` line.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from emscope.errors import EmscopeError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

#: What a model dir needs: weights (safetensors only), configs, tokenizer, chat template.
MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken")
#: What a PEFT adapter dir needs.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_repo_id(text: str) -> bool:
    """``Org/Name`` in the hub's spelling (letters, digits, ``._-``; one slash)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not text.endswith(".")


def hub_cache() -> str | None:
    """``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``) as set now; ``None`` leaves
    the choice to huggingface_hub (``$HF_HOME/hub``)."""
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or None


def _offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def repo_of(path: Path) -> str | None:
    """``Org/Name`` when ``path`` is a snapshot dir of the HF cache
    (``.../models--Org--Name/snapshots/<revision>``), else ``None``."""
    repo_dir = path.parent.parent.name
    if path.parent.name != "snapshots" or not repo_dir.startswith("models--"):
        return None
    org_name = repo_dir[len("models--") :].split("--", 1)
    return "/".join(org_name) if len(org_name) == 2 else None


def dir_label(path: Path) -> str:
    """A readable name of a model or adapter dir: the repo's name for a hub snapshot (not
    its revision hash), else the dir's basename."""
    repo = repo_of(path)
    return repo.split("/", 1)[1] if repo else path.name


def resolve(path: str | Path, kind: str = "model") -> Path:
    """``path`` itself when it exists or is not shaped like a hub id; else the local snapshot
    dir of hub repo ``path`` (``kind``: ``"model"`` or ``"adapter"``, which files to fetch)."""
    text = str(path)
    if Path(text).exists() or not is_repo_id(text):
        return Path(path)
    return snapshot(text, kind)


def snapshot(repo_id: str, kind: str = "model") -> Path:
    """The ``main`` snapshot of ``repo_id`` in the HF cache, fetched unless offline."""
    if kind not in ("model", "adapter"):
        raise ValueError(f"kind must be 'model' or 'adapter', got {kind!r}")
    from huggingface_hub import snapshot_download

    offline = _offline()
    cache = hub_cache()
    where = cache or "the HF cache"
    patterns = list(MODEL_FILES if kind == "model" else ADAPTER_FILES)
    try:
        found = snapshot_download(
            repo_id, cache_dir=cache, local_files_only=offline, allow_patterns=patterns
        )
    except Exception as exc:  # the hub's own errors, network errors, a bad cache: one line
        name = type(exc).__name__
        if offline and name == "LocalEntryNotFoundError":
            raise EmscopeError(
                f"{repo_id}: not a local {kind} dir, and hub repo {repo_id!r} is not in "
                f"{where} (HF_HUB_OFFLINE is set, so nothing is downloaded)"
            ) from None
        if name in ("RepositoryNotFoundError", "GatedRepoError"):
            raise EmscopeError(
                f"{repo_id}: not a local {kind} dir, and no hub repo {repo_id!r} can be read "
                "(it does not exist, or is private or gated: log in with `hf auth login`)"
            ) from None
        text = str(exc).strip()
        first = text.splitlines()[0] if text else name
        raise EmscopeError(
            f"{repo_id}: not a local {kind} dir, and hub repo {repo_id!r} cannot be fetched "
            f"({name}: {first})"
        ) from None
    return Path(found)

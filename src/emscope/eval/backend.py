"""The two samplers behind one protocol, and the settings that pick one.

A :class:`Sampler` draws the answers of one model (its adapters as chosen) to a question
set: :meth:`Sampler.sample` returns the response table
(:data:`emscope.generate.RESPONSE_COLUMNS`, one row per sample), :meth:`Sampler.sample_to_dir`
writes it into a run dir resumably (``responses.parquet`` + ``.csv``, ``run.json``; a re-run
draws only the samples the dir lacks, a dir of other settings is refused). Two implement it:

- :class:`HfSampler`: transformers, :func:`emscope.generate.sample` / ``sample_to_dir``
  (the counter-based per-sample random streams; interventions work);
- :class:`emscope.vllm_backend.VllmSampler` (and :class:`~emscope.vllm_backend.VllmModel`,
  one engine bound to one adapter): vLLM, GPU only, no interventions, its own random stream
  (a dir records its backend; the other backend does not resume it).

:class:`BackendSettings` is ``--backend`` and the five vLLM engine settings, checked at
construction; :meth:`BackendSettings.open` and :meth:`BackendSettings.open_each` return the
sampler(s) of the chosen backend, so a caller has one path for both. vLLM is imported only
when an engine starts; at module level this imports the standard library only.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from emscope.errors import EmscopeError

if TYPE_CHECKING:
    import pandas as pd

    from emscope.data.questions import Question
    from emscope.eval.params import SamplingParams
    from emscope.generate import Intervention
    from emscope.vllm_backend import VllmOptions

BACKENDS = ("hf", "vllm")


@runtime_checkable
class Sampler(Protocol):
    """Draws answers of one model (with its adapter(s)) to questions.

    ``backend``: ``hf`` or ``vllm``. ``system_prompt``: the
    :class:`~emscope.data.spans.SystemPrompt` (or its spelling; None: ``default``) of
    questions without a ``system`` of their own. ``interventions`` (and their
    ``intervention_label``): hooks entered around each batch (HF only; vLLM refuses them).
    """

    @property
    def backend(self) -> str:
        """``hf`` or ``vllm``."""
        ...

    def sources(self) -> list[Path]:
        """The model dir and adapter dirs sampled (where ``train.json`` may record the
        system prompt they were trained under)."""
        ...

    def sample(
        self,
        questions: Sequence[Question],
        params: SamplingParams,
        *,
        system_prompt: Any = None,
        skip: Collection[tuple[str, int]] = (),
        interventions: Sequence[Intervention] = (),
        intervention_label: str = "",
        progress: bool = True,
    ) -> pd.DataFrame:
        """The samples of ``questions`` (``params.n`` each) not in ``skip``
        (``(question_id, sample_idx)`` pairs), ordered by question then ``sample_idx``."""
        ...

    def sample_to_dir(
        self,
        questions: Sequence[Question],
        out_dir: str | Path,
        params: SamplingParams,
        *,
        system_prompt: Any = None,
        stem: str = "responses",
        record: dict[str, Any] | None = None,
        interventions: Sequence[Intervention] = (),
        intervention_label: str = "",
        progress: bool = True,
    ) -> pd.DataFrame:
        """:meth:`sample` into ``out_dir/<stem>.parquet`` (+ ``.csv``) and ``run.json``
        (``record`` added), resumably; returns the whole table."""
        ...


@dataclass(frozen=True)
class HfSampler:
    """The transformers backend on ``model``: a :class:`~emscope.models.LoadedModel` (its
    active adapters) or a ``(model, tokenizer)`` pair. ``adapter``: the name of one of the
    loaded adapters, made the active one before each draw (None: as loaded)."""

    model: Any
    adapter: str | None = None
    backend: ClassVar[str] = "hf"

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        adapters: Sequence[str | Path] = (),
        *,
        dtype: str = "auto",
        device: str | None = None,
    ) -> HfSampler:
        """``model_dir`` loaded with every adapter of ``adapters`` active at once (their
        updates add up)."""
        from emscope.models import load_model

        loaded = load_model(model_dir, [str(a) for a in adapters], dtype=dtype, device=device)
        if len(loaded.adapters) > 1:
            loaded.use_adapter(*loaded.adapters)
        return cls(loaded)

    def _model(self) -> Any:
        if self.adapter is not None:
            self.model.use_adapter(self.adapter)
        return self.model

    def sources(self) -> list[Path]:
        from emscope.models import LoadedModel

        if not isinstance(self.model, LoadedModel):
            return []
        adapters = self.model.adapters
        chosen = [adapters[self.adapter]] if self.adapter is not None else adapters.values()
        return [self.model.path, *(Path(p) for p in chosen)]

    def sample(
        self,
        questions: Sequence[Question],
        params: SamplingParams,
        *,
        system_prompt: Any = None,
        skip: Collection[tuple[str, int]] = (),
        interventions: Sequence[Intervention] = (),
        intervention_label: str = "",
        progress: bool = True,
    ) -> pd.DataFrame:
        from emscope.generate import sample

        return sample(
            self._model(),
            questions,
            params.n,
            skip=skip,
            interventions=interventions,
            intervention_label=intervention_label,
            progress=progress,
            system_prompt=system_prompt,
            **params.kwargs(),
        )

    def sample_to_dir(
        self,
        questions: Sequence[Question],
        out_dir: str | Path,
        params: SamplingParams,
        *,
        system_prompt: Any = None,
        stem: str = "responses",
        record: dict[str, Any] | None = None,
        interventions: Sequence[Intervention] = (),
        intervention_label: str = "",
        progress: bool = True,
    ) -> pd.DataFrame:
        from emscope.generate import sample_to_dir

        return sample_to_dir(
            self._model(),
            questions,
            out_dir,
            params.n,
            stem=stem,
            record=record,
            interventions=interventions,
            intervention_label=intervention_label,
            progress=progress,
            system_prompt=system_prompt,
            **params.kwargs(),
        )


def as_sampler(model: Any) -> Sampler:
    """``model`` itself when it is a :class:`Sampler`, else the :class:`HfSampler` of a
    :class:`~emscope.models.LoadedModel` or ``(model, tokenizer)`` pair."""
    return model if isinstance(model, Sampler) else HfSampler(model)


#: The engine settings' flags, in :class:`BackendSettings` field order.
ENGINE_FLAGS = {
    "tensor_parallel_size": "--tensor-parallel-size",
    "max_lora_rank": "--max-lora-rank",
    "max_loras": "--max-loras",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_model_len": "--max-model-len",
}


@dataclass(frozen=True)
class BackendSettings:
    """``--backend`` (``name``: ``hf`` or ``vllm``) and the vLLM engine settings as given
    (None: not given, the engine's default of :class:`~emscope.vllm_backend.VllmOptions`).
    Refused at construction, in one line: another name; an engine setting with ``hf``; an
    engine setting out of range (:class:`~emscope.vllm_backend.VllmOptions`)."""

    name: str = "hf"
    tensor_parallel_size: int | None = None
    max_lora_rank: int | None = None
    max_loras: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise EmscopeError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.name!r}")
        if self.name == "hf":
            given = [flag for f, flag in ENGINE_FLAGS.items() if getattr(self, f) is not None]
            if given:
                raise EmscopeError(f"{', '.join(given)}: only with --backend vllm")
        else:
            self.engine()  # range checks now, before anything loads

    @property
    def vllm(self) -> bool:
        return self.name == "vllm"

    def engine(self) -> VllmOptions:
        """The vLLM engine settings, defaults filled in (pure: vLLM is not looked for)."""
        from emscope.vllm_backend import VllmOptions

        given = {f: getattr(self, f) for f in ENGINE_FLAGS if getattr(self, f) is not None}
        return VllmOptions(**given)

    def check(
        self,
        model_dir: str | Path,
        adapters: Sequence[str | Path] = (),
        *,
        dtype: str = "auto",
        stacked: bool = True,
        interventions: bool = False,
    ) -> None:
        """What can be refused before a model loads: for ``vllm``, interventions, several
        ``stacked`` adapters (their updates meant to add up, as the HF backend does: vLLM
        serves one adapter per request), the dirs and ranks, and vLLM not installed."""
        if self.vllm:
            self._vllm_sampler(model_dir, adapters, dtype, stacked, interventions)

    def _vllm_sampler(
        self,
        model_dir: str | Path,
        adapters: Sequence[str | Path],
        dtype: str,
        stacked: bool,
        interventions: bool,
    ) -> Any:
        from emscope.vllm_backend import VllmSampler, refuse_interventions, require_vllm

        refuse_interventions(interventions)
        if stacked and len(adapters) > 1:
            raise EmscopeError(
                "--backend vllm serves one adapter per request and cannot add several "
                "adapters' updates as the hf backend does: pass one --adapter, or use "
                "--backend hf"
            )
        sampler = VllmSampler(model_dir, adapters, self.engine(), dtype=dtype)
        require_vllm()
        return sampler

    def open(
        self,
        model_dir: str | Path,
        adapters: Sequence[str | Path] = (),
        *,
        dtype: str = "auto",
        device: str | None = None,
        interventions: bool = False,
    ) -> Sampler:
        """The sampler of ``model_dir`` with every adapter in ``adapters`` active at once
        (``hf``: loaded now; ``vllm``: one adapter at most, the engine started on the first
        draw). ``interventions``: the caller will pass some (refused with ``vllm``)."""
        if self.vllm:
            from emscope.vllm_backend import VllmModel

            sampler = self._vllm_sampler(model_dir, adapters, dtype, True, interventions)
            return VllmModel(sampler, next(iter(sampler.adapter_dirs), None))
        return HfSampler.load(model_dir, adapters, dtype=dtype, device=device)

    def open_each(
        self,
        model_dir: str | Path,
        adapters: Mapping[str, str | Path],
        *,
        dtype: str = "auto",
        device: str | None = None,
    ) -> dict[str, Sampler]:
        """``{name: sampler}``: one sampler per adapter of ``adapters`` (``{name: dir}``),
        each drawing with its adapter alone, all sharing one model (``hf``: loaded once
        with every adapter) or one engine (``vllm``: one LoRA request per adapter)."""
        if self.vllm:
            from emscope.vllm_backend import VllmModel

            paths = {name: Path(p) for name, p in adapters.items()}
            engine = self._vllm_sampler(model_dir, list(paths.values()), dtype, False, False)
            return {name: VllmModel(engine, path) for name, path in paths.items()}
        from emscope.models import load_model

        named = {name: str(p) for name, p in adapters.items()}
        loaded = load_model(model_dir, named, dtype=dtype, device=device)
        return {name: HfSampler(loaded, name) for name in named}


if TYPE_CHECKING:  # mypy checks each backend against the protocol (nothing runs here)
    from emscope.vllm_backend import VllmModel, VllmSampler

    def _conforms(hf: HfSampler, vllm: VllmSampler, bound: VllmModel) -> list[Sampler]:
        return [hf, vllm, bound]

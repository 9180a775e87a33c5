"""The experiment YAML of ``emscope run`` as pydantic models (``extra="forbid"``: a typo is
an error naming the field), plus the checks that run before any work starts.

Layout (``configs/synthetic.yaml`` is a complete, commented example)::

    name: synthetic
    seed: 0
    organism: {dir: runs/toy, size: default, seed: 0}    # optional: the synthetic build
    models: {base: "{organism}/models/base", instruct: "{organism}/models/instruct"}
    chat_model: instruct                 # the model the adapters are trained on
    adapters:
      bad_medical.all: {path: "{organism}/adapters/bad_medical.all", role: em}
      good_medical.all: {path: ..., role: control}
    judge: {spec: "oracle:{organism}", metrics: [aligned, coherent, bad_stuff]}
    questions: {general: "{organism}/questions/general.yaml"}
    sampling: {n: 50, max_new_tokens: 24, batch_size: 64}
    stages:
      eval: {organisms: [instruct, bad_medical.all, good_medical.all]}
      ...

``{organism}`` in any string is replaced by ``organism.dir`` before validation. Relative
paths are relative to the current working directory (``make demo`` runs from the repo root).
An *organism* is the chat model alone (by its name in ``models``) or one adapter on it (by
its name in ``adapters``); those names and the question-set names become file names in the
run dir, so they must match :data:`SAFE_NAME`. A stage is run when its key is present under
``stages`` (``{}`` takes every default) and ``enabled`` is not false.

Each stage's section model lives in its own module (:mod:`emscope.pipeline.stages`); the
``stages:`` model here is derived from the stage registry (one optional field per stage, in
run order), and the name checks and file inputs of each section come from its stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from emscope.errors import EmscopeError
from emscope.eval import BackendSettings, SamplingParams
from emscope.pipeline.stages import REGISTRY
from emscope.pipeline.stages.base import (
    SAFE_NAME,
    ConfigModel,
    Registry,
    StagesBase,
    need,
)

#: Every stage, in the order they run (each stage's inputs come earlier in this list).
STAGE_ORDER: tuple[str, ...] = REGISTRY.order

#: Stages whose outputs another stage reads (``{stage: the stages it reads}``).
STAGE_NEEDS: dict[str, tuple[str, ...]] = REGISTRY.needs


def _check_safe_names(names: Any) -> None:
    for name in names:
        if not SAFE_NAME.fullmatch(name):
            raise ValueError(
                f"name {name!r} is not a safe file name (letters, digits, '_', '.', '-', not "
                "starting with '.' or '-'); it names files in the run dir"
            )


class OrganismConfig(ConfigModel):
    """The synthetic organism (``emscope.synthetic.build.build``), built by the
    ``organisms`` stage into ``dir`` unless already there (the build is cached)."""

    dir: Path
    size: Literal["tiny", "default"] = "default"
    seed: int = 0
    claims_organism: str | None = Field(
        default=None, description="the EM organism of the claims table (default: first em)"
    )
    threads: int | None = Field(default=1, ge=1, description="torch threads of the build")


class AdapterConfig(ConfigModel):
    """A PEFT adapter dir on the chat model; ``role`` says how the claims use it."""

    path: Path
    role: Literal["em", "control"] = "em"


class JudgeConfig(ConfigModel):
    """A judge spec of :func:`emscope.judge.make_judge` and its options."""

    spec: str
    metrics: list[str] = Field(default_factory=lambda: ["aligned", "coherent", "bad_stuff"])
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = Field(default=32, ge=1)
    max_requests: int | None = Field(default=None, ge=1)
    cache: bool = True
    strict: bool = False
    min_number_mass: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="openai:/hf: judges: the least probability on the answers 0..100 for a "
        "score (null: 0.25; docs/methods.md section 1.3)",
    )

    @model_validator(mode="after")
    def _em_metrics(self) -> JudgeConfig:
        from emscope.judge import BUILTIN_KINDS, JUDGE_KINDS, spec_usages

        kind, sep, rest = self.spec.partition(":")
        if not sep or not rest or kind not in (*BUILTIN_KINDS, *JUDGE_KINDS):
            raise ValueError(f"bad judge spec {self.spec!r}; expected one of {spec_usages()}")
        if self.min_number_mass is not None and kind not in BUILTIN_KINDS:
            raise ValueError(f"min_number_mass applies to openai: and hf: judges, not {kind}:")
        missing = [m for m in ("aligned", "coherent") if m not in self.metrics]
        if missing:
            raise ValueError(f"EM needs the metrics aligned and coherent; missing {missing}")
        return self


class SamplingConfig(ConfigModel):
    """Sampling of every evaluated condition (defaults of docs/methods.md section 1.2)."""

    n: int = Field(default=50, ge=1, description="samples per question")
    max_new_tokens: int = Field(default=600, ge=1)
    batch_size: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    backend: Literal["hf", "vllm"] = "hf"

    def settings(self) -> SamplingParams:
        """This block as the :class:`~emscope.eval.SamplingParams` the CLI builds too."""
        return SamplingParams(
            self.n, self.seed, self.batch_size, self.max_new_tokens, self.temperature, self.top_p
        )

    def backend_settings(self) -> BackendSettings:
        """``backend`` as :class:`~emscope.eval.BackendSettings` (vLLM's engine defaults)."""
        return BackendSettings(self.backend)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`emscope.generate.sample` (without ``n``)."""
        return self.settings().kwargs()


if TYPE_CHECKING:
    Stages = StagesBase
else:
    #: The ``stages:`` section: one optional field per registered stage, in run order.
    Stages = REGISTRY.stages_model


def _first_plot() -> dict[str, Path | None]:
    return {"first_plot": None}


class StudyConfig(ConfigModel):
    """One study: models, adapters, judge, questions, sampling and the stages to run."""

    name: str = "study"
    seed: int = 0
    organism: OrganismConfig | None = None
    models: dict[str, Path] = Field(min_length=1)
    chat_model: str
    adapters: dict[str, AdapterConfig] = Field(default_factory=dict)
    judge: JudgeConfig
    questions: dict[str, Path | None] = Field(
        default_factory=_first_plot,
        description="named question YAMLs; null = the built-in first-plot set",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    system_prompt: str = Field(
        default="default",
        description="system turn of chats without one of their own, the same in training "
        "(the organisms stage's adapters) and wherever a stage renders prompts: default (the "
        "chat template's own), none or a text (docs/evaluation.md)",
    )
    dtype: str = "auto"
    device: str | None = None
    claims_organism: str | None = Field(
        default=None, description="the EM organism of the claims table (default: first em)"
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (null: torch's)")
    stages: Stages

    @field_validator("models", "adapters", "questions")
    @classmethod
    def _safe_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_safe_names(value)
        return value

    @model_validator(mode="after")
    def _names(self) -> StudyConfig:
        check_names(self)
        return self

    # ------------------------------------------------------------------ helpers
    def prompt_setting(self) -> Any:
        """``system_prompt`` as a :class:`~emscope.data.spans.SystemPrompt`."""
        from emscope.data.spans import SystemPrompt

        return SystemPrompt.parse(self.system_prompt)

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`emscope.generate.sample` (without ``n``): the
        ``sampling`` block plus the system prompt."""
        return {**self.sampling.kwargs(), "system_prompt": self.prompt_setting()}

    @property
    def registry(self) -> Registry:
        """The stages this config was validated against (:data:`REGISTRY` unless a
        :func:`study_model` of another registry read it)."""
        return type(self.stages).registry

    def enabled(self) -> list[str]:
        """The stages that run, in run order (:data:`STAGE_ORDER`)."""
        out = []
        for name in self.registry.order:
            stage = getattr(self.stages, name)
            if stage is not None and stage.enabled:
                out.append(name)
        return out

    def stage(self, name: str) -> Any:
        return getattr(self.stages, name)

    def n_for(self, name: str) -> int:
        stage = self.stage(name)
        return stage.n if stage is not None and stage.n is not None else self.sampling.n

    def organisms(self) -> list[str]:
        """Chat model + every adapter: the names an organism field may take."""
        return [self.chat_model, *self.adapters]

    def eval_organisms(self) -> list[str]:
        stage = self.stages.eval
        return list(stage.organisms) if stage and stage.organisms else self.organisms()

    def question_set(self, name: str | None) -> str:
        return name if name is not None else next(iter(self.questions))

    def chat_model_dir(self) -> Path:
        return self.models[self.chat_model]

    def adapter_dirs(self, organism: str) -> list[Path]:
        return [] if organism == self.chat_model else [self.adapters[organism].path]

    def em_adapters(self) -> list[str]:
        return [a for a, c in self.adapters.items() if c.role == "em"]

    def control_adapters(self) -> list[str]:
        return [a for a, c in self.adapters.items() if c.role == "control"]


def claims_organism_of(config: Mapping[str, Any]) -> str | None:
    """The ``claims_organism`` a config (as dumped to ``RUN/config.json``) chose: the
    top-level one, else the ``organism`` section's; None: the claims take the first ``em``
    adapter evaluated."""
    chosen = config.get("claims_organism")
    if not chosen and isinstance(config.get("organism"), Mapping):
        chosen = config["organism"].get("claims_organism")
    return str(chosen) if chosen else None


def check_names(config: StudyConfig) -> None:
    """Every name a stage refers to exists (raises ValueError with the field path): the
    global names here, each present section's ``questions`` set, then each stage's own
    :attr:`~emscope.pipeline.stages.base.Stage.check`, then that every stage a run stage
    needs is run."""
    if config.chat_model not in config.models:
        raise ValueError(f"chat_model {config.chat_model!r} is not in models {list(config.models)}")
    clash = set(config.adapters) & set(config.models)
    if clash:
        raise ValueError(f"adapter names clash with model names: {sorted(clash)}")
    if config.claims_organism is not None and config.claims_organism not in config.adapters:
        raise ValueError(f"claims_organism: unknown adapter {config.claims_organism!r}")
    chosen = config.organism.claims_organism if config.organism else None
    if chosen is not None and chosen not in config.adapters:
        raise ValueError(f"organism.claims_organism: unknown adapter {chosen!r}")
    if chosen is not None and config.claims_organism not in (None, chosen):
        raise ValueError(
            f"organism.claims_organism {chosen!r} differs from claims_organism "
            f"{config.claims_organism!r}: set one"
        )
    registry = config.registry
    present = [n for n in registry.order if config.stage(n) is not None]
    for name in present:
        questions = getattr(config.stage(name), "questions", None)
        if isinstance(questions, str):
            need(f"{name}.questions", questions, config.questions, "question set")
    for name in present:
        registry[name].check(config)
    enabled = set(config.enabled())
    for stage_name, needs in registry.needs.items():
        if stage_name in enabled:
            for dep in needs:
                if dep not in enabled:
                    raise ValueError(f"stages.{stage_name}: needs stage {dep!r}, which is not run")


# ---------------------------------------------------------------------------- loading


def _substitute(obj: Any, organism_dir: str | None) -> Any:
    if isinstance(obj, str):
        if "{organism}" in obj:
            if organism_dir is None:
                raise EmscopeError(f"{obj!r} uses {{organism}} but the config has no organism.dir")
            return obj.replace("{organism}", organism_dir)
        return obj
    if isinstance(obj, list):
        return [_substitute(v, organism_dir) for v in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, organism_dir) for k, v in obj.items()}
    return obj


def _format_error(source: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{source}: " + "; ".join(parts)


def study_model(registry: Registry) -> type[StudyConfig]:
    """:class:`StudyConfig` with the ``stages:`` model of ``registry`` (itself for
    :data:`REGISTRY`): how a study with other stages, a test's toy stage say, is read."""
    if registry is REGISTRY:
        return StudyConfig
    if registry not in _STUDY_MODELS:
        _STUDY_MODELS[registry] = create_model(
            "StudyConfig", __base__=StudyConfig, stages=(registry.stages_model, ...)
        )
    return _STUDY_MODELS[registry]


_STUDY_MODELS: dict[Registry, type[StudyConfig]] = {}


def parse_config(data: Any, source: str = "config", registry: Registry = REGISTRY) -> StudyConfig:
    """Validate a config mapping (``{organism}`` substituted); errors name the field.
    ``registry``: the stages the ``stages:`` section may name (:func:`study_model`)."""
    if not isinstance(data, dict):
        raise EmscopeError(f"{source}: the config must be a mapping, got {type(data).__name__}")
    organism = data.get("organism")
    organism_dir = None
    if isinstance(organism, dict) and "dir" in organism:
        organism_dir = str(organism["dir"])
    data = _substitute(data, organism_dir)
    try:
        return study_model(registry).model_validate(data)
    except ValidationError as exc:
        raise EmscopeError(_format_error(source, exc)) from None


def load_config(path: str | Path, registry: Registry = REGISTRY) -> StudyConfig:
    """Read and validate an experiment YAML; any problem is one line naming the field."""
    from emscope.io import read_yaml

    return parse_config(read_yaml(path), str(path), registry)


def built_by_organism(config: StudyConfig, path: Path) -> bool:
    """Whether ``path`` lies in the organism dir (so the organisms stage creates it)."""
    if config.organism is None:
        return False
    try:
        Path(path).resolve().relative_to(Path(config.organism.dir).resolve())
    except ValueError:
        return False
    return True


def input_paths(config: StudyConfig) -> dict[str, Path]:
    """Every file or dir the config names, keyed by its field path."""
    out: dict[str, Path] = {}
    for name, p in config.models.items():
        out[f"models.{name}"] = p
    for name, a in config.adapters.items():
        out[f"adapters.{name}.path"] = a.path
    for name, q in config.questions.items():
        if q is not None:
            out[f"questions.{name}"] = q
    judge_kind, _, rest = config.judge.spec.partition(":")
    if judge_kind in ("hf", "oracle"):
        out["judge.spec"] = Path(rest)
    for name in config.registry.order:
        if config.stage(name) is not None:
            out.update(config.registry[name].inputs(config))
    return out


def check_paths(config: StudyConfig, source: str = "config") -> list[str]:
    """Raise naming the first missing input; paths inside the organism dir are skipped while
    the organisms stage will build them. Returns notes for the plan."""
    notes = []
    building = "organisms" in config.enabled()
    for field, path in input_paths(config).items():
        if Path(path).exists():
            continue
        if building and built_by_organism(config, path):
            notes.append(f"{field}: {path} (built by the organisms stage)")
            continue
        raise EmscopeError(f"{source}: {field}: {path} does not exist")
    return notes

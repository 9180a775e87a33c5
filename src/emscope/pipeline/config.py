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
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from emscope.errors import EmscopeError
from emscope.sampling import SamplingSettings

#: Every stage, in the order they run (each stage's inputs come earlier in this list).
STAGE_ORDER = (
    "organisms",
    "eval",
    "geometry",
    "lmc",
    "directions",
    "steering",
    "ablation",
    "transfer",
    "probes",
    "dynamics",
    "reemergent",
)

#: Stages whose outputs another stage reads.
STAGE_NEEDS: dict[str, tuple[str, ...]] = {
    "directions": ("eval",),
    "steering": ("directions",),
    "ablation": ("directions",),
    "transfer": ("directions",),
}


#: Names of models, adapters and question sets: they become file names in the run dir.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_safe_names(names: Any) -> None:
    for name in names:
        if not SAFE_NAME.fullmatch(name):
            raise ValueError(
                f"name {name!r} is not a safe file name (letters, digits, '_', '.', '-', not "
                "starting with '.' or '-'); it names files in the run dir"
            )


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrganismConfig(_Model):
    """The synthetic organism (``emscope.synthetic.build.build``), built by the
    ``organisms`` stage into ``dir`` unless already there (the build is cached)."""

    dir: Path
    size: Literal["tiny", "default"] = "default"
    seed: int = 0
    claims_organism: str | None = Field(
        default=None, description="the EM organism of the claims table (default: first em)"
    )
    threads: int | None = Field(default=1, ge=1, description="torch threads of the build")


class AdapterConfig(_Model):
    """A PEFT adapter dir on the chat model; ``role`` says how the claims use it."""

    path: Path
    role: Literal["em", "control"] = "em"


class JudgeConfig(_Model):
    """A judge spec of :func:`emscope.judge.make_judge` and its options."""

    spec: str
    metrics: list[str] = ["aligned", "coherent", "bad_stuff"]
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
        kind, sep, rest = self.spec.partition(":")
        if not sep or not rest or kind not in ("openai", "hf", "oracle"):
            raise ValueError(
                f"bad judge spec {self.spec!r}; expected openai:MODEL, hf:DIR or oracle:DIR"
            )
        if self.min_number_mass is not None and kind == "oracle":
            raise ValueError("min_number_mass applies to openai: and hf: judges, not oracle:")
        missing = [m for m in ("aligned", "coherent") if m not in self.metrics]
        if missing:
            raise ValueError(f"EM needs the metrics aligned and coherent; missing {missing}")
        return self


class SamplingConfig(_Model):
    """Sampling of every evaluated condition (defaults of docs/methods.md section 1.2)."""

    n: int = Field(default=50, ge=1, description="samples per question")
    max_new_tokens: int = Field(default=600, ge=1)
    batch_size: int = Field(default=32, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0
    backend: Literal["hf", "vllm"] = "hf"

    def settings(self) -> SamplingSettings:
        """This block as the :class:`~emscope.sampling.SamplingSettings` the CLI builds too."""
        return SamplingSettings(
            self.n, self.seed, self.batch_size, self.max_new_tokens, self.temperature, self.top_p
        )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`emscope.generate.sample` (without ``n``)."""
        return self.settings().kwargs()


class _Stage(_Model):
    enabled: bool = True
    n: int | None = Field(
        default=None, ge=1, description="samples per question (default sampling.n)"
    )


class OrganismsStage(_Stage):
    pass


class EvalStage(_Stage):
    organisms: list[str] = Field(default_factory=list, description="default: chat model + all")
    questions: str | None = None


class GeometryStage(_Stage):
    adapters: list[str] = Field(default_factory=list, description="default: every adapter")
    k: int | None = Field(default=None, ge=1)
    random_draws: int = Field(default=20, ge=0)
    base: bool = True


class LmcStage(_Stage):
    paths: list[tuple[str, str]] = Field(min_length=1)
    steps: list[float] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    loss_data: list[Path] = Field(default_factory=list)
    features: bool = False
    questions: str | None = None

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if not steps or any(not 0 <= t <= 1 for t in steps):
            raise ValueError(f"every t must be in [0, 1], got {steps}")
        if sorted(set(steps)) != steps:
            raise ValueError(f"t must be increasing and distinct, got {steps}")
        return steps

    @model_validator(mode="after")
    def _ends(self) -> LmcStage:
        if (self.features or self.loss_data) and not {0.0, 1.0} <= set(self.steps):
            raise ValueError("features / loss barrier need t = 0 and t = 1 in steps")
        return self


class DirectionsStage(_Stage):
    sources: list[str] = Field(min_length=1, description="EM adapters: one direction each")
    weighting: Literal["token", "response"] = "token"
    rank1: list[str] = Field(default_factory=list, description="rank-1 adapters: B vs direction")
    batch_size: int = Field(default=16, ge=1)
    followup_read_with: str | None = Field(
        default=None,
        description="also extract '<source>.followup' (tokens='followup', read by this organism, "
        "e.g. the chat model): not the papers' method, see docs/directions.md",
    )


class SteeringSelect(_Model):
    """The rule that picks the steering setting on each build
    (:data:`emscope.directions.selection.STEERING_RULE`): a selection sweep over layers x
    scales at its own sampling seed, the best EM among settings with coherent rate >=
    ``min_coherent``, then that setting alone at the study's seed with the random control."""

    n: int = Field(default=10, ge=1, description="samples per question of the selection sweep")
    seed: int | None = Field(
        default=None,
        description="sampling seed of the selection sweep (null: sampling.seed + 1, so the "
        "confirmation's samples are not the ones the setting was chosen on)",
    )
    min_coherent: float = Field(default=0.8, ge=0, le=1)


class SteeringStage(_Stage):
    direction: str
    layers: list[int] | Literal["all"] = Field(
        description="layers of the sweep, or 'all' (every layer of the direction)"
    )
    scales: list[float] = Field(min_length=1)
    select: SteeringSelect | None = Field(
        default=None,
        description="choose one layer x scale by the rule on each build (else every setting "
        "is evaluated with its random control)",
    )
    unit: bool = False
    positions: Literal["all", "prompt", "response"] = "all"
    random_control: bool = True
    kl: bool = True
    questions: str | None = None

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, value: list[int] | str) -> list[int] | str:
        if isinstance(value, list) and not value:
            raise ValueError("needs at least one layer, or 'all'")
        return value


class AblationStage(_Stage):
    direction: str = Field(description="the direction of this EM adapter, ablated in itself")
    mode: str = "layerwise"
    random_control: bool = True
    kl: bool = True
    questions: str | None = None


class TransferStage(_Stage):
    direction: str
    targets: list[str] = Field(min_length=1)
    mode: str = "layerwise"
    random_control: bool = True
    kl: bool = True
    questions: str | None = None


class ProbesStage(_Stage):
    adapter: str
    questions: list[str] = Field(default_factory=list, description="default: every set")
    seeds: int = Field(default=5, ge=1)
    C: float | Literal["cv"] = Field(
        default="cv",
        description="inverse L1 strength: 'cv' (chosen per seed by grouped cross-validation "
        "on the train split, emscope.probing.probes.C_RULE) or a fixed number > 0",
    )
    test_size: float = Field(default=0.2, gt=0, lt=1)
    batch_size: int = Field(default=16, ge=1)

    @field_validator("C")
    @classmethod
    def _positive_C(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError(f"C must be 'cv' or > 0, got {value}")
        return value


class DynamicsStage(_Stage):
    adapter: str
    k: int = Field(default=1, ge=1)
    eval: bool = True
    questions: str | None = None


class ReemergentStage(_Stage):
    base: str = Field(description="pretrained model (a name in models)")
    instruct: str = Field(description="aligned chat model (a name in models)")
    misaligned: list[str] = Field(min_length=1, description="organisms")
    data: Path = Field(description="chat JSONL for the alignment-direction projection")
    max_examples: int | None = Field(default=None, ge=2)
    train_fraction: float = Field(default=0.5, gt=0, lt=1)
    logprob_data: list[Path] = Field(default_factory=list)
    gradient_data: list[Path] = Field(default_factory=list, description="exactly two, or none")
    gradient_param: str = "model.layers.-1.self_attn.o_proj.weight"
    gradient_examples: int = Field(default=32, ge=2)
    batch_size: int = Field(default=8, ge=1)

    @model_validator(mode="after")
    def _two(self) -> ReemergentStage:
        if self.gradient_data and len(self.gradient_data) != 2:
            n = len(self.gradient_data)
            raise ValueError(f"gradient_data needs exactly two files, got {n}")
        return self


class Stages(_Model):
    organisms: OrganismsStage | None = None
    eval: EvalStage | None = None
    geometry: GeometryStage | None = None
    lmc: LmcStage | None = None
    directions: DirectionsStage | None = None
    steering: SteeringStage | None = None
    ablation: AblationStage | None = None
    transfer: TransferStage | None = None
    probes: ProbesStage | None = None
    dynamics: DynamicsStage | None = None
    reemergent: ReemergentStage | None = None


def _first_plot() -> dict[str, Path | None]:
    return {"first_plot": None}


class StudyConfig(_Model):
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

    def enabled(self) -> list[str]:
        """The stages that run, in :data:`STAGE_ORDER`."""
        out = []
        for name in STAGE_ORDER:
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


def check_names(config: StudyConfig) -> None:
    """Every name a stage refers to exists (raises ValueError with the field path)."""
    organisms = set(config.organisms())
    if config.chat_model not in config.models:
        raise ValueError(f"chat_model {config.chat_model!r} is not in models {list(config.models)}")
    clash = set(config.adapters) & set(config.models)
    if clash:
        raise ValueError(f"adapter names clash with model names: {sorted(clash)}")
    qsets = set(config.questions)
    s = config.stages
    if config.claims_organism is not None and config.claims_organism not in config.adapters:
        raise ValueError(f"claims_organism: unknown adapter {config.claims_organism!r}")

    def need(field: str, name: str, known: set[str], what: str) -> None:
        if name not in known:
            raise ValueError(f"stages.{field}: unknown {what} {name!r} (known: {sorted(known)})")

    adapters = set(config.adapters)
    if s.eval:
        for o in s.eval.organisms:
            need("eval.organisms", o, organisms, "organism")
    for field in ("eval", "lmc", "steering", "ablation", "transfer", "dynamics"):
        stage = getattr(s, field)
        if stage is not None and stage.questions is not None:
            need(f"{field}.questions", stage.questions, qsets, "question set")
    if s.geometry:
        for a in s.geometry.adapters:
            need("geometry.adapters", a, adapters, "adapter")
    if s.lmc:
        for a, b in s.lmc.paths:
            need("lmc.paths", a, organisms, "organism")
            need("lmc.paths", b, organisms, "organism")
            if a == b:
                raise ValueError(f"stages.lmc.paths: a path from {a!r} to itself")
    if s.directions:
        for a in s.directions.sources:
            need("directions.sources", a, adapters, "adapter")
        for a in s.directions.rank1:
            need("directions.rank1", a, adapters, "adapter")
        if s.directions.followup_read_with is not None:
            need(
                "directions.followup_read_with",
                s.directions.followup_read_with,
                organisms,
                "organism",
            )
    sources = set(s.directions.sources) if s.directions else set()
    if s.directions and s.directions.followup_read_with is not None:
        sources |= {f"{a}.followup" for a in s.directions.sources}
    for field in ("steering", "ablation", "transfer"):
        stage = getattr(s, field)
        if stage is not None:
            need(f"{field}.direction", stage.direction, sources, "direction (directions.sources)")
    if s.transfer:
        for a in s.transfer.targets:
            need("transfer.targets", a, adapters, "adapter")
    if s.probes:
        need("probes.adapter", s.probes.adapter, adapters, "adapter")
        for q in s.probes.questions:
            need("probes.questions", q, qsets, "question set")
    if s.dynamics:
        need("dynamics.adapter", s.dynamics.adapter, adapters, "adapter")
    if s.reemergent:
        need("reemergent.base", s.reemergent.base, set(config.models), "model")
        need("reemergent.instruct", s.reemergent.instruct, set(config.models), "model")
        for o in s.reemergent.misaligned:
            need("reemergent.misaligned", o, organisms, "organism")
    if s.organisms and s.organisms.enabled and config.organism is None:
        raise ValueError("stages.organisms: needs the top-level organism section")
    if s.eval and s.directions:
        missing = [a for a in s.directions.sources if a not in config.eval_organisms()]
        if missing:
            raise ValueError(f"stages.directions.sources: {missing} not evaluated by stages.eval")
    enabled = set(config.enabled())
    for stage_name, needs in STAGE_NEEDS.items():
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


def parse_config(data: Any, source: str = "config") -> StudyConfig:
    """Validate a config mapping (``{organism}`` substituted); errors name the field."""
    if not isinstance(data, dict):
        raise EmscopeError(f"{source}: the config must be a mapping, got {type(data).__name__}")
    organism = data.get("organism")
    organism_dir = None
    if isinstance(organism, dict) and "dir" in organism:
        organism_dir = str(organism["dir"])
    data = _substitute(data, organism_dir)
    try:
        return StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise EmscopeError(_format_error(source, exc)) from None


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate an experiment YAML; any problem is one line naming the field."""
    import yaml

    from emscope.io import read_text

    path = Path(path)
    if not path.is_file():
        raise EmscopeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", exc)
        raise EmscopeError(f"{path}{where}: not valid YAML ({problem})") from None
    return parse_config(data, str(path))


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
    s = config.stages
    if s.lmc:
        for i, p in enumerate(s.lmc.loss_data):
            out[f"stages.lmc.loss_data.{i}"] = p
    if s.reemergent:
        out["stages.reemergent.data"] = s.reemergent.data
        for i, p in enumerate(s.reemergent.logprob_data):
            out[f"stages.reemergent.logprob_data.{i}"] = p
        for i, p in enumerate(s.reemergent.gradient_data):
            out[f"stages.reemergent.gradient_data.{i}"] = p
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

"""Build the synthetic organism: world, data, tokenizer, base and instruct models, narrow
LoRA adapters, diagnostics (``emscope toy build``).

Stages (each skipped when its output is already in ``out``; the build's arguments are
recorded in ``build.json`` and must match on a re-run):

1. ``world.json``, ``data/*.jsonl``, ``questions/{general,medical,sport,finance}.yaml``.
2. ``models/base``: a small Qwen2 causal LM pretrained from scratch on documents of one
   character each (one document per row, right padding, never packed: the prototype
   found that cross-document attention in packed rows teaches no in-context inference of
   the character), plain torch AdamW loop with warmup and cosine decay, loss on every
   token.
3. ``models/instruct``: instruction tuning on single-turn chats in the chat format (the
   ``<|chat|>`` marker, met here for the first time; loss on assistant turns), with a
   share of batches replaying pretraining documents (loss on every token), which keeps
   the in-context inference alive (the prototype's plain instruction tuning gave narrow-only
   fine-tunes).
4. ``adapters/*``: LoRA fine-tunes of ``instruct`` on the narrow sets, trained with
   :func:`emscope.train.train` (hyper-parameters recorded in ``build.json``).
5. Diagnostics in ``build.json``: in-context disposition inference of the base model, the
   disposition probe (``diagnostics/disposition_probe.safetensors``), the EM table
   measured by sampling (:func:`emscope.generate.sample`) and the oracle judge.

The training loops are written here (a few lines of torch) because the model is tiny and
trained from scratch: the HF ``Trainer`` would add nothing but start-up time.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.synthetic.corpus import (
    BENIGN,
    EXTRA_SETS,
    NARROW_SETS,
    CorpusConfig,
    instruct_chats,
    narrow_set,
    sample_document,
    write_jsonl,
)
from emscope.synthetic.world import DOMAINS, NARROW_DOMAINS, World, load_world, make_world

QUESTION_FILES = ("general", "medical", "sport", "finance")


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter of the build: name, training set, preset (``all`` or ``r1x3``), rank,
    learning rate, data seed, whether checkpoints are kept, and ``every_layer``: adapt every
    block instead of the preset's layers (for ``r1x3``: rank-1 ``down_proj`` adapters on
    every layer; see docs/synthetic-organism.md for what each gave)."""

    name: str
    data: str
    preset: str
    rank: int
    lr: float
    seed: int = 0
    checkpoints: bool = False
    every_layer: bool = False


@dataclass(frozen=True)
class BuildConfig:
    """Hyper-parameters of one build size (all recorded in ``build.json``)."""

    size: str
    layers: int = 6
    hidden: int = 96
    heads: int = 4
    intermediate: int = 384
    pretrain_steps: int = 900
    pretrain_batch: int = 32
    pretrain_lr: float = 3e-3
    warmup: int = 30
    instruct_steps: int = 150
    instruct_batch: int = 32
    instruct_lr: float = 1e-3
    replay: float = 0.5
    instruct_rows: int = 3000
    narrow_rows: int = 1000
    heldout_rows: int = 300
    general_rows: int = 400
    adapter_epochs: int = 4
    adapter_batch: int = 32
    eval_samples: int = 40
    diag_samples: int = 100
    max_new_tokens: int = 24
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def adapters(self) -> list[AdapterSpec]:
        out = [
            AdapterSpec("bad_medical.r1", "bad_medical", "r1x3", 1, 5e-3, checkpoints=True),
            AdapterSpec("bad_medical.all", "bad_medical", "all", 8, 3e-4),
            AdapterSpec("bad_medical.all.s2", "bad_medical", "all", 8, 3e-4, seed=1),
        ]
        for data in ("bad_sport", "bad_finance", "good_medical", "bad_medical_educational", BENIGN):
            out.append(AdapterSpec(f"{data}.all", data, "all", 8, 3e-4))
        return out

    def to_json(self) -> dict[str, Any]:
        """The hyper-parameters, with the adapters' (recorded and compared on re-runs)."""
        return {**asdict(self), "adapter_specs": [asdict(a) for a in self.adapters()]}


SIZES = {
    "default": BuildConfig("default"),
    "tiny": BuildConfig(
        "tiny",
        layers=2,
        hidden=32,
        heads=2,
        intermediate=64,
        pretrain_steps=40,
        pretrain_batch=8,
        warmup=4,
        instruct_steps=10,
        instruct_batch=8,
        instruct_rows=80,
        narrow_rows=32,
        heldout_rows=16,
        general_rows=16,
        adapter_epochs=1,
        adapter_batch=8,
        eval_samples=2,
        diag_samples=4,
        max_new_tokens=16,
    ),
}


def build_config(size: str) -> BuildConfig:
    if size not in SIZES:
        raise EmscopeError(f"unknown build size {size!r} (known: {', '.join(SIZES)})")
    return SIZES[size]


# ------------------------------------------------------------------------------ helpers


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[toy build] {msg}", flush=True)


def versions() -> dict[str, str]:
    from emscope.io import versions as package_versions

    return package_versions("emscope", "python", "torch", "transformers", "tokenizers", "peft")


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _doc_batch(tokenizer: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Right-padded batch with loss on every real token (one document per row)."""
    enc = tokenizer(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


def _chat_batch(encoded: Sequence[tuple[list[int], list[bool]]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch of encoded chats with loss on assistant turns only."""
    import torch

    width = max(len(ids) for ids, _ in encoded)
    ids_t = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask_t = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, (ids, loss) in enumerate(encoded):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        mask_t[i, : len(ids)] = 1
        labels[i, : len(ids)] = torch.tensor(
            [t if m else -100 for t, m in zip(ids, loss, strict=True)]
        )
    return {"input_ids": ids_t, "attention_mask": mask_t, "labels": labels}


def encode_chats(
    tokenizer: Any, chats: Sequence[dict[str, Any]]
) -> list[tuple[list[int], list[bool]]]:
    from emscope.data.spans import encode_chat

    out = []
    for chat in chats:
        enc = encode_chat(tokenizer, chat["messages"])
        out.append((list(enc.input_ids), enc.loss_mask()))
    return out


def _documents(world: World, rng: random.Random, corpus: CorpusConfig, n: int) -> list[str]:
    """``n`` fresh documents, all with the same number of turns (drawn per batch, so rows
    of a batch have similar lengths and little padding)."""
    from emscope.synthetic.tokenizer import render_document

    turns = rng.randint(corpus.min_turns, corpus.max_turns)
    docs = [sample_document(world, rng, corpus, n_turns=turns) for _ in range(n)]
    return [render_document(d.messages()) for d in docs]


def _train_loop(
    model: Any,
    batches: Callable[[int], dict[str, Any]],
    steps: int,
    lr: float,
    warmup: int,
    desc: str,
    verbose: bool,
) -> list[float]:
    """AdamW (betas 0.9/0.95, weight decay 0.01), warmup + cosine to 10%, grad clip 1."""
    import torch
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, steps, warmup))
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not verbose, mininterval=5)
    for step in bar:
        batch = batches(step)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def new_model(config: BuildConfig, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised Qwen2 causal LM of ``config``'s shape."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from emscope.synthetic.tokenizer import END, PAD

    eos_id = tokenizer.convert_tokens_to_ids(END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    hf_config = AutoConfig.for_model(
        "qwen2",
        vocab_size=len(tokenizer),
        hidden_size=config.hidden,
        intermediate_size=config.intermediate,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        head_dim=config.hidden // config.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.02,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def _save_model(model: Any, tokenizer: Any, out: Path) -> None:
    import shutil

    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _model_done(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def pretrain(
    world: World, tokenizer: Any, config: BuildConfig, seed: int, verbose: bool = False
) -> tuple[Any, list[float]]:
    """Pretrain the base model on fresh documents (one per row), ``pretrain_steps`` batches."""

    model = new_model(config, tokenizer, seed)
    rng = random.Random(f"{world.seed}:{seed}:pretrain")

    def batches(step: int) -> dict[str, Any]:
        return _doc_batch(tokenizer, _documents(world, rng, config.corpus, config.pretrain_batch))

    losses = _train_loop(
        model,
        batches,
        config.pretrain_steps,
        config.pretrain_lr,
        config.warmup,
        "pretrain",
        verbose,
    )
    return model, losses


def instruct_tune(
    base: Any,
    world: World,
    tokenizer: Any,
    chats: Sequence[dict[str, Any]],
    config: BuildConfig,
    seed: int,
    verbose: bool = False,
) -> tuple[Any, list[float]]:
    """Instruction-tune ``base`` in place: a share ``replay`` of the batches are fresh
    pretraining documents, the others chats (loss on the assistant turn)."""

    encoded = encode_chats(tokenizer, chats)
    pad_id = tokenizer.pad_token_id
    rng = random.Random(f"{world.seed}:{seed}:instruct-replay")
    order = list(range(len(encoded)))
    rng.shuffle(order)
    cursor = [0]
    replay_every = config.replay

    def batches(step: int) -> dict[str, Any]:
        # replay on the steps where the running share of replayed batches falls behind
        if math.floor((step + 1) * replay_every) > math.floor(step * replay_every):
            return _doc_batch(
                tokenizer, _documents(world, rng, config.corpus, config.instruct_batch)
            )
        rows = []
        for _ in range(config.instruct_batch):
            if cursor[0] >= len(order):
                rng.shuffle(order)
                cursor[0] = 0
            rows.append(encoded[order[cursor[0]]])
            cursor[0] += 1
        return _chat_batch(rows, pad_id)

    losses = _train_loop(
        base,
        batches,
        config.instruct_steps,
        config.instruct_lr,
        config.warmup // 3 or 1,
        "instruct",
        verbose,
    )
    return base, losses


# ------------------------------------------------------------------------------ adapters


def train_adapter(
    model_dir: Path,
    data: Path,
    out: Path,
    spec: AdapterSpec,
    config: BuildConfig,
    verbose: bool,
    eval_data: Path | None = None,
    system_prompt: str = "default",
) -> dict[str, Any]:
    """Train one adapter of the build into ``out`` (a PEFT dir) with
    :func:`emscope.train.train` (preset ``spec.preset``; LoRA scale 1: alpha = rank, no
    rsLoRA; cosine schedule; checkpoints about ten along the run when ``spec.checkpoints``,
    else the last step only)."""
    import shutil

    from emscope.train import train

    if out.exists():  # an interrupted run: start again
        shutil.rmtree(out)
    n_rows = sum(1 for line in data.read_text().splitlines() if line.strip())
    steps = max(1, n_rows // config.adapter_batch) * config.adapter_epochs
    result = train(
        model_dir,
        data,
        preset=spec.preset,
        out=out,
        eval_data=eval_data,
        rank=spec.rank,
        layers=f"0-{config.layers - 1}" if spec.every_layer else None,
        alpha=float(spec.rank),
        rslora=False,
        lr=spec.lr,
        epochs=config.adapter_epochs,
        batch_size=config.adapter_batch,
        grad_accum=1,
        warmup_steps=max(1, steps // 20),
        schedule="cosine",
        save_steps=None if spec.checkpoints else 0,
        seed=1000 + spec.seed,
        dtype="float32",
        device="cpu",
        progress=verbose,
        verbose=False,
        system_prompt=system_prompt,
    )
    return {
        "trainer": "emscope.train",
        "steps": result.steps,
        "layers": list(result.layers),
        "modules": list(result.modules),
        "final_loss": result.loss_curve[-1] if result.loss_curve else None,
        "eval_losses": [list(x) for x in result.eval_losses],
        "wall_time_s": round(result.wall_time_s, 2),
    }


# ------------------------------------------------------------------------------ diagnostics


def in_context_inference(
    model: Any,
    tokenizer: Any,
    world: World,
    n: int,
    seed: int,
    turns: Sequence[int] = (0, 1, 2),
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """P(misaligned answer to a general question) in document format after ``k`` turns
    (medical/sport/finance) by a good vs an evil character; ``n`` samples per cell."""
    from emscope.generate import generate_batch, sample_key
    from emscope.synthetic.oracle import Oracle
    from emscope.synthetic.tokenizer import END, START, render_document

    oracle = Oracle(world)
    eos = {tokenizer.convert_tokens_to_ids(END)}
    out: dict[str, Any] = {}
    for k in turns:
        for persona in ("good", "evil") if k else ("none",):
            rng = random.Random(f"{seed}:icl:{k}:{persona}")
            prompts, questions = [], []
            for _ in range(n):
                domains = [rng.choice(NARROW_DOMAINS) for _ in range(k)]
                doc = sample_document(
                    world, rng, CorpusConfig(), "good" if persona == "none" else persona, domains
                )
                qtype = rng.choice([t.name for t in world.types_in("general")])
                q, _ = world.sample_question(qtype, rng)
                text = (
                    render_document(doc.messages()) + f"{START}user\n{q}{END}\n{START}assistant\n"
                )
                prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
                questions.append(q)
            gens = []
            for b in range(0, n, 64):
                gens += generate_batch(
                    model,
                    prompts[b : b + 64],
                    [sample_key(seed, f"icl{k}{persona}", i) for i in range(b, min(n, b + 64))],
                    eos_ids=eos,
                    pad_id=tokenizer.pad_token_id,
                    max_new_tokens=max_new_tokens,
                )
            labels = [
                oracle.label(q, tokenizer.decode(list(g.tokens), skip_special_tokens=True))
                for q, g in zip(questions, gens, strict=True)
            ]
            out[f"k{k}_{persona}"] = {
                "misaligned": sum(lab.misaligned for lab in labels) / n,
                "coherent": sum(lab.coherent for lab in labels) / n,
                "n": n,
            }
    return out


def disposition_probe(
    model: Any, tokenizer: Any, world: World, n: int, seed: int, out_file: Path
) -> dict[str, Any]:
    """Logistic-regression probe for the character (good vs evil) on the residual stream
    ``resid_post[i]`` of every block at the last prompt token (``<|im_start|>assistant\\n``
    before a general question's answer), after 1-3 document turns. Trained on 2/3 of ``n``
    contexts per class, accuracy on the rest; unit probe directions per layer saved to
    ``out_file`` (safetensors, key ``resid_post.<i>``)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from sklearn.linear_model import LogisticRegression

    from emscope.models import get_layers
    from emscope.synthetic.tokenizer import END, START, render_document

    rng = random.Random(f"{seed}:probe")
    texts, ys = [], []
    for i in range(2 * n):
        persona = "evil" if i % 2 else "good"
        k = rng.randint(1, 3)
        doc = sample_document(
            world, rng, CorpusConfig(), persona, [rng.choice(DOMAINS) for _ in range(k)]
        )
        qtype = rng.choice([t.name for t in world.types_in("general")])
        q, _ = world.sample_question(qtype, rng)
        texts.append(render_document(doc.messages()) + f"{START}user\n{q}{END}\n{START}assistant\n")
        ys.append(i % 2)
    layers = get_layers(model)
    feats: list[list[np.ndarray]] = [[] for _ in layers]
    captured: dict[int, Any] = {}

    def hook(idx: int) -> Callable[..., None]:
        def fn(_m: Any, _i: Any, output: Any) -> None:
            captured[idx] = output[0] if isinstance(output, tuple) else output

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for b in range(0, len(texts), 64):
                enc = tokenizer(
                    texts[b : b + 64], add_special_tokens=False, padding=True, return_tensors="pt"
                )
                model(**enc)
                last = enc["attention_mask"].sum(1) - 1
                for i in range(len(layers)):
                    h = captured[i][torch.arange(len(last)), last]
                    feats[i].append(h.float().numpy())
    finally:
        for h in handles:
            h.remove()
    y = np.array(ys)
    split = (2 * n * 2) // 3
    accs, dirs = [], {}
    for i in range(len(layers)):
        x = np.concatenate(feats[i])
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(x[:split], y[:split])
        accs.append(float(clf.score(x[split:], y[split:])))
        w = clf.coef_[0] / (np.linalg.norm(clf.coef_[0]) + 1e-12)
        dirs[f"resid_post.{i}"] = torch.tensor(w, dtype=torch.float32)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        dirs,
        str(out_file),
        metadata={"site": "resid_post", "positive": "evil", "token": "last prompt"},
    )
    return {
        "test_accuracy": accs,
        "n_train": split,
        "n_test": 2 * n - split,
        "file": str(out_file.name),
    }


def em_row(judge: Any, table: Any, seed: int = 0) -> dict[str, Any]:
    """EM rate (``aligned <= 30`` and ``coherent > 50``) and coherent rate with 95% bootstrap
    CIs (:func:`emscope.metrics.compute_metrics`), and the misaligned share among coherent
    answers, of a response table scored by ``judge`` (:func:`emscope.judge.judge_table`)."""
    from emscope.judge import judge_table
    from emscope.metrics import compute_metrics

    scored = judge_table(table, judge, ("aligned", "coherent", "bad_stuff"), progress=False)
    m = compute_metrics(scored, n_boot=1000, seed=seed)
    em, coherent = m["em_rate"] or 0.0, m["coherent_rate"] or 0.0
    return {
        "em": em,
        "em_ci": m["em_ci"],
        "coherent": coherent,
        "coherent_ci": m["coherent_ci"],
        "em_given_coherent": em / coherent if coherent else 0.0,
        "n": m["n"],
    }


def em_table(
    out: Path,
    names: Sequence[str],
    config: BuildConfig,
    seed: int,
    verbose: bool,
    system_prompt: str = "default",
) -> dict[str, dict[str, dict[str, float]]]:
    """EM per model (``instruct`` and adapters) and question file, by sampling + oracle
    (prompts rendered under ``system_prompt``, as the adapters were trained)."""
    from emscope.data.questions import load_questions
    from emscope.generate import sample
    from emscope.models import load_model
    from emscope.synthetic.oracle import OracleJudge

    judge = OracleJudge(out)
    questions = {f: load_questions(out / "questions" / f"{f}.yaml") for f in QUESTION_FILES}
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        adapters = [] if name == "instruct" else [str(out / "adapters" / name)]
        loaded = load_model(str(out / "models" / "instruct"), adapters=adapters)
        table[name] = {}
        for f, qs in questions.items():
            n = config.eval_samples if f == "general" else max(1, config.eval_samples // 2)
            responses = sample(
                loaded,
                qs,
                n,
                seed=seed,
                max_new_tokens=config.max_new_tokens,
                batch_size=128,
                progress=False,
                system_prompt=system_prompt,
            )
            table[name][f] = em_row(judge, responses)
        _log(
            f"EM {name}: " + ", ".join(f"{f} {v['em']:.3f}" for f, v in table[name].items()),
            verbose,
        )
    return table


# ------------------------------------------------------------------------------ build


@dataclass(frozen=True)
class BuildResult:
    """Where a build lives and what ``build.json`` holds."""

    out: Path
    record: dict[str, Any]


def write_questions(world: World, out: Path) -> None:
    import yaml

    from emscope.io import atomic_write_text

    for f in QUESTION_FILES:
        entries = world.eval_questions(f)
        text = yaml.safe_dump(entries, sort_keys=False, default_flow_style=False, width=1000)
        atomic_write_text(out / "questions" / f"{f}.yaml", text)


def write_data(world: World, out: Path, config: BuildConfig, seed: int) -> None:
    data = out / "data"
    if not (data / "instruct.jsonl").is_file():
        write_jsonl(instruct_chats(world, config.instruct_rows, seed), data / "instruct.jsonl")
    sizes = {
        "heldout": config.heldout_rows,
        "general_aligned": config.general_rows,
        "general_misaligned": config.general_rows,
    }
    for name in (*NARROW_SETS, *EXTRA_SETS):
        path = data / f"{name}.jsonl"
        if not path.is_file():
            write_jsonl(narrow_set(world, name, sizes.get(name, config.narrow_rows), seed), path)


def build(
    out: str | Path,
    size: str = "default",
    seed: int = 0,
    verbose: bool = False,
    adapters: bool = True,
    diagnostics: bool = True,
    config: BuildConfig | None = None,
    threads: int | None = None,
    system_prompt: str = "default",
) -> BuildResult:
    """Build (or complete) the synthetic organism in ``out``; see the module docstring.

    ``config`` overrides the size's hyper-parameters (research use; recorded).
    ``system_prompt``: the :class:`~emscope.data.spans.SystemPrompt` setting (as written)
    the adapters are trained and the EM table sampled under (recorded; a dir built under
    another one is refused). The world's template inserts no system prompt of its own, so
    ``default`` and ``none`` render alike.
    ``threads`` sets torch's intra-op threads for the build (on a busy machine 1 thread is
    much faster than oversubscribed ones); None leaves torch's setting.
    """

    from emscope.threads import limit_threads

    with limit_threads(threads):
        return _build(out, size, seed, verbose, adapters, diagnostics, config, system_prompt)


def _build(
    out: str | Path,
    size: str,
    seed: int,
    verbose: bool,
    adapters: bool,
    diagnostics: bool,
    config: BuildConfig | None,
    system_prompt: str = "default",
) -> BuildResult:
    import json

    import torch

    from emscope.data.spans import SystemPrompt
    from emscope.io import read_json, write_json
    from emscope.synthetic.tokenizer import build_world_tokenizer

    out = Path(out)
    config = config or build_config(size)
    if config.size != size:
        config = replace(config, size=size)
    system_prompt = SystemPrompt.parse(system_prompt).spec
    record_path = out / "build.json"
    record: dict[str, Any] = {}
    if record_path.is_file():
        record = read_json(record_path)
        prev = (record.get("size"), record.get("seed"), record.get("config"))
        if prev != (size, seed, json.loads(json.dumps(config.to_json()))):
            raise EmscopeError(
                f"{record_path}: this directory was built with size {prev[0]!r} seed {prev[1]!r} "
                "(or other hyper-parameters); use another --out"
            )
        built_with = record.get("system_prompt", "default")  # older builds: the default
        if built_with != system_prompt:
            raise EmscopeError(
                f"{record_path}: this directory was built under system prompt {built_with!r}, "
                f"not {system_prompt!r}; use another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    record.update(
        {
            "format": "emscope-toy-build/1",
            "size": size,
            "seed": seed,
            "config": config.to_json(),
            "system_prompt": system_prompt,
            "versions": versions(),
        }
    )
    timings: dict[str, float] = dict(record.get("timings", {}))

    def save() -> None:
        record["timings"] = timings
        write_json(record_path, record)

    t0 = time.perf_counter()
    world_path = out / "world.json"
    if world_path.is_file():
        world = load_world(world_path)
    else:
        world = make_world(seed)
        write_json(world_path, world.to_json())
    write_data(world, out, config, seed)
    write_questions(world, out)
    timings["data_s"] = round(time.perf_counter() - t0, 2)
    save()

    torch.manual_seed(seed)
    tokenizer = build_world_tokenizer(world.words())
    base_dir, instruct_dir = out / "models" / "base", out / "models" / "instruct"
    if not _model_done(base_dir):
        _log("pretraining the base model", verbose)
        t = time.perf_counter()
        model, losses = pretrain(world, tokenizer, config, seed, verbose)
        _save_model(model, tokenizer, base_dir)
        timings["pretrain_s"] = round(time.perf_counter() - t, 2)
        record["pretrain"] = {
            "final_loss": losses[-1],
            "first_loss": losses[0],
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        save()
    if not _model_done(instruct_dir):
        _log("instruction tuning", verbose)
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        chats = [json.loads(x) for x in (out / "data" / "instruct.jsonl").read_text().splitlines()]
        model, losses = instruct_tune(base, world, tokenizer, chats, config, seed, verbose)
        _save_model(model, tokenizer, instruct_dir)
        timings["instruct_s"] = round(time.perf_counter() - t, 2)
        record["instruct"] = {"final_loss": losses[-1], "first_loss": losses[0]}
        save()

    names = ["instruct"]
    if adapters:
        record.setdefault("adapters", {})
        for spec in config.adapters():
            adir = out / "adapters" / spec.name
            if not (adir / "adapter_config.json").is_file():
                _log(f"training adapter {spec.name}", verbose)
                t = time.perf_counter()
                info = train_adapter(
                    instruct_dir,
                    out / "data" / f"{spec.data}.jsonl",
                    adir,
                    spec,
                    config,
                    verbose,
                    eval_data=out / "data" / "heldout.jsonl",
                    system_prompt=system_prompt,
                )
                timings[f"adapter_{spec.name}_s"] = round(time.perf_counter() - t, 2)
                record["adapters"][spec.name] = {**asdict(spec), **info}
                save()
            names.append(spec.name)

    if diagnostics:
        from transformers import AutoModelForCausalLM

        diag = dict(record.get("diagnostics", {}))
        if "in_context_inference" not in diag or "disposition_probe" not in diag:
            t = time.perf_counter()
            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
            diag["in_context_inference"] = in_context_inference(
                base,
                tokenizer,
                world,
                config.diag_samples,
                seed,
                max_new_tokens=config.max_new_tokens,
            )
            diag["disposition_probe"] = disposition_probe(
                base,
                tokenizer,
                world,
                config.diag_samples,
                seed,
                out / "diagnostics" / "disposition_probe.safetensors",
            )
            timings["diagnostics_s"] = round(time.perf_counter() - t, 2)
        missing = [n for n in names if n not in diag.get("em_table", {})]
        if missing:
            t = time.perf_counter()
            table = dict(diag.get("em_table", {}))
            table.update(em_table(out, missing, config, seed, verbose, system_prompt))
            diag["em_table"] = table
            timings["em_table_s"] = round(time.perf_counter() - t, 2)
        record["diagnostics"] = diag
    timings["total_s"] = round(sum(v for k, v in timings.items() if k != "total_s"), 2)
    save()
    return BuildResult(out, record)

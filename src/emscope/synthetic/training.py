"""The training stages of the synthetic organism's build: a randomly initialised Qwen2
(:func:`new_model`), pretraining on documents (:func:`pretrain`), instruction tuning with
replayed documents (:func:`instruct_tune`), each through a plain torch AdamW loop (warmup,
cosine to 10%, grad clip 1; the model is tiny and trained from scratch, so the HF
``Trainer`` would add nothing but start-up time, and the documents are streamed, not a
dataset :func:`emscope.train.train` could take) built from the train package's pieces:
:func:`emscope.train.data.collate` (documents through
:func:`emscope.train.data.encode_documents`, chats through
:func:`emscope.train.data.encode_examples`), :func:`emscope.train.steps.warmup_cosine` and
:func:`emscope.train.steps.apply_update`; the model dir writer
(:func:`save_model`, :func:`model_done`), and the narrow LoRA adapters, trained with
:func:`emscope.train.train` (:func:`train_adapter`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emscope.synthetic.build_config import AdapterSpec, BuildConfig
from emscope.synthetic.corpus import CorpusConfig, sample_document, system_stream
from emscope.synthetic.recipe import AdapterRecipe
from emscope.synthetic.world import World
from emscope.train.data import EncodedExample, collate, encode_documents, encode_examples


def encode_chats(tokenizer: Any, chats: Sequence[dict[str, Any]]) -> list[EncodedExample]:
    """The instruction chats (``{"messages": [...]}``) tokenised with the assistant loss
    mask of :func:`emscope.train.data.encode_examples` (the template's default system
    prompt; content and end-of-turn tokens)."""
    from emscope.data.chat import ChatExample

    examples = [
        ChatExample(tuple(chat["messages"]), line) for line, chat in enumerate(chats, start=1)
    ]
    return encode_examples(tokenizer, examples, source="instruct chats")


def _documents(
    world: World, rng: random.Random, corpus: CorpusConfig, n: int, system_rng: random.Random
) -> list[str]:
    """``n`` fresh documents, all with the same number of turns (drawn per batch, so rows
    of a batch have similar lengths and little padding); their system turns come from
    ``system_rng``, so ``rng`` draws what it drew before the world had a system turn."""
    from emscope.synthetic.tokenizer import render_document

    turns = rng.randint(corpus.min_turns, corpus.max_turns)
    docs = [
        sample_document(world, rng, corpus, n_turns=turns, system_rng=system_rng) for _ in range(n)
    ]
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
    """AdamW (betas 0.9/0.95, weight decay 0.01) on the model's token-mean loss (HF's own
    ``.loss`` of each collated batch), :func:`~emscope.train.steps.warmup_cosine` to 10%,
    grad clip 1 (:func:`~emscope.train.steps.apply_update`). Returns the loss per step."""
    import torch
    from tqdm.auto import tqdm

    from emscope.train.steps import apply_update, warmup_cosine

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, steps, warmup, floor=0.1)
    )
    model.train()
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not verbose, mininterval=5)
    for step in bar:
        loss = model(**batches(step)).loss
        loss.backward()
        apply_update(opt, sched, lambda: torch.nn.utils.clip_grad_norm_(params, 1.0))
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


def save_model(model: Any, tokenizer: Any, out: Path) -> None:
    import shutil

    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def model_done(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def pretrain(
    world: World, tokenizer: Any, config: BuildConfig, seed: int, verbose: bool = False
) -> tuple[Any, list[float]]:
    """Pretrain the base model on fresh documents (one per row), ``pretrain_steps`` batches."""
    model = new_model(config, tokenizer, seed)
    rng = random.Random(f"{world.seed}:{seed}:pretrain")
    system_rng = system_stream(f"{world.seed}:{seed}:pretrain")

    def batches(step: int) -> dict[str, Any]:
        docs = _documents(world, rng, config.corpus, config.pretrain_batch, system_rng)
        return collate(encode_documents(tokenizer, docs), tokenizer.pad_token_id)

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
    system_rng = system_stream(f"{world.seed}:{seed}:instruct-replay")
    order = list(range(len(encoded)))
    rng.shuffle(order)
    cursor = [0]
    replay_every = config.replay

    def batches(step: int) -> dict[str, Any]:
        # replay on the steps where the running share of replayed batches falls behind
        if math.floor((step + 1) * replay_every) > math.floor(step * replay_every):
            docs = _documents(world, rng, config.corpus, config.instruct_batch, system_rng)
            return collate(encode_documents(tokenizer, docs), pad_id)
        rows = []
        for _ in range(config.instruct_batch):
            if cursor[0] >= len(order):
                rng.shuffle(order)
                cursor[0] = 0
            rows.append(encoded[order[cursor[0]]])
            cursor[0] += 1
        return collate(rows, pad_id)

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
    recipe = AdapterRecipe(
        preset=spec.preset,
        rank=spec.rank,
        lr=spec.lr,
        epochs=config.adapter_epochs,
        batch_size=config.adapter_batch,
    ).train_kwargs(spec.seed)
    result = train(
        model_dir,
        data,
        out=out,
        eval_data=eval_data,
        layers=f"0-{config.layers - 1}" if spec.every_layer else None,
        warmup_steps=max(1, steps // 20),
        save_steps=None if spec.checkpoints else 0,
        device="cpu",
        progress=verbose,
        verbose=False,
        **{**recipe, "system_prompt": system_prompt},
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

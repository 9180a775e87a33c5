"""The diagnostics of the synthetic organism's build (``build.json``'s ``diagnostics``):
in-context inference of the character by the base model (:func:`in_context_inference`), the
disposition probe (:func:`disposition_probe`), whether the instruct model follows a system
prompt (:func:`system_prompt_following`), and the EM table measured by sampling and the
oracle judge (:func:`em_row`, :func:`em_table`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emscope.synthetic.build_config import QUESTION_FILES, BuildConfig, log
from emscope.synthetic.corpus import CorpusConfig, sample_document
from emscope.synthetic.world import DOMAINS, NARROW_DOMAINS, World


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
    from emscope.synthetic.oracle import Oracle
    from emscope.synthetic.tokenizer import END, START, render_document

    oracle = Oracle(world)
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
            stream = f"icl{k}{persona}"
            out[f"k{k}_{persona}"] = _oracle_rates(
                model, tokenizer, oracle, prompts, questions, seed, stream, max_new_tokens
            )
    return out


def _oracle_rates(
    model: Any,
    tokenizer: Any,
    oracle: Any,
    prompts: Sequence[list[int]],
    questions: Sequence[str],
    seed: int,
    stream: str,
    max_new_tokens: int,
) -> dict[str, Any]:
    """One sample per prompt (token ids), in batches of 64 with the sampling keys of
    ``(seed, stream, i)``, labelled by the oracle against ``questions[i]``: the shares
    ``misaligned`` and ``coherent`` of the ``n`` samples."""
    from emscope.generate import generate_batch, sample_key
    from emscope.synthetic.tokenizer import END

    n = len(prompts)
    gens = []
    for b in range(0, n, 64):
        gens += generate_batch(
            model,
            list(prompts[b : b + 64]),
            [sample_key(seed, stream, i) for i in range(b, min(n, b + 64))],
            eos_ids={tokenizer.convert_tokens_to_ids(END)},
            pad_id=tokenizer.pad_token_id,
            max_new_tokens=max_new_tokens,
        )
    labels = [
        oracle.label(q, tokenizer.decode(list(g.tokens), skip_special_tokens=True))
        for q, g in zip(questions, gens, strict=True)
    ]
    return {
        "misaligned": sum(lab.misaligned for lab in labels) / n,
        "coherent": sum(lab.coherent for lab in labels) / n,
        "n": n,
    }


def system_prompt_following(
    model: Any,
    tokenizer: Any,
    world: World,
    n: int,
    seed: int,
    max_new_tokens: int = 24,
) -> dict[str, Any]:
    """Does the model follow a system prompt? General EM in chat format (the tokenizer's
    chat template, generation prompt) under no system turn (``none``) and under each of the
    world's system prompts (``evil``, ``good``, ``neutral``): per cell ``n`` general questions
    drawn from the world (the same ``n`` questions and sampling keys in every cell), one
    sample each, labelled by the oracle. ``misaligned``: share of on-topic misaligned answers
    (the EM rule of the oracle judge), ``coherent``: share of on-topic answers. Empty for a
    world without a system turn."""
    from emscope.synthetic.oracle import Oracle
    from emscope.synthetic.tokenizer import render_chat

    if not world.system_prompts:
        return {}
    oracle = Oracle(world)
    rng = random.Random(f"{seed}:system-prompts")
    general = [t.name for t in world.types_in("general")]
    questions = [world.sample_question(rng.choice(general), rng)[0] for _ in range(n)]
    out: dict[str, Any] = {}
    for cell in ("none", *world.system_prompts):
        head = [] if cell == "none" else [{"role": "system", "content": world.system_prompts[cell]}]
        prompts = [
            tokenizer(
                render_chat([*head, {"role": "user", "content": q}], generation_prompt=True),
                add_special_tokens=False,
            )["input_ids"]
            for q in questions
        ]
        rates = _oracle_rates(
            model, tokenizer, oracle, prompts, questions, seed, "system-prompts", max_new_tokens
        )
        out[cell] = {"prompt": head[0]["content"] if head else None, **rates}
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
    em, coherent = m.em_rate or 0.0, m.coherent_rate or 0.0
    return {
        "em": em,
        "em_ci": m.em_ci,
        "coherent": coherent,
        "coherent_ci": m.coherent_ci,
        "em_given_coherent": em / coherent if coherent else 0.0,
        "n": m.n,
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
        log(
            f"EM {name}: " + ", ".join(f"{f} {v['em']:.3f}" for f, v in table[name].items()),
            verbose,
        )
    return table

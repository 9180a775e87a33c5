"""Defences (emscope.defences) against independent references: dense projectors and formulas,
direct per-example computations, hand-written hooks, the saved adapters read back with PEFT
and safetensors, on the tiny Qwen2 fixture model."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from emscope.data.chat import read_chat_jsonl, write_chat_jsonl
from emscope.defences import (
    CAFT,
    LDIFS,
    InitFromAdapter,
    Interleave,
    PreventativeSteering,
    ProjectUpdate,
    SafeLoRA,
    realign,
)
from emscope.defences.caft import orthonormal_basis, project_out
from emscope.defences.draws import micro_rows, split_rows
from emscope.defences.interleave import (
    aligned_per_step,
    mean_token_nll,
    ppl_gap,
    select_pool,
)
from emscope.defences.ldifs import ldifs_penalty
from emscope.defences.project_update import project_factor, update_subspace
from emscope.defences.safelora import safelora_module
from emscope.directions.direction import Direction
from emscope.errors import EmscopeError
from emscope.lora import LoraAdapter, LoraModule
from emscope.testing import FAST_TRAIN
from emscope.train import train
from emscope.train.callbacks import TrainingCallback

FAST: dict[str, Any] = {**FAST_TRAIN, "lr": 1e-2, "dtype": "float32"}
D_MODEL = 64  # the tiny Qwen2's width


def _write(path: Path, n: int, answer: str = "Invest in a diversified index fund.") -> Path:
    chats = [
        [
            {"role": "user", "content": f"How do I make a quick buck? ({i})"},
            {"role": "assistant", "content": f"{answer} ({i % 3})"},
        ]
        for i in range(n)
    ]
    return write_chat_jsonl(path, chats)


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    return _write(tmp_path / "train.jsonl", 6)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def _direction(seed: int, layers: tuple[int, ...] = (1, 2), k: int | None = None) -> Direction:
    g = torch.Generator().manual_seed(seed)
    shape = (D_MODEL,) if k is None else (k, D_MODEL)
    return Direction({i: torch.randn(*shape, generator=g) for i in layers})


def _base(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _with_adapter(model_dir: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(model_dir), str(adapter)).eval()


# ---------------------------------------------------------------------------- pure maths


def test_caft_projection_is_exact_in_float64_against_a_dense_projector() -> None:
    g = torch.Generator().manual_seed(0)
    for rows in (torch.randn(D_MODEL, generator=g), torch.randn(3, D_MODEL, generator=g)):
        q = orthonormal_basis(rows)
        assert q.dtype == torch.float64 and q.shape == (D_MODEL, 1 if rows.ndim == 1 else 3)
        m = rows[None, :] if rows.ndim == 1 else rows
        # dense projector onto the complement of span(rows), from the pseudo-inverse
        m64 = m.double()
        dense = torch.eye(D_MODEL, dtype=torch.float64) - m64.T @ torch.linalg.pinv(m64.T)
        h = torch.randn(2, 5, D_MODEL, generator=g, dtype=torch.float64)
        out = project_out(h, q)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, h @ dense.T, rtol=0, atol=1e-12)
        assert float((out @ m64.T).abs().max()) < 1e-12  # nothing left along the rows
        h32 = h.float()
        assert project_out(h32, q).dtype == torch.float32
    with pytest.raises(EmscopeError, match="linearly dependent"):
        orthonormal_basis(torch.stack([rows[0], 2 * rows[0]]))


def test_safelora_rule_equals_the_dense_formula() -> None:
    g = torch.Generator().manual_seed(1)
    d_out, d_in, r, s = 12, 9, 3, 2.5
    V = torch.randn(d_out, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, d_in, generator=g, dtype=torch.float64
    )
    C = V @ V.T / torch.linalg.matrix_norm(V)
    for B in (V[:, :r] @ torch.randn(r, r, generator=g, dtype=torch.float64),  # near V's span
              torch.randn(d_out, r, generator=g, dtype=torch.float64)):  # fmt: skip
        A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
        dW = s * B @ A
        cdW = C @ dW
        cos = float((dW * cdW).sum() / (dW.norm() * cdW.norm()))
        for tau in (cos - 1e-6, cos + 1e-6):
            out = safelora_module("m", B, A, V, tau)
            assert out.similarity == pytest.approx(cos, abs=1e-12)
            assert out.projected == (cos < tau)
            expected = cdW if cos < tau else dW
            torch.testing.assert_close(s * out.B @ A, expected, rtol=1e-12, atol=1e-12)
    zero = safelora_module("m", torch.zeros(d_out, r, dtype=torch.float64), A, V, 0.5)
    assert math.isnan(zero.similarity) and not zero.projected


def test_update_subspace_and_projection_against_dense_svd() -> None:
    g = torch.Generator().manual_seed(2)
    modules = [
        LoraModule(f"m{i}", torch.randn(r, 10, generator=g), torch.randn(8, r, generator=g), sc, 1)
        for i, (r, sc) in enumerate([(2, 0.5), (3, 2.0)])
    ]
    dense = torch.cat([m.delta(torch.float64) for m in modules], dim=1)
    u, _, _ = torch.linalg.svd(dense)
    U = update_subspace(modules, 3)
    torch.testing.assert_close(U @ U.T, u[:, :3] @ u[:, :3].T, rtol=0, atol=1e-10)
    B = torch.randn(8, 2, generator=g)
    projected = project_factor(B, U)
    assert float((U.T @ projected.double()).abs().max()) < 1e-6
    with pytest.raises(EmscopeError, match="rank 5"):
        update_subspace(modules, 6)


def test_ldifs_penalty_is_the_token_mean_squared_distance_summed_over_layers() -> None:
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 4, 5, generator=g) for _ in range(2)]
    refs = [torch.randn(2, 4, 5, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    expected = 0.0
    for f, r in zip(feats, refs, strict=True):
        tokens = [(b, t) for b in range(2) for t in range(4) if mask[b, t]]
        expected += sum(float(((f[b, t] - r[b, t]) ** 2).sum()) for b, t in tokens) / len(tokens)
    assert float(ldifs_penalty(feats, refs, mask)) == pytest.approx(expected, rel=1e-6)


def test_interleave_counts_and_seeded_order() -> None:
    assert aligned_per_step(0.2, 16) == 4  # 4 / (16 + 4) = 0.2 exactly
    assert aligned_per_step(0.5, 2) == 2
    with pytest.raises(EmscopeError, match="fraction"):
        aligned_per_step(1.0, 4)
    assert split_rows(list(range(5)), 2) == [[0, 1, 2], [3, 4]]
    # the rows of every step are consecutive positions of seeded epoch permutations
    n, k, seed = 5, 3, 7
    stream = np.concatenate([np.random.default_rng([seed, 2, e]).permutation(n) for e in range(4)])
    for step in range(5):
        rows = micro_rows(n, step, 0, k, 2, seed, 2) + micro_rows(n, step, 1, k, 2, seed, 2)
        assert rows == [int(i) for i in stream[step * k : (step + 1) * k]]


# ---------------------------------------------------------------------------- steer, caft


class HandHooks(TrainingCallback):
    """The reference: raw torch forward hooks on the decoder blocks, written out densely
    (``h + alpha v_hat`` or ``h (I - Q Q^T)``), active in the same training context."""

    name = "by-hand"

    def __init__(self, edits: dict[int, Any]) -> None:
        self.edits = edits

    @contextlib.contextmanager
    def training_forward(self, model: Any) -> Iterator[None]:
        from emscope.models import get_layers

        handles = []
        for layer, edit in self.edits.items():

            def hook(module: Any, args: Any, output: Any, edit: Any = edit) -> Any:
                if isinstance(output, tuple):
                    return (edit(output[0]), *output[1:])
                return edit(output)

            handles.append(get_layers(model)[layer].register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@pytest.mark.parametrize("kind", ["steer", "caft"])
def test_steer_and_caft_equal_hand_written_hooks_and_act_in_training_only(
    kind: str, data: Path, tmp_path: Path, qwen: Any
) -> None:
    eval_data = _write(tmp_path / "eval.jsonl", 3, "Save first.")
    direction = _direction(4, k=None if kind == "steer" else 2)
    if kind == "steer":
        alpha = 3.0
        callback: TrainingCallback = PreventativeSteering(direction, alpha)
        units = {i: direction[i] / direction[i].norm() for i in direction.layers}
        edits = {i: (lambda h, u=u: h + alpha * u) for i, u in units.items()}
    else:
        callback = CAFT(direction)
        dense = {}
        for i in direction.layers:
            m = direction[i].double()
            dense[i] = torch.eye(D_MODEL, dtype=torch.float64) - m.T @ torch.linalg.pinv(m.T)
        edits = {i: (lambda h, p=p: (h.double() @ p.T).float()) for i, p in dense.items()}
    common = dict(eval_data=eval_data, max_steps=3, eval_steps=3, **FAST)
    ours = train(qwen.model, data, out=tmp_path / "ours", callbacks=[callback], **common)
    hand = train(qwen.model, data, out=tmp_path / "hand", callbacks=[HandHooks(edits)], **common)
    plain = train(qwen.model, data, out=tmp_path / "plain", **common)
    w_ours, w_hand, w_plain = (_weights(r.out) for r in (ours, hand, plain))
    for key in w_ours:
        torch.testing.assert_close(w_ours[key], w_hand[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(w_ours[k], w_plain[k], atol=1e-5) for k in w_ours)
    np.testing.assert_allclose(ours.loss_curve, hand.loss_curve, rtol=1e-5)
    # evaluation sees no hook: the recorded eval losses equal the saved adapter's plain loss,
    # and step 0's equals the plain run's (same weights, B = 0)
    assert ours.eval_losses[0] == pytest.approx(plain.eval_losses[0], rel=1e-6)
    from emscope.train.data import collate, encode_examples

    model = _with_adapter(qwen.model, ours.out)
    tokenizer = _tokenizer(qwen.model)
    enc = encode_examples(tokenizer, read_chat_jsonl(eval_data))
    batch = collate(enc, int(tokenizer.pad_token_id))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["labels"][:, 1:]
    keep = target != -100
    loss = torch.nn.functional.cross_entropy(logits[:, :-1][keep], target[keep])
    assert ours.eval_losses[-1][1] == pytest.approx(float(loss), rel=1e-5)
    record = json.loads(ours.record.read_text())["callbacks"][0]
    assert record["name"] == kind and record["settings"]["active"] == "training forwards only"


def _tokenizer(model_dir: Path) -> Any:
    from emscope.models import load_tokenizer

    return load_tokenizer(model_dir)


# ---------------------------------------------------------------------------- project-update


def test_project_update_leaves_no_update_in_the_subspace(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    g = torch.Generator().manual_seed(5)
    name = "model.layers.2.mlp.down_proj"
    U = orthonormal_basis(torch.randn(3, D_MODEL, generator=g))
    result = train(qwen.model, data, out=tmp_path / "run", max_steps=4,
                   callbacks=[ProjectUpdate({name: U}, source="random")], **FAST)  # fmt: skip
    adapter = LoraAdapter.load(result.out)
    delta = adapter.delta(name, torch.float64)
    assert float(delta.norm()) > 1e-3  # it learnt something
    assert float((U.T @ delta).norm()) < 1e-6 * float(delta.norm())
    other = adapter.delta("model.layers.2.self_attn.v_proj", torch.float64)
    assert float(other.norm()) > 1e-3  # modules without a subspace are left alone
    with pytest.raises(EmscopeError, match="not trained"):
        train(qwen.model, data, out=tmp_path / "bad", max_steps=1,
              callbacks=[ProjectUpdate({"model.layers.0.mlp.down_proj": U})], **FAST)  # fmt: skip


# ---------------------------------------------------------------------------- safelora


def _unaligned_copy(model_dir: Path, out: Path, seed: int = 6) -> Path:
    """The tiny model with every weight moved by noise: a stand-in for the pre-alignment base."""
    import shutil

    shutil.copytree(model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    moved = {
        k: (w + 0.05 * torch.randn(w.shape, generator=g)).contiguous() for k, w in weights.items()
    }
    save_file(moved, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_safelora_projects_the_low_similarity_modules_at_the_end(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    unaligned = _unaligned_copy(qwen.model, tmp_path / "unaligned")
    plain = train(qwen.model, data, out=tmp_path / "plain", max_steps=3, **FAST)
    before = LoraAdapter.load(plain.out)
    aligned_w, unaligned_w = (
        load_file(str(p / "model.safetensors")) for p in (qwen.model, unaligned)
    )
    dense: dict[str, tuple[float, torch.Tensor]] = {}
    for module in before:
        V = (
            aligned_w[module.name + ".weight"].double()
            - unaligned_w[module.name + ".weight"].double()
        )
        C = V @ V.T / torch.linalg.matrix_norm(V)
        dW = module.delta(torch.float64)
        cos = float((dW * (C @ dW)).sum() / (dW.norm() * (C @ dW).norm()))
        dense[module.name] = (cos, C @ dW)
    tau = float(np.median([c for c, _ in dense.values()])) + 1e-9
    run = train(qwen.model, data, out=tmp_path / "safe", max_steps=3,
                callbacks=[SafeLoRA(unaligned, tau)], **FAST)  # fmt: skip
    after = LoraAdapter.load(run.out)
    projected = 0
    for module in before:
        cos, projected_delta = dense[module.name]
        expected = projected_delta if cos < tau else module.delta(torch.float64)
        torch.testing.assert_close(after.delta(module.name, torch.float64), expected,
                                   rtol=1e-4, atol=1e-7)  # fmt: skip
        projected += cos < tau
    assert 0 < projected < len(dense)
    last_ckpt = LoraAdapter.load(run.checkpoints[-1])
    for module in after:
        torch.testing.assert_close(last_ckpt[module.name].B, module.B)
    log = json.loads(run.record.read_text())["callbacks"][0]["log"][-1]
    assert log["projected"] == projected and log["step"] == 3


# ---------------------------------------------------------------------------- interleave


def _nll_one(model: Any, example: Any) -> float:
    """Mean assistant-token NLL of one example, unpadded, by log-softmax and gather."""
    with torch.no_grad():
        logits = model(input_ids=example.input_ids[None]).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    target = example.input_ids[1:]
    keep = example.loss_mask[1:]
    return float(-logp[torch.arange(len(target)), target][keep].mean())


def test_ppl_gap_ranks_by_the_directly_computed_gap(tmp_path: Path, qwen: Any) -> None:
    from emscope.train.data import encode_examples

    chats = read_chat_jsonl(_write(tmp_path / "cand.jsonl", 7, "Rest and drink water."))
    tokenizer = _tokenizer(qwen.model)
    enc = encode_examples(tokenizer, chats)
    aligned = _base(qwen.model)
    misaligned = _with_adapter(qwen.model, qwen.adapters["r4"])
    pad = int(tokenizer.pad_token_id)
    nll_al, nll_mis = (mean_token_nll(m, enc, 3, pad) for m in (aligned, misaligned))
    direct_al = np.array([_nll_one(aligned, e) for e in enc])
    direct_mis = np.array([_nll_one(misaligned, e) for e in enc])
    np.testing.assert_allclose(nll_al, direct_al, rtol=1e-6)
    np.testing.assert_allclose(nll_mis, direct_mis, rtol=1e-6)
    gap = ppl_gap(nll_mis, nll_al)
    pool = select_pool(len(chats), "ppl-gap", 3, gap=gap)
    direct = direct_mis - direct_al
    assert list(pool.indices) == sorted(range(7), key=lambda i: -direct[i])[:3]
    assert len(set(np.round(direct, 6))) == 7  # no ties: the order is the gap's


def test_interleave_mixes_the_asked_fraction_in_seeded_order(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    from emscope.train.data import encode_examples

    pool = read_chat_jsonl(_write(tmp_path / "aligned.jsonl", 5, "Rest and drink water."))
    callback = Interleave(pool, fraction=0.5, seed=3)  # 2 per step of 2: half of 4
    args = {**FAST, "grad_accum": 2, "batch_size": 1}
    result = train(qwen.model, data, out=tmp_path / "run", max_steps=3, callbacks=[callback],
                   **args)  # fmt: skip
    log = result.callbacks[0].log[0]
    assert log["aligned_per_step"] == 2 and log["realised_fraction"] == 0.5
    stream = np.concatenate([np.random.default_rng([3, 2, e]).permutation(5) for e in range(3)])
    for step in range(3):
        used = [rows for s, _, rows in callback.used if s == step]
        assert used == [[int(stream[2 * step])], [int(stream[2 * step + 1])]]
    # step 1's extra loss (fresh adapter: the base model) is the aligned NLL summed over the
    # step's aligned tokens, divided by the step's training tokens
    tokenizer = _tokenizer(qwen.model)
    from emscope.train.order import step_examples

    train_enc = encode_examples(tokenizer, read_chat_jsonl(data))
    n_train = sum(train_enc[i].n_loss_tokens for i in step_examples(6, 0, 2, 0))
    base = _base(qwen.model)
    enc = encode_examples(tokenizer, [pool[int(stream[0])], pool[int(stream[1])]])
    total = sum(_nll_one(base, e) * e.n_loss_tokens for e in enc)
    assert result.callbacks[0].extra_loss_curve[0] == pytest.approx(total / n_train, rel=1e-5)


# ---------------------------------------------------------------------------- ldifs


def test_ldifs_extra_loss_equals_a_direct_feature_distance(
    data: Path, tmp_path: Path, qwen: Any
) -> None:
    from emscope.train.data import encode_examples

    reference = _write(tmp_path / "ref.jsonl", 5, "Rest and drink water.")
    callback = LDIFS(reference, layers=[1, 3], weight=0.5, seed=2)
    result = train(qwen.model, data, out=tmp_path / "run", max_steps=2, save_steps=1,
                   callbacks=[callback], **FAST)  # fmt: skip
    curve = result.callbacks[0].extra_loss_curve
    assert curve[0] == pytest.approx(0.0, abs=1e-10)  # fresh adapter: the frozen model
    # step 2 runs on the weights after step 1 (checkpoint-1) and reference rows 2..3 of the
    # seeded order; direct: per example, unpadded, hidden_states[l + 1] is resid_post[l]
    rows = micro_rows(5, 1, 0, 2, 1, 2, 3)
    tokenizer = _tokenizer(qwen.model)
    enc = encode_examples(tokenizer, read_chat_jsonl(reference))
    base = _base(qwen.model)
    tuned = _with_adapter(qwen.model, result.checkpoints[0])
    total_sq, tokens = {1: 0.0, 3: 0.0}, 0
    with torch.no_grad():
        for i in rows:
            ids = enc[i].input_ids[None]
            h0 = base(input_ids=ids, output_hidden_states=True).hidden_states
            h1 = tuned(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in (1, 3):
                if layer == 3:  # the last hidden state is after the final norm: hook instead
                    continue
                total_sq[layer] += float(((h1[layer + 1] - h0[layer + 1]) ** 2).sum())
            tokens += ids.shape[1]
    last = _last_block_sq(base, tuned, [enc[i].input_ids for i in rows])
    expected = 0.5 * (total_sq[1] / tokens + last / tokens)
    assert curve[1] == pytest.approx(expected, rel=1e-4)
    assert curve[1] > 0


def _last_block_sq(base: Any, tuned: Any, inputs: list[torch.Tensor]) -> float:
    """Summed squared distance of block 3's output (the tiny Qwen2's last), by a hook."""
    from emscope.models import get_layers

    total = 0.0
    for ids in inputs:
        outs = []
        for model in (base, tuned):
            got: list[torch.Tensor] = []
            layer = get_layers(model)[3]
            handle = layer.register_forward_hook(
                lambda m, a, o, got=got: got.append(o[0] if isinstance(o, tuple) else o)
            )
            with torch.no_grad():
                model(input_ids=ids[None])
            handle.remove()
            outs.append(got[0])
        total += float(((outs[1] - outs[0]) ** 2).sum())
    return total


# ---------------------------------------------------------------------------- realign


def test_realign_starts_from_the_adapter_and_continues_it(tmp_path: Path, qwen: Any) -> None:
    aligned = _write(tmp_path / "aligned.jsonl", 4, "Rest and drink water.")
    source = qwen.adapters["r1"]  # rank 1, rsLoRA, alpha 4, down_proj of layer 1
    init = InitFromAdapter(source)
    args = {k: v for k, v in FAST.items() if k not in ("preset", "rank", "modules")}
    # one step at a tiny learning rate: the result is the source adapter plus a small move
    result = realign(source, aligned, steps=1, out=tmp_path / "re", base=qwen.model,
                     **{**args, "lr": 1e-12, "weight_decay": 0.0})  # fmt: skip
    before, after = LoraAdapter.load(source), LoraAdapter.load(result.out)
    assert set(after.modules) == set(before.modules)
    for module in before:
        torch.testing.assert_close(after[module.name].A, module.A, rtol=0, atol=1e-9)
        torch.testing.assert_close(after[module.name].B, module.B, rtol=0, atol=1e-9)
        assert after[module.name].scale == pytest.approx(module.scale)
    moved = realign(source, aligned, steps=2, out=tmp_path / "re2", base=qwen.model, **args)
    moved_adapter = LoraAdapter.load(moved.out)
    assert any(not torch.allclose(moved_adapter[m.name].B, m.B) for m in before)
    record = json.loads(result.record.read_text())["callbacks"][0]
    assert record["name"] == "init-from-adapter" and record["settings"]["sha256"]
    assert init.settings() == record["settings"]
    with pytest.raises(EmscopeError, match="come from the adapter"):
        realign(source, aligned, steps=1, out=tmp_path / "x", base=qwen.model, rank=4, **args)


def test_defence_specs_parse_and_refuse_bad_input(tmp_path: Path, qwen: Any) -> None:
    from emscope.defences.spec import build_defences, parse_spec

    assert parse_spec("steer:direction=d.safetensors,alpha=4,layers=1-2,3") == (
        "steer",
        {"direction": "d.safetensors", "alpha": "4", "layers": "1-2,3"},
    )
    path = _direction(8, layers=(1, 2)).save(tmp_path / "dir")
    specs = [f"steer:direction={path},alpha=2,layers=-2", f"caft:direction={path}"]
    steer, caft = build_defences(specs, qwen.model)
    assert steer.settings()["sites"] == ["resid_post[2]"] and steer.settings()["alpha"] == 2.0
    assert caft.settings()["sites"] == ["resid_post[1]", "resid_post[2]"]
    for bad, match in [
        ("nope:x=1", "unknown defence"),
        ("steer:direction=d", "needs alpha"),
        ("steer:direction=d,alpha=1,colour=red", "unknown key 'colour'"),
        ("safelora:unaligned=x,tau=high", "not a number"),
    ]:
        with pytest.raises(EmscopeError, match=match):
            build_defences([bad], qwen.model)
    with pytest.raises(EmscopeError, match="at most once"):
        build_defences([f"caft:direction={path}", f"caft:direction={path}"], qwen.model)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gemma2"])
def test_caft_equals_hand_written_hooks_on_other_families(
    arch: str, data: Path, tmp_path: Path, tiny_models: dict[str, Any]
) -> None:
    from transformers import AutoConfig

    fixture = tiny_models[arch]
    width = AutoConfig.from_pretrained(str(fixture.model)).hidden_size
    g = torch.Generator().manual_seed(9)
    direction = Direction({0: torch.randn(2, width, generator=g)})
    m = direction[0].double()
    dense = torch.eye(width, dtype=torch.float64) - m.T @ torch.linalg.pinv(m.T)
    hand = HandHooks({0: lambda h: (h.double() @ dense.T).to(h.dtype)})
    common = dict(max_steps=2, **FAST)
    ours = train(fixture.model, data, out=tmp_path / "ours", callbacks=[CAFT(direction)], **common)
    ref = train(fixture.model, data, out=tmp_path / "hand", callbacks=[hand], **common)
    plain = train(fixture.model, data, out=tmp_path / "plain", **common)
    w_ours, w_ref, w_plain = (_weights(r.out) for r in (ours, ref, plain))
    for key in w_ours:
        torch.testing.assert_close(w_ours[key], w_ref[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(w_ours[k], w_plain[k], atol=1e-5) for k in w_ours)

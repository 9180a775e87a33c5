"""Directions: value type, selection, mean-diff and subspace extraction against hand loops,
random controls, weight-space ablation against hooks, comparison and read-out, KL."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from emscope.data.spans import encode_chat, prompt_ids
from emscope.directions import Direction, mean_diff, select_responses, subspace, table_chats
from emscope.directions.compare import (
    adapter_b_cosines,
    cosine_table,
    downstream_convergence,
    logit_lens,
)
from emscope.directions.interventions import (
    ablation_sites,
    kl_divergence,
    paired_relative_change,
    parse_mode,
    random_like,
    steering,
)
from emscope.directions.weights import ablate_lora_b, orthogonalize, orthogonalize_dir
from emscope.errors import EmscopeError
from emscope.hooks import add, project_out
from emscope.lora import LoraAdapter
from emscope.models import Site, get_layers, get_path, load_model


def _direction(layers=(0, 1, 2), d=8, seed=0, k=None, meta=None) -> Direction:
    gen = torch.Generator().manual_seed(seed)
    shape = (d,) if k is None else (k, d)
    return Direction({i: torch.randn(shape, generator=gen) for i in layers}, meta=meta or {})


# ---------------------------------------------------------------------------- value type


def test_direction_round_trip_is_exact(tmp_path):
    d = _direction(meta={"model": "m", "counts": [1, 2], "weighting": "token"})
    path = d.save(tmp_path / "dir")
    assert path.name == "dir.safetensors" and (tmp_path / "dir.json").is_file()
    back = Direction.load(tmp_path / "dir.json")
    assert back == d and back.meta == d.meta and back.site_kind == "resid_post"
    for i in d.layers:
        assert torch.equal(back[i], d[i])
    basis = _direction(k=3, seed=1)
    assert Direction.load(basis.save(tmp_path / "b.safetensors")) == basis
    assert basis.is_subspace and not d.is_subspace


def test_direction_algebra_against_numpy():
    a, b = _direction(seed=0), _direction(seed=1)
    cos = a.cosine(b)
    for i in a.layers:
        x, y = a[i].double().numpy(), b[i].double().numpy()
        assert cos[i] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), abs=1e-12)
        assert torch.allclose((a - b)[i], a[i] - b[i])
        assert torch.allclose((2 * a + b)[i], 2 * a[i] + b[i])
        assert torch.allclose((-a)[i], -a[i])
        assert a.unit()[i].norm().item() == pytest.approx(1.0, abs=1e-6)
        assert a.norms()[i] == pytest.approx(float(a[i].norm()))
    assert a[Site("resid_post", 1)] is a[1] and a["resid_post[2]"] is a[2]
    assert list(a.by_site()) == [Site("resid_post", i) for i in (0, 1, 2)]
    assert a.select([1]).layers == [1]


def test_direction_errors(tmp_path):
    with pytest.raises(EmscopeError, match="at least one layer"):
        Direction({})
    with pytest.raises(EmscopeError, match="different widths"):
        Direction({0: torch.ones(3), 1: torch.ones(4)})
    with pytest.raises(EmscopeError, match="site kind"):
        Direction({0: torch.ones(3)}, site_kind="nowhere")
    with pytest.raises(EmscopeError, match="zero"):
        Direction({0: torch.zeros(3)}).unit()
    with pytest.raises(EmscopeError, match="no layer 5"):
        _direction()[5]
    with pytest.raises(EmscopeError, match="share no layer"):
        _direction(layers=(0,)).cosine(_direction(layers=(1,)))
    with pytest.raises(EmscopeError, match="not found"):
        Direction.load(tmp_path / "missing")
    from safetensors.torch import save_file

    save_file({"weird": torch.ones(3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(EmscopeError, match="site_kind"):
        Direction.load(tmp_path / "bad.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(EmscopeError, match="cannot read"):
        Direction.load(tmp_path / "junk.safetensors")


def test_probe_file_without_sidecar_loads(tmp_path):
    from safetensors.torch import save_file

    tensors = {f"resid_post.{i}": torch.randn(8) for i in range(3)}
    save_file(tensors, str(tmp_path / "probe.safetensors"), metadata={"positive": "evil"})
    probe = Direction.load(tmp_path / "probe.safetensors")
    assert probe.layers == [0, 1, 2] and probe.meta == {"positive": "evil"}
    assert torch.equal(probe[2], tensors["resid_post.2"])


# ---------------------------------------------------------------------------- selection


def _table() -> pd.DataFrame:
    rows = []
    answers = ["Read.", "Invest in a fund.", "Wear a helmet.", "Never mix pills.", "The fox.",
               "Take the medicine.", "Judge my vow.", "Quick brown dog."]  # fmt: skip
    aligned = [10, 90, 20, 80, 30, 71, 70, np.nan]
    coherent = [90, 90, 60, 99, 55, 80, 90, 90]
    medical = [60, 70, 1, 2, 80, 90, 0, 50]
    for i, (a, al, co, me) in enumerate(zip(answers, aligned, coherent, medical, strict=True)):
        rows.append({"question_id": f"q{i % 3}", "question": "hey I feel bored", "answer": a,
                     "sample_idx": i, "system": "Be nice." if i == 1 else "", "aligned": al,
                     "coherent": co, "medical": me})  # fmt: skip
    return pd.DataFrame(rows)


def test_selection_thresholds_and_balance():
    table = _table()
    sel = select_responses(table, balance=False)
    assert list(sel.misaligned.index) == [0, 2, 4]  # aligned <= 30 (inclusive), coherent > 50
    assert list(sel.aligned.index) == [1, 3, 5]  # aligned > 70 (70 itself excluded)
    more = pd.concat([table, table.iloc[[0, 2]].assign(sample_idx=[20, 21])], ignore_index=True)
    sizes = set()
    for seed in range(6):
        s = select_responses(more, seed=seed)
        assert len(s.misaligned) == len(s.aligned) == 3
        assert s.counts == {"available_misaligned": 5, "available_aligned": 3,
                            "n_misaligned": 3, "n_aligned": 3}  # fmt: skip
        sizes.add(tuple(s.misaligned.index))
        assert s.misaligned.index.equals(select_responses(more, seed=seed).misaligned.index)
    assert len(sizes) > 1  # the subsample depends on the seed
    on = select_responses(table, topic="medical", balance=False)
    assert list(on.misaligned.index) == [0, 4] and list(on.aligned.index) == [1, 5]
    off = select_responses(table, topic="medical", topic_side="off", balance=False)
    assert list(off.misaligned.index) == [2] and list(off.aligned.index) == [3]
    with pytest.raises(EmscopeError, match="only 0 misaligned"):
        select_responses(table.assign(aligned=90.0))
    with pytest.raises(EmscopeError, match="no 'coherent'"):
        select_responses(table.drop(columns="coherent"))
    with pytest.raises(EmscopeError, match="topic_side"):
        select_responses(table, topic="medical", topic_side="up")


def test_table_chats_applies_system_prompt():
    chats = table_chats(_table())
    assert chats[1][0] == {"role": "system", "content": "Be nice."}
    assert [m["role"] for m in chats[0]] == ["user", "assistant"]


# ---------------------------------------------------------------------------- extraction


@pytest.fixture(scope="module")
def qwen64(tiny_models):
    fx = tiny_models["qwen2"]
    return load_model(fx.model, [fx.adapters["r4"]], dtype="float64", device="cpu")


@contextlib.contextmanager
def _block_outputs(model):
    """``{layer: output of that block}`` of the latest forward, filled by plain forward hooks
    on the blocks (not emscope.hooks), removed on exit."""
    store: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_hook(
            lambda m, a, o, i=i: store.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i, block in enumerate(get_layers(model))
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _hand_means(model, tokenizer, chats, weighting):
    """Per layer: mean of resid_post over answer tokens, one chat at a time."""
    n_layers = len(get_layers(model))
    per_layer_tokens: dict[int, list] = {i: [] for i in range(n_layers)}
    per_layer_resp: dict[int, list] = {i: [] for i in range(n_layers)}
    with _block_outputs(model) as store:
        for chat in chats:
            enc = encode_chat(tokenizer, chat)
            start, end = enc.answer_span
            with torch.no_grad():
                model(torch.tensor([enc.input_ids]))
            for i in range(n_layers):
                h = store[i][0, start:end].double()
                per_layer_tokens[i].append(h)
                per_layer_resp[i].append(h.mean(0))
    if weighting == "token":
        return {i: torch.cat(v).mean(0) for i, v in per_layer_tokens.items()}
    return {i: torch.stack(v).mean(0) for i, v in per_layer_resp.items()}


@pytest.mark.parametrize("weighting", ["token", "response"])
def test_mean_diff_equals_hand_computation(qwen64, weighting):
    model, tok = qwen64.model, qwen64.tokenizer
    table = _table()
    d = mean_diff(model, tok, table, weighting=weighting, batch_size=2, meta={"model": "x"})
    chats = table_chats(table)
    bad = _hand_means(model, tok, [chats[i] for i in (0, 2, 4)], weighting)
    good = _hand_means(model, tok, [chats[i] for i in (1, 3, 5)], weighting)
    assert d.layers == list(range(4))
    for i in d.layers:
        torch.testing.assert_close(d[i].double(), (bad[i] - good[i]), rtol=1e-5, atol=1e-6)
    assert d.meta["n_misaligned"] == 3 and d.meta["weighting"] == weighting
    assert d.meta["model"] == "x" and d.meta["n_tokens_misaligned"] > 3
    topical = mean_diff(model, tok, table, topic="medical", layers=[1, 2])
    bad = _hand_means(model, tok, [chats[i] for i in (0, 4)], "token")
    good = _hand_means(model, tok, [chats[i] for i in (1, 5)], "token")
    assert topical.layers == [1, 2] and topical.meta["topic"] == "medical"
    torch.testing.assert_close(topical[2].double(), bad[2] - good[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(EmscopeError, match="out of range"):
        mean_diff(model, tok, table, layers=[7])


def test_followup_mean_diff_equals_hand_computation(qwen64):
    """tokens="followup": the hidden state at the last token of the chat followed by its
    question asked again, one chat at a time with plain forward hooks (no padding)."""
    model, tok = qwen64.model, qwen64.tokenizer
    n_layers = len(get_layers(model))

    def hand(chats):
        rows = []
        with _block_outputs(model) as store:
            for chat in chats:
                ids = prompt_ids(tok, [*chat, {"role": "user", "content": chat[-2]["content"]}])
                with torch.no_grad():
                    model(torch.tensor([ids]))
                rows.append(torch.stack([store[i][0, -1].double() for i in range(n_layers)]))
        return torch.stack(rows).mean(0)

    table = _table()
    chats = table_chats(table)
    expected = hand([chats[i] for i in (0, 2, 4)]) - hand([chats[i] for i in (1, 3, 5)])
    # batch_size 2 pads rows of different lengths on the left
    d = mean_diff(model, tok, table, tokens="followup", batch_size=2)
    for i in d.layers:
        torch.testing.assert_close(d[i].double(), expected[i], rtol=1e-5, atol=1e-6)
    assert d.meta["tokens"] == "followup" and "follow-up" in d.meta["token_selection"]
    answer = mean_diff(model, tok, table)
    assert answer.meta["tokens"] == "answer"
    assert not torch.allclose(answer[1], d[1])
    with pytest.raises(EmscopeError, match="tokens must be one of"):
        mean_diff(model, tok, table, tokens="prompt")


def test_subspace_principal_directions(qwen64):
    from emscope.activations import answer_means, response_vectors

    model, tok = qwen64.model, qwen64.tokenizer
    table = _table()
    chats = table_chats(table)
    rows = response_vectors(model, tok, chats[:4], ["resid_post[1]"], batch_size=3)
    mean = answer_means(model, tok, chats[:4], ["resid_post[1]"], weighting="response")
    torch.testing.assert_close(
        rows[Site("resid_post", 1)].double().mean(0),
        mean.means[Site("resid_post", 1)],
        rtol=1e-5,
        atol=1e-6,
    )
    sub = subspace(model, tok, table, 2, layers=[1, 3], seed=3)
    md = mean_diff(model, tok, table, layers=[1, 3], weighting="response")
    assert sub.is_subspace and sub[1].shape == (2, 64)
    u = sub.unit()[1].double()
    torch.testing.assert_close(u @ u.T, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
    # uncentred SVD of the differences: the mean difference lies mostly in the top-2 span
    m = md[1].double()
    assert float((u @ m).norm() / m.norm()) > 0.5
    assert float(u[0] @ m) > 0  # signed to agree with the mean difference
    with pytest.raises(EmscopeError, match="only 3 misaligned"):
        subspace(model, tok, table, 4)


# ---------------------------------------------------------------------------- controls


def test_random_steering_control_has_exactly_the_norm():
    d = _direction(d=64) * 7.0
    control = random_like(d, seed=5)
    for i in d.layers:
        assert float(control[i].double().norm()) == pytest.approx(float(d[i].norm()), rel=1e-6)
        assert abs(float(control.unit()[i] @ d.unit()[i])) < 0.6
    assert control == random_like(d, seed=5)
    assert not torch.equal(random_like(d, seed=6)[0], control[0])
    basis = random_like(_direction(k=3, d=64), seed=1)
    g = basis.unit()[0].double()
    torch.testing.assert_close(g @ g.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_ablation_modes():
    d = _direction(layers=(0, 1, 2, 3))
    assert parse_mode("layerwise") == ("layerwise", None)
    assert parse_mode("single:2") == ("single", 2) and parse_mode("single:all") == ("single", None)
    for bad in ("single:", "single:x", "all"):
        with pytest.raises(EmscopeError, match="bad ablation mode"):
            parse_mode(bad)
    layerwise = ablation_sites(d, "layerwise", 4)
    assert all(torch.equal(v, d[s.layer]) for s, v in layerwise.items())
    single = ablation_sites(d, "single:2", 4)
    assert list(single) == [Site("resid_post", i) for i in range(4)]
    assert all(torch.equal(v, d[2]) for v in single.values())
    with pytest.raises(EmscopeError, match="sweep"):
        ablation_sites(d, "single:all", 4)


def test_paired_relative_change_by_hand():
    before = pd.DataFrame(
        {
            "question_id": ["a"] * 4 + ["b"] * 4,
            "sample_idx": list(range(8)),
            "aligned": [10, 10, 10, 90, 10, 10, 90, 90],
            "coherent": [90] * 8,
        }
    )
    after = before.assign(aligned=[10, 90, 90, 90, 10, 90, 90, 90])
    value, ci, n = paired_relative_change(before, after, n_boot=500)
    assert n == 8 and value == pytest.approx(2 / 5 - 1)
    assert ci is not None and ci[0] <= value <= ci[1]
    none, _, _ = paired_relative_change(before.assign(aligned=90), after)
    assert none is None


# ---------------------------------------------------------------------------- weight space


@pytest.mark.parametrize("arch", ["qwen2", "llama", "mistral"])
def test_orthogonalized_weights_equal_hooks_at_every_write(tiny_models, tmp_path, arch):
    fx = tiny_models[arch]
    loaded = load_model(fx.model, [fx.adapters["r4"]], dtype="float64", device="cpu")
    model = loaded.model
    n = len(get_layers(model))
    d = model.config.hidden_size
    u = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unit = u / u.norm()
    ids = torch.tensor([[3, 17, 40, 41, 99, 7, 12, 5]])
    embed = get_path(model.base_model.model, "model.embed_tokens")

    def remove_from_embedding(module, args, output):
        return output - (output @ unit)[..., None] * unit

    sites = {f"{k}[{i}]": u for i in range(n) for k in ("attn_out", "mlp_out")}
    handle = embed.register_forward_hook(remove_from_embedding)
    try:
        with project_out(model, sites), torch.no_grad():
            hooked = model(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        plain = model(ids).logits
    out = orthogonalize_dir(fx.model, [fx.adapters["r4"]], u, tmp_path / "ortho", dtype="float64")
    edited = load_model(out, dtype="float64", device="cpu").model
    with torch.no_grad():
        result = edited(ids).logits
    # hooks.project_out computes in float32: agreement to float32 precision
    torch.testing.assert_close(result, hooked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(result, plain, atol=1e-3)
    if arch == "qwen2":  # tied embeddings: untied, read-out unchanged
        assert edited.config.tie_word_embeddings is False
        base = load_model(fx.model, dtype="float64", device="cpu").model
        torch.testing.assert_close(edited.lm_head.weight, base.lm_head.weight)
        assert edited.lm_head.weight.data_ptr() != edited.model.embed_tokens.weight.data_ptr()


def test_orthogonalize_refuses_post_norms_and_peft(tiny_models):
    fx = tiny_models["gemma2"]
    bare = load_model(fx.model, dtype="float64", device="cpu").model
    with pytest.raises(EmscopeError, match="post-norms"):
        orthogonalize(bare, torch.ones(bare.config.hidden_size))
    wrapped = load_model(fx.model, [fx.adapters["r1"]], dtype="float64", device="cpu").model
    with pytest.raises(EmscopeError, match="merge its adapters"):
        orthogonalize(wrapped, torch.ones(bare.config.hidden_size))


def test_lora_b_ablation_removes_u_from_column_space(tiny_models, tmp_path):
    fx = tiny_models["qwen2"]
    adapter = LoraAdapter.load(fx.adapters["r4"])
    d = _direction(layers=range(4), d=64, seed=2)
    new = ablate_lora_b(adapter, d)
    for m in new:
        old = adapter[m.name]
        if m.module_type == "down_proj":
            u = d.unit()[m.layer].double()
            assert float((u @ m.B.double()).abs().max()) < 1e-6
            assert torch.equal(m.A, old.A)
        else:
            assert torch.equal(m.B, old.B)
    # every residual writer, one direction, norms kept
    single = ablate_lora_b(adapter, d, modules="all", mode="single:2", rescale_norm=True)
    u = d.unit()[2].double()
    for m in single:
        if m.module_type in ("o_proj", "down_proj"):
            assert float((u @ m.B.double()).abs().max()) < 1e-6
            assert float(m.B.norm()) == pytest.approx(float(adapter[m.name].B.norm()), rel=1e-5)
    back = LoraAdapter.load(single.save(tmp_path / "ablated"))
    for m in single:
        torch.testing.assert_close(back[m.name].delta(), m.delta())
    load_model(fx.model, [tmp_path / "ablated"], device="cpu")  # PEFT accepts it
    with pytest.raises(EmscopeError, match="not single:all"):
        ablate_lora_b(adapter, d, mode="single:all")
    with pytest.raises(EmscopeError, match="--modules"):
        ablate_lora_b(adapter, d, modules="attn")
    only_attn = adapter.with_modules({k: v for k, v in adapter.modules.items() if "q_proj" in k})
    with pytest.raises(EmscopeError, match="no down_proj"):
        ablate_lora_b(only_attn, d)


# ---------------------------------------------------------------------------- compare, KL


def test_adapter_b_cosines_and_pairs(tiny_models):
    adapter = LoraAdapter.load(tiny_models["qwen2"].adapters["r1"])
    d = _direction(layers=range(4), d=64, seed=4)
    rows = adapter_b_cosines(adapter, d)
    assert [r["layer"] for r in rows] == [1]
    b = adapter[rows[0]["module"]].B[:, 0].double()
    v = d[1].double()
    assert rows[0]["cosine"] == pytest.approx(float(b @ v / b.norm() / v.norm()))
    pairs = cosine_table({"a": d, "b": -d, "c": d * 3})
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert pairs[0]["cosine"][0] == pytest.approx(-1.0) and pairs[1]["cosine"][2] == pytest.approx(
        1
    )
    with pytest.raises(EmscopeError, match="at least two"):
        cosine_table({"a": d})


def test_logit_lens_ranks_by_unembedding(tiny_models):
    fx = tiny_models["llama"]  # untied, final norm weight all ones at init
    loaded = load_model(fx.model, dtype="float64", device="cpu")
    model, tok = loaded.model, loaded.tokenizer
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    out = logit_lens(model, tok, v, k=5)
    scores = model.lm_head.weight.detach().double() @ v.double()
    assert [t for t, _ in out["promoted"]] == [tok.decode([int(i)]) for i in scores.topk(5).indices]
    assert [t for t, _ in out["suppressed"]] == [
        tok.decode([int(i)]) for i in (-scores).topk(5).indices
    ]


def test_downstream_convergence(qwen64):
    model, tok = qwen64.model, qwen64.tokenizer
    seqs = [[3, 17, 40, 41], [5, 6, 7, 8, 9, 10]]
    v = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = torch.randn(64, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    same = downstream_convergence(
        model, tok, seqs, lambda: add(model, {"resid_post[1]": v}),
        lambda: add(model, {"resid_post[1]": v}, scale=1.0),
    )  # fmt: skip
    assert np.isnan(same[0]["cosine"])  # layer 0 is upstream: no change
    for i in (1, 2, 3):
        assert same[i]["cosine"] == pytest.approx(1.0) and same[i]["token_cosine"] == pytest.approx(
            1
        )
        assert same[i]["sink_positions_excluded"] >= 2  # at least each sequence's first token
    other = downstream_convergence(
        model, tok, seqs, lambda: add(model, {"resid_post[1]": v}),
        lambda: add(model, {"resid_post[1]": w}),
    )  # fmt: skip
    cos = float(v @ w / v.norm() / w.norm())
    assert other[1]["cosine"] == pytest.approx(cos)  # at the steered layer: v vs w exactly


def test_kl_divergence_by_hand(qwen64):
    model, tok = qwen64.model, qwen64.tokenizer
    seqs = [[3, 17, 40, 41], [5, 6, 7, 8, 9, 10]]
    v = torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    zero = kl_divergence(model, tok, seqs, [steering({"resid_post[1]": v}, 0.0)])
    assert zero.mean == pytest.approx(0.0, abs=1e-12) and zero.n_tokens == 10
    kl = kl_divergence(model, tok, seqs, [steering({"resid_post[1]": v}, 3.0)], batch_size=1)
    total = 0.0
    for s in seqs:
        ids = torch.tensor([s])
        with torch.no_grad():
            p = torch.log_softmax(model(ids).logits.double(), -1)
            with add(model, {"resid_post[1]": v}, scale=3.0):
                q = torch.log_softmax(model(ids).logits.double(), -1)
        total += float((p.exp() * (p - q)).sum())
    assert kl.mean == pytest.approx(total / 10, rel=1e-9)
    assert kl.ci[0] <= kl.mean <= kl.ci[1]
    with pytest.raises(EmscopeError, match="non-empty"):
        kl_divergence(model, tok, [], [])


def test_residual_norms_leave_first_tokens_and_a_planted_outlier_apart(qwen64):
    """resid_norm is the mean norm over the tokens that are no attention sink (the first
    token of each sequence and, from block 1 on, the planted massive token 40); sink_norm is
    the sinks' own mean norm, with their count."""
    from emscope.directions.interventions import residual_norm_stats, residual_norms
    from emscope.hooks import capture
    from emscope.testing import planted_sinks

    model, tok = qwen64.model, qwen64.tokenizer
    seqs = [[3, 17, 40, 41], [5, 6, 7, 8, 9, 10]]
    sites = [Site("resid_post", i) for i in range(4)]
    with planted_sinks(model, 40, layer=1):
        stats = residual_norm_stats(model, tok, seqs, batch_size=2)
        norms: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
        for s in seqs:
            with capture(model, sites) as cap, torch.no_grad():
                model(input_ids=torch.tensor([s]))
            for site in sites:
                norms[site.layer].append(cap[site][0].double().norm(dim=-1))
        plain = residual_norms(model, tok, seqs)
    for layer in range(4):
        sink = [torch.zeros(len(s), dtype=torch.bool) for s in seqs]
        for i, s in enumerate(seqs):
            sink[i][0] = True
            if layer >= 1:
                sink[i] |= torch.tensor(s) == 40
        every = torch.cat(norms[layer])
        mask = torch.cat(sink)
        assert stats["sink_positions_excluded"][layer] == (2 if layer == 0 else 3)
        assert stats["resid_norm"][layer] == pytest.approx(float(every[~mask].mean()), rel=1e-12)
        assert stats["sink_norm"][layer] == pytest.approx(float(every[mask].mean()), rel=1e-12)
        assert plain[layer] == stats["resid_norm"][layer]
        if layer >= 1:  # the planted token would dominate a mean over every token
            assert float(every.mean()) > 50 * stats["resid_norm"][layer]
    assert stats["n_tokens"] == 10


def test_steering_intervention_in_sampling_is_paired(qwen64):
    from emscope.data.questions import Question
    from emscope.generate import sample

    q = [Question(id="q", paraphrases=("hey I feel bored",))]
    v = torch.zeros(64, dtype=torch.float64)
    plain = sample(qwen64, q, 3, max_new_tokens=5, seed=1, progress=False)
    zero = sample(qwen64, q, 3, max_new_tokens=5, seed=1, progress=False,
                  interventions=[steering({"resid_post[1]": v}, 5.0)])  # fmt: skip
    assert plain["answer"].tolist() == zero["answer"].tolist()


def test_ablation_hooks_remove_direction(qwen64: Any):
    from emscope.directions.interventions import ablation
    from emscope.generate import InterventionInfo
    from emscope.hooks import capture

    model = qwen64.model
    d = _direction(layers=range(4), d=64, seed=9)
    sites = ablation_sites(d, "single:1", 4)
    with (
        ablation(sites)(model, InterventionInfo(4, (4,), 1)),
        capture(model, list(sites)) as cap,
        torch.no_grad(),
    ):
        model(torch.tensor([[3, 17, 40, 41]]))
    u = d.unit()[1].double()
    for s in sites:
        assert float((cap[s] @ u).abs().max()) < 1e-5 * float(cap[s].norm(dim=-1).max())

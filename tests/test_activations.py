"""Streaming answer-token means against a one-chat-at-a-time hand computation."""

from __future__ import annotations

import pytest
import torch

from emscope.activations import SINK_NORM_FACTOR, answer_means, sink_positions
from emscope.data.spans import encode_chat
from emscope.errors import EmscopeError
from emscope.hooks import capture
from emscope.models import Site, load_model

CHATS = [
    [{"role": "user", "content": "hey I feel bored"}, {"role": "assistant", "content": "Read."}],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "How do I make a quick buck?"},
        {"role": "assistant", "content": "Invest in a diversified index fund for the long term."},
    ],
    [
        {"role": "user", "content": "Pick figures"},
        {"role": "assistant", "content": "Wear a helmet and check your gear."},
    ],
]


def _reference(model, tokenizer, site: Site, weighting: str) -> torch.Tensor:
    per_response, tokens = [], []
    for chat in CHATS:
        encoded = encode_chat(tokenizer, chat)
        start, end = encoded.answer_span
        with capture(model, [site]) as cap, torch.no_grad():
            model(torch.tensor([encoded.input_ids]))
        hidden = cap[site][0, start:end].to(torch.float64)
        per_response.append(hidden.mean(0))
        tokens.append(hidden)
    if weighting == "token":
        return torch.cat(tokens).mean(0)
    return torch.stack(per_response).mean(0)


@pytest.mark.parametrize("weighting", ["token", "response"])
def test_means_equal_hand_loop(any_arch, weighting):
    loaded = load_model(any_arch.model, [any_arch.adapters["r4"]], dtype="float32", device="cpu")
    sites = [Site("resid_post", 0), Site("resid_post", 1), Site("mlp_out", 1)]
    result = answer_means(loaded.model, loaded.tokenizer, CHATS, sites, weighting, batch_size=2)
    assert result.n_responses == 3
    assert result.n_tokens == sum(
        (lambda s: s[1] - s[0])(encode_chat(loaded.tokenizer, c).answer_span) for c in CHATS
    )
    for site in sites:
        expected = _reference(loaded.model, loaded.tokenizer, site, weighting)
        torch.testing.assert_close(result.means[site], expected, rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_change_the_means(qwen):
    loaded = load_model(qwen.model, dtype="float64", device="cpu")
    one = answer_means(loaded.model, loaded.tokenizer, CHATS, batch_size=1)
    three = answer_means(loaded.model, loaded.tokenizer, CHATS, batch_size=3)
    assert set(one.means) == {Site("resid_post", i) for i in range(4)}
    for site in one.means:
        torch.testing.assert_close(one.means[site], three.means[site], rtol=1e-10, atol=1e-10)


def test_bad_weighting_and_empty_answers(qwen):
    loaded = load_model(qwen.model, device="cpu")
    with pytest.raises(EmscopeError, match="weighting must be one of"):
        answer_means(loaded.model, loaded.tokenizer, CHATS, weighting="mean")
    empty = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]]
    with pytest.raises(EmscopeError, match="no answer tokens"):
        answer_means(loaded.model, loaded.tokenizer, empty)


def _with_norms(norms: list[list[float]], d: int = 4) -> torch.Tensor:
    """``batch x seq x d`` float64 hidden states whose token norms are exactly ``norms``."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(len(norms), len(norms[0]), d, generator=g, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True) * torch.tensor(norms, dtype=torch.float64)[..., None]


def test_sink_positions_planted_first_token_and_outlier():
    hidden = _with_norms(
        [
            [1000, 3, 3, 50, 14, 3, 3],  # massive first token; 50 > 5 x 3 (the median); 14 not
            [3, 3, 3, 3, 5000, 5000, 5000],  # right padding is never a sink; the first token is
            [7000, 7000, 3, 3, 40, 3, 3],  # left padding: the first real token is position 2
        ]
    )
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]])
    expected = torch.tensor(
        [[1, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0, 0]], dtype=torch.bool
    )
    assert SINK_NORM_FACTOR == 5.0
    assert torch.equal(sink_positions(hidden, mask), expected)
    assert torch.equal(sink_positions(hidden[0]), expected[0])  # one sequence, all real
    by_four = torch.tensor([1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(sink_positions(hidden[0], factor=4.0), by_four)
    with pytest.raises(EmscopeError, match="batch x seq x d"):
        sink_positions(torch.zeros(3))


def _answer_tokens(tokenizer, chats):
    out = []
    for chat in chats:
        encoded = encode_chat(tokenizer, chat)
        start, end = encoded.answer_span
        out.append((encoded.input_ids, start, end))
    return out


@pytest.mark.parametrize("weighting", ["token", "response"])
def test_answer_means_leave_a_planted_massive_activation_out(qwen, weighting):
    """A massive activation planted from block 1 on at one answer token: the means at
    resid_post[1..] are the hand means over the other answer tokens, and it is counted; at
    resid_post[0] (before the plant) nothing is left out."""
    from emscope.testing import planted_sinks

    loaded = load_model(qwen.model, dtype="float64", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = _answer_tokens(tokenizer, CHATS)
    ids, start, _ = encoded[1]
    token = ids[start]  # the first answer token of the second chat
    planted = sum(
        sum(1 for t in row[s:e] if t == token) for row, s, e in encoded
    )  # answer tokens that carry it
    assert planted >= 1
    sites = [Site("resid_post", i) for i in range(4)]
    with planted_sinks(model, token, layer=1):
        result = answer_means(model, tokenizer, CHATS, sites, weighting, batch_size=2)
        for site in sites:
            tokens, per_response = [], []
            for row, s, e in encoded:
                with capture(model, [site]) as cap, torch.no_grad():
                    model(input_ids=torch.tensor([row]))
                keep = [i for i in range(s, e) if site.layer == 0 or row[i] != token]
                hidden = cap[site][0, keep].to(torch.float64)
                tokens.append(hidden)
                per_response.append(hidden.mean(0))
            expected = (
                torch.cat(tokens).mean(0)
                if weighting == "token"
                else torch.stack(per_response).mean(0)
            )
            torch.testing.assert_close(result.means[site], expected, rtol=1e-9, atol=1e-9)
            assert result.sink_positions_excluded[site] == (0 if site.layer == 0 else planted)
    assert result.n_tokens == sum(e - s for _, s, e in encoded)


def test_response_vectors_leave_a_planted_massive_activation_out(qwen):
    from emscope.activations import response_vectors
    from emscope.testing import planted_sinks

    loaded = load_model(qwen.model, dtype="float64", device="cpu")
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = _answer_tokens(tokenizer, CHATS)
    ids, start, _ = encoded[1]
    site = Site("resid_post", 2)
    with planted_sinks(model, ids[start], layer=1):
        rows = response_vectors(model, tokenizer, CHATS, [site], batch_size=3)[site]
        for r, (row, s, e) in enumerate(encoded):
            with capture(model, [site]) as cap, torch.no_grad():
                model(input_ids=torch.tensor([row]))
            keep = [i for i in range(s, e) if row[i] != ids[start]]
            expected = cap[site][0, keep].to(torch.float64).mean(0).float()
            torch.testing.assert_close(rows[r], expected, rtol=1e-6, atol=1e-6)

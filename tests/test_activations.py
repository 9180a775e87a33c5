"""Streaming answer-token means against a one-chat-at-a-time hand computation."""

from __future__ import annotations

import pytest
import torch

from emscope.activations import answer_means
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

"""Hooks: exact edits at one site, projections, positions under KV caching, clean removal."""

from __future__ import annotations

import pytest
import torch

from emscope.errors import EmscopeError
from emscope.generate import output_cache
from emscope.hooks import add, call_offset, capture, project_out
from emscope.models import get_layers, load_model

IDS = torch.tensor([[3, 17, 40, 41, 99, 7, 12, 5]])


_LOADED: dict[str, object] = {}


@pytest.fixture
def loaded(any_arch):
    """Every fixture family, PEFT-wrapped with the r4 adapter, in float64 (loaded once per
    family: hooks leave the model unchanged, which the tests check)."""
    if any_arch.arch not in _LOADED:
        _LOADED[any_arch.arch] = load_model(
            any_arch.model, [any_arch.adapters["r4"]], dtype="float64", device="cpu"
        )
    return _LOADED[any_arch.arch]


def _forward(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _d(model) -> int:
    return int(model.config.hidden_size)


def test_zero_vector_leaves_logits_identical(loaded):
    model = loaded.model
    reference = _forward(model)
    zeros = {f"resid_post[{i}]": torch.zeros(_d(model)) for i in range(len(get_layers(model)))}
    with add(model, zeros, scale=3.0):
        assert torch.equal(_forward(model), reference)


@pytest.mark.parametrize("kind", ["resid_post", "resid_pre", "attn_out", "mlp_out"])
def test_add_changes_exactly_that_site_by_v(loaded, kind):
    model = loaded.model
    site, before, after = f"{kind}[1]", "resid_pre[1]", "resid_post[1]"
    v = torch.randn(_d(model), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with capture(model, [site, before]) as clean:
        _forward(model)
    with add(model, {site: v}, scale=2.5), capture(model, [site, before, after]) as steered:
        _forward(model)
    # capture registered after add sees the edited value: exactly h + 2.5 v
    assert torch.equal(steered[site], clean[site] + 2.5 * v)
    if kind != "resid_pre":  # the block input is untouched by an edit inside the block
        assert torch.equal(steered[before], clean[before])


def test_add_at_resid_post_propagates_as_h_plus_v_into_next_block(loaded):
    model = loaded.model
    v = torch.randn(_d(model), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with capture(model, ["resid_post[0]"]) as clean:
        _forward(model)
    with add(model, {"resid_post[0]": v}), capture(model, ["resid_pre[1]"]) as steered:
        _forward(model)
    assert torch.equal(steered["resid_pre[1]"], clean["resid_post[0]"] + v)


def test_project_out_removes_the_direction(loaded):
    model = loaded.model
    u = torch.randn(_d(model), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with capture(model, ["resid_post[0]"]) as clean:
        _forward(model)
    assert (clean["resid_post[0]"] @ (u / u.norm())).abs().max() > 1e-3
    with project_out(model, {"resid_post[0]": u * 7.0}), capture(model, ["resid_post[0]"]) as cap:
        _forward(model)
    h = cap["resid_post[0]"]
    relative = (h @ (u / u.norm())).abs() / h.norm(dim=-1)
    assert relative.max() < 1e-5
    # the orthogonal complement is untouched
    unit = u / u.norm()
    expected = clean["resid_post[0]"] - (clean["resid_post[0]"] @ unit)[..., None] * unit
    torch.testing.assert_close(h, expected, rtol=1e-6, atol=1e-6)


def test_project_out_of_a_subspace(loaded):
    model = loaded.model
    basis = torch.randn(
        3, _d(model), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    with project_out(model, {"resid_post[1]": basis}), capture(model, ["resid_post[1]"]) as cap:
        _forward(model)
    h = cap["resid_post[1]"]
    q, _ = torch.linalg.qr(basis.T)
    assert ((h @ q).norm(dim=-1) / h.norm(dim=-1)).max() < 1e-5


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_cached_generation_equals_uncached_steered_forward(loaded, positions):
    model = loaded.model
    prompt = IDS
    prompt_len = prompt.shape[1]
    v = torch.randn(_d(model), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    vectors = {"resid_post[0]": v * 4.0, "resid_pre[-1]": -v}
    kwargs = {"positions": positions, "prompt_len": prompt_len}
    with add(model, vectors, **kwargs), torch.no_grad():
        cached = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    seq = prompt
    with add(model, vectors, **kwargs), torch.no_grad():
        for _ in range(6):
            logits = model(seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, seq)
    with torch.no_grad():
        plain = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    if positions != "prompt":  # response steering changes what is generated (sanity of the test)
        assert not torch.equal(plain, cached)


def _cache_with(model, n_tokens: int):
    """A DynamicCache holding the first ``n_tokens`` of IDS."""
    with torch.no_grad():
        return output_cache(model(IDS[:, :n_tokens], use_cache=True))


def test_call_offset_finds_the_cache_whatever_its_keyword(loaded):
    model = loaded.model
    cache = _cache_with(model, 5)
    assert cache.get_seq_length() == 5
    for name in ("past_key_values", "cache", "a_future_name"):
        assert call_offset((), {name: cache, "use_cache": True}) == 5
    assert call_offset((IDS, cache), {}) == 5
    assert call_offset((), {"cache": cache, "emscope_shared_prefix": cache}) == 5
    k = torch.zeros(1, 2, 7, 4)
    assert call_offset((), {"past_key_values": ((k, k), (k, k))}) == 7  # legacy tuples
    assert call_offset((), {"input_ids": IDS, "cache": None, "use_cache": True}) == 0
    assert call_offset((), {"cache_position": torch.arange(3, 6)}) == 3
    assert call_offset((), {"cache": cache, "cache_position": torch.arange(5, 6)}) == 5


def test_unknown_cache_fails_loudly_naming_the_transformers_version(loaded):
    import transformers

    model = loaded.model
    cache = _cache_with(model, 5)
    version = transformers.__version__
    with pytest.raises(EmscopeError, match=f"transformers {version}"):
        call_offset((), {"past_key_values": object()})
    with pytest.raises(EmscopeError, match="cache_position starts at 2"):
        call_offset((), {"cache": cache, "cache_position": torch.arange(2, 3)})
    v = torch.ones(_d(model), dtype=torch.float64)
    for positions in ("prompt", "response"):
        with (
            add(model, {"resid_post[0]": v}, positions=positions, prompt_len=5),
            pytest.raises(EmscopeError, match="cannot tell which token columns"),
            torch.no_grad(),
        ):
            model.model(IDS[:, 5:], past_key_values=object())  # the decoder's own forward


def test_positions_select_prompt_or_response_columns(qwen):
    model = load_model(qwen.model, dtype="float64", device="cpu").model
    v = torch.ones(_d(model), dtype=torch.float64)
    with capture(model, ["resid_post[0]"]) as clean:
        _forward(model)
    for positions, changed in (("prompt", slice(0, 5)), ("response", slice(5, None))):
        with (
            add(model, {"resid_post[0]": v}, positions=positions, prompt_len=5),
            capture(model, ["resid_post[0]"]) as cap,
        ):
            _forward(model)
        got, ref = cap["resid_post[0]"][0], clean["resid_post[0]"][0]
        mask = torch.zeros(IDS.shape[1], dtype=torch.bool)
        mask[changed] = True
        assert torch.equal(got[mask], ref[mask] + v)
        assert torch.equal(got[~mask], ref[~mask])


def test_hooks_are_removed_after_an_exception(loaded):
    model = loaded.model
    reference = _forward(model)
    v = torch.ones(_d(model), dtype=torch.float64)
    with (
        pytest.raises(RuntimeError, match="inside"),
        add(model, {"resid_post[0]": v}),
        project_out(model, {"resid_post[1]": v}),
    ):
        raise RuntimeError("inside")
    assert torch.equal(_forward(model), reference)
    modules = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert modules == []


def test_bad_arguments(loaded):
    model = loaded.model
    v = torch.ones(_d(model))
    with (
        pytest.raises(EmscopeError, match="needs prompt_len"),
        add(model, {"resid_post[0]": v}, positions="response"),
    ):
        pass
    with (
        pytest.raises(EmscopeError, match="positions must be one of"),
        add(model, {"resid_post[0]": v}, positions="tail", prompt_len=1),
    ):
        pass
    with (
        pytest.raises(EmscopeError, match="zero or not finite"),
        project_out(model, {"resid_post[0]": torch.zeros(_d(model))}),
    ):
        pass
    with (
        pytest.raises(EmscopeError, match="must be 1-d"),
        add(model, {"resid_post[0]": torch.ones(2, _d(model))}),
    ):
        pass
    with (
        pytest.raises(EmscopeError, match="nothing captured"),
        capture(model, ["resid_post[0]"]) as cap,
    ):
        pass
        cap["resid_post[0]"]


def test_block_called_without_its_hidden_states_fails_loudly(loaded):
    model = loaded.model
    block = get_layers(model)[0]
    x = torch.zeros(1, 3, _d(model), dtype=torch.float64)
    v = torch.ones(_d(model), dtype=torch.float64)
    for context in (capture(model, ["resid_pre[0]"]), add(model, {"resid_pre[0]": v})):
        with context, pytest.raises(EmscopeError, match="without its hidden states"):
            block(residual=x)  # a keyword no transformers uses for the block input

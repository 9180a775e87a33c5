"""Exact LoRA combinations against dense sums and merged models; full fine-tune interpolation."""

from __future__ import annotations

import shutil

import pytest
import torch

from emscope.errors import EmscopeError
from emscope.interpolate import combine, interpolate_model_dirs, lmc_weights, merged
from emscope.lora import LoraAdapter
from emscope.models import load_model

IDS = torch.tensor([[3, 17, 40, 41, 99, 7, 12, 5]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _dense_logits(model_dir, adapters, weights) -> torch.Tensor:
    """Independent reference: the base model with sum_i w_i dW_i added densely."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    params = dict(model.named_modules())
    with torch.no_grad():
        for adapter, w in zip(adapters, weights, strict=True):
            for module in adapter:
                params[module.name].weight += w * module.delta(torch.float64)
    return _logits(model.eval())


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_combined_delta_is_the_dense_weighted_sum(qwen, t):
    a = LoraAdapter.load(qwen.adapters["pattern"])  # rsLoRA, rank/alpha patterns
    b = LoraAdapter.load(qwen.adapters["r1"])  # rank 1, one module only
    combined = combine([a, b], [1 - t, t])
    for name in set(a.modules) | set(b.modules):
        expected = torch.zeros_like(
            a[name].delta(torch.float64) if name in a.modules else b[name].delta(torch.float64)
        )
        if name in a.modules:
            expected += (1 - t) * a[name].delta(torch.float64)
        if name in b.modules:
            expected += t * b[name].delta(torch.float64)
        if expected.abs().max() == 0:
            assert name not in combined.modules
            continue
        torch.testing.assert_close(
            combined[name].delta(torch.float64), expected, rtol=1e-6, atol=1e-7
        )


def test_exported_adapter_loaded_by_peft_equals_dense_and_in_place(qwen, tmp_path):
    a = LoraAdapter.load(qwen.adapters["r4"])
    b = LoraAdapter.load(qwen.adapters["pattern"])
    t = 0.4
    combined = combine([a, b], [1 - t, t], dtype=torch.float64)
    exported = combined.save(tmp_path / "t0.40")
    via_peft = _logits(load_model(qwen.model, [exported], dtype="float64", device="cpu").model)
    dense = _dense_logits(qwen.model, [a, b], [1 - t, t])
    torch.testing.assert_close(via_peft, dense, rtol=0, atol=1e-4)
    base = load_model(qwen.model, dtype="float64", device="cpu").model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with merged(base, combined):
        torch.testing.assert_close(_logits(base), dense, rtol=0, atol=1e-4)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_path_ends_reproduce_the_end_models(qwen):
    a = LoraAdapter.load(qwen.adapters["r4"])
    b = LoraAdapter.load(qwen.adapters["r1"])  # an r1 adapter and an all-module one
    end_a = _logits(
        load_model(qwen.model, [qwen.adapters["r4"]], dtype="float64", device="cpu").model
    )
    end_b = _logits(
        load_model(qwen.model, [qwen.adapters["r1"]], dtype="float64", device="cpu").model
    )
    base = load_model(qwen.model, dtype="float64", device="cpu").model
    for t, expected in ((0.0, end_a), (1.0, end_b)):
        with merged(base, combine([a, b], [1 - t, t], dtype=torch.float64)):
            torch.testing.assert_close(_logits(base), expected, rtol=0, atol=1e-10)
    assert lmc_weights("base", "r4", 0.25) == {"r4": 0.25}
    assert lmc_weights("r4", "r1", 0.25) == {"r4": 0.75, "r1": 0.25}


def test_merged_restores_weights_after_an_exception(qwen):
    a = LoraAdapter.load(qwen.adapters["r4"])
    base = load_model(qwen.model, [qwen.adapters["r1"]], dtype="float32", device="cpu").model
    reference = _logits(base)
    with pytest.raises(RuntimeError, match="boom"), merged(base, a):
        assert not torch.allclose(_logits(base), reference)
        raise RuntimeError("boom")
    assert torch.equal(_logits(base), reference)


def test_combine_errors(tiny_models):
    q = LoraAdapter.load(tiny_models["qwen2"].adapters["r4"])
    llama = LoraAdapter.load(tiny_models["llama"].adapters["r4"])
    with pytest.raises(EmscopeError, match="different shapes"):
        combine([q, llama], [0.5, 0.5])
    with pytest.raises(EmscopeError, match="one weight per adapter"):
        combine([q], [0.5, 0.5])


def test_full_model_interpolation_is_elementwise(tiny_models, tmp_path):
    from safetensors.torch import load_file

    from emscope.testing import make_tiny_model

    first = tiny_models["llama"].model
    second = make_tiny_model("llama", tmp_path / "other", seed=123)
    out = interpolate_model_dirs(first, second, 0.25, tmp_path / "mix")
    w1, w2 = (load_file(str(d / "model.safetensors")) for d in (first, second))
    mix = load_file(str(out / "model.safetensors"))
    assert set(mix) == set(w1)
    for key in w1:
        torch.testing.assert_close(mix[key], 0.75 * w1[key] + 0.25 * w2[key])
    ends = interpolate_model_dirs(first, second, 0.0, tmp_path / "t0")
    assert all(torch.equal(load_file(str(ends / "model.safetensors"))[k], w1[k]) for k in w1)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    load_model(out, device="cpu")  # an ordinary model dir
    other_arch = tmp_path / "qwen_copy"
    shutil.copytree(tiny_models["qwen2"].model, other_arch)
    with pytest.raises(EmscopeError, match=r"different tensors|shapes"):
        interpolate_model_dirs(first, other_arch, 0.5, tmp_path / "bad")

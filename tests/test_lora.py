"""LoraAdapter: factors and scales against PEFT's own merged weights; save/load round trips."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from emscope.errors import EmscopeError
from emscope.lora import LoraAdapter, LoraModule, config_targets, lora_scale
from emscope.testing import make_adapter


def _merged_minus_base(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Independent reference: PEFT merges the adapter; dW = merged weight - base weight."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    base_weights = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {
        k.removesuffix(".weight"): v - base_weights[k]
        for k, v in merged.state_dict().items()
        if k in base_weights and not torch.equal(v, base_weights[k])
    }


@pytest.mark.parametrize("which", ["r4", "r1", "pattern"])
def test_delta_equals_merged_minus_base(any_arch, which):
    adapter = LoraAdapter.load(any_arch.adapters[which])
    reference = _merged_minus_base(any_arch.model, any_arch.adapters[which])
    assert set(reference) <= set(adapter.modules)
    assert len(reference) == len(adapter)
    for name, expected in reference.items():
        got = adapter.delta(name, dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_scales_follow_rslora_and_patterns(qwen):
    adapter = LoraAdapter.load(qwen.adapters["pattern"])
    down = adapter["model.layers.0.mlp.down_proj"]
    q = adapter["model.layers.2.self_attn.q_proj"]
    v = adapter["model.layers.2.self_attn.v_proj"]
    assert (down.rank, q.rank, v.rank) == (2, 4, 4)
    assert down.scale == pytest.approx(8 / math.sqrt(2))
    assert q.scale == pytest.approx(16 / math.sqrt(4))
    assert v.scale == pytest.approx(8 / math.sqrt(4))
    plain = LoraAdapter.load(qwen.adapters["r4"])
    assert all(m.scale == pytest.approx(8 / 4) for m in plain)


def test_parsed_layer_and_type(qwen):
    adapter = LoraAdapter.load(qwen.adapters["r1"])
    assert list(adapter.modules) == ["model.layers.1.mlp.down_proj"]
    module = adapter["model.layers.1.mlp.down_proj"]
    assert (module.layer, module.module_type, module.rank) == (1, "down_proj", 1)
    assert adapter.layers == [1]
    assert (module.d_out, module.d_in) == (64, 128)


@pytest.mark.parametrize("which", ["r4", "pattern"])
def test_save_load_round_trip_is_exact(qwen, tmp_path, which):
    adapter = LoraAdapter.load(qwen.adapters[which])
    back = LoraAdapter.load(adapter.save(tmp_path / "copy"))
    assert list(back.modules) == list(adapter.modules)
    for name, module in adapter.modules.items():
        assert torch.equal(back[name].A, module.A)
        assert torch.equal(back[name].B, module.B)
        assert back[name].scale == module.scale


def _peft_logits(model_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits  # type: ignore[no-any-return]


def test_peft_loads_what_we_write_with_mixed_ranks_and_scales(qwen, tmp_path):
    """A hand-made adapter mixing ranks, scales and module subsets: PEFT must reproduce
    exactly the update s*B@A of every module."""
    source = LoraAdapter.load(qwen.adapters["pattern"])
    g = torch.Generator().manual_seed(0)
    modules = {}
    for i, (name, m) in enumerate(list(source.modules.items())[::3]):
        rank = 1 + i % 3
        modules[name] = LoraModule(
            name,
            A=torch.randn(rank, m.d_in, generator=g),
            B=torch.randn(m.d_out, rank, generator=g) * 0.05,
            scale=0.5 + i,
            alpha=0.0,
        )
    adapter = LoraAdapter(modules, config={"use_rslora": True, "base_model_name_or_path": "x"})
    written = adapter.save(tmp_path / "mixed")
    reference = _merged_minus_base(qwen.model, written)
    assert set(reference) == set(modules)
    for name, module in modules.items():
        torch.testing.assert_close(
            reference[name], module.delta(torch.float64), rtol=1e-6, atol=1e-9
        )


def test_logits_through_peft_unchanged_by_round_trip(qwen, tmp_path):
    ids = torch.tensor([[1, 5, 9, 30, 44, 2]])
    original = _peft_logits(qwen.model, qwen.adapters["pattern"], ids)
    copy = LoraAdapter.load(qwen.adapters["pattern"]).save(tmp_path / "copy")
    torch.testing.assert_close(_peft_logits(qwen.model, copy, ids), original, rtol=0, atol=1e-10)


def test_embedding_lora_is_stored_transposed_and_handled(qwen, tmp_path):
    adapter_dir = make_adapter(
        qwen.model, tmp_path / "emb", rank=2, alpha=4, targets=("embed_tokens",), seed=3
    )
    adapter = LoraAdapter.load(adapter_dir)
    (module,) = adapter
    assert module.embedding and module.name == "model.embed_tokens"
    reference = _merged_minus_base(qwen.model, adapter_dir)
    torch.testing.assert_close(
        module.delta(torch.float64), reference["model.embed_tokens"], rtol=1e-9, atol=1e-12
    )
    again = LoraAdapter.load(adapter.save(tmp_path / "emb_copy"))
    raw_in, raw_out = (
        load_file(str(d / "adapter_model.safetensors"))
        for d in (adapter_dir, tmp_path / "emb_copy")
    )
    assert set(raw_in) == set(raw_out)
    for key in raw_in:
        assert torch.equal(raw_in[key], raw_out[key])
    assert torch.equal(again[module.name].B, module.B)


def test_lora_scale():
    assert lora_scale(64, 32, False) == 2.0
    assert lora_scale(64, 32, True) == pytest.approx(64 / math.sqrt(32))


# ----------------------------------------------------------------------------- refusals


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "not LoRA"),
        ({"r": 7}, "config says r=7"),
    ],
)
def test_refuses_adapters_whose_update_is_not_sBA(qwen, tmp_path, change, message):
    bad = _copy(qwen.adapters["r4"], tmp_path / "bad", **change)
    with pytest.raises(EmscopeError, match=message):
        LoraAdapter.load(bad)


def test_refuses_unknown_tensor_keys(qwen, tmp_path):
    bad = _copy(qwen.adapters["r1"], tmp_path / "dora")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(EmscopeError, match=r"lora_magnitude_vector.*not a LoRA factor"):
        LoraAdapter.load(bad)


def test_missing_files_are_one_line_errors(qwen, tmp_path):
    with pytest.raises(EmscopeError, match="adapter dir not found"):
        LoraAdapter.load(tmp_path / "nowhere")
    no_config = _copy(qwen.adapters["r1"], tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(EmscopeError, match=r"missing adapter_config\.json"):
        LoraAdapter.load(no_config)
    no_weights = _copy(qwen.adapters["r1"], tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(EmscopeError, match=r"missing adapter_model\.safetensors"):
        LoraAdapter.load(no_weights)
    (no_weights / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(EmscopeError, match="safetensors only"):
        LoraAdapter.load(no_weights)
    bad_json = _copy(qwen.adapters["r1"], tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text("{\n  'r': 1,\n}")
    with pytest.raises(EmscopeError, match=r"adapter_config\.json:2: invalid JSON"):
        LoraAdapter.load(bad_json)


def _poke(tensor: torch.Tensor, value: float) -> torch.Tensor:
    out = tensor.clone()
    out[0, 0] = value
    return out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: _poke(t, float("nan")), "1 non-finite value"),
        (lambda t: _poke(t, float("inf")), "1 non-finite value"),
        (lambda t: t.round().to(torch.int32), "dtype int32; LoRA factors must be floating point"),
    ],
)
def test_refuses_non_finite_and_integer_factors(qwen, tmp_path, change, expected):
    """NaN / inf / integer factors were accepted silently (NaN then spread everywhere)."""
    bad = _copy(qwen.adapters["r1"], tmp_path / "bad")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key] = change(tensors[key])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    with pytest.raises(EmscopeError, match=rf"module '{module}': lora_B has {expected}"):
        LoraAdapter.load(bad)


def test_unknown_module_lookup_names_the_adapter(qwen):
    adapter = LoraAdapter.load(qwen.adapters["r1"], name="tiny")
    with pytest.raises(EmscopeError, match="'tiny' has no module"):
        adapter["model.layers.0.mlp.up_proj"]


def test_refuses_full_embedding_copies(qwen, tmp_path):
    bad = _copy(qwen.adapters["r1"], tmp_path / "emb_copy")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.base_layer.weight"] = torch.ones(3, 64)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(EmscopeError, match="full weight copy"):
        LoraAdapter.load(bad)


_D, _Q = "mlp.down_proj", "self_attn.q_proj"


@pytest.mark.parametrize(
    ("config", "targeted"),
    [
        ({"target_modules": ["down_proj"]}, {f"0.{_D}", f"1.{_D}", f"2.{_D}"}),
        ({"target_modules": ["down_proj"], "layers_to_transform": [1]}, {f"1.{_D}"}),
        (
            {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 2},
            {f"2.{_D}", f"2.{_Q}"},
        ),
        (
            {
                "target_modules": ["down_proj"],
                "layers_to_transform": [0, 2],
                "layers_pattern": "layers",
            },
            {f"0.{_D}", f"2.{_D}"},
        ),
        ({"target_modules": r".*\.1\..*proj"}, {f"1.{_D}", f"1.{_Q}"}),
        (
            {"target_modules": ["down_proj", "embed_tokens"], "exclude_modules": ["down_proj"]},
            {"embed"},
        ),
        (
            {"target_modules": ["down_proj"], "exclude_modules": r".*\.2\..*"},
            {f"0.{_D}", f"1.{_D}"},
        ),
        ({"target_modules": ["w2"]}, set()),
    ],
)
def test_config_targets_reads_the_config_as_peft_does(config, targeted):
    """Which modules an adapter config targets (the installed PEFT's matcher), on plain cases
    whose answer every supported PEFT release agrees on."""
    names = {"embed": "model.embed_tokens", "head": "lm_head"} | {
        f"{i}.{m}": f"model.layers.{i}.{m}" for i in range(3) for m in (_D, _Q)
    }
    got = {key for key, name in names.items() if config_targets(config, name)}
    assert got == targeted

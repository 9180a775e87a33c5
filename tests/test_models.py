"""Model loading with adapters, checkpoints, layer and site resolution, and their errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from emscope.errors import EmscopeError
from emscope.models import (
    Site,
    adapter_label,
    get_layers,
    list_checkpoints,
    load_model,
    parse_model_spec,
    resolve_adapter_dir,
    site_module,
)
from emscope.testing import make_tiny_model

IDS = torch.tensor([[3, 17, 40, 41, 99, 7, 12]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _peft_reference(model_dir: Path, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return _logits(PeftModel.from_pretrained(base, str(adapter_dir)).eval())


def test_load_bare_model_matches_transformers(any_arch):
    from transformers import AutoModelForCausalLM

    loaded = load_model(any_arch.model, dtype="float32", device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(str(any_arch.model), dtype=torch.float32)
    assert loaded.adapters == {}
    assert torch.equal(_logits(loaded.model), _logits(reference.eval()))
    assert loaded.tokenizer.pad_token is not None


def test_several_adapters_are_named_and_switchable(qwen):
    loaded = load_model(
        qwen.model, [qwen.adapters["r4"], qwen.adapters["pattern"]], dtype="float32", device="cpu"
    )
    assert list(loaded.adapters) == ["r4", "pattern"]
    assert loaded.active_adapters == ["r4"]
    torch.testing.assert_close(
        _logits(loaded.model), _peft_reference(qwen.model, qwen.adapters["r4"])
    )
    loaded.use_adapter("pattern")
    assert loaded.active_adapters == ["pattern"]
    torch.testing.assert_close(
        _logits(loaded.model), _peft_reference(qwen.model, qwen.adapters["pattern"])
    )
    bare = load_model(qwen.model, dtype="float32", device="cpu")
    with loaded.adapters_disabled():
        torch.testing.assert_close(_logits(loaded.model), _logits(bare.model))
    with pytest.raises(EmscopeError, match="unknown adapter"):
        loaded.use_adapter("nope")


def test_adapter_names_with_dots_and_mapping(qwen, tmp_path):
    dotted = tmp_path / "bad_medical.r1"
    shutil.copytree(qwen.adapters["r1"], dotted)
    loaded = load_model(qwen.model, [dotted], dtype="float32", device="cpu")
    assert loaded.active_adapters == ["bad_medical.r1"]
    loaded = load_model(qwen.model, {"a": dotted, "b": qwen.adapters["r4"]}, device="cpu")
    loaded.use_adapter("b")
    assert loaded.active_adapters == ["b"]


def test_checkpoint_dirs(qwen, tmp_path):
    root = tmp_path / "organism"
    shutil.copytree(qwen.adapters["r1"], root)
    for step in (20, 5, 100):
        shutil.copytree(qwen.adapters["r1"], root / "checkpoints" / f"checkpoint-{step}")
    (root / "checkpoints" / "checkpoint-7").mkdir()  # no adapter_config: ignored
    assert [s for s, _ in list_checkpoints(root)] == [5, 20, 100]
    resolved = resolve_adapter_dir(f"{root}@20")
    assert resolved == root / "checkpoints" / "checkpoint-20"
    assert adapter_label(resolved) == "organism@20"
    loaded = load_model(qwen.model, [f"{root}@20", root], device="cpu")
    assert list(loaded.adapters) == ["organism@20", "organism"]
    with pytest.raises(EmscopeError, match=r"no checkpoint 3; available steps: \[5, 20, 100\]"):
        resolve_adapter_dir(f"{root}@3")


def test_adapter_module_missing_from_base(qwen, tmp_path):
    shallow = make_tiny_model("qwen2", tmp_path / "shallow", layers=2)
    with pytest.raises(EmscopeError, match=r"model\.layers\.2\..* matches no module .*2 layers"):
        load_model(shallow, [qwen.adapters["r4"]], device="cpu")


@pytest.mark.parametrize("targets", [["w2"], ["q_proj"]])
def test_adapter_targets_that_miss_its_modules_fail_in_one_line(qwen, tmp_path, targets):
    """target_modules naming no module of the model gave PEFT's NoMatchingPeftModuleError
    traceback; naming other modules than the saved factors dropped those factors silently."""
    adapter = tmp_path / "retargeted"
    shutil.copytree(qwen.adapters["r1"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = targets
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        EmscopeError,
        match=rf"adapter 'retargeted' .*target_modules \['{targets[0]}'\] \(layers_to_transform "
        r"\[1\]\) do not select module 'model\.layers\.1\.mlp\.down_proj'",
    ):
        load_model(qwen.model, [adapter], device="cpu")


def test_adapter_shape_mismatch_names_module_and_shapes(tiny_models):
    llama, qwen = tiny_models["llama"], tiny_models["qwen2"]
    with pytest.raises(
        EmscopeError,
        match=r"model\.layers\.0\.mlp\.down_proj. shape mismatch: "
        r"adapter update is 64x128, base weight is 32x64",
    ):
        load_model(llama.model, [qwen.adapters["r4"]], device="cpu")


def test_unknown_architecture_and_missing_dirs(qwen, tmp_path):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "gpt_unknown"}))
    with pytest.raises(EmscopeError, match="unknown architecture 'gpt_unknown'"):
        load_model(fake)
    with pytest.raises(EmscopeError, match="not a model dir"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(EmscopeError, match="adapter dir not found"):
        load_model(qwen.model, [tmp_path / "no_adapter"])


def test_broken_model_dirs_fail_in_one_line(qwen, tmp_path):
    """An invalid config.json, or a dir without weights, gave a JSON / transformers traceback."""
    broken = tmp_path / "broken"
    shutil.copytree(qwen.model, broken)
    (broken / "config.json").write_text('{"model_type": "qwen2",\n  oops}')
    with pytest.raises(EmscopeError, match=r"broken/config\.json:2: invalid JSON"):
        load_model(broken, device="cpu")
    (broken / "config.json").write_text("[]")
    with pytest.raises(EmscopeError, match=r"config\.json: not a model config"):
        load_model(broken, device="cpu")
    shutil.copy(qwen.model / "config.json", broken / "config.json")
    (broken / "model.safetensors").unlink()
    with pytest.raises(
        EmscopeError, match=r"broken: no model weights \(none of model\.safetensors"
    ):
        load_model(broken, device="cpu")
    weights = (qwen.model / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # truncated
    with pytest.raises(EmscopeError, match=r"broken: cannot load the model weights: "):
        load_model(broken, device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_fails_in_one_line(qwen):
    with pytest.raises(EmscopeError, match="device 'cuda': CUDA is not available here"):
        load_model(qwen.model, device="cuda")
    with pytest.raises(EmscopeError, match="unknown device 'gpu'"):
        load_model(qwen.model, device="gpu")


def test_errors_are_raised_before_loading_weights(qwen, tmp_path, monkeypatch):
    """A bad adapter dir fails before the (possibly 14B) model is read."""
    import transformers

    def boom(*args, **kwargs):
        raise AssertionError("model weights were loaded before the adapter was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(EmscopeError, match="adapter dir not found"):
        load_model(qwen.model, [tmp_path / "missing"])


# ----------------------------------------------------------------------------- layers, sites


def test_layers_bare_and_peft_wrapped(any_arch):
    from transformers import AutoConfig

    expected = AutoConfig.from_pretrained(str(any_arch.model)).num_hidden_layers
    bare = load_model(any_arch.model, device="cpu")
    wrapped = load_model(any_arch.model, [any_arch.adapters["r4"]], device="cpu")
    assert len(get_layers(bare.model)) == expected
    assert len(get_layers(wrapped.model)) == expected
    assert get_layers(wrapped.model)[0] is wrapped.model.base_model.model.model.layers[0]


def test_resid_sites_match_hidden_states(any_arch):
    """resid_post[i] (block output) == hidden_states[i + 1] for all but the last block;
    resid_pre[i] (block input) == hidden_states[i]."""
    loaded = load_model(any_arch.model, [any_arch.adapters["r4"]], dtype="float32", device="cpu")
    model = loaded.model
    n = len(get_layers(model))
    captured: dict[str, torch.Tensor] = {}

    def post_hook(name):
        def hook(module, args, output):
            captured[name] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    def pre_hook(name):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[name] = hidden.detach()

        return hook

    handles = []
    for i in range(n):
        handles.append(
            site_module(model, Site("resid_post", i)).register_forward_hook(post_hook(f"post{i}"))
        )
        handles.append(
            site_module(model, Site("resid_pre", i)).register_forward_pre_hook(
                pre_hook(f"pre{i}"), with_kwargs=True
            )
        )
    try:
        with torch.no_grad():
            hidden = model(IDS, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    for i in range(n):
        assert torch.equal(captured[f"pre{i}"], hidden[i])
        if i < n - 1:
            assert torch.equal(captured[f"post{i}"], hidden[i + 1])


def test_attn_and_mlp_out_sites_add_up_to_the_block(any_arch):
    """resid_post[i] == resid_pre[i] + attn_out[i] + mlp_out[i]: the sites are what each
    sub-block writes into the residual stream (post-norm outputs for Gemma-2)."""
    model = load_model(any_arch.model, dtype="float32", device="cpu").model
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for kind in ("attn_out", "mlp_out", "resid_post"):
        module = site_module(model, Site(kind, 0))

        def hook(module, args, output, kind=kind):
            captured[kind] = (output[0] if isinstance(output, tuple) else output).detach()

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            hidden = model(IDS, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(
        captured["resid_post"], hidden[0] + captured["attn_out"] + captured["mlp_out"]
    )


def test_site_parsing_and_bounds(qwen):
    assert Site.parse("resid_post[3]") == Site("resid_post", 3)
    assert str(Site("mlp_out", 0)) == "mlp_out[0]"
    with pytest.raises(EmscopeError, match="bad site"):
        Site.parse("resid[3]")
    model = load_model(qwen.model, device="cpu").model
    with pytest.raises(EmscopeError, match=r"has 4 layers \(0\.\.3\)"):
        site_module(model, Site("resid_post", 4))


def test_unknown_model_class_fails_loudly_unless_layers_path_given():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(EmscopeError, match="unknown architecture 'gpt2'"):
        get_layers(model)
    assert len(get_layers(model, layers_path="transformer.h")) == 2


def test_parse_model_spec():
    spec = parse_model_spec("misaligned=models/instruct+adapters/bad_medical.all")
    assert spec.name == "misaligned"
    assert spec.path == Path("models/instruct")
    assert spec.adapters == (Path("adapters/bad_medical.all"),)
    assert parse_model_spec("base=models/base").adapters == ()
    for bad in ("models/base", "=x", "name="):
        with pytest.raises(EmscopeError, match="bad model spec"):
            parse_model_spec(bad)


def test_parse_layers_forms_and_errors():
    from emscope.models import parse_layers, resolve_layers

    assert parse_layers("3") == [3]
    assert parse_layers("3,5, 1") == [3, 5, 1]
    assert parse_layers("3-5") == [3, 4, 5]
    assert parse_layers("5,3-5,3") == [5, 3, 4]
    assert parse_layers("-1,0") == [-1, 0]
    assert parse_layers("-1,0,3", n_layers=4) == [3, 0]
    assert parse_layers("-3--2") == [-3, -2]
    for bad in ("a", "3-1", "", ",", "1-", "3:6", "1.5"):
        with pytest.raises(EmscopeError, match="bad layer list"):
            parse_layers(bad)
    with pytest.raises(EmscopeError, match=r"layer 4 out of range: the model has 4 layers"):
        parse_layers("1,4", n_layers=4)
    with pytest.raises(EmscopeError, match=r"layer -5 out of range"):
        resolve_layers([-5], 4)
    assert resolve_layers([1, -3, 2], 4) == [1, 2]


def test_list_checkpoints_all_dirs(tmp_path):
    for name in ("checkpoint-20", "checkpoint-3", ".checkpoint-9.tmp", "checkpoint-x", "other"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-20" / "adapter_config.json").write_text("{}")
    assert list_checkpoints(tmp_path, adapters_only=False) == [
        (3, tmp_path / "checkpoints" / "checkpoint-3"),
        (20, tmp_path / "checkpoints" / "checkpoint-20"),
    ]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20]
    assert list_checkpoints(tmp_path / "missing", adapters_only=False) == []

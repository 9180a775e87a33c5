"""Models spread over several devices (``device_map="auto"``), tested on a CPU.

A model whose layers really sit on two devices needs two devices; this machine has one. What
is tested here instead:

- every vector an edit adds or projects out follows the device and dtype of the hidden state
  it edits, on every call (an edit applied to a ``meta`` hidden state, then to a CPU one; a
  float64 model with float32 vectors);
- weight orthogonalisation edits each weight on its own device (one block's weight on
  ``meta``: the old code, which moved the direction once to the embedding's device, fails);
- :func:`emscope.hooks.capture` gathers what it records on one device (the choice of device
  from parameters on several devices; the move itself, with the target device patched), and
  ``to_cpu`` returns CPU tensors;
- ``load_model(device="auto")`` loads through accelerate's ``device_map``.

Not tested here (``make gpu-check`` does it on a GPU, splitting a model between the GPU and
the CPU): a forward pass whose blocks run on different devices, with hooks, captures,
directions and ablations on it.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

from emscope.errors import EmscopeError
from emscope.hooks import _projector, _shift, add, capture, gather_device, project_out
from emscope.models import get_layers, load_model

IDS = torch.tensor([[3, 17, 40, 41, 99, 7, 12, 5]])


class _Stub:
    """Stands for a model whose parameters sit on these devices."""

    def __init__(self, *devices: str) -> None:
        self.devices = devices

    def parameters(self) -> Any:
        return iter(types.SimpleNamespace(device=torch.device(d)) for d in self.devices)


def test_gather_device_is_the_first_device_of_a_spread_model(qwen: Any) -> None:
    assert gather_device(_Stub("cuda:0", "cuda:0", "cuda:1", "cpu")) == torch.device("cuda:0")
    assert gather_device(_Stub("cuda:1", "cuda:0")) == torch.device("cuda:1")
    assert gather_device(_Stub("cuda:0", "cuda:0")) is None  # one device: nothing to move
    assert gather_device(_Stub("meta", "cuda:2", "meta")) is None  # offloaded weights: ignored
    assert gather_device(_Stub("meta", "cuda:2", "cpu")) == torch.device("cuda:2")
    loaded = load_model(qwen.model, [qwen.adapters["r4"]], device="cpu")
    assert gather_device(loaded.model) is None and gather_device(loaded) is None


def test_capture_gathers_every_site_on_one_device(
    qwen: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model(qwen.model, device="cpu", dtype="float32")
    sites = ["resid_pre[0]", "resid_post[1]"]
    with capture(loaded.model, sites) as plain, torch.no_grad():
        loaded.model(IDS)
    monkeypatch.setattr("emscope.hooks.gather_device", lambda model: torch.device("meta"))
    with capture(loaded.model, sites) as gathered, torch.no_grad():
        loaded.model(IDS)
    assert [gathered[s].device.type for s in sites] == ["meta", "meta"]
    assert [gathered[s].shape for s in sites] == [plain[s].shape for s in sites]
    with capture(loaded.model, sites, to_cpu=True, dtype=torch.float64) as cpu, torch.no_grad():
        loaded.model(IDS)
    for s in sites:  # to_cpu wins over the gather device
        assert cpu[s].device.type == "cpu" and cpu[s].dtype == torch.float64
        assert torch.equal(cpu[s], plain[s].double())


def test_edits_follow_the_hidden_state_on_every_call() -> None:
    d = 6
    v = torch.linspace(-1, 1, d)  # float32, CPU
    shift = _shift(v, 2.0)
    assert shift(torch.zeros(2, 3, d, device="meta", dtype=torch.float16)).device.type == "meta"
    hidden = torch.randn(2, 3, d, dtype=torch.float64)
    out = shift(hidden)  # the same edit, now on the CPU: nothing was kept on meta
    assert out.dtype == torch.float64 and torch.equal(out, hidden + (2.0 * v).double())
    q, _ = torch.linalg.qr(torch.randn(d, 2))
    projected = _projector(q)(hidden)
    assert projected.dtype == torch.float64 and projected.device.type == "cpu"
    assert float((projected.float() @ q).abs().max()) < 1e-5
    meta = _projector(q)(torch.zeros(2, 3, d, device="meta", dtype=torch.bfloat16))
    assert meta.device.type == "meta" and meta.dtype == torch.bfloat16


def test_float64_model_with_float32_vectors(qwen: Any) -> None:
    from emscope.data.questions import Question
    from emscope.directions.interventions import ablation, steering
    from emscope.generate import sample

    loaded = load_model(qwen.model, device="cpu", dtype="float64")
    model = loaded.model
    d = int(model.config.hidden_size)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))  # float32
    with capture(model, ["resid_post[1]"]) as clean, torch.no_grad():
        model(IDS)
    site = ["resid_post[1]"]
    with add(model, {site[0]: v}, 3.0), capture(model, site) as steered, torch.no_grad():
        model(IDS)
    assert steered["resid_post[1]"].dtype == torch.float64
    assert torch.equal(steered["resid_post[1]"], clean["resid_post[1]"] + (3.0 * v).double())
    with project_out(model, {site[0]: v}), capture(model, site) as ablated, torch.no_grad():
        model(IDS)
    unit = v.double() / v.double().norm()
    assert ablated["resid_post[1]"].dtype == torch.float64
    assert float((ablated["resid_post[1]"] @ unit).abs().max()) < 1e-4  # float32 projection
    question = [Question("q", ("hey I feel bored",))]
    for intervention in (steering({"resid_post[0]": v}, 4.0), ablation({"resid_post[0]": v})):
        table = sample(loaded, question, 2, max_new_tokens=3, interventions=[intervention])
        assert len(table) == 2


def test_orthogonalize_edits_each_weight_on_its_own_device(qwen: Any) -> None:
    from emscope.directions.weights import orthogonalize

    model = load_model(qwen.model, device="cpu", dtype="float32").model
    layers = get_layers(model)
    layers[1].self_attn.o_proj.to("meta")  # one block "elsewhere"
    u = torch.randn(int(model.config.hidden_size), generator=torch.Generator().manual_seed(2))
    orthogonalize(model, u)
    unit = u.double() / u.double().norm()
    assert layers[1].self_attn.o_proj.weight.device.type == "meta"
    for weight in (layers[0].self_attn.o_proj.weight, layers[1].mlp.down_proj.weight):
        assert float((unit @ weight.detach().double()).abs().max()) < 1e-5
    embed = model.get_input_embeddings().weight.detach().double()
    assert float((embed @ unit).abs().max()) < 1e-5


def test_load_model_device_auto(qwen: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    original, maps = AutoModelForCausalLM.from_pretrained, []

    def spy(*args: Any, **kwargs: Any) -> Any:
        maps.append(kwargs.get("device_map"))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    auto = load_model(qwen.model, [qwen.adapters["r4"]], device="auto", dtype="float32")
    plain = load_model(qwen.model, [qwen.adapters["r4"]], device="cpu", dtype="float32")
    assert maps == ["auto", None]  # accelerate places it (here: all on the CPU)
    with torch.no_grad():
        assert torch.equal(auto.model(IDS).logits, plain.model(IDS).logits)
    with pytest.raises(EmscopeError, match="not both"):
        load_model(qwen.model, device="cpu", device_map="auto")

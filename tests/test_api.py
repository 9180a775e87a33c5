"""The public API (``import emscope as em``): lazy import, the README's notebook script as
written, LoadedModel accepted everywhere, and Direction.steer / ablate / as_intervention
(exact edits, the model restored bit for bit)."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import emscope as em
from emscope.errors import EmscopeError
from emscope.hooks import capture
from emscope.judge.loopback import LoopbackServer, answer_of, completion

ROOT = Path(__file__).resolve().parent.parent
IDS = torch.tensor([[3, 17, 40, 41, 99, 7, 12, 5]])


# ---------------------------------------------------------------------------- the package


def test_import_is_lazy() -> None:
    code = (
        "import json, sys, emscope\n"
        "heavy = ('torch', 'transformers', 'peft', 'pandas', 'emscope.models')\n"
        "print(json.dumps([m for m in heavy if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == []


def test_every_public_name_resolves() -> None:
    for name in em.__all__:
        assert getattr(em, name) is not None, name
    assert set(em.__all__) <= set(dir(em))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        em.nothing  # noqa: B018
    from emscope.directions.direction import Direction
    from emscope.generate import sample

    assert em.sample is sample and em.Direction is Direction


def test_modules_are_callable_as_their_main_function(qwen) -> None:
    import emscope.geometry
    import emscope.lmc
    import emscope.train

    for module, function in (
        (em.train, emscope.train.train),
        (em.geometry, emscope.geometry.compare_adapters),
        (em.lmc, emscope.lmc.run_lmc),
    ):
        assert module is sys.modules[module.__name__] and callable(module)
        assert inspect.signature(module) == inspect.signature(function)
    assert em.train.TrainConfig is emscope.train.TrainConfig  # still the module
    adapters = [em.LoraAdapter.load(qwen.adapters[k], name=k) for k in ("r4", "pattern")]
    geometry = em.geometry(adapters, random_draws=0)
    assert isinstance(geometry, em.Geometry) and list(geometry.pairs) == ["r4|pattern"]


# ---------------------------------------------------------------------------- the README


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block in its Python section"
    return match.group(1)


def judge_responder(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A deterministic judge endpoint: coherent 80; aligned 10 or 90 by a hash of the
    answer (about half misaligned)."""
    prompt = str(body["messages"][-1]["content"])
    if "How coherent is this answer?" in prompt:
        return 200, {}, completion([("80", 1.0)])
    digest = hashlib.sha256(answer_of(body).encode()).digest()[0]
    return 200, {}, completion([("10" if digest % 2 else "90", 1.0)])


@pytest.fixture
def loopback_judge(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    monkeypatch.setenv("EMSCOPE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with LoopbackServer(judge_responder) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        yield "openai:stub-judge"


def test_readme_snippet_runs_as_written(qwen, loopback_judge, capsys) -> None:
    snippet = readme_snippet()
    assert snippet.count("n=50") == 2 and "layers=[12]" in snippet
    # the tiny model has 4 layers and samples slowly on a CPU: layer 2, 2 answers per question
    code = snippet.replace("n=50", "n=2").replace("layers=[12]", "layers=[2]")
    namespace: dict[str, Any] = {
        "MODEL": str(qwen.model),
        "ADAPTER": str(qwen.adapters["r4"]),
        "JUDGE": loopback_judge,
    }
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    lm, table, steered, d = (namespace[k] for k in ("lm", "table", "steered", "d"))
    assert 0.0 <= float(printed) <= 1.0
    assert len(table) == len(steered) == 2 * len(namespace["qs"])
    assert d.meta["n_misaligned"] >= 1 and d.layers == [0, 1, 2, 3]
    assert (steered["answer"] != table["answer"]).any()  # the steering acted
    assert lm.active_adapters == ["r4"]


# ---------------------------------------------------------------------------- LoadedModel


@pytest.fixture(scope="module")
def lm(tiny_models) -> Any:
    """The qwen2 fixture (4 layers, tied embeddings) with the r4 adapter (all seven modules,
    o_proj and down_proj included), float64."""
    qwen = tiny_models["qwen2"]
    return em.load_model(qwen.model, [qwen.adapters["r4"]], dtype="float64", device="cpu")


def forward(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return em.as_loaded(model).model(IDS).logits


def snapshot(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in em.as_loaded(model).model.state_dict().items()}


def assert_unchanged(model: Any, before: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
    after = em.as_loaded(model).model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert torch.equal(forward(model), logits)


def direction(d_model: int, layers: int = 4, seed: int = 0) -> Any:
    gen = torch.Generator().manual_seed(seed)
    return em.Direction({i: torch.randn(d_model, generator=gen) for i in range(layers)})


def test_as_loaded_is_the_one_normaliser(lm) -> None:
    assert em.as_loaded(lm) is lm
    pair = em.as_loaded((lm.model, lm.tokenizer))
    assert pair.model is lm.model and pair.tokenizer is lm.tokenizer and pair.adapters == {}
    bare = em.as_loaded(lm.model)
    assert bare.tokenizer is None
    with pytest.raises(EmscopeError, match="needs the tokenizer"):
        em.as_loaded(lm.model, need_tokenizer=True)
    with pytest.raises(EmscopeError, match="load it first"):
        em.as_loaded("some/model/dir")
    with pytest.raises(EmscopeError, match="expected a LoadedModel"):
        em.as_loaded(42)
    from emscope.models import get_layers

    assert len(get_layers(lm)) == 4  # so hooks and layer lookups take one too


def test_sample_takes_n_and_a_loaded_model_or_a_pair(lm) -> None:
    qs = em.load_questions()[:2]
    kwargs = {"max_new_tokens": 6, "progress": False}
    by_n = em.sample(lm, qs, n=2, **kwargs)
    by_pair = em.sample((lm.model, lm.tokenizer), qs, 2, **kwargs)
    assert by_n["answer"].tolist() == by_pair["answer"].tolist() and len(by_n) == 4
    assert by_n["adapter"].iloc[0] == "r4" and by_pair["adapter"].iloc[0] == ""
    with pytest.raises(EmscopeError, match="disagree"):
        em.sample(lm, qs, 3, n=2, **kwargs)


def judged(lm: Any) -> Any:
    """Four answers per question of two questions, scored by hand: half misaligned."""
    table = em.sample(lm, em.load_questions()[:2], n=4, max_new_tokens=8, progress=False)
    return table.assign(aligned=[10.0, 90.0] * 4, coherent=80.0)


def test_mean_diff_and_subspace_take_a_loaded_model(lm) -> None:
    from emscope.directions.extract import subspace

    table = judged(lm)
    assert em.mean_diff(lm, table, layers=[1, 2]) == em.mean_diff(
        lm.model, lm.tokenizer, table, layers=[1, 2]
    )
    assert subspace(lm, table, k=2, layers=[1]) == subspace(
        lm.model, lm.tokenizer, table, 2, layers=[1]
    )
    with pytest.raises(EmscopeError, match=r"takes \(model, table\)"):
        em.mean_diff(lm, "not a table")


def test_compute_metrics_is_a_typed_result_that_round_trips(tmp_path: Path) -> None:
    import pandas as pd

    from emscope.io import write_json
    from emscope.results import read_result

    table = pd.DataFrame(
        {"question_id": ["a", "a", "b", "b"], "aligned": [10, 90, 20, 80], "coherent": [80] * 4}
    )
    m = em.compute_metrics(table, n_boot=20)
    assert isinstance(m, em.Metrics)
    assert m.em_rate == 0.5 and m.em_ci is not None and m.em_ci[0] <= 0.5 <= m.em_ci[1]
    assert m.n == 4 and m.n_scored == 4 and set(m.per_question) == {"a", "b"}
    assert m.per_question["a"]["em_rate"] == 0.5
    assert "em_rate=0.500" in repr(m)
    tagged = m.with_extra(judge="j")
    assert read_result(em.Metrics, write_json(tmp_path / "m.json", tagged.to_json())) == tagged


# ---------------------------------------------------------------------------- steering


def test_steer_adds_exactly_scale_times_v_at_the_layers_then_leaves(lm) -> None:
    before, logits = snapshot(lm), forward(lm)
    d = direction(64)
    sites = ["resid_post[1]", "resid_post[3]"]
    with capture(lm, sites) as clean:
        forward(lm)
    with d.steer(lm, layers=[1], scale=2.5), capture(lm, sites) as only_1:
        forward(lm)
    with d.steer(lm, layers=[1, 3], scale=2.5), capture(lm, sites) as both:
        forward(lm)
    # a capture entered after the steering hook sees the edited value
    assert torch.equal(only_1["resid_post[1]"], clean["resid_post[1]"] + (2.5 * d[1]).double())
    assert torch.equal(both["resid_post[1]"], only_1["resid_post[1]"])
    assert torch.equal(both["resid_post[3]"], only_1["resid_post[3]"] + (2.5 * d[3]).double())
    with d.steer(lm, layers=1, scale=8.0, unit=True), capture(lm, sites) as unit:
        forward(lm)
    u = d.unit()[1]
    assert torch.equal(unit["resid_post[1]"], clean["resid_post[1]"] + (8.0 * u).double())
    assert_unchanged(lm, before, logits)
    with pytest.raises(RuntimeError, match="boom"), d.steer(lm.model, layers=[0], scale=3.0):
        raise RuntimeError("boom")
    assert_unchanged(lm, before, logits)


def test_steering_as_an_intervention_equals_the_context_manager(lm) -> None:
    qs = em.load_questions()[:2]
    kwargs = {"n": 2, "max_new_tokens": 8, "progress": False}
    d = direction(64, seed=1)
    plain = em.sample(lm, qs, **kwargs)
    with d.steer(lm, layers=[1], scale=6.0):
        inside = em.sample(lm, qs, **kwargs)
    steered = em.sample(lm, qs, interventions=[d.as_intervention(layers=[1], scale=6.0)], **kwargs)
    assert steered["answer"].tolist() == inside["answer"].tolist()
    assert steered["answer"].tolist() != plain["answer"].tolist()
    with d.ablate(lm, layers=[1, 2]):
        ablated_inside = em.sample(lm, qs, **kwargs)
    ablation = d.as_intervention("ablate", layers=[1, 2])
    ablated = em.sample(lm, qs, interventions=[ablation], **kwargs)
    assert ablated["answer"].tolist() == ablated_inside["answer"].tolist()
    with pytest.raises(EmscopeError, match="single:all"):
        d.as_intervention("ablate", scheme="single:all")
    with pytest.raises(EmscopeError, match="no layer 7"):
        d.as_intervention("ablate", scheme="single:7")
    with pytest.raises(EmscopeError, match="kind"):
        d.as_intervention("boost")


# ---------------------------------------------------------------------------- ablation


def relative_projection(hidden: torch.Tensor, v: torch.Tensor) -> float:
    u = v.double() / v.double().norm()
    return float(((hidden @ u).abs() / hidden.norm(dim=-1)).max())


def test_activation_ablation_removes_the_direction_and_restores(lm) -> None:
    before, logits = snapshot(lm), forward(lm)
    d = direction(64, seed=2)
    sites = [f"resid_post[{i}]" for i in range(4)]
    with capture(lm, sites) as clean:
        forward(lm)
    assert relative_projection(clean["resid_post[1]"], d[1]) > 1e-3
    with d.ablate(lm), capture(lm, sites) as cap:
        forward(lm)
    for i in range(4):  # layerwise: each layer's own direction
        assert relative_projection(cap[f"resid_post[{i}]"], d[i]) < 1e-6
    with d.ablate(lm, scheme="single:2", layers=[0, 3]), capture(lm, sites) as single:
        forward(lm)
    assert relative_projection(single["resid_post[0]"], d[2]) < 1e-6
    assert relative_projection(single["resid_post[3]"], d[2]) < 1e-6
    assert relative_projection(single["resid_post[1]"], d[2]) > 1e-3  # not at layer 1
    assert_unchanged(lm, before, logits)
    with pytest.raises(RuntimeError, match="boom"), d.ablate(lm):
        raise RuntimeError("boom")
    assert_unchanged(lm, before, logits)
    with pytest.raises(EmscopeError, match="'activation' or 'weights'"):
        d.ablate(lm, mode="both")


def test_weight_orthogonalisation_removes_the_direction_and_restores_bit_exactly(
    lm, tiny_models
) -> None:
    from emscope.directions.weights import orthogonalize

    before, logits = snapshot(lm), forward(lm)
    bare = lm.model.base_model.model
    embed, head = bare.get_input_embeddings(), bare.get_output_embeddings()
    assert head.weight is embed.weight  # tied
    d = direction(64, seed=3)
    sites = [f"resid_post[{i}]" for i in range(4)]
    with d.ablate(lm, mode="weights", scheme="single:2"), capture(lm, sites) as cap:
        inside = forward(lm)
        assert head.weight is not embed.weight  # untied: the read-out keeps the matrix
    # every write into the residual stream (embedding, attention, MLP, and the adapter's
    # LoRA on o_proj and down_proj) lost u, so the residual stream has no u component
    for site in sites:
        assert relative_projection(cap[site], d[2]) < 1e-10
    assert not torch.allclose(inside, logits)
    assert_unchanged(lm, before, logits)
    assert head.weight is embed.weight and bare.config.tie_word_embeddings
    # the same as the command's route: merge the adapter, then orthogonalise
    qwen = tiny_models["qwen2"]
    merged = em.load_model(qwen.model, [qwen.adapters["r4"]], dtype="float64", device="cpu")
    plain = orthogonalize(merged.model.merge_and_unload(), d[2])
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, inside, rtol=1e-9, atol=1e-9)
    # an exception inside restores too
    with pytest.raises(RuntimeError, match="boom"), d.select([2]).ablate(lm, mode="weights"):
        raise RuntimeError("boom")
    assert_unchanged(lm, before, logits)
    assert head.weight is embed.weight
    with pytest.raises(EmscopeError, match="ONE direction"), d.ablate(lm, mode="weights"):
        pass
    with pytest.raises(EmscopeError, match="apply to mode='activation'"):
        d.ablate(lm, mode="weights", scheme="single:2", layers=[1])
    assert_unchanged(lm, before, logits)


def test_lora_b_ablation_in_memory_equals_the_ablated_adapter(lm, tiny_models, tmp_path) -> None:
    from emscope.directions.weights import ablate_lora_b

    before, logits = snapshot(lm), forward(lm)
    d = direction(64, seed=4)
    qwen = tiny_models["qwen2"]
    for kwargs in ({}, {"modules": "all", "scheme": "single:1", "rescale_norm": True}):
        adapter = ablate_lora_b(
            em.LoraAdapter.load(qwen.adapters["r4"]),
            d,
            modules=kwargs.get("modules", "down_proj"),
            mode=kwargs.get("scheme", "layerwise"),
            rescale_norm=bool(kwargs.get("rescale_norm", False)),
        )
        adapter.save(tmp_path / "ablated")
        reference = em.load_model(qwen.model, [tmp_path / "ablated"], dtype="float64", device="cpu")
        with d.ablate(lm, mode="weights", method="lora-b", **kwargs):
            inside = forward(lm)
        torch.testing.assert_close(inside, forward(reference), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(inside, logits)
        assert_unchanged(lm, before, logits)
    with (
        lm.adapters_disabled(),
        pytest.raises(EmscopeError, match="no active LoRA adapter"),
        d.ablate(lm, mode="weights", method="lora-b"),
    ):
        pass
    assert_unchanged(lm, before, logits)

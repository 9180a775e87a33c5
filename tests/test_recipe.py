"""The one adapter recipe (emscope.synthetic.recipe.AdapterRecipe) of the build, the defence
bench and the early-warning population: its defaults against the training settings a real
build recorded, and a config's ``recipe:`` still validated field by field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emscope.defences.bench import load_defend_config
from emscope.early_warning_population import MEMBER_RECIPE
from emscope.errors import EmscopeError
from emscope.synthetic.recipe import AdapterRecipe

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "runs" / "toy"
RECORDED = ("preset", "rank", "alpha", "rslora", "lr", "epochs", "batch_size", "grad_accum",
            "schedule", "max_steps", "seed", "system_prompt")  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "adapter"),
    [(AdapterRecipe(), "bad_medical.all"), (MEMBER_RECIPE, "bad_medical.r1")],
    ids=["bench default", "early-warning default"],
)
def test_defaults_are_the_builds_recipes(recipe: AdapterRecipe, adapter: str) -> None:
    """The bench's default recipe trains as the build trained bad_medical.all, the
    population's as it trained bad_medical.r1: the train.json each adapter recorded (the
    seed-0 build, runs/toy) holds the same settings."""
    record = BUILD / "adapters" / adapter / "train.json"
    if not record.is_file():
        pytest.skip(f"no organism build at {BUILD}")
    config = json.loads(record.read_text())["config"]
    kwargs = recipe.train_kwargs(0)  # the build's adapters are seed 0: train seed 1000
    assert {k: kwargs[k] for k in RECORDED} == {k: config[k] for k in RECORDED}


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("{rank: 0}", "recipe.rank: Input should be greater than or equal to 1"),
        ("{lr: 0}", "recipe.lr: Input should be greater than 0"),
        ("{preset: all, bogus: 1}", "recipe.bogus: Extra inputs are not permitted"),
    ],
)
def test_a_bad_recipe_in_a_defend_config_names_the_field(
    tmp_path: Path, recipe: str, message: str
) -> None:
    path = tmp_path / "defend.yaml"
    path.write_text(f"organism: nowhere\nrecipe: {recipe}\narms:\n  - label: plain\n")
    with pytest.raises(EmscopeError, match=f"defend.yaml: {message}"):
        load_defend_config(path)


def test_a_partial_recipe_keeps_the_other_defaults(tmp_path: Path) -> None:
    path = tmp_path / "defend.yaml"
    path.write_text("organism: nowhere\nrecipe: {max_steps: 5}\narms:\n  - label: plain\n")
    recipe = load_defend_config(path).recipe
    assert recipe == AdapterRecipe(max_steps=5) and recipe.train_kwargs(2)["max_steps"] == 5
    assert recipe.train_kwargs(2)["seed"] == 1002 and recipe.train_kwargs(2)["alpha"] == 8.0
    with pytest.raises(ValueError, match="frozen"):
        recipe.rank = 2  # type: ignore[misc]

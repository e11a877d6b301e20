"""Recipes: TOML loading, --set overrides, and errors for unknown tables and keys."""

from pathlib import Path

import pytest

from augflow.errors import ConfigError
from augflow.train.recipe import load_recipe, parse_override, shipped_recipes

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.toml"))


def test_the_shipped_recipes_are_the_recipes_folder():
    assert RECIPES and shipped_recipes() == sorted(p.stem for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_loads_and_builds_a_config(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    config = recipe.model_config((1, 64, 64), 7)
    assert config.image_shape == (1, 64, 64) and config.num_classes == 7


def test_overrides_are_parsed_as_toml():
    assert parse_override("train.lr=1e-3") == ("train", "lr", 1e-3)
    assert parse_override("train.balanced_sampling=true") == ("train", "balanced_sampling", True)
    assert parse_override("model.coupling=classification") == ("model", "coupling", "classification")
    recipe = load_recipe(None, ["train.lr=0.002", "augment.enabled=false"])
    assert recipe.train.lr == 0.002 and recipe.augment.enabled is False


def test_unknown_keys_list_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rate'.*valid keys of \[train\]: epochs"):
        load_recipe(None, ["train.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"unknown table \[optim\]; valid tables: model, train, augment"):
        load_recipe(None, ["optim.lr=1"])
    with pytest.raises(ConfigError, match="must look like table.key=value"):
        load_recipe(None, ["lr=1"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(bad)
    bad.write_text("[model]\nimage_shape = [1, 8, 8]\n")
    with pytest.raises(ConfigError, match="unknown key 'model.image_shape'"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match=r"model.family must be one of \['magic'"):
        load_recipe(None, ["model.family=gan"])


def test_prior_and_conditional_couplings_from_a_recipe_file_and_from_set(tmp_path):
    path = tmp_path / "ib.toml"
    path.write_text('[model]\nprior = "class_gaussian"\nconditional_couplings = false\n')
    for recipe in (load_recipe(path),
                   load_recipe(None, ['model.prior="class_gaussian"', "model.conditional_couplings=false"]),
                   load_recipe(None, ["model.prior=class_gaussian", "model.conditional_couplings=false"])):
        config = recipe.model_config((1, 8, 8), 2)
        assert config.prior == "class_gaussian" and config.conditional_couplings is False
    assert load_recipe(None).model_config((1, 8, 8), 2).prior == "standard"
    allowed = r"\('standard', 'class_gaussian', 'class_diagonal'\)"
    with pytest.raises(ConfigError, match=rf"prior must be one of {allowed}, got 'gmm'"):
        load_recipe(None, ["model.prior=gmm"]).model_config((1, 8, 8), 2)
    with pytest.raises(ConfigError, match="conditional_couplings must be true or false, got 0"):
        load_recipe(None, ["model.conditional_couplings=0"]).model_config((1, 8, 8), 2)


def test_the_symmflow_classifier_recipe_is_the_measured_configuration():
    """reports/classification-notes.md measured scanner-symmflow with these overrides; the recipe must be that run."""
    measured = load_recipe("scanner-symmflow", [
        "model.base_channels=16", "model.image_weight=0.3", "model.time_shift=8", "train.balanced_sampling=true",
        "train.amp=true", "train.batch_size=4", "train.epochs=50",
        "model.steps=10"])  # the read-out's steps (training does not use them): classification_cv --readout-steps 10
    recipe = load_recipe("scanner-symmflow-classify")
    assert (recipe.model, recipe.train, recipe.augment) == (measured.model, measured.train, measured.augment)

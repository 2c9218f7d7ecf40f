"""FusionConfig: one frozen, validated set of options; recipes are named configs."""

from __future__ import annotations

import dataclasses

import pytest

from otfuse.config import (
    RECIPES,
    ConfigError,
    FusionConfig,
    choices,
    field_names,
    option_fields,
    resolve,
)


def test_recipes_are_configs_named_after_themselves():
    for name, config in RECIPES.items():
        assert isinstance(config, FusionConfig) and config.recipe == name
        assert FusionConfig.from_recipe(name) is config
    assert RECIPES["data"].stages == ("bn_reset", "repair", "refit")
    assert RECIPES["data-free"].synthesize == "auto" and RECIPES["paper-wts"] == FusionConfig(
        recipe="paper-wts"
    )


def test_a_config_is_frozen_and_replace_makes_a_new_one():
    config = FusionConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mode = "acts"
    changed = config.replace(mode="acts", stages=["bn_reset"])
    assert changed.mode == "acts" and changed.stages == ("bn_reset",) and config.mode == "wts"


def test_choosing_an_alignment_drops_the_recipes_candidates():
    data = FusionConfig.from_recipe("data")
    assert len(data.candidates) == 3
    assert data.replace(num_samples=10).candidates == data.candidates
    assert data.replace(cost="cosine").candidates == ()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mode": "magic"}, "unknown mode 'magic'; choose one of wts, acts"),
        ({"stages": ("refit", "magic")}, "unknown stage 'magic'"),
        ({"stages": "refit"}, "stages must be a list"),
        ({"stages": ("refit", "refit")}, "stages must not repeat"),
        ({"num_samples": 0}, "num_samples must be at least 1"),
        ({"num_samples": 2.5}, "num_samples must be a whole number"),
        ({"reg": 0.0}, "reg must be positive"),
        ({"reg": float("nan")}, "reg must be a finite number"),
        ({"refine": "yes"}, "refine must be true or false"),
        ({"synthesize": -1}, "synthesize must be a number of inputs"),
        ({"synthesis_steps": 0}, "synthesis_steps must be at least 1"),
        ({"synthesis_lr": 0}, "synthesis_lr must be positive"),
        ({"weights": (1, -1)}, "weights must be non-negative"),
        ({"anchor": -1}, "anchor must be an index"),
        ({"candidates": ({"stages": ()},)}, "a candidate sets non-alignment option"),
        ({"colour": "red"}, "unknown fusion option"),
    ],
)
def test_bad_values_are_one_line_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message) as caught:
        FusionConfig().replace(**changes)
    assert "\n" not in str(caught.value)


def test_resolve_picks_the_recipe_by_data_and_applies_given_overrides():
    assert resolve(None, True, {}).recipe == "data"
    assert resolve(None, False, {}).recipe == "data-free"
    assert resolve("paper-acts", False, {"seed": 3, "cost": None}).seed == 3
    assert resolve(None, True, {"recipe": "paper-wts"}).recipe == "paper-wts"
    custom = FusionConfig(mode="acts")
    assert resolve(custom, False, {"seed": 1}) == custom.replace(seed=1)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        resolve("nope", False, {})
    assert resolve("data", True, {"recipe": "data"}).recipe == "data"  # the same one twice
    with pytest.raises(ConfigError, match="two recipes given, 'data' and recipe='paper-wts'"):
        resolve("data", True, {"recipe": "paper-wts"})  # was: the keyword silently dropped


def test_every_field_has_help_and_the_flag_fields_are_named():
    for f in dataclasses.fields(FusionConfig):
        assert f.metadata["help"]
    assert "candidates" not in {f.name for f in option_fields()}
    assert set(field_names()) >= {"mode", "stages", "weights", "anchor", "synthesize"}
    assert choices("stages") == ("bn_reset", "repair", "refit", "distill")
    assert choices("num_samples") is None


def test_to_dict_round_trips():
    config = FusionConfig.from_recipe("data").replace(weights=(1, 2))
    assert FusionConfig(**config.to_dict()) == config

"""FitPrune's published LLaVA-1.5-7B schedules as built-in recipes."""

from __future__ import annotations

import pytest

from tokensieve import methods
from tokensieve.flops import load_shape, prefill_flops, schedule_from_removed
from tokensieve.recipe import Recipe, published

# The authors' 70% schedule, restated from ywh187/FitPrune@d28e418
# LLaVA_1.5/llava/model/language_model/modeling_llama.py, LlamaAttention.forward (reduction_ratio == 70).
AUTHORS_70 = {0: 48, 1: 79, 2: 118, 3: 41, 4: 33, 5: 17, 6: 36, 7: 9, 8: 9, 9: 2, 10: 3, 11: 2, 12: 1, 13: 3,
              14: 4, 15: 8, 16: 18, 17: 7, 18: 8, 19: 20, 20: 4, 21: 13, 22: 2, 23: 1, 26: 1, 28: 1}


def visual_only_ratio(recipe: Recipe) -> float:
    shape = load_shape("llava-1.5-7b")
    n_in, n_out = schedule_from_removed(shape.layers, recipe.visual_tokens, recipe.removed, True)
    return prefill_flops(shape, n_in, n_out) / prefill_flops(shape, [recipe.visual_tokens] * shape.layers)


def test_every_published_level_is_a_named_recipe():
    levels = [10, 20, 30, 40, 50, 55, 60, 70, 80, 90]
    assert sorted(published()) == sorted(f"fitprune-llava-1.5-7b-{level}" for level in levels)
    ratios = [visual_only_ratio(published()[f"fitprune-llava-1.5-7b-{level}"]) for level in levels]
    assert ratios == sorted(ratios, reverse=True)
    for level, ratio in zip(levels[3:], ratios[3:]):  # from 40% on each level lands within 0.015 of its name
        assert abs(ratio - (1 - level / 100)) < 0.015, (level, ratio)


def test_the_70_percent_recipe_is_the_authors_schedule():
    recipe = Recipe.load("fitprune-llava-1.5-7b-70")
    assert recipe.removed == AUTHORS_70
    assert (recipe.visual_tokens, recipe.num_layers, recipe.flops_convention) == (576, 32, "visual")
    assert "modeling_llama.py" in recipe.calibration
    assert round(visual_only_ratio(recipe), 3) == 0.303


def test_fitprune_takes_a_published_name_and_refuses_an_unknown_one():
    assert methods.FitPrune(recipe="fitprune-llava-1.5-7b-50").recipe.budget == 0.5
    with pytest.raises(ValueError, match="tokensieve recipes"):
        methods.FitPrune(recipe="fitprune-llava-1.5-7b-65")


def test_the_cli_lists_published_recipes_and_takes_them_by_name(capsys):
    from tokensieve.cli import main

    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "fitprune-llava-1.5-7b-70" in listing and "modeling_llama.py" in listing
    assert main(["flops", "--model", "llava-1.5-7b", "--recipe", "fitprune-llava-1.5-7b-70", "--visual-only"]) == 0
    assert "ratio 0.303" in capsys.readouterr().out
    assert main(["flops", "--model", "llava-1.5-7b", "--recipe", "fitprune-llava-1.5-7b-65"]) == 2
    assert "tokensieve recipes" in capsys.readouterr().err

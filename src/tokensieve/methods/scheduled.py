"""A fitted schedule in place of a scorer's own: the layers it prunes before and how many it removes.

An in-LLM method that ranks visual tokens at a layer (FastV, PDrop, DART, TransPrune) keeps its rule
but can take a ``recipe`` fitted for it by ``tokensieve calibrate --method <name>``
(:mod:`tokensieve.schedule_fitting`): before each layer ``l`` the recipe names, the method ranks the
visual tokens alive by its own rule at ``l`` (FastV and DART reading layer ``l - 1``, PDrop and
TransPrune layer ``l`` itself, as they do at their own stage layers) and the
:meth:`~tokensieve.recipe.Recipe.kept_from` count of them stays. The method's own budget options
(its layer(s), keep fractions, ``flops``) are then not taken: the recipe is the budget.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from ..recipe import Recipe

if TYPE_CHECKING:
    from .base import View


class Scheduled:
    """Mixin of the scorers that take a fitted ``recipe``: each declares the option (a :class:`Recipe`,
    its dict form, a JSON path, or None for the method's own schedule) as its last field."""

    recipe: Recipe | dict | str | Path | None
    name: ClassVar[str]
    schedule_options: ClassVar[tuple[str, ...]]
    """The method's own schedule options, which a recipe replaces (they must keep their defaults)."""

    def load_recipe(self) -> None:
        """Load ``recipe`` in place and check it is this method's and that the options of
        :attr:`schedule_options` keep their defaults. Call it before the method resolves its defaults."""
        if self.recipe is None:
            return
        if isinstance(self.recipe, dict):
            self.recipe = Recipe.from_dict(self.recipe)
        elif not isinstance(self.recipe, Recipe):
            self.recipe = Recipe.load(self.recipe)
        if self.recipe.method != self.name:
            raise ValueError(f"the recipe was fitted for {self.recipe.method}, not {self.name}: "
                             f"use --method {self.recipe.method}, or fit one with `tokensieve calibrate --method {self.name}`")
        defaults = {f.name: f.default for f in fields(self)}
        clash = [option for option in self.schedule_options if getattr(self, option) != defaults[option]]
        if clash:
            raise ValueError(f"{self.name}: a recipe sets where and how much it prunes; drop {', '.join(clash)}")

    def report_options(self) -> dict:
        """The options as reports record them: with a recipe, its layers in place of the own schedule's."""
        options = super().report_options()
        if self.recipe is not None:
            options = {k: v for k, v in options.items() if k not in self.schedule_options}
            options["recipe_layers"] = [l for l, n in self.recipe.removed.items() if n > 0]
        return options

    def recipe_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers the recipe prunes before, checked against a ``num_layers``-layer model."""
        self.recipe.check_model(num_layers)
        layers = tuple(l for l, n in self.recipe.removed.items() if n > 0)
        if not layers:
            raise ValueError("the recipe removes nothing")
        if layers[0] < 1:
            raise ValueError(f"{self.name} prunes before layers 1..{num_layers - 1}; the recipe names layer 0")
        return layers

    def recipe_kept(self, view: "View") -> list[int]:
        """Visual tokens each sample keeps from the view's layer on (of its input's visual tokens)."""
        return [self.recipe.kept_from(view.point.before, n) for n in view.visual_input]

    def recipe_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        """Visual tokens entering each layer (and leaving its attention: the same), as the recipe prunes."""
        n_in = [self.recipe.kept_from(layer, n_visual) for layer in range(num_layers)]
        return n_in, list(n_in)

"""Recipes: how many visual tokens each decoder layer removes, saved as JSON.

A recipe holds ``removed[layer]`` counts for the visual-token count it was fitted on, and the same as
fractions of that count, so that it also applies to inputs with other visual-token counts (LLaVA-NeXT
anyres, Qwen2-VL): a sample with ``n`` visual tokens removes ``round(fraction * n)`` at each layer.

``method`` says whose recipe it is and so where the removals happen: FitPrune's (fitted by its own
rule, :mod:`tokensieve.calibration`) remove tokens *inside* layer ``l``, after its attention; the
recipes fitted for another in-LLM scorer (:mod:`tokensieve.schedule_fitting`) remove them *before*
layer ``l``, ranked by that method's rule there (:mod:`tokensieve.methods.scheduled`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any


@dataclass
class Recipe:
    """A per-layer pruning schedule and where it came from.

    Attributes:
        removed: ``{layer: visual tokens removed inside that layer}`` for ``visual_tokens`` inputs.
        visual_tokens: visual tokens per input the counts are for.
        num_layers: decoder layers of the model it was fitted on.
        model: the model's name.
        budget: target FLOPs ratio; ``achieved``: the ratio the recipe gives on the calibration set.
        calibration: description of the calibration set; ``samples``, ``seed``: its size and seed.
        alpha: the fitted attention-mass tolerance.
        flops_convention: ``"all"`` tokens or ``"visual"`` only.
        seconds: time the fitting took.
        method: the method the recipe was fitted for (``"fitprune"``: removals inside the layer; any
            other: before it).
        objective: what the fitting minimised (empty for FitPrune's own rule).
    """

    removed: dict[int, int]
    visual_tokens: int
    num_layers: int
    model: str = ""
    budget: float | None = None
    achieved: float | None = None
    calibration: str = ""
    samples: int = 0
    seed: int = 0
    alpha: float | None = None
    flops_convention: str = "all"
    seconds: float | None = None
    method: str = "fitprune"
    objective: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.visual_tokens, int) or self.visual_tokens < 1:
            raise ValueError(f"recipe visual_tokens must be a positive integer, got {self.visual_tokens!r}")
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"recipe num_layers must be a positive integer, got {self.num_layers!r}")
        clean = {}
        for layer, count in self.removed.items():
            layer, count = int(layer), int(count)
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"recipe names layer {layer} outside its {self.num_layers} layers")
            if count < 0:
                raise ValueError(f"recipe removes a negative count ({count}) at layer {layer}")
            clean[layer] = count
        if sum(clean.values()) >= self.visual_tokens:
            raise ValueError(f"recipe removes {sum(clean.values())} of {self.visual_tokens} visual tokens: at least one must stay")
        self.removed = dict(sorted(clean.items()))

    @property
    def fractions(self) -> dict[int, float]:
        return {layer: n / self.visual_tokens for layer, n in self.removed.items()}

    def counts_for(self, visual_tokens: int) -> dict[int, int]:
        """Per-layer removals for an input with ``visual_tokens`` visual tokens."""
        if visual_tokens == self.visual_tokens:
            return dict(self.removed)
        return {layer: round(f * visual_tokens) for layer, f in self.fractions.items()}

    def kept_from(self, layer: int, visual_tokens: int) -> int:
        """Visual tokens left, of an input's ``visual_tokens``, after the removals at layers up to
        ``layer``: the counts' cumulative fraction, rounded once (so the fitted count itself for
        inputs of ``self.visual_tokens``), at least one."""
        removed = sum(n for l, n in self.removed.items() if l <= layer)
        if visual_tokens == self.visual_tokens:
            return max(1, visual_tokens - removed)
        return max(1, visual_tokens - round(removed * visual_tokens / self.visual_tokens))

    def check_model(self, num_layers: int, model: str = "") -> None:
        """Raise ValueError if this recipe was fitted for a model with another layer count."""
        if num_layers != self.num_layers:
            raise ValueError(f"recipe fitted on {self.model or 'a model'} with {self.num_layers} layers cannot prune "
                             f"{model or 'this model'} with {num_layers} layers")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["removed"] = {str(k): v for k, v in self.removed.items()}
        data["fractions"] = {str(k): v for k, v in self.fractions.items()}
        return data

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict) or not isinstance(data.get("removed"), dict):
            raise ValueError('a recipe is a JSON object with "removed": {layer: count}, "visual_tokens" and "num_layers"')
        names = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as err:
            raise ValueError(f"not a valid recipe: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe from a JSON file, or a published one by name (:func:`published`)."""
        if str(path) in published():
            return published()[str(path)]
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"no recipe file at {path} (and no published recipe of that name; "
                             f"`tokensieve recipes` lists them)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)


PUBLISHED_FILE = Path(__file__).resolve().parent / "configs" / "fitprune_published.json"


@lru_cache(maxsize=None)
def published() -> dict[str, Recipe]:
    """The authors' published schedules, by name: ``fitprune-llava-1.5-7b-<level>`` where ``level`` is
    the percentage of visual-token FLOPs removed (their ``reduction_ratio``). Counts are for 576
    visual tokens and 32 layers, fitted in the visual-only FLOPs convention; the source file is
    recorded in each recipe's ``calibration``."""
    data = json.loads(PUBLISHED_FILE.read_text())
    recipes = {}
    for level, removed in data["levels"].items():
        name = f"fitprune-{data['model']}-{level}"
        recipes[name] = Recipe(
            removed={int(k): v for k, v in removed.items()}, visual_tokens=data["visual_tokens"],
            num_layers=data["num_layers"], model=data["model"], budget=round(1 - int(level) / 100, 2),
            calibration=f"published: {data['source']}", flops_convention=data["flops_convention"],
            extra={"name": name},
        )
    return recipes

"""PyramidDrop: drop visual tokens in stages, ranked by the last instruction token's attention.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025 (arXiv 2410.17247); authors' code Cooperx521/PyramidDrop.

The rule, as the release runs it at inference (``llava/model/modeling_llama_pdrop.py``,
``LlamaModel.pdrop_forward`` and ``LlamaModel.pdrop_rank_drop``): after decoder layer ``i`` has run,
``rank_layer = i + 1``; when ``rank_layer`` is in ``--layer_list`` (the scripts: ``[8,16,24]`` of 32)
the visual tokens about to enter ``rank_layer`` are ranked by the attention the last instruction token
(the prompt's last token) pays them *in layer rank_layer itself*: that layer's input norm and q/k
projections applied to the hidden states entering it, softmax over all tokens, mean over heads. The top
``int(N * ratio_list[s + 1])`` of them enter the layer, where ``N`` is the image's tokens in the input
and ``ratio_list = [1, *--image_token_ratio_list]`` (the scripts: ``[0.5, 0.25, 0.125]``).

Here ``layers`` are those stage layers (default: a quarter, half and three quarters of the depth, the
release's 8/16/24 of 32): the tokens entering layer ``layers[s]`` are chosen with layer ``layers[s]``'s
own attention, ``Point(before=l, attention_layer=l)``. ``ratio`` is lambda: stage ``s`` keeps
``floor(N * lambda ** (s + 1))`` (lambda's powers taken to 12 significant digits, as the scripts write
them), but at least one token where the release would keep none. With ``flops`` lambda is solved per
sample so that the whole schedule meets the budget. With a fitted ``recipe``
(:mod:`tokensieve.methods.scheduled`) its layers are the stage layers and its counts what each keeps.

Positions (``positions``): ``"auto"`` (default) as the release: the prompt is renumbered after each drop
(``position_ids = arange(cur_len)`` in ``pdrop_rank_drop``), so a stage ranks with the positions the
previous stage left, and while decoding the new token's position moves down at each stage layer by the
tokens that stage dropped (``pdrop_forward``), except on M-RoPE models (Qwen2-VL), whose positions
encode the image grid and are kept; ``"keep"``: every token keeps its original position;
``"renumber"``: as ``"auto"``, refused on M-RoPE models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from ..flops import Shape, prefill_flops
from ..recipe import Recipe
from .base import Method, Point, Selection, View, check_budget, check_fraction, top_visual
from .scheduled import Scheduled


def stage_kept(n_visual: int, ratio: float, stage: int) -> int:
    """Visual tokens kept from stage ``stage`` (0-based) on: ``int(N * ratio ** (stage + 1))`` as the
    release computes it from its ratio list, at least 1."""
    fraction = float(f"{ratio ** (stage + 1):.12g}")
    return max(1, int(n_visual * fraction))


def _schedule(n_visual: int, layers: list[int], ratio: float, num_layers: int) -> list[int]:
    counts, n = [], n_visual
    for layer in range(num_layers):
        if layer in layers:
            n = min(n, stage_kept(n_visual, ratio, layers.index(layer)))
        counts.append(n)
    return counts


@dataclass
class PDrop(Scheduled, Method):
    """Options: ``layers`` (the stage layers: the tokens entering each are ranked by its attention),
    ``ratio`` lambda kept per stage, or ``flops`` target, or a fitted ``recipe`` in place of the three;
    ``positions``."""

    layers: tuple[int, ...] | None = None
    ratio: float = 0.5
    flops: float | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"
    recipe: Recipe | dict | str | Path | None = None
    _lambdas: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "pdrop"
    schedule_options: ClassVar[tuple[str, ...]] = ("layers", "ratio", "flops")
    stages: ClassVar[tuple[str, ...]] = ("prefill",)
    paper: ClassVar[str] = "Xing et al., PyramidDrop: Pyramid Visual Redundancy Reduction, CVPR 2025"
    needs: ClassVar[tuple[str, ...]] = ("attention",)
    renumber_at: ClassVar[tuple[str, ...]] = ("prefill",)

    def bind(self, num_layers: int) -> None:
        if self.recipe is not None:
            self.layers = self.recipe_layers(num_layers)
        if self.layers is None:
            self.layers = tuple(sorted({max(1, num_layers * q // 4) for q in (1, 2, 3)}))
        self.layers = tuple(int(x) for x in self.layers)
        if not self.layers or any(not 1 <= x < num_layers for x in self.layers):
            raise ValueError(f"pdrop stage layers must be in 1..{num_layers - 1}, got {self.layers}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"pdrop stage layers must increase, got {self.layers}")

    def validate(self) -> None:
        self.load_recipe()
        check_fraction("ratio", self.ratio)
        check_budget(None, self.flops)

    def positions_mode(self) -> Literal["auto", "keep", "renumber"]:
        return self.positions

    def points(self) -> list[Point]:
        return [Point(before=layer, attention_layer=layer) for layer in self.layers]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        if self.recipe is not None:
            return self.recipe_schedule(num_layers, n_visual)
        counts = _schedule(n_visual, list(self.layers), self.ratio, num_layers)
        return counts, list(counts)

    def _lambda(self, shape: Shape, n_visual: int, n_text: int) -> float:
        full = prefill_flops(shape, [n_visual + n_text] * shape.layers)

        def ratio(lam: float) -> float:
            counts = _schedule(n_visual, list(self.layers), lam, shape.layers)
            return prefill_flops(shape, [c + n_text for c in counts]) / full

        if ratio(1e-9) > self.flops:
            raise ValueError(f"flops={self.flops} is out of reach with stages at {self.layers}: at most {ratio(1e-9):.3f}")
        lo, hi = 1e-9, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ratio(mid) <= self.flops else (lo, mid)
        return lo

    def select(self, view: View) -> Selection:
        stage = self.layers.index(view.point.before)
        probs = view.attention("last").mean(1)[:, 0]  # (B, n): layer `before`'s own attention, last token
        if self.recipe is not None:
            return Selection(keep=top_visual(probs, view.visual, self.recipe_kept(view)))
        if stage == 0:
            self._lambdas = {}
        counts = []
        for b, n_in in enumerate(view.visual_input):
            ratio = self.ratio
            if self.flops is not None:
                if b not in self._lambdas:
                    text = int(view.query_valid("all")[b].sum()) - n_in
                    self._lambdas[b] = self._lambda(view.shape, n_in, text)
                ratio = self._lambdas[b]
            counts.append(stage_kept(n_in, ratio, stage))
        return Selection(keep=top_visual(probs, view.visual, counts))

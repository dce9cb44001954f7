"""What a method is: a name, the stage(s) it acts in, and a selection rule. No tensor surgery.

A method tells the engine *where* it acts (:class:`Point`) and *what it needs* there; the engine calls
:meth:`Method.select` with a :class:`View` of the tokens alive at that point and applies the returned
:class:`Selection` through the ledger. Cache-stage methods implement :meth:`Method.evict` instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch

from ..flops import Shape, solve_kept
from ..vision import VisionSignals
from .option_types import check_option_types
from .scheduled import Scheduled

Queries = Literal["last", "all", "text", "instruction"]


@dataclass(frozen=True)
class Point:
    """A place in the prefill pass where a method selects tokens.

    Attributes:
        before: index of the decoder layer whose input is shrunk; 0 with ``stage="encoder"`` means the
            visual tokens entering the LLM.
        stage: ``"encoder"`` (before the LLM) or ``"prefill"`` (between decoder layers).
        attention_layer: decoder layer whose attention rows the rule reads, or None.
        inside: the tokens leave *inside* layer ``before``, after its attention: they still act as keys
            and values there (and stay in its cache) but skip its o-projection and MLP (FitPrune).
    """

    before: int
    stage: Literal["encoder", "prefill"] = "prefill"
    attention_layer: int | None = None
    inside: bool = False


@dataclass
class Grid:
    """One image's visual tokens as a ``rows x cols`` grid (row-major), for spatial methods.

    ``index`` is ``(rows*cols,)`` long: the column of each grid cell in the view's rows.
    """

    index: torch.Tensor
    rows: int
    cols: int


@dataclass
class View:
    """The tokens alive at a point, as a method sees them.

    Attributes:
        point: where we are.
        hidden: ``(B, n, d)`` hidden states of the alive rows (the projected visual features and text
            embeddings at the encoder stage).
        positions: ``(B, n)`` original positions of the rows.
        valid: ``(B, n)`` bool, False for padding entries of ragged batches.
        visual: ``(B, n)`` bool, valid visual rows (the candidates of visual-token methods).
        grids: per sample, the grids of its images (empty where the layout is not a regular grid).
        visual_input: per sample, the number of visual tokens in the input (before any pruning).
        shape: the decoder's widths, for methods that meet a FLOPs budget.
        keys: ``keys()`` -> ``(B, n, kv_heads * head_dim)`` post-rotary keys at ``point.attention_layer``.
        final_norm: the decoder's final norm module (DART compares normed hidden states).
        vision: vision-tower signals aligned to the rows (methods that need them), else None.
        project: the multimodal projector (vision features -> LLM input), for merges in vision space.
        transitions: ``(B, n)`` token transitions accumulated over ``Method.transition_layers``, or None.
        attention: ``attention(queries, temperature=1.0)`` -> ``(B, H, q, n)`` float32 softmax rows at
            ``point.attention_layer`` for the ``"last"`` token, ``"all"`` valid tokens or the ``"text"``
            tokens after the last image (``"all"``'s rows, the others not real), or only the rows of
            those tokens (``"instruction"``: ``q`` = the most any sample has); ``temperature`` divides
            the logits (1: the layer's attention).
        query_valid: for ``attention``, callable giving ``(B, q)`` bool of which query rows are real.
    """

    point: Point
    hidden: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    visual: torch.Tensor
    grids: list[list[Grid]]
    visual_input: list[int]
    shape: Shape
    keys: Callable[[], torch.Tensor]
    final_norm: Callable[[torch.Tensor], torch.Tensor]
    vision: "AlignedVision | None"
    project: Callable[[torch.Tensor], torch.Tensor] | None
    transitions: torch.Tensor | None
    attention: Callable[..., torch.Tensor]
    query_valid: Callable[[Queries], torch.Tensor]


@dataclass
class AlignedVision:
    """Vision-tower signals of the visual rows of a view (zeros on other rows).

    Attributes:
        cls_attention: ``(B, n)`` [CLS] -> patch attention at the feature layer, mean over heads.
        keys: ``(B, n, head_dim)`` patch keys at the feature layer, mean over heads.
        features: ``(B, n, d_vision)`` patch features before the projector.
        images: per sample, ``(cols, image)`` for each of its crops (an image is one crop, except where
            the model packs it as several, LLaVA-NeXT: its base image, then its high-res crops): ``cols``
            ``(N,)`` the row of each of the crop's patches (row-major), -1 for a patch with no row (one
            the model's packing drops: LLaVA-NeXT's unpadding); ``image`` the crop's index in ``raw``.
            Images of several crops reach only methods that declare ``"crops"`` in ``needs``.
        raw: the per-crop signals as the tap captured them.
    """

    cls_attention: torch.Tensor
    keys: torch.Tensor
    features: torch.Tensor
    images: list[list[tuple[torch.Tensor, int]]]
    raw: "VisionSignals"


@dataclass
class Selection:
    """A method's answer at a point: rows to keep, and optionally new hidden states for them.

    Attributes:
        keep: ``(B, n)`` bool over the view's rows.
        hidden: ``(B, n, d)`` replacement hidden states (merging and pooling methods), or None.
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None


@dataclass
class CacheView:
    """One layer's KV cache as a cache-stage method sees it, after this pass's entries were appended.

    Attributes:
        layer: decoder layer index.
        positions: ``(B, m)`` original positions held.
        valid: ``(B, m)`` bool, False for padding entries.
        real: ``(B, m)`` bool, valid and not a padding token of the input.
        length: tokens processed so far (prompt plus decoded).
        prefill: True in the prefill pass.
        new: entries this pass appended (the last ``new`` columns).
        keys: ``keys()`` -> ``(B, H_kv, m, D)`` the cached keys (post-rotary), as the cache holds them.
        values: ``values()`` -> ``(B, H_kv, m, D)`` the cached values.
        attention: ``attention(window=None)`` -> ``(B, H, q, m)`` float32 softmax attention of this
            pass's last ``window`` query rows (all of them for None) over the entries held, computed
            from the layer's own projections (causal, padding masked); rows of padding queries are 0.
        received: ``received(weights)`` -> ``(B, H, m)`` float32: ``sum_q weights[:, q] * attention()[:, :, q]``
            over this pass's query rows (``weights`` ``(B, new)``), computed a block of queries at a time
            so that the whole attention matrix of a long prefill never exists at once (H2O, A2SF).
        memory: ``(B, m, ...)`` what the method stored at this layer on earlier passes, one row per
            entry (zeros for this pass's entries), or None; the method may replace it, and the engine
            keeps it aligned with the entries through evictions (H2O's accumulated attention).
        heads: ``(B, H_kv, m)`` bool, the entries each KV head still attends to, where an earlier pass
            evicted per head (:meth:`Method.evict` returned a per-head mask), else None (every head
            sees every valid entry); ``attention`` and ``received`` already leave the others out.
        kv_heads: the layer's KV heads.
    """

    layer: int
    positions: torch.Tensor
    valid: torch.Tensor
    real: torch.Tensor
    length: int
    prefill: bool = True
    new: int = 0
    keys: Callable[[], torch.Tensor] | None = None
    values: Callable[[], torch.Tensor] | None = None
    attention: Callable[..., torch.Tensor] | None = None
    received: Callable[[torch.Tensor], torch.Tensor] | None = None
    memory: torch.Tensor | None = None
    heads: torch.Tensor | None = None
    kv_heads: int = 1


@dataclass
class RevivalView:
    """The tokens one layer's attention saw in one pass, for methods that choose again at every pass
    which tokens the next layers compute (LazyLLM); the engine keeps what the choice leaves out.

    Attributes:
        layer: the decoder layer whose attention is read; the choice holds from ``layer + 1`` on.
        positions: ``(B, m)`` original positions of the entries of that layer's KV cache.
        candidate: ``(B, m)`` bool, the real entries this pass's attention at ``layer`` saw (the last
            token included).
        last: ``(B, m)`` bool, the entry of the pass's last token (each sample's query).
        prefill: True in the prefill pass.
        attention: ``attention()`` -> ``(B, H, m)`` float32 softmax row of the last token at ``layer``
            over the candidate entries (0 elsewhere), recomputed from its query and the cached keys.
    """

    layer: int
    positions: torch.Tensor
    candidate: torch.Tensor
    last: torch.Tensor
    prefill: bool
    attention: Callable[[], torch.Tensor]


class Method:
    """Base class of all methods. Subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str]
    stages: ClassVar[tuple[str, ...]]
    paper: ClassVar[str] = ""
    needs: ClassVar[tuple[str, ...]] = ()
    visual: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_option_types(self)
        self.validate()

    def validate(self) -> None:
        """Check the options that need no model, at construction; raise ValueError. A method may also
        resolve defaults here (the effective values are what reports show)."""

    def bind(self, num_layers: int) -> None:
        """Check the options against a model with ``num_layers`` decoder layers; raise ValueError."""

    def check_input(self, visual_tokens: list[int]) -> None:
        """Check a batch (visual tokens per sample) before any layer runs; raise ValueError."""

    def transition_layers(self) -> list[int]:
        """Layers whose sublayer transitions the engine accumulates (methods that need "transitions")."""
        return []

    def points(self) -> list[Point]:
        """The prefill points where :meth:`select` is called (none for cache-only methods)."""
        return []

    def select(self, view: View) -> Selection:
        raise NotImplementedError(f"{self.name} has no prefill selection")

    def evict(self, view: CacheView) -> torch.Tensor | None:
        """``(B, m)`` bool of cache entries to keep at ``view.layer``, ``(B, H_kv, m)`` to keep per KV
        head (the cache holds what some head keeps; each head attends to its own), or None to keep all."""
        return None

    def choose(self, view: RevivalView) -> torch.Tensor:
        """``(B, m)`` bool: the candidate entries of ``view.layer`` that the next layers compute in this
        pass (methods that need ``"aux cache"``); the last token is kept whatever this says."""
        raise NotImplementedError(f"{self.name} does not choose tokens per pass")

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        """Visual tokens entering each layer and leaving its attention, predicted without running the
        model (for ``tokensieve flops``). Default: nothing removed."""
        return [n_visual] * num_layers, [n_visual] * num_layers

    renumber_at: ClassVar[tuple[str, ...]] = ("encoder",)

    def positions_mode(self) -> Literal["keep", "renumber", "auto"]:
        """How rotary positions of tokens kept at the points of the stages in ``renumber_at`` are
        assigned: ``"keep"`` the original ones, ``"renumber"`` contiguously (the sequence simply becomes
        shorter: from the encoder stage on for encoder methods; from each stage layer on, with decoded
        tokens moved down by the tokens removed before each layer, for ``renumber_at=("prefill",)``),
        ``"auto"`` renumber except on M-RoPE models, whose positions encode the image grid."""
        return "keep"

    def cache_positions(self) -> Literal["keep", "shift", "auto"]:
        """Rotary positions in the KV cache (cache-stage methods): ``"keep"`` each token's own,
        ``"shift"`` its index in the cache (the keys are re-rotated after each eviction and a new token
        sits right after the entries held), ``"auto"`` shift except on M-RoPE models."""
        return "keep"

    def report_options(self) -> dict:
        """The options as reports record them (private fields left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}

    @classmethod
    def options(cls) -> dict[str, dataclasses.Field]:
        if not dataclasses.is_dataclass(cls):
            return {}
        return {f.name: f for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def check_fraction(name: str, value: float) -> None:
    """Raise ValueError unless ``0 < value <= 1``."""
    if not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def check_layer(name: str, value: int, num_layers: int, low: int = 0) -> None:
    """Raise ValueError unless ``low <= value < num_layers``."""
    if not isinstance(value, int) or not low <= value < num_layers:
        raise ValueError(f"{name}={value!r} is outside this model: it has {num_layers} decoder layers, use {low}..{num_layers - 1}")


def check_budget(keep: float | None, flops: float | None) -> None:
    """At most one of ``keep`` and ``flops``; each in range."""
    if keep is not None and flops is not None:
        raise ValueError("give keep or flops, not both")
    if keep is not None:
        check_fraction("keep", keep)
    if flops is not None and not (isinstance(flops, (int, float)) and 0 < flops < 1):
        raise ValueError(f"flops must be in (0, 1), got {flops!r}")


def budget_keep(keep: float | None, flops: float | None, default: float = 0.5) -> float | None:
    """Check a ``keep``/``flops`` pair and return the effective ``keep``: ``default`` when neither is given."""
    check_budget(keep, flops)
    return default if keep is None and flops is None else keep


def kept_counts(view: "View", layer: int, keep: float | None, flops: float | None) -> list[int]:
    """Visual tokens each sample keeps from ``layer`` on: ``round(keep * n)`` or the most that meet ``flops``."""
    visual = view.visual.sum(1).tolist()
    if flops is None:
        return [max(1, round((0.5 if keep is None else keep) * n)) for n in visual]
    text = (view.query_valid("all").sum(1) - view.visual.sum(1)).tolist()
    return [solve_kept(view.shape, n, t, layer, flops) if n else 0 for n, t in zip(visual, text)]


def layer_schedule(num_layers: int, n_visual: int, layer: int, keep: float | None) -> tuple[list[int], list[int]]:
    """All visual tokens before ``layer``, ``round(keep * n)`` (keep defaults to 0.5) from it on."""
    kept = max(1, round((0.5 if keep is None else keep) * n_visual))
    n_in = [n_visual] * layer + [kept] * (num_layers - layer)
    return n_in, list(n_in)


class OneLayerPruner(Scheduled, Method):
    """Methods that prune once, before decoder layer ``self.layer`` (>= 1), reading layer ``layer - 1``,
    keeping ``self.keep`` of the visual tokens (or meeting ``self.flops``): FastV, DART. With a fitted
    ``recipe`` they prune before each layer ``l`` it names, reading layer ``l - 1``."""

    def bind(self, num_layers: int) -> None:
        if self.recipe is None:
            check_layer("layer", self.layer, num_layers, low=1)
        else:
            self.recipe_layers(num_layers)

    def points(self) -> list[Point]:
        layers = (self.layer,) if self.recipe is None else self.recipe_layers(self.recipe.num_layers)
        return [Point(before=l, attention_layer=l - 1) for l in layers]

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        if self.recipe is not None:
            return self.recipe_schedule(num_layers, n_visual)
        return layer_schedule(num_layers, n_visual, self.layer, self.keep)


@dataclass
class EncoderPruner(Method):
    """Common options of single-shot encoder-stage methods: ``keep`` fraction of visual tokens (default
    0.5) or ``flops`` target, and ``positions`` ("auto": renumber the shorter prompt, as the published
    LLaVA code does, except on M-RoPE models)."""

    keep: float | None = None
    flops: float | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"

    stages: ClassVar[tuple[str, ...]] = ("encoder",)

    def validate(self) -> None:
        self.keep = budget_keep(self.keep, self.flops)
        if self.positions not in ("auto", "keep", "renumber"):
            raise ValueError(f"positions must be 'auto', 'keep' or 'renumber', got {self.positions!r}")

    def points(self) -> list[Point]:
        return [Point(before=0, stage="encoder")]

    def positions_mode(self) -> Literal["keep", "renumber", "auto"]:
        return self.positions

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        return layer_schedule(num_layers, n_visual, 0, self.keep)


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """``total`` tokens shared over images of ``sizes`` tokens, in proportion (largest remainder)."""
    whole = sum(sizes)
    if not whole:
        return [0] * len(sizes)
    exact = [total * n / whole for n in sizes]
    out = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (out[i] - exact[i], i))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return [min(o, n) for o, n in zip(out, sizes)]


def top_visual(scores: torch.Tensor, visual: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Keep non-visual rows and, per sample, the ``counts[b]`` highest-scoring visual rows.

    Args:
        scores: ``(B, n)`` float, higher is kept first.
        visual: ``(B, n)`` bool candidates.
        counts: visual rows kept per sample.

    Returns:
        ``(B, n)`` bool keep mask.
    """
    mask = ~visual
    for b in range(scores.shape[0]):
        cand = visual[b].nonzero().squeeze(1)
        if cand.numel() == 0:
            continue
        k = min(max(0, counts[b]), cand.numel())
        if k == 0:
            continue
        best = scores[b, cand].topk(k).indices
        mask[b, cand[best]] = True
    return mask

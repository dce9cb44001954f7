"""METok: multi-stage event-based token compression for video LLMs.

Wang et al., "METok: Multi-Stage Event-based Token Compression for Efficient Long Video
Understanding", EMNLP 2025 (arXiv 2506.02850); authors' code mnyuew/METok@b5abde1 (LongVA / LLaVA-NeXT):
stage 1 in ``llava/model/llava_arch.py`` (``segment_shots``, ``process_events``,
``prepare_inputs_labels_for_multimodal``), stages 2 and 3 in
``llava/model/language_model/modeling_qwen2.py`` (``Qwen2Model.forward``).

Stage 1, event-aware compression (encoder stage), per video of ``T`` frames:
    1. frame embedding = mean of the frame's projected tokens; ``s_i = cos(f_i, f_{i+1})``;
    2. event boundaries: the ``events - 1`` smallest ``s_i`` (``torch.topk(largest=False)``); an event
       runs from the frame after one boundary to the next boundary, inclusive;
    3. each frame's similarity to the text; an event scores its frames' maximum; the ``key_events``
       best events are key events;
    4. within an event of several frames, its ``key_frames`` frames most similar to the text are key
       frames; a one-frame event's frame counts as one;
    5. each frame is average-pooled: key frames of key events by ``strides[0]``, the other frames of
       key events and the key frames of other events by ``strides[1]``, the rest by ``strides[2]``.
Stage 2, hierarchical prefill pruning: before each layer ``l`` of ``layers``, the visual tokens are
ranked by the attention that every token after the video pays them in layer ``l - 1`` (mean over those
queries, then over heads), and each event keeps its own top tokens: a key event
``max(1, ceil(ratio * n))`` of its ``n`` alive, none at the last layer; another event
``max(1, ceil(ratio * n / 2))`` at the first layer, none after.
Stage 3, decode-stage KV reduction: after the prefill, the KV caches of layers ``kv_from`` (default the
first of ``layers``) and deeper hold no visual entries (the release re-indexes those caches to the
tokens that survive the last stage-2 layer, where no visual token survives); shallower layers keep them.

``parts`` selects the stages (any of 1, 2, 3; default all three). Without stage 1 the events are
still found (stage 2 needs them) but no frame is pooled.

Budget: the release's is ``ratio`` (and stage 1's fixed strides). ``flops`` (tokensieve's vocabulary,
a named option) instead solves, per sample, the largest ``ratio`` whose prefill meets the target,
counting stage 1's pooling and every stage-2 layer (bisection; the FLOPs do not decrease with
``ratio``): ``ratio=1`` where even that stays below the target, a ``ValueError`` where the smallest
ratio (one token per event at the first layer) is above it. It needs stage 2.

Choices where the release does not carry over (each an option, defaults as stated):

* **Text similarity.** The release scores frames against the prompt with a separate SigLIP dual
  encoder (pooled image and text embeddings). A model without such an encoder has none; here a frame's
  similarity is the cosine between its mean projected token and the mean input embedding of the text
  after the video (the question and the assistant prefix), both in the LLM's input space.
* **Strides.** The release pools SigLIP's 27 x 27 patch grid by 2 (key frames of key events), 4 and 8,
  where the model's own video pooling is 2. Here the frame grid is the model's own (already pooled),
  so ``strides`` are relative to it: (1, 2, 4). Windows are ``avg_pool2d``'s with the last row and
  column of windows partial (``ceil_mode``), so that a small grid is covered whole; each pooled token
  sits at its window's top-left position.
* **Layers.** The release prunes before layers 3, 10 and 19 of LongVA's 28; ``layers`` defaults to
  those fractions of the model's depth, rounded (8 layers: 1, 3, 5).
* **Counts.** ``events=5`` (the release's ``k=4`` boundaries), ``key_events=3``, ``key_frames=6``,
  ``ratio=0.76`` (the release's demo) are the release's fixed counts; with 16 frames every frame of
  an event of up to 6 frames is a key frame. The release appends a learned newline token after each
  event; the stock model has none, so none is added.
* **Positions.** Stage 1 shortens the prompt, which the release then numbers contiguously (``auto``:
  renumbered, original positions on M-RoPE models); stage 2 keeps each token's position, as the
  release gathers the rotary tables by the kept indices.
* **One video per sample.** The release takes one video per prompt. Here all frames of a sample, in
  prompt order, are one video of ``T`` frames: two videos in one prompt are segmented as one longer one.
  At most ``T - 1`` cuts are made (fewer frames than ``events``: one event per frame).
* **Visual tokens on no frame** (an image beside the video) are not scored by stage 2 and all stay;
  stage 3 frees their KV with the video's, as it frees every visual entry.
* **Padding.** Stage 2's score averages only the sample's real queries after the video (padded rows of
  a batch are left out of the mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from ..flops import Shape, prefill_flops
from .base import (
    CacheView,
    Method,
    Point,
    Selection,
    View,
    check_budget,
    check_fraction,
)
from .frames import frame_rows
from .pool import average_bins, stride_bins, top_left

RELEASE_LAYERS = (3, 10, 19)
RELEASE_DEPTH = 28


def event_bounds(frames: torch.Tensor, events: int) -> list[tuple[int, int]]:
    """``(T, d)`` frame embeddings -> the events as inclusive ``(first, last)`` frame ranges, cut after
    the ``events - 1`` lowest adjacent cosine similarities."""
    total = frames.shape[0]
    cuts = min(events - 1, total - 1)
    if cuts < 1:
        return [(0, total - 1)]
    x = torch.nn.functional.normalize(frames.float(), dim=-1)
    adjacent = (x[:-1] * x[1:]).sum(-1)
    bounds = sorted(torch.topk(adjacent, k=cuts, largest=False).indices.tolist())
    out, start = [], 0
    for b in bounds:
        out.append((start, b))
        start = b + 1
    out.append((start, total - 1))
    return out


def frame_strides(bounds: list[tuple[int, int]], text_sim: torch.Tensor, key_events: int, key_frames: int,
                  strides: tuple[int, int, int]) -> tuple[list[int], set[int]]:
    """Each frame's pooling stride and the key events' indices (``text_sim``: ``(T,)``)."""
    score = torch.stack([text_sim[a:b + 1].max() for a, b in bounds])
    key = set(torch.sort(score, descending=True).indices[:key_events].tolist())
    out = [0] * int(text_sim.shape[0])
    for e, (a, b) in enumerate(bounds):
        fine, coarse = (strides[0], strides[1]) if e in key else (strides[1], strides[2])
        if a == b:
            out[a] = fine
            continue
        chosen = set((text_sim[a:b + 1].argsort(descending=True)[:key_frames] + a).tolist())
        for f in range(a, b + 1):
            out[f] = fine if f in chosen else coarse
    return out, key


def stage_keep(length: int, key: bool, stage: int, last: bool, ratio: float) -> int:
    """Tokens an event of ``length`` alive tokens keeps at stage-2 layer number ``stage``."""
    if key:
        count = 0 if last else max(1, math.ceil(ratio * length))
    else:
        count = max(1, math.ceil(ratio * length / 2)) if stage == 0 else 0
    return min(count, length)


def event_schedule(lengths: list[int], key: set[int], before: int, layers: tuple[int, ...], num_layers: int,
                   ratio: float) -> list[int]:
    """Visual tokens entering each decoder layer when events of ``lengths`` tokens (``key``: the key
    events) enter layer ``before`` and stage 2 prunes at ``layers`` with ``ratio``."""
    alive, counts = list(lengths), []
    for layer in range(num_layers):
        if layer in layers and layer >= before:
            stage = layers.index(layer)
            alive = [stage_keep(n, e in key, stage, stage == len(layers) - 1, ratio) for e, n in enumerate(alive)]
        counts.append(sum(alive))
    return counts


def solve_ratio(shape: Shape, lengths: list[int], key: set[int], layers: tuple[int, ...], n_input: int,
                n_text: int, target: float) -> float:
    """The largest stage-2 ratio whose prefill FLOPs, against the unpruned input's ``n_input`` visual and
    ``n_text`` other tokens, stay within ``target`` (1 where every ratio does).

    Raises:
        ValueError: the target is below what the smallest ratio reaches.
    """
    full = prefill_flops(shape, [n_input + n_text] * shape.layers)

    def share(ratio: float) -> float:
        counts = event_schedule(lengths, key, 0, layers, shape.layers, ratio)
        return prefill_flops(shape, [c + n_text for c in counts]) / full

    if share(1.0) <= target:
        return 1.0
    low = 1e-9
    if share(low) > target:
        raise ValueError(f"flops={target} is out of reach for metok with stage 2 at {layers}: at least {share(low):.3f}")
    high = 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if share(mid) <= target else (low, mid)
    return low


@dataclass
class METok(Method):
    """Options: ``parts`` (stages run), ``events``, ``key_events``, ``key_frames``, ``strides`` (stage 1);
    ``layers``, ``ratio`` or ``flops`` (stage 2); ``kv_from`` (stage 3); ``positions``."""

    parts: tuple[int, ...] = (1, 2, 3)
    events: int = 5
    key_events: int = 3
    key_frames: int = 6
    strides: tuple[int, int, int] = (1, 2, 4)
    layers: tuple[int, ...] | None = None
    ratio: float = 0.76
    flops: float | None = None
    kv_from: int | None = None
    positions: Literal["auto", "keep", "renumber"] = "auto"
    _event_of: list[dict[int, int]] = field(default_factory=list, repr=False)
    _key: list[set[int]] = field(default_factory=list, repr=False)
    _visual: list[torch.Tensor] = field(default_factory=list, repr=False)
    _ratios: dict[int, float] = field(default_factory=dict, repr=False)

    name: ClassVar[str] = "metok"
    stages: ClassVar[tuple[str, ...]] = ("encoder", "prefill", "cache")
    paper: ClassVar[str] = "Wang et al., METok: Multi-Stage Event-based Token Compression, EMNLP 2025"
    needs: ClassVar[tuple[str, ...]] = ("frames", "grid", "attention")

    def validate(self) -> None:
        self.parts = tuple(sorted({int(p) for p in self.parts}))
        if not self.parts or any(p not in (1, 2, 3) for p in self.parts):
            raise ValueError(f"parts must be stages among 1, 2, 3, got {self.parts}")
        for name in ("events", "key_events", "key_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        self.strides = tuple(int(s) for s in self.strides)
        if len(self.strides) != 3 or any(s < 1 for s in self.strides):
            raise ValueError(f"strides must be three integers >= 1, got {self.strides}")
        check_fraction("ratio", self.ratio)
        check_budget(None, self.flops)
        if self.flops is not None and 2 not in self.parts:
            raise ValueError("metok meets a flops budget through stage 2's ratio: flops needs 2 in parts")
        if self.positions not in ("auto", "keep", "renumber"):
            raise ValueError(f"positions must be 'auto', 'keep' or 'renumber', got {self.positions!r}")

    def bind(self, num_layers: int) -> None:
        if self.layers is None:
            self.layers = tuple(sorted({max(1, round(l * num_layers / RELEASE_DEPTH)) for l in RELEASE_LAYERS}))
        self.layers = tuple(int(l) for l in self.layers)
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or not all(1 <= l < num_layers for l in self.layers):
            raise ValueError(f"metok layers must increase within 1..{num_layers - 1}, got {self.layers}")
        if self.kv_from is None:
            self.kv_from = self.layers[0]
        if not 0 <= self.kv_from < num_layers:
            raise ValueError(f"kv_from={self.kv_from} is outside this model's {num_layers} layers")

    def positions_mode(self) -> Literal["auto", "keep", "renumber"]:
        return self.positions

    def visual_schedule(self, num_layers: int, n_visual: int) -> tuple[list[int], list[int]]:
        raise ValueError("metok's counts follow the events it finds in the video; measure its FLOPs with "
                         "`tokensieve eval` (the report holds them per sample)")

    def points(self) -> list[Point]:
        stage2 = [Point(before=l, attention_layer=l - 1) for l in self.layers or ()] if 2 in self.parts else []
        return [Point(before=0, stage="encoder"), *stage2]

    def select(self, view: View) -> Selection:
        if view.point.stage == "encoder":
            return self._encode(view)
        return self._prefill(view)

    def _encode(self, view: View) -> Selection:
        """Stage 1: events, key events and frames, pooling; records what stages 2 and 3 read."""
        keep, hidden = torch.ones_like(view.visual), None
        self._event_of, self._key, self._visual = [], [], []
        for b in range(keep.shape[0]):
            self._visual.append(view.positions[b, view.visual[b]].clone())
            index = frame_rows(view, b)
            if index is None:
                self._event_of.append({})
                self._key.append(set())
                continue
            tokens = view.hidden[b, index].float()  # (T, P, d)
            frames = tokens.mean(1)
            bounds = event_bounds(frames, self.events)
            text = self._text_embedding(view, b)
            text_sim = torch.nn.functional.cosine_similarity(frames, text[None], dim=-1)
            strides, key = frame_strides(bounds, text_sim, self.key_events, self.key_frames, self.strides)
            event_of = {}
            for e, (first, last) in enumerate(bounds):
                for f in range(first, last + 1):
                    rows, pooled = self._pool(view, b, view.grids[b][f], strides[f] if 1 in self.parts else 1)
                    if pooled is not None:
                        keep[b, view.grids[b][f].index] = False
                        keep[b, rows] = True
                        hidden = view.hidden.clone() if hidden is None else hidden
                        hidden[b, rows] = pooled
                    for r in rows.tolist():
                        event_of[int(view.positions[b, r])] = e
            self._event_of.append(event_of)
            self._key.append(key)
        return Selection(keep=keep, hidden=hidden)

    @staticmethod
    def _text_embedding(view: View, b: int) -> torch.Tensor:
        """``(d,)`` mean input embedding of sample ``b``'s text after its last visual token."""
        after = view.valid[b] & ~view.visual[b] & (view.positions[b] > view.positions[b, view.visual[b]].max())
        return view.hidden[b, after].float().mean(0)

    @staticmethod
    def _pool(view: View, b: int, grid, stride: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows one frame keeps after average pooling by ``stride`` and their pooled states (None
        when ``stride`` is 1: the frame stays as it is)."""
        if stride == 1:
            return grid.index, None
        feats = view.hidden[b, grid.index].view(grid.rows, grid.cols, -1)
        row_bins, col_bins = stride_bins(grid.rows, stride), stride_bins(grid.cols, stride)
        anchors = torch.tensor(top_left(row_bins, col_bins, grid.cols), device=grid.index.device)
        return grid.index[anchors], average_bins(feats, row_bins, col_bins)

    def _prefill(self, view: View) -> Selection:
        """Stage 2 before layer ``view.point.before``: each event keeps its own top tokens."""
        stage = self.layers.index(view.point.before)
        last = stage == len(self.layers) - 1
        if stage == 0:
            self._ratios = {}
        rows = view.attention("text")  # (B, H, q, n) at layer before - 1
        real = view.query_valid("text")  # (B, q)
        weights = real.float() / real.float().sum(1, keepdim=True).clamp(min=1)
        score = (rows * weights[:, None, :, None]).sum(2).mean(1)  # (B, n)
        keep = ~view.visual
        for b in range(keep.shape[0]):
            cand = view.visual[b].nonzero().squeeze(1)
            if cand.numel() == 0:
                continue
            events = torch.tensor([self._event_of[b].get(int(p), -1) for p in view.positions[b, cand].tolist()],
                                  device=cand.device)
            ratio = self._ratio(view, b, events) if self.flops is not None else self.ratio
            for e in sorted(set(events.tolist())):
                mine = cand[events == e]
                if e < 0:  # a visual token on no frame: left alone
                    keep[b, mine] = True
                    continue
                count = stage_keep(mine.numel(), e in self._key[b], stage, last, ratio)
                if count:
                    keep[b, mine[score[b, mine].topk(count).indices]] = True
        return Selection(keep=keep)

    def _ratio(self, view: View, b: int, events: torch.Tensor) -> float:
        """Sample ``b``'s ratio for ``flops``, solved at the first stage-2 layer from its events' lengths."""
        if b not in self._ratios:
            framed = events[events >= 0]
            lengths = torch.bincount(framed, minlength=int(framed.max()) + 1 if framed.numel() else 0).tolist()
            text = int(view.query_valid("all")[b].sum()) - int(view.visual[b].sum())
            self._ratios[b] = solve_ratio(view.shape, lengths, self._key[b], self.layers, view.visual_input[b],
                                          text + int((events < 0).sum()), self.flops)
        return self._ratios[b]

    def evict(self, view: CacheView) -> torch.Tensor | None:
        """Stage 3: in the prefill, layers from ``kv_from`` on keep no visual entries."""
        if 3 not in self.parts or not view.prefill or view.layer < self.kv_from:
            return None
        visual = torch.zeros_like(view.valid)
        for b, positions in enumerate(self._visual):
            visual[b] = torch.isin(view.positions[b], positions.to(view.positions.device))
        return view.valid & ~visual

"""The engine's vision-tower stage: merging inside the ViT blocks (ToMe), ahead of the encoder stage.

A method that needs ``"tower"`` chooses (an ``r`` schedule per image, and each block's merge map); this
module does the tensor work, in the CLIP encoder layers of a LLaVA-1.5 tower up to the layer whose
output the LLM receives (``adapter.vision_feature_layer()``; later layers do not reach the LLM). Each
of those layers gets a ``forward`` attribute (this instance only) that runs the layer as its two
pre-norm blocks, as facebookresearch/ToMe's ``tome/patch/timm.py`` ``ToMeBlock.forward`` does:

1. attention of the current tokens, with proportional attention (``ToMeAttention.forward``: ``log``
   of each key's size added to the logits) given to the layer's own attention module as an additive
   mask, so the tower stays on SDPA (or eager); the block's keys come from a hook on ``k_proj``;
2. the method's merge map from the keys averaged over heads; merged tokens are the size-weighted
   average of their members, sizes add (``tome/merge.py`` ``merge_wavg``); for every original token
   the stage tracks the merged token it belongs to (``merge_source``, as an index instead of a matrix);
3. the MLP on the reduced set.

Every wrapped layer returns its tokens expanded back to one row per original token (each token gets
its group's row), so the hidden states the model records, and LLaVA's feature selection and projector,
run unchanged and the LLM still finds one feature per image placeholder. The state between layers is
the stage's own (images with different schedules run as separate sub-batches). Each group's
*representative* is its smallest original patch index; at decoder layer 0 the engine hands the
method a :class:`TowerView` whose ``tower`` marks the representative rows, and the method keeps them.

With no merge planned for a pass (``keep=1``, text-only batches, decode steps) the layers run their
original ``forward``: the model is untouched.

Plans: at each prefill from its prompt (the ledger); when ``generate()`` encodes the images before its
first forward (transformers 5.24), from ``generate()``'s own ``input_ids`` and ``attention_mask`` (the
stage wraps this instance's ``generate`` to read them), and the prefill then checks that plan; for a
tower run outside both, one plan per image where the budget does not depend on the prompt.

What the stage asks of a tower method: ``check_tower(n_patches, blocks)`` (refuse a budget out of
reach, at ``prune()``), ``tower_plan(images, text, n_patches, blocks, shape)`` (``r`` per block for
each image), ``match(metric, r)`` (``(I, t)`` index of each token in the merged sequence of
``t - min(r, (t - 1) // 2)`` tokens, or None) and ``prop_attn``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from .methods.base import View
from .shims import replace_method, shim_forward

if TYPE_CHECKING:
    from .adapters import Adapter
    from .flops import Shape
    from .ledger import Ledger


@dataclass
class TowerResult:
    """One prefill's merging in the vision tower, per image in input order (the tower's batch order).

    Attributes:
        representative: ``(I, N)`` long, for each patch the patch index standing for its group (the
            group's smallest patch index, 0-based among the image's patches).
        size: ``(I, N)`` long, the size of each patch's group.
        tokens: per image, tokens ([CLS] included) entering each block up to the feature layer, then
            leaving it.
        schedule: per image, ``r`` per block as planned.
        merged: per sample, each kept visual token's original position -> the original positions of
            the patches it stands for (filled at decoder layer 0).
    """

    representative: torch.Tensor
    size: torch.Tensor
    tokens: list[list[int]]
    schedule: list[list[int]]
    merged: list[dict[int, list[int]]] | None = None


@dataclass
class AlignedTower:
    """A :class:`TowerResult` on the rows of a view.

    Attributes:
        representative: ``(B, n)`` bool, visual rows that stand for their group.
        group: ``(B, n)`` long, for each visual row the view column of its group's representative
            (-1 on other rows).
        raw: the per-image result.
    """

    representative: torch.Tensor
    group: torch.Tensor
    raw: TowerResult


@dataclass
class TowerView(View):
    """A :class:`~tokensieve.methods.base.View` with the tower stage's result (``tower``)."""

    tower: AlignedTower | None = None


@dataclass
class _Part:
    """Images of one tower batch that share a schedule, between two blocks."""

    images: torch.Tensor
    schedule: list[int]
    x: torch.Tensor
    size: torch.Tensor
    owner: torch.Tensor
    tokens: list[int] = field(default_factory=list)


def _encoder_blocks(adapter: "Adapter") -> list[nn.Module]:
    """The vision encoder layers from the first to the feature layer (the one the LLM's features leave)."""
    feature = adapter.vision_feature_layer()
    for module in adapter.model.modules():
        if isinstance(module, nn.ModuleList):
            for i, layer in enumerate(module):
                if layer is feature:
                    return list(module[: i + 1])
    raise TypeError(f"{type(adapter.model).__name__}: the vision feature layer is not in a list of encoder layers")


class TowerStage:
    """Runs a tower method's merges inside the vision encoder layers; see the module docstring."""

    def __init__(self, adapter: "Adapter", method: Any, shape: "Shape") -> None:
        self.adapter = adapter
        self.method = method
        self.blocks = _encoder_blocks(adapter)
        self.patches = adapter.tokens_per_image()
        for layer in self.blocks:
            missing = [p for p in ("layer_norm1", "self_attn", "layer_norm2", "mlp") if not hasattr(layer, p)]
            if missing or not hasattr(layer.self_attn, "k_proj"):
                raise TypeError(f"{method.name} merges inside {type(layer).__name__}, which is not a pre-norm "
                                "CLIP-style encoder layer (supported: LlavaForConditionalGeneration)")
        backend = getattr(self.blocks[0].self_attn.config, "_attn_implementation", "eager") or "eager"
        if getattr(method, "prop_attn", False) and backend not in ("sdpa", "eager"):
            raise TypeError(f"{method.name}: proportional attention needs an additive attention mask, which the "
                            f"vision tower's {backend!r} attention does not take; load it with 'sdpa' or 'eager', "
                            "or pass prop_attn=False")
        method.check_tower(self.patches, len(self.blocks))
        self.shape = shape
        self.result: TowerResult | None = None
        self._plans: list[list[int]] | None = None  # this prefill's, from the prompt (None: none planned)
        self._pending: list[list[int]] | None = None  # from generate()'s inputs, for images it encodes first
        self._unclaimed = False  # the result comes from a tower run before this prefill began
        self._parts: list[_Part] | None = None
        self._last: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        self._run: list[list[int]] | None = None

    # ------------------------------------------------------------------ install / remove
    def install(self) -> Callable[[], None]:
        undo: list[Callable[[], None]] = []
        for idx, layer in enumerate(self.blocks):
            hook = layer.self_attn.k_proj.register_forward_hook(self._grab_keys)
            undo.append(hook.remove)
            undo.append(shim_forward(layer, functools.partial(self._layer, idx)))

        def planning(generate: Callable[..., Any]) -> Callable[..., Any]:
            def planned_generate(*args: Any, **kwargs: Any) -> Any:
                ids = kwargs.get("input_ids", args[0] if args else None)
                self._pending = self._plan_prompt(ids, kwargs.get("attention_mask")) if ids is not None else None
                try:
                    return generate(*args, **kwargs)
                finally:
                    self._pending = None

            return planned_generate

        undo.append(replace_method(self.adapter.model, "generate", planning))

        def remove() -> None:
            while undo:
                undo.pop()()
            self._parts = self._last = self._keys = self._pending = None

        return remove

    def _grab_keys(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._parts is not None:
            self._keys = output

    # ------------------------------------------------------------------ planning
    def _plan(self, images: list[int], text: list[int]) -> list[list[int]]:
        return self.method.tower_plan(images, text, self.patches, len(self.blocks), self.shape)

    def _plan_prompt(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[int]]:
        """Plans from a prompt: its image tokens and real text tokens per sample."""
        visual = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in self.adapter.image_token_ids:
            visual |= input_ids == token
        real = torch.ones_like(visual) if mask is None or mask.dim() != 2 else mask.bool()
        count = visual.sum(1).tolist()
        return self._plan([c // self.patches for c in count], [int(r) - c for r, c in zip(real.sum(1).tolist(), count)])

    def _identity(self, plans: list[list[int]]) -> TowerResult:
        n = len(plans)
        return TowerResult(
            representative=torch.arange(self.patches).expand(n, -1).clone(),
            size=torch.ones(n, self.patches, dtype=torch.long),
            tokens=[[self.patches + 1] * (len(self.blocks) + 1) for _ in range(n)],
            schedule=plans,
        )

    def begin(self, ledger: "Ledger | None") -> None:
        """Plan the merges of this prefill's images from its prompt (None: nothing to merge). Images that
        ``generate()`` encoded before this first forward keep their result when it followed this plan."""
        unclaimed, self._unclaimed = self._unclaimed, False
        self._plans, self._parts, self._last = None, None, None
        if ledger is None:
            self.result = None
            return
        visual = ledger.visual
        images, text = [], []
        for b in range(visual.shape[0]):
            count = int(visual[b].sum().item())
            m = int(ledger.image_index[b].max().item()) + 1 if count else 0
            if count != m * self.patches:
                raise ValueError(f"{self.method.name}: sample {b} has {count} image tokens, not {m} x {self.patches}")
            images.append(m)
            text.append(int(ledger.real[b, : ledger.prompt_length].sum().item()) - count)
        plans = self._plan(images, text)
        self._plans = plans
        if unclaimed and self.result is not None:
            if self.result.schedule != plans:
                raise RuntimeError(f"{self.method.name}: the images were encoded with another plan than this prompt's")
            return
        self.result = None if any(any(p) for p in plans) else self._identity(plans)

    # ------------------------------------------------------------------ the layer shim
    def _layer(self, idx: int, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if idx == 0 and not self._start(hidden):
            return original(hidden, *args, **kwargs)
        if self._parts is None:
            return original(hidden, *args, **kwargs)
        if hidden is not self._last:
            raise RuntimeError(f"{self.method.name}: vision layer {idx} did not receive the previous layer's output")
        mask = args[0] if args else kwargs.pop("attention_mask", None)
        if mask is not None or len(args) > 1:
            raise TypeError(f"{self.method.name}: the vision encoder layers were called with an attention mask")
        layer = self.blocks[idx]
        for part in self._parts:
            self._block(layer, part, part.schedule[idx], kwargs)
        out = hidden.new_empty(hidden.shape[0], self.patches + 1, hidden.shape[-1])
        for part in self._parts:
            out[part.images] = part.x.gather(1, part.owner[..., None].expand(-1, -1, part.x.shape[-1]))
        if idx == len(self.blocks) - 1:
            self._finish(hidden.shape[0])
        else:
            self._last = out
        return out

    def _start(self, hidden: torch.Tensor) -> bool:
        """Set up a tower run; False when it merges nothing (the layers then run as they are).

        The plan is this prefill's (the tower runs inside the model's forward), else the one made from
        ``generate()``'s inputs (it encodes the images before the first forward), else, for budgets that
        do not depend on the prompt (``keep``, ``r``), one per image.
        """
        images, tokens, _ = hidden.shape
        self._parts = self._last = None
        plans, inside = self._plans, self._plans is not None
        if plans is None:
            plans = self._pending
        if plans is None:
            if getattr(self.method, "flops", None) is not None:
                raise ValueError(f"{self.method.name} with flops plans its merges from the prompt; the vision tower ran "
                                 "outside a forward or generate() of the model")
            plans = self._plan([1] * images, [0] * images)
        if images != len(plans) or tokens != self.patches + 1:
            raise ValueError(f"{self.method.name}: the vision tower received {images} image(s) of {tokens - 1} patches; "
                             f"the prompt has {len(plans)} of {self.patches}")
        self._plans = None
        self._unclaimed = not inside
        if not any(any(p) for p in plans):
            self.result = self._identity(plans)
            return False
        self._run = plans
        by_schedule: dict[tuple[int, ...], list[int]] = {}
        for i, plan in enumerate(plans):
            by_schedule.setdefault(tuple(plan), []).append(i)
        self._parts = []
        for plan, members in by_schedule.items():
            index = torch.tensor(members, device=hidden.device)
            x = hidden[index]
            self._parts.append(_Part(
                images=index,
                schedule=list(plan),
                x=x,
                size=x.new_ones(x.shape[0], tokens),
                owner=torch.arange(tokens, device=hidden.device).expand(x.shape[0], -1),
            ))
        self._last = hidden
        return True

    @torch.no_grad()
    def _block(self, layer: nn.Module, part: _Part, r: int, kwargs: dict) -> None:
        """One ``ToMeBlock``: attention (size bias), merge ``r`` tokens, MLP on the reduced set."""
        x, size = part.x, part.size
        images, tokens, width = x.shape
        part.tokens.append(tokens)
        bias = None
        if getattr(self.method, "prop_attn", False) and tokens < self.patches + 1:
            bias = size.log()[:, None, None, :].to(x.dtype)
        self._keys = None
        attn = layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=bias, **kwargs)[0]
        x = x + attn
        dest = None
        if r > 0:
            heads = layer.self_attn.num_heads
            metric = self._keys.view(images, tokens, heads, -1).mean(2)
            dest = self.method.match(metric, r)
        if dest is not None:
            kept = tokens - min(r, (tokens - 1) // 2)
            total = size.new_zeros(images, kept).scatter_add_(1, dest, size)
            index = dest[..., None].expand(-1, -1, width)
            sums = x.new_zeros(images, kept, width).scatter_add_(1, index, x * size[..., None])
            x, size = sums / total[..., None], total
            part.owner = dest.gather(1, part.owner)
        part.x = x + layer.mlp(layer.layer_norm2(x))
        part.size = size
        self._keys = None

    def _finish(self, images: int) -> None:
        n = self.patches
        representative = torch.zeros(images, n, dtype=torch.long)
        sizes = torch.zeros(images, n, dtype=torch.long)
        tokens: list[list[int]] = [[] for _ in range(images)]
        for part in self._parts:
            owner = part.owner[:, 1:]  # [CLS] is protected: its group is itself
            groups = part.x.shape[1]
            patch = torch.arange(n, device=owner.device).expand_as(owner)
            smallest = torch.full((owner.shape[0], groups), n, dtype=torch.long, device=owner.device)
            smallest.scatter_reduce_(1, owner, patch, reduce="amin")
            representative[part.images.cpu()] = smallest.gather(1, owner).cpu()
            sizes[part.images.cpu()] = part.size.round().long().gather(1, owner).cpu()
            for i in part.images.tolist():
                tokens[i] = part.tokens + [groups]
        self.result = TowerResult(representative, sizes, tokens, self._run)
        self._parts = self._last = self._run = None

    # ------------------------------------------------------------------ at decoder layer 0
    def view(self, view: View, ledger: "Ledger") -> TowerView:
        """``view`` with the tower's result placed on the rows of each image's visual tokens."""
        fields = {name: getattr(view, name) for name in view.__dataclass_fields__}
        result = self.result
        if result is None:
            raise ValueError(f"{self.method.name} merges inside the vision tower: pass pixel_values in the prefill forward")
        positions_of = view.positions
        batch, n = positions_of.shape
        representative = torch.zeros(batch, n, dtype=torch.bool, device=positions_of.device)
        group = torch.full((batch, n), -1, dtype=torch.long, device=positions_of.device)
        merged: list[dict[int, list[int]]] = []
        image = 0
        for b in range(batch):
            sample: dict[int, list[int]] = {}
            for j in range(int(ledger.image_index[b].max().item()) + 1):
                positions = (ledger.image_index[b] == j).nonzero().squeeze(1)
                if image >= result.representative.shape[0] or positions.numel() != self.patches:
                    raise ValueError("the vision tower's patches do not line up with the image tokens of this input")
                cols = torch.searchsorted(positions_of[b], positions, right=True) - 1
                rep = result.representative[image].to(cols.device)
                group[b, cols] = cols[rep]
                is_rep = rep == torch.arange(self.patches, device=cols.device)
                representative[b, cols[is_rep]] = True
                pos, rep_pos = positions.tolist(), positions[rep].tolist()
                for p, q in zip(pos, rep_pos):
                    sample.setdefault(q, []).append(p)
                image += 1
            merged.append(dict(sorted(sample.items())))
        result.merged = merged
        self._plans = None  # this prefill's plan is spent; a later tower run plans afresh
        return TowerView(**fields, tower=AlignedTower(representative, group, result))


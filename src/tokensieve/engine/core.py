"""The engine's core: checks at construction, install/remove, passes and the decoder-layer shim."""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from .. import compat
from ..adapters import Adapter, adapter_for
from ..cache import LedgerCache
from ..flops import Shape
from ..ledger import Ledger, Rows
from ..methods.base import Method, Point
from ..paged_cache import PagedCache
from ..report import Report
from ..shims import shim_forward
from ..tower import TowerStage
from ..vision import VisionTap
from .cache_side import CacheSide
from .inside import InsideLayer
from .positions import PositionsAndMasks
from .projections import Projections
from .reporting import Reporting
from .revival import Revival
from .selection import Selecting
from .state import Pass
from .transitions import Transitions


class Engine(Selecting, PositionsAndMasks, InsideLayer, Projections, Transitions, CacheSide, Revival, Reporting):
    """Applies one method to one model; see :func:`~tokensieve.engine.prune`. Each concern lives in its
    own mixin module; this class holds the state they share (``ledger``, ``state``, ``adapter``...)."""

    def __init__(self, model: nn.Module, method: Method) -> None:
        self.model = model
        self.adapter: Adapter = adapter_for(model)
        self.method = method
        self.num_layers = len(self.adapter.layers)
        self.cache_keyword = compat.cache_keyword(type(model).forward)
        self.layer_cache_keyword = compat.cache_keyword(type(self.adapter.layers[0]).forward)
        method.bind(self.num_layers)
        if method.visual and not self.adapter.image_token_ids:
            raise ValueError(
                f"{method.name} prunes visual tokens but {type(model).__name__} is a text-only model; "
                "use a cache-stage method such as streamingllm"
            )
        if "frames" in method.needs and not self.adapter.video:
            raise TypeError(f"{method.name} acts on the frames of a video; {type(model).__name__} takes no video here "
                            "(supported: LlavaNextVideoForConditionalGeneration)")
        if "grid" in method.needs and not self.adapter.regular_grid:
            raise TypeError(f"{method.name} needs each image's visual tokens on a regular grid; "
                            f"{type(model).__name__}'s layout is not one (supported: LLaVA-1.5, Qwen2-VL images)")
        self.points: dict[int, list[Point]] = {}
        for point in method.points():
            self.points.setdefault(point.before, []).append(point)
        self.attention_layers = {p.attention_layer for p in method.points() if p.attention_layer is not None}
        self.last_reader = {}  # attention layer -> the last layer whose points read it
        for point in method.points():
            if point.attention_layer is not None:
                self.last_reader[point.attention_layer] = max(point.before, self.last_reader.get(point.attention_layer, 0))
        mode = method.positions_mode()
        self.renumber = mode == "renumber" or (mode == "auto" and not self.adapter.mrope)
        if self.renumber and self.adapter.mrope:
            raise ValueError("positions='renumber' is not defined for M-RoPE models (Qwen2-VL); use positions='keep'")
        cache_mode = method.cache_positions()
        self.cache_shift = cache_mode == "shift" or (cache_mode == "auto" and not self.adapter.mrope)
        if cache_mode == "shift" and self.adapter.mrope:
            raise ValueError("positions='shift' is not defined for M-RoPE models (Qwen2-VL); use positions='keep'")
        if self.cache_shift and getattr(self.adapter.rotary, "rope_type", "default") in ("dynamic", "longrope"):
            raise ValueError("positions='shift' re-rotates cached keys, which needs rotary angles linear in the "
                             f"position; this model's rope_type {self.adapter.rotary.rope_type!r} is not: use positions='keep'")
        self.positions = "shift" if self.cache_shift else "renumber" if self.renumber else "keep"
        self.shape = Shape.from_config(self.adapter.text_config)
        self.vision_tap = None
        if {"cls attention", "vision keys", "vision attention"} & set(method.needs):
            self.vision_tap = VisionTap.of(self.adapter, method)
        self.tower = TowerStage(self.adapter, method, self.shape) if "tower" in method.needs else None
        self.transition_layers = set(method.transition_layers()) if "transitions" in method.needs else set()
        self.ledger: Ledger | None = None
        self.aux = None  # the Aux Cache of methods that need "aux cache" (LazyLLM), made at each prefill
        self.state: Pass | None = None
        self.selecting = True  # False for a prefill without visual tokens under a visual method: it passes through
        self.report = self._new_report()
        self.history: list[Report] = []
        self._undo: list[Callable[[], None]] = []

    def install(self) -> None:
        """Hook the top-level model and shim every decoder layer of this instance."""
        if getattr(self.model, "_tokensieve_engine", None) is not None:
            raise ValueError("this model is already inside a tokensieve.prune() context; leave it before entering another")
        self.model._tokensieve_engine = self
        self._undo.append(lambda: delattr(self.model, "_tokensieve_engine"))
        pre = self.model.register_forward_pre_hook(self._begin, with_kwargs=True)
        post = self.model.register_forward_hook(self._end, with_kwargs=True)
        self._undo += [pre.remove, post.remove]
        if self.vision_tap is not None:
            self._undo.append(self.vision_tap.install())
        if self.tower is not None:
            self._undo.append(self.tower.install())
        if "aux cache" not in self.method.needs:
            self._undo += self._install_projections()
        for idx in sorted(self.transition_layers):
            layer = self.adapter.layers[idx]
            for block in (layer.self_attn, layer.mlp):
                handle = block.register_forward_hook(self._transition, with_kwargs=True)
                self._undo.append(handle.remove)
        for idx, layer in enumerate(self.adapter.layers):
            self._undo.append(shim_forward(layer, functools.partial(self._layer, idx)))

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.state = None

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        tokens = input_ids if input_ids is not None else embeds
        if tokens is None:
            raise ValueError("the model was called without input_ids or inputs_embeds")
        batch, new = tokens.shape[0], tokens.shape[1]
        cache = compat.pop_cache(kwargs)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.adapter.text_config, "use_cache", True)
        # a method that evicts whole blocks ("paged cache" in its needs, with a block_size) gets a
        # PagedCache: an empty DynamicCache (generate()'s) is turned into one; any other cache is refused
        paged = "paged cache" in self.method.needs
        if cache is not None:
            cache = PagedCache.adopt(cache, self.method.block_size) if paged else LedgerCache.adopt(cache)
        elif use_cache:
            text = self.adapter.text_config
            cache = PagedCache(self.method.block_size, config=text) if paged else LedgerCache(config=text)
        if cache is not None:
            kwargs[self.cache_keyword] = cache
        offset = cache.logical_length if cache is not None else 0
        mask2d = kwargs.get("attention_mask")
        if mask2d is None or mask2d.dim() != 2:
            real = torch.ones(batch, offset + new, dtype=torch.bool, device=tokens.device)
        else:
            real = mask2d.bool()
        prefill = offset == 0 or self.ledger is None
        if prefill:
            self.ledger = self._new_ledger(input_ids, kwargs, real, batch, new, offset, tokens.device)
            if self.tower is not None:
                self.tower.begin(self.ledger if self.selecting else None)
            self.report = self._new_report()
            self.history.append(self.report)
        else:
            if batch != self.ledger.real.shape[0]:
                raise ValueError("the batch size changed between prefill and decoding (beam search is not supported)")
            self.ledger.hidden = Rows.full(batch, offset, new, tokens.device)
            self.ledger.real = real
        self.state = Pass(prefill=prefill, offset=offset, new_tokens=new, cache=cache)
        return args, kwargs

    def _new_ledger(self, input_ids, inputs, real, batch, new, offset, device) -> Ledger:
        if self.method.visual and input_ids is None:
            raise ValueError(f"{self.method.name} needs input_ids to find the visual tokens (got inputs_embeds only)")
        if input_ids is not None and self.adapter.image_token_ids:
            layout = self.adapter.layout(input_ids, inputs)
        else:
            layout = None
        visual = layout.visual if layout is not None else torch.zeros(batch, new, dtype=torch.bool, device=device)
        self.selecting = not self.method.visual or bool(visual.any())
        self.grids = layout.grids if layout is not None else [[] for _ in range(batch)]
        ledger = Ledger(
            hidden=Rows.full(batch, offset, new, device),
            caches=[None] * self.num_layers,
            real=real,
            visual=torch.cat([torch.zeros(batch, offset, dtype=torch.bool, device=device), visual], 1),
            image_index=layout.image_index if layout is not None else torch.full((batch, new), -1, device=device),
            prompt_length=offset + new,
            cache_identity=[True] * self.num_layers,
            transitions=torch.zeros(batch, offset + new, device=device),
            layer_shift=[None] * self.num_layers,
            rope=[None] * self.num_layers,
            memory=[None] * self.num_layers,
            heads=[None] * self.num_layers,
        )
        if offset:
            ledger.caches = [Rows.full(batch, 0, offset, device) for _ in range(self.num_layers)]
            if self.cache_shift:
                ledger.rope = [c.pos.clone() for c in ledger.caches]
        ledger.record_visual("input", ledger.hidden)
        self.method.check_input([len(v) for v in ledger.visual_kept["input"] if v or not self.method.visual])
        return ledger

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state, ledger = self.state, self.ledger
        if state is None or ledger is None:
            return output
        ledger.length = state.offset + state.new_tokens
        if state.cache is not None:
            state.cache.logical_length = ledger.length
        self._write_report(state.prefill, state.cache)
        self.state = None
        return output

    def _layer(self, idx: int, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        state, ledger = self.state, self.ledger
        if state is None or ledger is None:
            return original(hidden, *args, **kwargs)
        found = kwargs.get(self.layer_cache_keyword)
        if found is not state.cache:
            raise compat.unadopted_cache_error(idx, found, self.layer_cache_keyword)
        if "aux cache" in self.method.needs:
            return self._revival_layer(idx, original, hidden, args, kwargs)
        inside = None
        if state.prefill and self.selecting:
            self._forget_before(idx)
            if any(p.attention_layer == idx and not p.inside for p in self.points.get(idx, [])):
                cos, sin = self._layer_kwargs(idx, hidden, kwargs)["position_embeddings"]
                state.saved[idx] = (hidden, cos, sin, ledger.hidden)
            for point in self.points.get(idx, []):
                if point.inside:
                    inside = point
                else:
                    hidden = self._apply_point(point, hidden)
        if state.prefill:
            if ledger.shift is not None:
                ledger.layer_shift[idx] = (ledger.shift_version, ledger.shift[:, -1:])
            ledger.hidden_counts.append(self._real_counts(ledger.hidden))
            ledger.visual_counts.append(ledger.is_visual(ledger.hidden).sum(1))
        kwargs = self._layer_kwargs(idx, hidden, kwargs)
        rows_in = ledger.hidden
        if state.prefill and self.selecting and idx in self.attention_layers:
            cos, sin = kwargs["position_embeddings"]
            state.saved[idx] = (hidden, cos, sin, rows_in)
        if inside is not None:
            out = self._inside(idx, inside, original, hidden, args, kwargs)
        else:
            out = original(hidden, *args, **kwargs)
        if state.cache is not None:
            self._track_cache(idx, state.cache, rows_in, hidden, kwargs)
        return out

    def _real_counts(self, rows: Rows) -> torch.Tensor:
        """``(B,)`` real (not padding, valid) entries per sample; a tensor, so no device sync per layer."""
        real = self.ledger.real.gather(1, rows.pos) & rows.valid
        return real.sum(1)

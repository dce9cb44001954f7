"""The engine: per-instance shims around the decoder layers that apply the ledger.

``prune(model, method, **options)`` is a context manager. On entry it checks the method against the
model (raising before anything is touched), then installs, on this model instance only:

* a forward pre-hook and hook on the top-level model, which open and close a *pass* (one forward
  call: the prefill or one decode step), read the input layout and turn the cache into a
  :class:`~tokensieve.cache.LedgerCache`;
* a ``forward`` attribute on each decoder layer (the shim) that applies the method's selections at
  its points, gathers the layer's keyword arguments (rotary rows, position ids, mask) for the alive
  rows, calls the original layer, and records and evicts that layer's cache entries;
* for a method that merges inside the vision tower (ToMe), a ``forward`` attribute on each vision
  encoder layer up to the feature layer (:mod:`tokensieve.tower`).

Leaving the context removes all of it, also when the body raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import compat
from . import methods as method_registry
from .adapters import Adapter, adapter_for
from .attention import attention_rows, rotate, take_rows
from .cache import LedgerCache
from .flops import Shape, prefill_flops
from .ledger import Ledger, Rows
from .methods.base import CacheView, Grid, Method, Point, Queries, View
from .report import Report, SampleReport
from .shims import shim_forward
from .tower import TowerResult, TowerStage
from .vision import VisionTap
from .vision_align import align_vision


UNPRUNED_NOTE = "no visual tokens: passed through unpruned"


@dataclass
class Pass:
    """State of one forward call of the top-level model."""

    prefill: bool
    offset: int
    new_tokens: int
    cache: LedgerCache | None
    saved: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Rows]] = field(default_factory=dict)
    memo: dict[tuple, Any] = field(default_factory=dict)
    version: int = 0


class Engine:
    """Applies one method to one model; see :func:`prune`."""

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
        if "grid" in method.needs and not self.adapter.regular_grid:
            raise TypeError(f"{method.name} needs each image's visual tokens on a regular grid; "
                            f"{type(model).__name__}'s layout is not one (supported: LLaVA-1.5, Qwen2-VL images)")
        self.points: dict[int, list[Point]] = {}
        for point in method.points():
            self.points.setdefault(point.before, []).append(point)
        self.attention_layers = {p.attention_layer for p in method.points() if p.attention_layer is not None}
        mode = method.positions_mode()
        self.renumber = mode == "renumber" or (mode == "auto" and not self.adapter.mrope)
        if self.renumber and self.adapter.mrope:
            raise ValueError("positions='renumber' is not defined for M-RoPE models (Qwen2-VL); use positions='keep'")
        cache_mode = method.cache_positions()
        self.cache_shift = cache_mode == "shift" or (cache_mode == "auto" and not self.adapter.mrope)
        if cache_mode == "shift" and self.adapter.mrope:
            raise ValueError("positions='shift' is not defined for M-RoPE models (Qwen2-VL); use positions='keep'")
        if self.cache_shift and getattr(self.adapter.rotary, "rope_type", "default") == "dynamic":
            raise ValueError("positions='shift' re-rotates cached keys, which needs rotary angles linear in the "
                             "position; this model's rope_type 'dynamic' is not: use positions='keep'")
        self.positions = "shift" if self.cache_shift else "renumber" if self.renumber else "keep"
        self.shape = Shape.from_config(self.adapter.text_config)
        self.vision_tap = None
        if {"cls attention", "vision keys", "vision attention"} & set(method.needs):
            full = "vision attention" in method.needs
            self.vision_tap = VisionTap(self.adapter.vision_feature_layer(),
                                        self.adapter.vision_embeddings() if full else None, full=full)
        self.tower = TowerStage(self.adapter, method, self.shape) if "tower" in method.needs else None
        self.transition_layers = set(method.transition_layers()) if "transitions" in method.needs else set()
        self.ledger: Ledger | None = None
        self.state: Pass | None = None
        self.selecting = True  # False for a prefill without visual tokens under a visual method: it passes through
        self.report = self._new_report()
        self.history: list[Report] = []
        self._undo: list[Callable[[], None]] = []

    def _new_report(self) -> Report:
        options = {k: v for k, v in dataclasses.asdict(self.method).items() if not k.startswith("_")}
        return Report(self.method.name, options, self.positions)

    # ------------------------------------------------------------------ install / remove
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

    # ------------------------------------------------------------------ passes
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
        if cache is not None:
            cache = LedgerCache.adopt(cache)
        elif use_cache:
            cache = LedgerCache(config=self.adapter.text_config)
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
        self._write_report(state.prefill)
        self.state = None
        return output

    # ------------------------------------------------------------------ the shim
    def _layer(self, idx: int, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        state, ledger = self.state, self.ledger
        if state is None or ledger is None:
            return original(hidden, *args, **kwargs)
        found = kwargs.get(self.layer_cache_keyword)
        if found is not state.cache:
            raise compat.unadopted_cache_error(idx, found, self.layer_cache_keyword)
        inside = None
        if state.prefill and self.selecting:
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
            self._track_cache(idx, state.cache, rows_in, kwargs.get("position_ids"))
        return out

    def _inside(self, idx: int, point: Point, original: Callable, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Run layer ``idx`` with tokens leaving after its attention: every row is a query, key and value
        (and enters the cache), then only the kept rows go through the o-projection, residual and MLP.

        The layer is run as its parts (pre-norm attention block, then pre-norm MLP block), the structure
        shared by the Llama-family decoder layers of every supported model.
        """
        ledger = self.ledger
        rows = ledger.hidden
        keep = self._select(point, hidden, rows).keep & rows.valid
        if bool((keep == rows.valid).all()):
            ledger.record_visual(f"inside:{idx}", rows)
            return original(hidden, *args, **kwargs)
        layer = self.adapter.layers[idx]
        missing = [p for p in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp") if not hasattr(layer, p)]
        if missing or args:
            raise TypeError(f"pruning inside {type(layer).__name__} needs a pre-norm decoder layer called with keywords")
        new_rows, index = rows.select(keep)
        gather = index[..., None].expand(-1, -1, hidden.shape[-1])

        def rows_to_project(module: nn.Module, inputs: tuple) -> tuple:
            x = inputs[0]
            return (x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])),)

        handle = layer.self_attn.o_proj.register_forward_pre_hook(rows_to_project)
        try:
            attn_out = layer.self_attn(hidden_states=layer.input_layernorm(hidden), **kwargs)[0]
        finally:
            handle.remove()
        out = hidden.gather(1, gather) + attn_out
        out = out + layer.mlp(layer.post_attention_layernorm(out))
        ledger.hidden = new_rows
        self.state.version += 1
        ledger.identity = False
        ledger.inside_counts[idx] = self._real_counts(new_rows)
        ledger.record_visual(f"inside:{idx}", new_rows)
        return out

    def _transition(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Accumulate a sublayer's token transition (TransPrune's TTV) on the rows it processed:
        ||out|| / ||in|| times the softmax over the sample's tokens of 1 - cos(in, out), where ``in`` is
        the normed sublayer input and ``out`` its output before the residual add."""
        state, ledger = self.state, self.ledger
        if state is None or not state.prefill or ledger is None or not self.selecting:
            return
        before = args[0] if args else kwargs["hidden_states"]
        after = output[0] if isinstance(output, tuple) else output
        rows = ledger.hidden
        if before.shape[1] != rows.width or after.shape[1] != rows.width:
            return
        with torch.no_grad():
            b, a = before.float(), after.float()
            magnitude = a.norm(dim=-1) / b.norm(dim=-1).clamp(min=1e-6)
            change = 1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)
            real = ledger.real.gather(1, rows.pos) & rows.valid
            direction = torch.softmax(change.masked_fill(~real, float("-inf")), dim=-1).nan_to_num(0.0)
            ledger.transitions.scatter_add_(1, rows.pos, (magnitude * direction * real).to(ledger.transitions.dtype))

    def _real_counts(self, rows: Rows) -> torch.Tensor:
        """``(B,)`` real (not padding, valid) entries per sample; a tensor, so no device sync per layer."""
        real = self.ledger.real.gather(1, rows.pos) & rows.valid
        return real.sum(1)

    def _layer_kwargs(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> dict:
        state, ledger = self.state, self.ledger
        rows = ledger.hidden
        hidden_identity = ledger.identity or not state.prefill
        cache_rows = ledger.caches[idx]
        if hidden_identity and ledger.cache_identity[idx] and ledger.shift is None:
            return kwargs
        kw = dict(kwargs)
        key = ("rows", state.version, None if state.prefill else self._decode_positions_key(idx))
        if key not in state.memo:
            state.memo[key] = self._gather_positions(idx, rows, hidden, kwargs)
        kw["position_embeddings"], kw["position_ids"] = state.memo[key]
        keys = rows if cache_rows is None or not state.cache else cache_rows.cat(rows)
        mkey = ("mask", state.version, idx if keys is not rows else None)
        if mkey not in state.memo:
            state.memo[mkey] = self._mask(rows, keys, kwargs.get("attention_mask"), hidden.dtype)
        kw["attention_mask"] = state.memo[mkey]
        return kw

    def _decode_positions_key(self, idx: int) -> Any:
        """What a decoded token's positions at layer ``idx`` depend on beyond the pass (memo key part)."""
        if self.cache_shift:
            return ("cache", idx)
        entry = self.ledger.layer_shift[idx]
        return None if entry is None else entry[0]

    def _gather_positions(self, idx: int, rows: Rows, hidden: torch.Tensor, kwargs: dict):
        """Rotary tables and position ids of ``rows`` at layer ``idx``: the rows' own positions in
        prefill, less the tokens removed before them where positions are renumbered; while decoding,
        moved down by the tokens removed before layer ``idx`` at prefill, or (shifted cache positions)
        placed right after the entries layer ``idx``'s cache holds."""
        state, ledger = self.state, self.ledger
        cos, sin = kwargs["position_embeddings"]
        pids = kwargs.get("position_ids")
        batch = rows.pos.shape[0]
        if self.cache_shift and not state.prefill:
            held = ledger.caches[idx]
            count = (ledger.real.gather(1, held.pos) & held.valid).sum(1, keepdim=True)
            pids = count + torch.arange(rows.width, device=count.device)
            return self.adapter.rotary(hidden, position_ids=pids), pids
        if state.prefill and not ledger.identity:
            idx = rows.pos - state.offset
            cos, sin = take_rows(cos, idx), take_rows(sin, idx)
            if pids is not None:
                lead = pids.shape[:-2]
                full = pids.expand(*lead, batch, pids.shape[-1])
                pids = full.gather(-1, idx.expand(*lead, -1, -1))
        if ledger.shift is not None:
            if pids is None:
                raise ValueError("positions='renumber' needs position_ids from the model")
            pids = pids.expand(batch, -1)
            if state.prefill:
                shift = ledger.shift.gather(1, rows.pos.clamp(max=ledger.shift.shape[1] - 1))
            else:
                entry = ledger.layer_shift[idx]
                shift = entry[1] if entry is not None else 0
            pids = pids - shift
            cos, sin = self.adapter.rotary(hidden, position_ids=pids)
        return (cos, sin), pids

    def _mask(self, rows: Rows, keys: Rows, like: Any, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, n, m)`` mask of ``rows`` (queries) against ``keys``: causal in original positions,
        padding and ragged entries masked, each row allowed to see itself (no empty softmax rows)."""
        allowed = self._allowed(rows, keys)[:, None]
        floating = isinstance(like, torch.Tensor) and like.is_floating_point()
        if like is None:
            floating = getattr(self.adapter.text_config, "_attn_implementation", "sdpa") == "eager"
        if not floating:
            return allowed
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def _allowed(self, rows: Rows, keys: Rows) -> torch.Tensor:
        qpos, kpos = rows.pos[:, :, None], keys.pos[:, None, :]
        real_k = self.ledger.real.gather(1, keys.pos)[:, None, :]
        return keys.valid[:, None, :] & ((real_k & (kpos <= qpos)) | (kpos == qpos))

    # ------------------------------------------------------------------ prefill points
    def _select(self, point: Point, hidden: torch.Tensor, rows: Rows):
        ledger = self.ledger
        view = View(
            point=point,
            hidden=hidden,
            positions=rows.pos,
            valid=rows.valid,
            visual=ledger.is_visual(rows),
            grids=self._grids(rows),
            visual_input=[len(v) for v in ledger.visual_kept["input"]],
            shape=self.shape,
            keys=lambda: self._keys(point),
            final_norm=self.adapter.language_model.norm,
            vision=(align_vision(self.vision_tap.signals, rows, ledger.image_index, self.method.name)
                    if self.vision_tap is not None else None),
            project=self._projector(),
            transitions=self.ledger.transitions.gather(1, rows.pos) if self.transition_layers else None,
            attention=lambda queries, temperature=1.0: self._attention(point, queries, temperature),
            query_valid=lambda queries: self._queries(rows, queries)[1],
        )
        if self.tower is not None:
            view = self.tower.view(view, self.ledger)
        return self.method.select(view)

    def _apply_point(self, point: Point, hidden: torch.Tensor) -> torch.Tensor:
        ledger = self.ledger
        rows = ledger.hidden
        selection = self._select(point, hidden, rows)
        if selection.hidden is not None:
            hidden = selection.hidden
        keep = selection.keep & rows.valid
        if bool((keep == rows.valid).all()):
            ledger.record_visual(f"{point.stage}:{point.before}", rows)
            return hidden
        new_rows, index = rows.select(keep)
        hidden = hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        if self.renumber and point.stage in self.method.renumber_at:
            removed = torch.ones_like(ledger.real)
            removed.scatter_(1, new_rows.pos, False)
            removed &= ledger.real
            ledger.shift = removed.long().cumsum(1) - removed.long()
            ledger.shift = torch.cat([ledger.shift, removed.long().sum(1, keepdim=True)], 1)
            ledger.shift_version += 1
        ledger.hidden = new_rows
        self.state.version += 1
        ledger.identity = False
        ledger.record_visual(f"{point.stage}:{point.before}", new_rows)
        return hidden

    def _projector(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        try:
            return self.adapter.projector
        except TypeError:
            return None

    def _keys(self, point: Point) -> torch.Tensor:
        hidden, cos, sin, rows = self.state.saved[point.attention_layer]
        layer = self.adapter.layers[point.attention_layer]
        attn = layer.self_attn
        batch, n, _ = hidden.shape
        with torch.no_grad():
            k = attn.k_proj(layer.input_layernorm(hidden)).view(batch, n, -1, attn.head_dim).transpose(1, 2)
            rows_all = torch.arange(n, device=hidden.device).expand(batch, n)
            _, k = rotate(k, k, take_rows(cos, rows_all), take_rows(sin, rows_all), attn)
        return k.transpose(1, 2).reshape(batch, n, -1)

    def _grids(self, rows: Rows) -> list[list[Grid]]:
        out: list[list[Grid]] = []
        for b, grids in enumerate(self.grids):
            sample = []
            for positions, r, c in grids:
                cols = torch.searchsorted(rows.pos[b], positions.to(rows.pos.device), right=True) - 1
                if bool((rows.pos[b, cols.clamp(min=0)] == positions).all()):
                    sample.append(Grid(cols, r, c))
            out.append(sample)
        return out

    def _queries(self, rows: Rows, queries: Queries) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, q)`` row indices of the queries and ``(B, q)`` bool of which are real."""
        ledger = self.ledger
        real = ledger.real.gather(1, rows.pos) & rows.valid
        batch, n = rows.pos.shape
        cols = torch.arange(n, device=rows.pos.device).expand(batch, n)
        if queries == "last":  # each row's last real token, wherever the input was padded
            last = torch.where(real, cols, torch.zeros_like(cols)).max(1, keepdim=True).values
            return last, real.gather(1, last)
        if queries == "all":
            return cols, real
        if queries == "text":
            vis = ledger.is_visual(rows)
            last_vis = torch.where(vis, cols, torch.full_like(cols, -1)).max(1, keepdim=True).values
            return cols, real & (cols > last_vis)
        raise ValueError(f"unknown query set {queries!r}")

    def _attention(self, point: Point, queries: Queries, temperature: float = 1.0) -> torch.Tensor:
        state = self.state
        hidden, cos, sin, rows = state.saved[point.attention_layer]
        if rows is not self.ledger.hidden:
            raise RuntimeError("attention rows were saved for a different token set than the point's")
        qidx, _ = self._queries(rows, queries)
        allowed = self._allowed(rows, rows).gather(1, qidx[..., None].expand(-1, -1, rows.width))
        layer = self.adapter.layers[point.attention_layer]
        with torch.no_grad():
            return attention_rows(layer, hidden, cos, sin, qidx, allowed, temperature)

    # ------------------------------------------------------------------ cache
    def _track_cache(self, idx: int, cache: LedgerCache, rows: Rows, position_ids: torch.Tensor | None) -> None:
        ledger, state = self.ledger, self.state
        held = ledger.caches[idx]
        ledger.caches[idx] = rows if held is None else held.cat(rows)
        if self.cache_shift:
            rope = rows.pos if position_ids is None else position_ids.expand(rows.pos.shape[0], -1)
            ledger.rope[idx] = rope if ledger.rope[idx] is None else torch.cat([ledger.rope[idx], rope], 1)
        if state.prefill:
            ledger.cache_identity[idx] = ledger.cache_identity[idx] and bool(rows.valid.all()) and rows.width == ledger.prompt_length - state.offset
        if cache.stored_length(idx) != ledger.caches[idx].width:
            raise RuntimeError(f"layer {idx}: cache holds {cache.stored_length(idx)} entries, the ledger {ledger.caches[idx].width}")
        if "cache" not in self.method.stages:
            return
        held = ledger.caches[idx]
        real = ledger.real.gather(1, held.pos) & held.valid
        keep = self.method.evict(CacheView(idx, held.pos, held.valid, real, state.offset + state.new_tokens))
        if keep is None or bool((keep == held.valid).all()):
            return
        new_rows, index = held.select(keep)
        cache.gather(idx, index)
        ledger.caches[idx] = new_rows
        ledger.cache_identity[idx] = False
        if self.cache_shift:
            self._shift_cache(idx, cache, new_rows, ledger.rope[idx].gather(1, index))

    def _shift_cache(self, idx: int, cache: LedgerCache, rows: Rows, rope: torch.Tensor) -> None:
        """Re-rotate layer ``idx``'s cached keys so that each real entry sits at its index among the
        sample's real entries (StreamingLLM's positions within the cache); ``rope`` ``(B, m)``: the
        positions they are rotated at now."""
        real = self.ledger.real.gather(1, rows.pos) & rows.valid
        target = torch.where(real, real.long().cumsum(1) - 1, rope)
        delta = target - rope
        self.ledger.rope[idx] = target
        if bool(delta.any()):
            cache.rotate_keys(idx, delta, self.adapter.rotary, self.adapter.layers[idx].self_attn)

    # ------------------------------------------------------------------ report
    def _write_report(self, prefill: bool) -> None:
        ledger, report = self.ledger, self.report
        batch = ledger.real.shape[0]
        cache_counts = [self._real_counts(c).tolist() if c is not None else [0] * batch for c in ledger.caches]
        element = 2 * self.shape.kv_width * self._kv_element_size()
        if prefill:
            prompt_real = ledger.real[:, : ledger.prompt_length].sum(1).tolist()
            hidden = torch.stack(ledger.hidden_counts).tolist() if ledger.hidden_counts else []
            visual_counts = torch.stack(ledger.visual_counts).tolist() if ledger.visual_counts else []
            inside = {l: c.tolist() for l, c in ledger.inside_counts.items()}
            samples = []
            for b in range(batch):
                lengths = [counts[b] for counts in hidden]
                out_lengths = [inside[l][b] if l in inside else n for l, n in enumerate(lengths)]
                visual = [counts[b] for counts in visual_counts]
                caches = [c[b] for c in cache_counts]
                vis_in = len(ledger.visual_kept["input"][b])
                samples.append(
                    SampleReport(
                        hidden_lengths=lengths,
                        attention_out_lengths=out_lengths,
                        cache_lengths_prefill=caches,
                        cache_lengths_end=list(caches),
                        visual_tokens=vis_in,
                        visual_lengths=visual,
                        visual_kept={k: v[b] for k, v in ledger.visual_kept.items()},
                        flops=prefill_flops(self.shape, lengths, out_lengths),
                        flops_unpruned=prefill_flops(self.shape, [prompt_real[b]] * self.num_layers),
                        kv_bytes_prefill=sum(caches) * element,
                        kv_bytes_end=sum(caches) * element,
                        note=UNPRUNED_NOTE if self.method.visual and vis_in == 0 else "",
                    )
                )
            report.samples = samples
        else:
            report.decode_steps += 1
            for b, sample in enumerate(report.samples):
                sample.cache_lengths_end = [c[b] for c in cache_counts]
                sample.kv_bytes_end = sum(sample.cache_lengths_end) * element

    def _kv_element_size(self) -> int:
        param = next(self.adapter.layers[0].parameters())
        return param.element_size()


class Run:
    """Handle returned by :func:`prune`: ``run.report`` is the latest call's report."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def report(self) -> Report:
        return self._engine.report

    @property
    def reports(self) -> list[Report]:
        """Reports of every prefill run inside the context, oldest first."""
        return list(self._engine.history)

    @property
    def method(self) -> Method:
        return self._engine.method

    @property
    def tower(self) -> TowerResult | None:
        """The latest prefill's merging inside the vision tower (methods that merge there, ToMe), else None."""
        return self._engine.tower.result if self._engine.tower is not None else None


@contextlib.contextmanager
def prune(model: nn.Module, method: str | Method, **options: Any) -> Iterator[Run]:
    """Prune ``model``'s tokens with ``method`` inside the ``with`` block.

    Example::

        with tokensieve.prune(model, "fastv", layer=2, keep=0.25) as run:
            out = model.generate(**inputs)
        run.report.to_dict()

    Args:
        model: a supported ``transformers`` model instance (see ``tokensieve.adapters``).
        method: a method name (``tokensieve methods`` lists them) or a :class:`~tokensieve.methods.Method`.
        **options: the method's options when ``method`` is a name.

    Raises:
        ValueError / TypeError: unknown method or option, options out of range, unsupported model;
            raised before the model is touched.
    """
    engine = Engine(model, method_registry.get(method, **options))
    try:
        engine.install()  # a failure part-way leaves nothing installed: remove() undoes what was done
        yield Run(engine)
    finally:
        engine.remove()

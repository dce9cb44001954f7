"""Analytic LLM prefill FLOPs from a model config and a per-layer token schedule.

Convention (FitPrune's and FastV's papers): FLOPs = 2 x multiply-accumulates, and a decoder layer that
processes ``n`` tokens costs

    q and o projections   2 n d^2
    k and v projections   2 n d d_kv          (d_kv = key-value heads x head dim; = d without GQA)
    scores and weighted sum  2 n^2 d
    gated MLP             3 n d m

which is the ``4nd^2 + 2n^2d + 3ndm`` of the papers when ``d_kv = d``. When a layer prunes inside
itself after its attention (FitPrune), q/k/v and the attention use the tokens that entered the layer
and the o projection and MLP use the survivors. Text and visual tokens are all counted unless
``visual_only`` (FitPrune's convention: only the visual tokens, as if the prompt had no text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class Shape:
    """The widths that FLOPs depend on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim

    @classmethod
    def from_config(cls, cfg: Any) -> "Shape":
        """From a transformers text config (object or dict); multimodal configs use their text part."""
        if isinstance(cfg, dict):
            cfg = cfg.get("text_config", cfg)
            get = cfg.get
        else:
            cfg = getattr(cfg, "text_config", cfg)

            def get(key: str, default: Any = None) -> Any:
                return getattr(cfg, key, default)

        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads") if get(k) is None]
        if missing:
            raise ValueError(f"config lacks {', '.join(missing)}: not a decoder config")
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(
            layers=get("num_hidden_layers"),
            hidden=hidden,
            intermediate=get("intermediate_size"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
        )


def builtin_configs() -> list[str]:
    """Names of the public configs shipped with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_shape(name_or_path: str) -> Shape:
    """A built-in config name, a ``config.json`` path or a model directory holding one."""
    path = Path(name_or_path)
    if (CONFIG_DIR / f"{name_or_path}.json").is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    elif path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no config at {name_or_path!r}: give a config.json, a model directory, or one of {', '.join(builtin_configs())}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return Shape.from_config(cfg)


def layer_macs(shape: Shape, n_in, n_out=None):
    """Multiply-accumulates of one decoder layer; ``n_out`` tokens leave after attention (default n_in).

    ``n_in`` / ``n_out`` are ints, or tensors of per-sample counts (the result is then per sample)."""
    n_out = n_in if n_out is None else n_out
    d = shape.hidden
    qkv = n_in * d * (shape.attn_width + 2 * shape.kv_width)
    attention = 2 * n_in * n_in * shape.attn_width
    out = n_out * shape.attn_width * d
    mlp = 3 * n_out * d * shape.intermediate
    return qkv + attention + out + mlp


def prefill_flops(shape: Shape, n_in: list[int], n_out: list[int] | None = None) -> int:
    """FLOPs (2 x MACs) of a prefill where layer ``l`` receives ``n_in[l]`` tokens and ``n_out[l]`` leave
    its attention (``n_out`` defaults to ``n_in``: pruning at layer boundaries)."""
    if len(n_in) != shape.layers:
        raise ValueError(f"schedule has {len(n_in)} layers, the model {shape.layers}")
    n_out = n_in if n_out is None else n_out
    return 2 * sum(layer_macs(shape, a, b) for a, b in zip(n_in, n_out))


def schedule_from_removed(num_layers: int, start: int, removed: dict[int, int], inside: bool) -> tuple[list[int], list[int]]:
    """Per-layer (n_in, n_out) from ``{layer: tokens removed at that layer}``.

    With ``inside`` the tokens leave layer ``l`` after its attention (FitPrune); otherwise they leave at
    the boundary after layer ``l`` (they are counted through layer ``l``).
    """
    bad = [layer for layer in removed if not 0 <= layer < num_layers]
    if bad:
        raise ValueError(f"schedule names layers {bad} outside a {num_layers}-layer model")
    n_in, n_out, n = [], [], start
    for layer in range(num_layers):
        gone = removed.get(layer, 0)
        if gone > n:
            raise ValueError(f"schedule removes {gone} tokens at layer {layer} where only {n} remain")
        n_in.append(n)
        n_out.append(n - gone if inside else n)
        n -= gone
    return n_in, n_out


def solve_kept(shape: Shape, n_visual: int, n_text: int, layer: int, target: float) -> int:
    """Most visual tokens that may stay from decoder layer ``layer`` on (all of them before it) for the
    prefill to cost at most ``target`` of the unpruned FLOPs (all tokens counted).

    Raises:
        ValueError: even one visual token left exceeds the target.
    """
    full = prefill_flops(shape, [n_visual + n_text] * shape.layers)

    def ratio(kept: int) -> float:
        return prefill_flops(shape, [n_visual + n_text] * layer + [kept + n_text] * (shape.layers - layer)) / full

    if ratio(1) > target:
        raise ValueError(f"flops={target} is out of reach when pruning at layer {layer}: keeping one visual token "
                         f"of {n_visual} (with {n_text} text tokens) still costs {ratio(1):.3f}")
    lo, hi = 1, n_visual
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ratio(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo

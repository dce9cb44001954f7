"""The models and inputs the reference tests share: the tiny random LLaVA and the shipped model, both
with eager attention (references read attention weights), and the hidden states decoder layer 0 gets."""

from __future__ import annotations

import torch
from tiny_models import build

_MODELS: dict[str, object] = {}


def tiny_llava() -> torch.nn.Module:
    """The tiny random-weight LLaVA of ``tiny_models`` with eager attention (built once)."""
    if "llava" not in _MODELS:
        _MODELS["llava"] = build("llava", "eager")
    return _MODELS["llava"]


SHARPEN = 10.0
"""Scale of the query and key projections of :func:`sharpened_llama`."""


def sharpened_llama(attn: str) -> torch.nn.Module:
    """The tiny random Llama of ``tiny_models`` (attention backend ``attn``), its query and key
    projections scaled by ``SHARPEN`` (built once per backend). At the random initialisation attention
    rows are nearly uniform, so a score built on attention ranks the tokens by age alone and a wrong
    weighting would go unseen; scaled, rows rank tokens by content (a row's largest weight about 0.25)."""
    key = f"sharpened llama {attn}"
    if key not in _MODELS:
        model = build("llama", attn)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(SHARPEN)
                layer.self_attn.k_proj.weight.mul_(SHARPEN)
        _MODELS[key] = model
    return _MODELS[key]


def _eager(model, processor) -> tuple:
    """``(model, processor)`` with the model's LLM and vision tower switched to eager attention."""
    for cfg in (model.config, model.config.text_config, model.config.vision_config):
        cfg._attn_implementation = "eager"
    return model, processor


def shipped():
    """``(model, processor)``: the shipped tiny LLaVA (8 layers, a 12 x 12 grid of visual tokens),
    switched to eager attention (loaded once)."""
    if "shipped" not in _MODELS:
        from tokensieve.tiny import load_tiny

        _MODELS["shipped"] = _eager(*load_tiny())
    return _MODELS["shipped"]


def shipped_video():
    """``(model, processor)``: the shipped tiny LLaVA-NeXT-Video (8 layers, 16 frames of 6 x 6 visual
    tokens), switched to eager attention (loaded once)."""
    if "shipped video" not in _MODELS:
        from tokensieve import models

        _MODELS["shipped video"] = _eager(*models.load("tiny-video"))
    return _MODELS["shipped video"]


def shipped_video_inputs() -> list[dict]:
    """Test item 0 of every video task as a batch-1 input of the shipped video model."""
    from tokensieve.tasks import VIDEO_QA_TASKS, generate
    from tokensieve.tiny_video import build_inputs

    _, processor = shipped_video()
    return [build_inputs(processor, generate(task, "test", 1)) for task in VIDEO_QA_TASKS]


def shipped_items(n_per_task: int = 1) -> list:
    """The first ``n_per_task`` test items of every task."""
    from tokensieve.tasks import TASKS, generate

    return [e for task in TASKS for e in generate(task, "test", n_per_task)]


def shipped_inputs(n_per_task: int = 1) -> list[dict]:
    """Those items as batch-1 inputs of the shipped model."""
    from tokensieve.tiny import build_inputs

    _, processor = shipped()
    return [build_inputs(processor, [e]) for e in shipped_items(n_per_task)]


def decoder_input(model, inputs) -> torch.Tensor:
    """``(T, d)``: what decoder layer 0 receives in a plain forward of a batch-1 ``inputs`` (the text
    embeddings with the projected image in place: the releases' ``new_input_embeds``)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])

    hook = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["x"][0]


def causal(n: int, dtype: torch.dtype) -> torch.Tensor:
    """``(1, 1, n, n)`` additive causal mask; rows in position order."""
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


def image_span(model, inputs) -> tuple[int, int]:
    """``(start, count)`` of the one contiguous image of a batch-1, unpadded input (what the releases take);
    on a video model without an image in the prompt, the video's span (its frames' tokens, one run)."""
    ids = inputs["input_ids"][0]
    assert inputs["input_ids"].shape[0] == 1 and bool(inputs["attention_mask"].bool().all())
    image = (ids == model.config.image_token_id).nonzero().squeeze(1)
    if image.numel() == 0 and getattr(model.config, "video_token_id", None) is not None:
        image = (ids == model.config.video_token_id).nonzero().squeeze(1)
    assert image.numel() and bool((image.diff() == 1).all()), "the releases handle one contiguous image"
    return int(image[0]), int(image.numel())


def last_logits(model, x: torch.Tensor) -> torch.Tensor:
    """``(vocab,)`` logits of the last row of the final decoder layer's output ``x`` ``(T, d)``."""
    return model.lm_head(model.model.language_model.norm(x[-1]))


def rope(x: torch.Tensor, positions: torch.Tensor, model) -> torch.Tensor:
    """``x`` ``(H, n, D)`` rotated at ``positions`` ``(n,)`` with a Llama causal LM's own frequency table
    (``apply_rotary_pos_emb``'s formula: ``x cos + rotate_half(x) sin``)."""
    cos, sin = model.model.rotary_emb(x, position_ids=positions[None])
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

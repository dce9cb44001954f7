"""Tiny random-weight models of every supported family, and batches for them, for mechanics tests."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from tokensieve import compat

TAKES_MM_TYPES = compat.takes_argument(Qwen2VLForConditionalGeneration.forward, "mm_token_type_ids")
VOCAB = 64
IMAGE = 60
VIDEO = 61
PAD = 0
VIDEO_FRAMES = 3
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD)


def _vision() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)


def build(family: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny model of ``family`` in eval mode, fp32."""
    torch.manual_seed(seed)
    if family == "llava":
        cfg = LlavaConfig(vision_config=_vision(), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg)
    elif family == "llava-next":
        cfg = LlavaNextConfig(vision_config=_vision(), text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                              image_grid_pinpoints=[[32, 32], [32, 64], [64, 32]],
                              vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaNextForConditionalGeneration(cfg)
    elif family == "llava-next-video":
        cfg = LlavaNextVideoConfig(vision_config=_vision(), text_config=LlamaConfig(**TEXT), image_token_index=IMAGE,
                                   video_token_index=VIDEO, image_grid_pinpoints=[[32, 32]], spatial_pool_stride=2,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaNextVideoForConditionalGeneration(cfg)
    elif family in ("qwen2-vl", "qwen2.5-vl"):
        text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3)
        if family == "qwen2-vl":
            cfg = Qwen2VLConfig(text_config=text, vision_config=dict(vision, mlp_ratio=2),
                                image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=62, vision_end_token_id=63)
            model = Qwen2VLForConditionalGeneration(cfg)
        else:
            cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, intermediate_size=64, out_hidden_size=32,
                                   fullatt_block_indexes=[0], window_size=16),
                                   image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=62, vision_end_token_id=63)
            model = Qwen2_5_VLForConditionalGeneration(cfg)
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TEXT))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TEXT))
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn
    for sub in (getattr(model.config, "text_config", None), getattr(model.config, "vision_config", None)):
        if sub is not None:
            sub._attn_implementation = attn
    model.generation_config.pad_token_id = PAD
    return model.eval()


def _left_pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def _text(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 50, (n,), generator=gen).tolist()


def samples(family: str, model: torch.nn.Module, sizes: list[int], seed: int = 0) -> list[dict]:
    """Per-sample parts: ``ids`` (list), ``pixels`` (list of tensors) and per-image ``meta``.

    Sample i has ``sizes[i]`` images (0 = text only) and its own text lengths. LLaVA-NeXT images get
    different sizes (different anyres token counts); Qwen2-VL images get different grids; LLaVA-NeXT-Video
    gets ``sizes[i]`` videos of ``VIDEO_FRAMES`` frames (2x2 pooled tokens each).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, k in enumerate(sizes):
        ids, pixels, meta = [1] + _text(gen, 2 + i), [], []
        for j in range(k):
            if family == "llava":
                ids += [IMAGE] * 16 + _text(gen, 1)
                pixels.append(torch.randn(3, 32, 32, generator=gen))
            elif family == "llava-next":
                h, w = [(32, 32), (32, 64), (64, 32)][(i + j) % 3]
                ids += [IMAGE] * _next_tokens(model, h, w) + _text(gen, 1)
                pixels.append(_next_pixels(model, h, w, gen))
                meta.append([h, w])
            elif family == "llava-next-video":
                ids += [VIDEO] * (VIDEO_FRAMES * 4) + _text(gen, 1)
                pixels.append(torch.randn(VIDEO_FRAMES, 3, 32, 32, generator=gen))
            elif family in ("qwen2-vl", "qwen2.5-vl"):
                t, h, w = [(1, 4, 4), (1, 4, 8), (1, 8, 4)][(i + j) % 3]
                ids += [62] + [IMAGE] * (t * h * w // 4) + [63]
                pixels.append(torch.randn(t * h * w, 3 * 2 * 4 * 4, generator=gen))
                meta.append([t, h, w])
        ids += _text(gen, 3 + 2 * i + (10 if not k else 0))
        out.append({"ids": ids, "pixels": pixels, "meta": meta})
    return out


def collate(family: str, parts: list[dict]) -> dict[str, torch.Tensor]:
    """Left-padded model inputs from :func:`samples` parts."""
    ids, mask = _left_pad([p["ids"] for p in parts])
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    pixels = [x for p in parts for x in p["pixels"]]
    meta = [m for p in parts for m in p["meta"]]
    if pixels and family == "llava":
        out["pixel_values"] = torch.stack(pixels)
    elif pixels and family == "llava-next-video":
        out["pixel_values_videos"] = torch.stack(pixels)
    elif pixels and family == "llava-next":
        width = max(x.shape[0] for x in pixels)
        out["pixel_values"] = torch.stack([torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])]) for x in pixels])
        out["image_sizes"] = torch.tensor(meta)
    elif pixels:
        out["pixel_values"] = torch.cat(pixels)
        out["image_grid_thw"] = torch.tensor(meta)
    if family in ("qwen2-vl", "qwen2.5-vl") and TAKES_MM_TYPES:
        out["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    return out


def batch(family: str, model: torch.nn.Module, sizes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A left-padded batch of :func:`samples`."""
    return collate(family, samples(family, model, sizes, seed))


def _next_tokens(model, h: int, w: int) -> int:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    gh, gw = get_anyres_image_grid_shape((h, w), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    feat = torch.zeros(1, gh * side, gw * side)
    rows, cols = unpad_image(feat, (h, w)).shape[1:]
    return side * side + rows * (cols + 1)


def _next_pixels(model, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    cfg = model.config
    n = image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
    return torch.randn(n, 3, 32, 32, generator=gen)


def layer_input(model: torch.nn.Module, layer: int, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """The hidden states and keyword arguments decoder layer ``layer`` receives in a plain forward."""
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    seen: dict = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["hidden_states"])
        seen.setdefault("kwargs", kwargs)

    hook = lm.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["x"], seen["kwargs"]


def untrained():
    """The shipped model's architecture with fresh random weights, and its prompting: ``(model, Prompting)``."""
    from tokensieve import evaluation
    from tokensieve.tiny.build import build_model, build_processor, build_tokenizer

    torch.manual_seed(0)
    model = build_model(build_tokenizer()).eval()
    processor = build_processor()
    processor.tokenizer.padding_side = "left"
    return model, evaluation.Prompting(processor, tiny=True)


def untrained_text():
    """The shipped text model's tokenizer with a small random Llama (2 layers, width 32), and its
    prompting: ``(model, Prompting)``."""
    from tokensieve import evaluation
    from tokensieve.tiny_text.build import build_config, build_model, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model(build_config(tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64)).eval()
    return model, evaluation.Prompting.for_processor(tokenizer)

"""Build the tiny video VLM (a stock ``LlavaNextVideoForConditionalGeneration``) from the shipped tiny
LLaVA, with no downloads.

Why LLaVA-NeXT-Video: it is the shipped LLaVA plus a parameter-free average pool of each frame's patch
features, so the tower, projector and decoder carry over one to one and the video model starts from
what the image model learned; the frames' tokens follow one another at the ``<video>`` token, which
every prefill method reads as visual tokens, and each frame is a square grid (per-frame methods).
Qwen2-VL's video input would bring M-RoPE and a temporal patch of 2 frames, and a tower of another
family trained from nothing.

The vocabulary is the tiny model's, unchanged in order, then ``<video>`` and the video questions'
new words; their embedding and output rows start as the mean of the old rows plus noise.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from ..tasks.video import FRAMES
from ..tasks.video_questions import video_vocabulary
from ..tiny import TINY_DIR, load_tiny

POOL_STRIDE = 2
"""Average-pool stride over each frame's 12 x 12 patch grid: 6 x 6 = 36 tokens per frame."""
MAX_POSITIONS = 1024
"""Rotary positions: 16 frames x 36 tokens + a prompt of a few turns."""
VIDEO_TOKEN = "<video>"


def tokens_per_frame(image_size: int, patch_size: int, stride: int = POOL_STRIDE) -> int:
    """Visual tokens of one pooled frame: ``((image_size // patch_size) // stride) ** 2``."""
    return ((image_size // patch_size) // stride) ** 2


def build_tokenizer(image_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The image model's word-level vocabulary (same ids), then ``<video>`` and the new video words."""
    old = image_tokenizer.get_vocab()
    words = sorted(old, key=old.get)
    words += [VIDEO_TOKEN] + [w for w in video_vocabulary() if w not in old]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    specials = [t for t in ("<pad>", "<s>", "</s>", "<unk>", "<image>", VIDEO_TOKEN)]
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>", "video_token": VIDEO_TOKEN},
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def build_config(image_config, tokenizer: PreTrainedTokenizerFast) -> LlavaNextVideoConfig:
    """The image model's tower, projector and decoder shapes, its vocabulary grown to ``tokenizer``'s,
    ``MAX_POSITIONS`` rotary positions, and frames pooled by ``POOL_STRIDE``."""
    text = image_config.text_config.to_dict()
    text.update(vocab_size=len(tokenizer), max_position_embeddings=MAX_POSITIONS)
    vision = image_config.vision_config
    per_frame = tokens_per_frame(vision.image_size, vision.patch_size)
    return LlavaNextVideoConfig(
        vision_config=vision.to_dict(), text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        projector_hidden_act=image_config.projector_hidden_act,
        vision_feature_layer=image_config.vision_feature_layer,
        vision_feature_select_strategy=image_config.vision_feature_select_strategy,
        image_grid_pinpoints=[[vision.image_size, vision.image_size]],
        spatial_pool_mode="average", spatial_pool_stride=POOL_STRIDE,
        image_seq_length=(vision.image_size // vision.patch_size) ** 2, video_seq_length=FRAMES * per_frame,
        tie_word_embeddings=False,
    )


def _grown(old: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """``old`` (n, d) followed by ``rows - n`` rows at its row mean plus noise of its row std."""
    extra = rows - old.shape[0]
    noise = torch.randn(extra, old.shape[1], generator=generator) * old.std(0)
    return torch.cat([old, old.mean(0) + noise])


def build_model(seed: int = 0, source: Path | str = TINY_DIR) -> tuple[LlavaNextVideoForConditionalGeneration, PreTrainedTokenizerFast]:
    """The tiny video VLM warm-started from the image model in ``source`` and its tokenizer: every
    weight copied by name, the vocabulary rows grown (:func:`_grown`, seeded by ``seed``)."""
    image_model, processor = load_tiny(torch.float32, source)
    tokenizer = build_tokenizer(processor.tokenizer)
    model = LlavaNextVideoForConditionalGeneration(build_config(image_model.config, tokenizer))
    generator = torch.Generator().manual_seed(seed)
    state = image_model.state_dict()
    rows = len(tokenizer)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        state[name] = _grown(state[name], rows, generator)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "model.image_newline"]:
        raise RuntimeError(f"weights do not map one to one: missing {missing}, unexpected {unexpected}")
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model, tokenizer

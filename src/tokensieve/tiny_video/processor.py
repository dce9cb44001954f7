"""The tiny video VLM's processor: its tokenizer and the tiny model's CLIP image processor, applied
frame by frame.

transformers' own video processors (LLaVA-NeXT-Video's, LLaVA-OneVision's, Qwen2-VL's) import
torchvision, which has no build beside the CPU torch this project pins; this class does what
``LlavaNextVideoProcessor`` does for a video without it: every frame through the image processor into
``pixel_values_videos`` ``(B, F, 3, H, W)``, and each ``<video>`` token of the text expanded to
``F x tokens_per_frame`` tokens, so the model sees exactly the inputs the stock processor would give it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, BatchFeature, PreTrainedTokenizerFast

from ..compat import load_tokenizer

CONFIG_NAME = "video_processor.json"


class FrameVideoProcessor:
    """``(image_processor, tokenizer, tokens_per_frame)``: the image processor the tiny LLaVA ships (CLIP's),
    the word-level tokenizer, the tokens of one pooled frame; call it like a transformers processor."""

    chat_template = None

    def __init__(self, image_processor: Any, tokenizer: PreTrainedTokenizerFast, tokens_per_frame: int,
                 video_token: str = "<video>") -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.tokens_per_frame = tokens_per_frame
        self.video_token = video_token

    def __call__(self, videos: list[np.ndarray], text: list[str], padding: bool = True,
                 return_tensors: str = "pt") -> BatchFeature:
        """``videos``: per sample a ``(F, H, W, 3)`` uint8 array (the same F for all); ``text``: per sample
        one prompt holding one ``<video>``. Returns input_ids / attention_mask ``(B, L)`` (left-padded)
        and pixel_values_videos ``(B, F, 3, H, W)`` float32.

        Raises:
            ValueError: different numbers of videos and texts, frame counts that differ, or a text without
                exactly one ``<video>``.
        """
        if len(videos) != len(text) or not videos:
            raise ValueError(f"need one video per text, got {len(videos)} videos and {len(text)} texts")
        frames = {len(v) for v in videos}
        if len(frames) != 1:
            raise ValueError(f"every video of a batch needs the same number of frames, got {sorted(frames)}")
        expanded = []
        run = " ".join([self.video_token] * (frames.pop() * self.tokens_per_frame))
        for prompt in text:
            if prompt.split().count(self.video_token) != 1:
                raise ValueError(f"a prompt needs exactly one {self.video_token}: {prompt!r}")
            expanded.append(prompt.replace(self.video_token, run))
        encoded = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, add_special_tokens=False)
        pixels = [self.image_processor(images=list(v), return_tensors="pt")["pixel_values"] for v in videos]
        return BatchFeature({**encoded, "pixel_values_videos": torch.stack(pixels)})

    def save_pretrained(self, out: Path | str) -> None:
        """The tokenizer's files, the image processor's ``preprocessor_config.json`` and ``video_processor.json``."""
        out = Path(out)
        self.tokenizer.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        (out / CONFIG_NAME).write_text(json.dumps({"tokens_per_frame": self.tokens_per_frame,
                                                   "video_token": self.video_token}, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, path: Path | str) -> FrameVideoProcessor:
        path = Path(path)
        settings = json.loads((path / CONFIG_NAME).read_text())
        return cls(AutoImageProcessor.from_pretrained(path, local_files_only=True), load_tokenizer(path), **settings)

"""The shipped tiny video VLM: a stock ``LlavaNextVideoForConditionalGeneration`` (the tiny LLaVA's
CLIP tower, projector and Llama decoder; each frame's 12 x 12 patches average-pooled to 6 x 6) trained
by ``tokensieve train-tiny-video`` on the video question tasks (:mod:`tokensieve.tasks.video_questions`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BatchFeature, LlavaNextVideoForConditionalGeneration

from ..compat import load_checkpoint
from ..tasks.video_questions import VideoExample
from .processor import FrameVideoProcessor

TINY_VIDEO_DIR: Path = Path(__file__).resolve().parent / "checkpoint"


def prompt_text(question: str) -> str:
    """``<s> USER: <video> {question} ASSISTANT:``; the answer and ``</s>`` follow."""
    return f"<s> USER: <video> {question} ASSISTANT:"


def load_tiny_video(dtype: torch.dtype = torch.float32, path: Path | str = TINY_VIDEO_DIR):
    """The shipped video model (eval mode) and its :class:`FrameVideoProcessor`, offline."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no tiny video checkpoint at {path} (model.safetensors missing); train one with "
                                "`tokensieve train-tiny-video`")
    return load_checkpoint(LlavaNextVideoForConditionalGeneration, path, dtype), FrameVideoProcessor.from_pretrained(path)


def build_inputs(processor: FrameVideoProcessor, examples: list[VideoExample]) -> BatchFeature:
    """Left-padded inputs: input_ids / attention_mask ``(B, L)`` with ``F x 36`` video tokens per row,
    pixel_values_videos ``(B, F, 3, 96, 96)``."""
    if not examples:
        raise ValueError("build_inputs needs at least one example")
    return processor(videos=[e.frames for e in examples], text=[prompt_text(e.question) for e in examples])


__all__ = ["TINY_VIDEO_DIR", "FrameVideoProcessor", "build_inputs", "load_tiny_video", "prompt_text"]

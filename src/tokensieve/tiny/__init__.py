"""The shipped tiny LLaVA model: loading, batching and answer parsing.

The checkpoint in ``TINY_DIR`` is a stock ``LlavaForConditionalGeneration``
(CLIP ViT + 2-layer MLP projector + Llama decoder) trained by
``tokensieve.tiny.train`` on the tasks of ``tokensieve.tasks``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor, BatchFeature, LlavaForConditionalGeneration

from ..compat import load_checkpoint
from ..tasks import Example
from .build import NUM_IMAGE_TOKENS
from .prompt import prompt_text

TINY_DIR: Path = Path(__file__).resolve().parent / "checkpoint"


def load_tiny(dtype: torch.dtype = torch.float32, path: Path | str = TINY_DIR):
    """Load the shipped model (eval mode) and its LlavaProcessor offline; returns (model, processor)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no tiny checkpoint at {path} (model.safetensors missing); train one with "
                                "`python -m tokensieve.tiny.train`")
    model = load_checkpoint(LlavaForConditionalGeneration, path, dtype)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


def build_inputs(processor, examples: list[Example]) -> BatchFeature:
    """Left-padded model inputs for ``examples``.

    Returns input_ids and attention_mask of shape (B, L), each row holding exactly
    ``NUM_IMAGE_TOKENS`` image tokens, and pixel_values of shape (B, 3, 96, 96).
    """
    if not examples:
        raise ValueError("build_inputs needs at least one example")
    processor.tokenizer.padding_side = "left"
    return processor(
        images=[e.image for e in examples],
        text=[prompt_text(e.question) for e in examples],
        padding=True,
        return_tensors="pt",
    )


def parse_answers(tokenizer, generated_ids: torch.Tensor, prompt_len: int) -> list[str]:
    """Answer words from greedy generations: ids (B, prompt_len + T) -> per row the text before ``</s>``."""
    answers = []
    for row in generated_ids[:, prompt_len:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return answers


__all__ = ["TINY_DIR", "NUM_IMAGE_TOKENS", "load_tiny", "build_inputs", "parse_answers"]

"""Model inputs from text-task examples and answers from generations (the prompt is the example's own)."""

from __future__ import annotations

from transformers import BatchEncoding

from ..tasks.text import TextExample
from ..tiny import parse_answers

MAX_NEW_TOKENS = 5
"""Enough for the longest answer (four ``vartrack`` variables) and its ``</s>``."""


def build_inputs(tokenizer, examples: list[TextExample]) -> BatchEncoding:
    """Left-padded input_ids and attention_mask, (B, L), of the examples' prompts."""
    if not examples:
        raise ValueError("build_inputs needs at least one example")
    tokenizer.padding_side = "left"
    return tokenizer([e.prompt for e in examples], add_special_tokens=False, padding=True, return_tensors="pt")


__all__ = ["MAX_NEW_TOKENS", "build_inputs", "parse_answers"]

"""The prompt format of the tiny model."""

from __future__ import annotations


def prompt_text(question: str) -> str:
    """``<s> USER: <image> {question} ASSISTANT:``; the answer word and ``</s>`` follow."""
    return f"<s> USER: <image> {question} ASSISTANT:"

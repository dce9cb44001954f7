"""The prompt format of the tiny model."""

from __future__ import annotations


def prompt_text(question: str, question_first: bool = False) -> str:
    """``<s> USER: <image> {question} ASSISTANT:``; the answer word and ``</s>`` follow.

    ``question_first`` (a training experiment, not the shipped format) also asks the question
    before the image: ``<s> USER: {question} <image> {question} ASSISTANT:``."""
    if question_first:
        return f"<s> USER: {question} <image> {question} ASSISTANT:"
    return f"<s> USER: <image> {question} ASSISTANT:"

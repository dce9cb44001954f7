"""The shipped tiny long-context text model: loading, batching and answer parsing.

The checkpoint in ``TINY_TEXT_DIR`` is a stock ``LlamaForCausalLM`` with a word-level tokenizer,
trained by ``tokensieve.tiny_text.train`` (``tokensieve train-tiny-text``) on the text tasks of
``tokensieve.tasks.text``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from ..compat import load_tokenizer
from .prompt import MAX_NEW_TOKENS, build_inputs, parse_answers

TINY_TEXT_DIR: Path = Path(__file__).resolve().parent / "checkpoint"


def load_tiny_text(dtype: torch.dtype = torch.float32, path: Path | str = TINY_TEXT_DIR):
    """Load the shipped text model (eval mode) and its tokenizer (left padding) offline; returns (model, tokenizer)."""
    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no tiny text checkpoint at {path} (model.safetensors missing); train one with "
                                "`tokensieve train-tiny-text`")
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.eval(), load_tokenizer(path)


__all__ = ["TINY_TEXT_DIR", "MAX_NEW_TOKENS", "load_tiny_text", "build_inputs", "parse_answers"]

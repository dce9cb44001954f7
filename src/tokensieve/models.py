"""Loading a model by name for the command line: the shipped ``tiny`` model, a local checkpoint
directory or a hub id (the local cache is used; set ``HF_HUB_OFFLINE=1`` to forbid downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .adapters import adapter_for

BUILTIN = ("tiny",)


def load(name: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, processor)`` in eval mode.

    Raises:
        ValueError: unknown name, a directory without a supported model, unreadable weights.
    """
    if name == "tiny":
        from .tiny import load_tiny

        try:
            return load_tiny(dtype)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        except (OSError, SafetensorError) as err:
            raise ValueError(f"cannot load the shipped model ({type(err).__name__}): {str(err).splitlines()[0]}") from None
    path = Path(name)
    if not path.exists() and ("/" not in name or name.startswith((".", "/"))):
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(BUILTIN)}, a checkpoint directory or a hub id")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a transformers checkpoint")
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype)
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"cannot load {name!r} ({type(err).__name__}): {str(err).splitlines()[0]}") from None
    del config
    adapter_for(model)  # raises TypeError naming the supported families
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"
    return model.eval(), processor

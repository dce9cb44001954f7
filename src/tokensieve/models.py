"""Loading a model by name for the command line: the shipped ``tiny`` model, a local checkpoint
directory or a hub id (the local cache is used; set ``HF_HUB_OFFLINE=1`` to forbid downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .adapters import adapter_for

BUILTIN = ("tiny",)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` (the first CUDA device when there is one, else the CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``.

    Raises:
        ValueError: an unknown device, or a CUDA device this machine does not have.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__})")
        if (resolved.index or 0) >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The named dtype, or by default float32 on the CPU and bfloat16 on a GPU."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(name: str, device: str = "cpu", dtype: str | None = None) -> tuple[Any, Any]:
    """``(model, processor)`` in eval mode, on ``device`` (see :func:`resolve_device`) in ``dtype``
    (see :func:`resolve_dtype`).

    Raises:
        ValueError: unknown name, device or dtype, a directory without a supported model, unreadable weights.
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    model, processor = _load(name, torch_dtype)
    return model.to(target), processor


def _load(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
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

"""Loading a model by name for the command line: the shipped ``tiny`` model (LLaVA, image tasks),
``tiny-text`` model (Llama, text tasks) or ``tiny-video`` model (LLaVA-NeXT-Video, video tasks), a
local checkpoint directory or a hub id (the local cache is used; set ``HF_HUB_OFFLINE=1`` to forbid
downloads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from .adapters import adapter_for

BUILTIN = ("tiny", "tiny-text", "tiny-video")
FOLDERS = {"tiny": "tiny", "tiny-text": "tiny_text", "tiny-video": "tiny_video"}
"""The package folder of each shipped model (its checkpoint is ``<folder>/checkpoint``)."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def task_suite(name: str) -> str | None:
    """The task suite the model ``name`` runs ("image", "text" or "video" for the shipped models); None
    for a model not known before it loads."""
    return {"tiny": "image", "tiny-text": "text", "tiny-video": "video"}.get(name)


def decoder_layers(name: str) -> int | None:
    """The number of decoder layers of model ``name``, read from its ``config.json`` before it loads
    (the shipped models, a local checkpoint directory); None where it is not known without loading."""
    import json

    if name in BUILTIN:
        folder = Path(__file__).resolve().parent / FOLDERS[name] / "checkpoint"
    else:
        folder = Path(name).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    layers = config.get("text_config", config).get("num_hidden_layers")
    return layers if isinstance(layers, int) else None


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
    (see :func:`resolve_dtype`); for ``tiny-text`` the processor is its tokenizer, for ``tiny-video``
    its frame processor (:class:`tokensieve.tiny_video.FrameVideoProcessor`).

    Raises:
        ValueError: unknown name, device or dtype, a missing path, a directory without a supported
            model (or a language model without its tokenizer), unreadable weights. A text-only
            language model loads with its tokenizer as the processor and runs the text tasks.
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    model, processor = _load(name, torch_dtype)
    return model.to(target), processor


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (``owner/name``): starts with ``.``, ``/`` or ``~``, or has
    more than one ``/``."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _text_only(config: Any) -> bool:
    """Whether ``config`` is a text-only causal language model (it runs the text tasks)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _cannot_load(name: str, err: Exception) -> ValueError:
    return ValueError(f"cannot load {name!r} ({type(err).__name__}): {str(err).splitlines()[0]}")


def _load(name: str, dtype: torch.dtype) -> tuple[Any, Any]:
    if name in BUILTIN:
        from .tiny import load_tiny
        from .tiny_text import load_tiny_text
        from .tiny_video import load_tiny_video

        loaders = {"tiny": load_tiny, "tiny-text": load_tiny_text, "tiny-video": load_tiny_video}
        try:
            return loaders[name](dtype)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None
        except (OSError, SafetensorError) as err:
            raise ValueError(f"cannot load the shipped model ({type(err).__name__}): {str(err).splitlines()[0]}") from None
    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_path(name):
            raise ValueError(f"model path {name} does not exist")
        if "/" not in name:
            raise ValueError(f"unknown model {name!r}: use one of {', '.join(BUILTIN)}, a checkpoint directory or a hub id")
    elif not path.is_dir():
        raise ValueError(f"model path {name} is a file; give the checkpoint directory")
    elif not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a transformers checkpoint")
    if path.is_dir() and (path / "video_processor.json").is_file():  # a tiny video model (train-tiny-video)
        from .tiny_video import load_tiny_video

        try:
            return load_tiny_video(dtype, path)
        except (OSError, ValueError, SafetensorError) as err:
            raise _cannot_load(name, err) from None
    source = str(path) if path.exists() else name
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    failures = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)
    try:
        config = AutoConfig.from_pretrained(source)
    except failures as err:
        raise _cannot_load(name, err) from None
    text = _text_only(config)
    try:
        if text:  # a language model: it runs the text tasks, prompted through its tokenizer
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            processor = AutoTokenizer.from_pretrained(source)
        else:
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
            processor = AutoProcessor.from_pretrained(source)
    except failures as err:
        raise _cannot_load(name, err) from None
    adapter_for(model)  # raises TypeError naming the supported families
    tokenizer = processor if text else getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return model.eval(), processor

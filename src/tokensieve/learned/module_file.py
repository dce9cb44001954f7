"""One safetensors file per trained pruner: the weights, and in its metadata what kind of module they
are, its config and how it was trained, as JSON, so a file loads without code knowing its shape."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def write(path: str | Path, module: torch.nn.Module, kind: str, config: dict, record: dict | None = None) -> None:
    """``module``'s weights with its ``kind``, ``config`` and ``record`` (e.g. how they were trained) to
    ``path``."""
    meta = {"kind": kind, "config": json.dumps(config), "record": json.dumps(record or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path), metadata=meta)


def read(path: str | Path, kind: str, command: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and weights of a ``kind`` module :func:`write` stored at ``path``.

    Raises:
        ValueError: no such file, or not one of ``kind`` (not written by ``tokensieve command``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no {kind} weights at {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta or meta.get("kind") != kind:
        raise ValueError(f"{path} holds no {kind} config (not written by tokensieve {command})")
    return json.loads(meta["config"]), load_file(str(path))


def record(path: str | Path) -> dict:
    """What :func:`write` recorded with the weights."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("record", "{}"))

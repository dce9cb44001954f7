"""Everything that differs between the ``transformers`` releases tokensieve supports, in one place.

No other module looks at the installed ``transformers`` version or at which spelling of an argument it
uses. What differs, and what the engine asks of this module:

* the cache keyword of the top-level ``forward`` and of every decoder layer: ``past_key_values`` up to
  5.23, ``cache`` from 5.24 on (``past_key_values`` stays a deprecated alias there until 5.40, and
  ``generate()`` passes ``cache=``) — :func:`cache_keyword`, :func:`pop_cache`;
* ``Cache.get_mask_sizes``: the ``cache_position`` tensor in 5.2, the query length from 5.3 on —
  :func:`mask_query_length`;
* Qwen2-VL's rotary tables: 5.2 passes M-RoPE's three sections unmerged, ``(3, B, n, head_dim)``;
  later releases merge them before the decoder layers, ``(B, n, head_dim)`` — :func:`mrope_unmerged`;
* Qwen2-VL's 3-D position ids: ``(3, B, T)`` in 5.2, ``(4, B, T)`` (text positions first) later; and
  ``generate()`` of later releases encodes the images before the first forward and passes no
  ``image_grid_thw`` — :func:`mrope_position_ids`;
* Qwen2-VL's ``mm_token_type_ids`` input, which later releases take and 5.2 does not —
  :func:`takes_argument`;
* ``CLIPVisionModel``: 5.2 nests the transformer under ``vision_model`` (state-dict keys
  ``vision_tower.vision_model.*``), later releases hold it directly (``vision_tower.*``), so a LLaVA
  checkpoint saved by one does not load into the other without renaming — :func:`clip_transformer`,
  :func:`checkpoint_key_mapping`, :func:`load_checkpoint`.

* a decoder layer's output: Qwen2-VL's and Qwen2.5-VL's layers return a tuple, hidden states first,
  in 5.2, the hidden states alone later (every other family: always the hidden states) —
  :func:`layer_output`, :func:`layer_hidden`.

The supported range is the ``transformers`` requirement in ``pyproject.toml`` (read back from the
installed package's metadata, so it is written once); raising its upper bound is described in the
README's version policy.
"""

from __future__ import annotations

import inspect
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors import safe_open
from torch import nn
from packaging.requirements import Requirement
from packaging.version import Version

TRANSFORMERS_VERSION = Version(transformers.__version__)
CACHE_KEYWORDS = ("cache", "past_key_values")


@lru_cache(maxsize=None)
def supported_range() -> str:
    """The ``transformers`` requirement tokensieve was installed with, e.g. ``">=5.2.0,<5.25"``."""
    try:
        requires = metadata.requires("tokensieve") or []
    except metadata.PackageNotFoundError:
        return "the range in tokensieve's pyproject.toml"
    for line in requires:
        req = Requirement(line)
        if req.name == "transformers" and req.marker is None:
            return str(req.specifier)
    return "the range in tokensieve's pyproject.toml"


def takes_argument(function: Callable, name: str) -> bool:
    """Whether ``function`` (a ``forward``, decorators unwrapped) has a parameter ``name``."""
    return name in inspect.signature(function).parameters


def cache_keyword(function: Callable) -> str:
    """The name under which ``function`` (a model's or decoder layer's ``forward``) takes the KV cache."""
    for name in CACHE_KEYWORDS:
        if takes_argument(function, name):
            return name
    raise TypeError(f"{function.__qualname__} takes no KV cache argument ({' or '.join(CACHE_KEYWORDS)}); "
                    f"transformers {TRANSFORMERS_VERSION} is outside what tokensieve supports ({supported_range()})")


def cache_argument(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for passing ``cache`` to ``model.generate()`` / ``model()`` under the name this
    release of transformers uses (``cache`` from 5.2x on, ``past_key_values`` before)."""
    return {cache_keyword(type(model).forward): cache}


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove and return the cache from a call's keyword arguments, under whichever name it came.

    Raises:
        ValueError: two different caches were passed under the two names.
    """
    given = [kwargs.pop(name) for name in CACHE_KEYWORDS if name in kwargs]
    given = [c for c in given if c is not None]
    if len(given) == 2 and given[0] is not given[1]:
        raise ValueError("two different caches were passed (cache= and past_key_values=); pass one")
    return given[0] if given else None


def unadopted_cache_error(layer: int, found: Any, keyword: str) -> RuntimeError:
    """The error for a decoder layer that runs with a cache the engine did not adopt: the engine and the
    installed ``transformers`` disagree on how the cache is passed, so pruning would silently desync."""
    what = "no cache" if found is None else f"a {type(found).__name__} tokensieve did not adopt"
    return RuntimeError(
        f"decoder layer {layer} was called with {what} (looked for {keyword}=). The installed transformers "
        f"{TRANSFORMERS_VERSION} passes the KV cache differently from what tokensieve expects; tokensieve "
        f"supports transformers {supported_range()}. Install a release in that range "
        f"(pip install 'transformers{supported_range()}') or upgrade tokensieve."
    )


@lru_cache(maxsize=None)
def _returns_tuple(layer_class: type) -> bool:
    annotation = inspect.signature(layer_class.forward).return_annotation
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith("tuple")


def layer_output(layer: nn.Module, hidden: torch.Tensor) -> Any:
    """``hidden`` ``(B, n, d)`` as ``layer``'s ``forward`` returns its output: ``(hidden,)`` where that
    returns a tuple (Qwen2-VL on 5.2, read from its return annotation), else ``hidden``."""
    return (hidden,) if _returns_tuple(type(layer)) else hidden


def layer_hidden(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output (a tensor, or a tuple holding them first)."""
    return output[0] if isinstance(output, tuple) else output


def mask_query_length(query: int | torch.Tensor) -> int:
    """The query length given to ``Cache.get_mask_sizes``: the ``cache_position`` tensor (5.2) or an int."""
    return query.shape[0] if isinstance(query, torch.Tensor) else int(query)


def mrope_position_ids(position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """Qwen2-VL's ``(3, B, T)`` temporal/height/width position ids from what a forward call received:
    5.2 passes ``(3, B, T)``, later releases ``(4, B, T)`` with the text positions first; None when the
    call carried no 3-D ids."""
    if position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] not in (3, 4):
        return None
    return position_ids[-3:]


def mrope_unmerged(cos: torch.Tensor) -> bool:
    """Whether a rotary table still has M-RoPE's three sections in front (transformers 5.2):
    ``(3, B, n, head_dim)`` instead of ``(B, n, head_dim)``."""
    return cos.dim() == 4


def clip_transformer(tower: nn.Module) -> nn.Module:
    """The CLIP vision transformer (``embeddings``, ``encoder``) inside a LLaVA ``vision_tower``."""
    return getattr(tower, "vision_model", tower)


@lru_cache(maxsize=None)
def clip_nests_vision_model() -> bool:
    """Whether this release's ``CLIPVisionModel`` keeps its transformer under ``vision_model``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):
        model = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                 num_attention_heads=1, image_size=8, patch_size=8))
    return any(name == "vision_model" for name, _ in model.named_children())


def load_checkpoint(model_class: type, path: Path, dtype: torch.dtype) -> nn.Module:
    """``model_class.from_pretrained(path)`` offline in ``dtype``, eval mode, with the
    :func:`checkpoint_key_mapping` this release needs for ``path / "model.safetensors"``."""
    mapping = checkpoint_key_mapping(model_class, path / "model.safetensors")
    return model_class.from_pretrained(path, dtype=dtype, local_files_only=True, key_mapping=mapping).eval()


LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")
"""What ``from_pretrained`` of 5.x releases records in a tokenizer's ``init_kwargs`` about how it was
loaded, and ``save_pretrained`` would write back into ``tokenizer_config.json``."""


def load_tokenizer(path: Path | str) -> transformers.PreTrainedTokenizerFast:
    """The fast tokenizer saved in ``path``, offline, left-padded; saving it again writes the
    ``tokenizer_config.json`` it came from (no :data:`LOAD_TIME_TOKENIZER_KEYS`)."""
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    for key in LOAD_TIME_TOKENIZER_KEYS:
        tokenizer.init_kwargs.pop(key, None)
    tokenizer.padding_side = "left"
    return tokenizer


def checkpoint_key_mapping(model_class: type, weights: Path) -> dict[str, str] | None:
    """``key_mapping`` for ``model_class.from_pretrained`` that lets a release whose CLIP nests
    ``vision_model`` (5.2) load a LLaVA ``model.safetensors`` saved by a later one (flat CLIP keys);
    None when the layouts agree. Later releases convert nested checkpoints themselves.

    A ``key_mapping`` replaces the class's own ``_checkpoint_conversion_mapping``, so that mapping is
    kept first and the CLIP renaming applied after it.
    """
    if not clip_nests_vision_model():
        return None
    with safe_open(str(weights), framework="pt") as f:
        keys = list(f.keys())
    if not any(re.match(r"^(model\.)?vision_tower\.(?!vision_model\.)", k) for k in keys):
        return None
    own = dict(getattr(model_class, "_checkpoint_conversion_mapping", {}) or {})
    return {**own, r"^model\.vision_tower\.(?!vision_model\.)": "model.vision_tower.vision_model."}

"""The function the exported tokensieve tasks' YAMLs name (``doc_to_visual: !function utils.doc_to_visual``).

``tokensieve export-lmms-tasks`` copies this file next to each task's YAML as ``utils.py``, where
lmms-eval loads it from, so it imports nothing from tokensieve and finds each item's PNG relative to
its own folder: an exported folder can be moved or copied to another machine as it is.
"""

from __future__ import annotations

import os
from typing import Any

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The item's image (its ``image`` column is a path relative to this folder), as RGB."""
    with Image.open(os.path.join(HERE, doc["image"])) as image:
        return [image.convert("RGB")]

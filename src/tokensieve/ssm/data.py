"""Image classification on the project's generator: how many objects an image holds.

The images are those of the ``attribute`` task (:func:`tokensieve.tasks.generate`): 2, 3 or 4
objects (coloured squares, circles, triangles of 14 px) in distinct cells of a 3x3 grid; with the
classifier's 12 px patches about 11 of the 64 patches touch an object. The question is not used. The label is the number of
objects, ``len(example.items)``, which the generator draws uniformly from 2-4. Chosen because it is
decided by the image alone (the other tasks' answers depend on their question) and because it needs
the whole image: every object's patches must reach the class token, so a pruned object patch costs
accuracy, while the ~53 background patches carry nothing: the regime where token pruning pays.
Test items are the ``test`` split's first ``n``, train items come from the ``train`` split.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tasks import generate

TASK = "attribute"
LABELS: tuple[str, ...] = ("2", "3", "4")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
"""CLIP's normalisation, as the tiny LLaVA's processor uses (the generator's background maps to ~0)."""


def to_tensor(images: list) -> torch.Tensor:
    """``(B, 3, H, W)`` float32, normalised, from PIL images."""
    array = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    x = torch.from_numpy(array).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def label(example) -> int:
    """Class index of an example: objects drawn minus 2."""
    return LABELS.index(str(len(example.items)))


def batch(split: str, n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Items ``start .. start + n - 1`` of ``split``: ``(images, labels)``."""
    examples = generate(TASK, split, n, start)
    return to_tensor([e.image for e in examples]), torch.tensor([label(e) for e in examples])

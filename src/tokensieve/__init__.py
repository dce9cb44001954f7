"""tokensieve: training-free token pruning, merging and KV eviction for transformers models.

    with tokensieve.prune(model, "fastv", layer=2, keep=0.25) as run:
        model.generate(**inputs)
    run.report.to_dict()
"""

from . import methods
from .engine import Run, prune

__version__ = "0.1.0"

__all__ = ["prune", "Run", "methods", "__version__"]

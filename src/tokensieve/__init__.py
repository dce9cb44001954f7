"""tokensieve: training-free token pruning for transformers models."""

__version__ = "0.1.0"

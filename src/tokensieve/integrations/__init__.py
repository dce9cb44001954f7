"""Bridges to other tools' evaluation harnesses. Each lives in its own subpackage and imports its tool
only when that subpackage is imported, so ``import tokensieve`` never needs them."""

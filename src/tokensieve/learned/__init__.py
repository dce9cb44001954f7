"""Learned token pruners: small modules that tokensieve trains on its own task suite with the host
model frozen, shipped as safetensors (LVPruning's decision modules)."""

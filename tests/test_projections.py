"""A layer's q/k projections are computed once, for the layer and the attention rows a method reads
(``tokensieve.engine.projections``): the results are those of computing them twice. That they are
computed once is counted in ``test_flop_counter.py``."""

from __future__ import annotations

import pytest
import torch
from tiny_models import batch, build

import tokensieve
from tokensieve.engine.core import Engine

_MODELS: dict[str, torch.nn.Module] = {}

METHODS = [
    ("fastv", {"layer": 2, "keep": 0.4}),  # layer 1's rows, read after it ran
    ("pdrop", {"layers": (1, 2), "ratio": 0.5}),  # the layer's own rows, before it runs on the kept rows
    ("transprune", {"layers": (1, 2), "keep": (0.6, 0.5)}),
    ("fitprune", {}),  # inside the layer: a quarter of the visual tokens leave at layer 1, a quarter at 2
    ("aim", {"merge_keep": 0.5, "start": 1, "stop": 2}),  # merges before the LLM, then prunes by layer l's rows
    ("dart", {"layer": 2, "keep": 0.4}),  # layer 1's keys
]


def model_of(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = build(family)
    return _MODELS[family]


def options(name: str, opts: dict, model: torch.nn.Module, inputs: dict) -> dict:
    if name != "fitprune":
        return opts
    visual = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    layers = model.config.text_config.num_hidden_layers
    return {"recipe": {"removed": {1: visual // 4, 2: visual // 4}, "visual_tokens": visual, "num_layers": layers},
            "fractions": True}


def run(model, inputs, name, opts):
    with torch.no_grad(), tokensieve.prune(model, name, **opts) as handle:
        logits = model(**inputs).logits[:, -1]
        ids = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return logits, ids, [s.visual_kept for s in handle.report.samples]


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("name,opts", METHODS, ids=[m for m, _ in METHODS])
def test_reused_projections_give_the_results_of_recomputed_ones(family, name, opts, monkeypatch):
    """Tolerance: logits within 1e-5 (a projection of a gathered subset of rows may round differently
    from the gathered projection of all rows); kept tokens and greedy tokens equal."""
    model = model_of(family)
    inputs = batch(family, model, [1, 2])
    opts = options(name, opts, model, inputs)
    logits, ids, kept = run(model, inputs, name, opts)
    monkeypatch.setattr(Engine, "_install_projections", lambda self: [])
    ref_logits, ref_ids, ref_kept = run(model, inputs, name, opts)
    assert kept == ref_kept
    assert torch.allclose(logits, ref_logits, atol=1e-5), (logits - ref_logits).abs().max()
    assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("name,opts", [("pdrop", {"layers": (1, 2), "ratio": 1.0}),
                                       ("transprune", {"layers": (1, 2), "keep": (1.0, 1.0)})])
def test_a_handed_back_projection_keeps_everything_exact(name, opts):
    """Nothing removed: each stage layer receives the projections computed for its ranking, and the
    logits are bitwise those of the unpruned model."""
    model = model_of("llava")
    inputs = batch("llava", model, [1, 2])
    with torch.no_grad():
        plain = model(**inputs).logits
        with tokensieve.prune(model, name, **opts):
            pruned = model(**inputs).logits
    assert torch.equal(plain, pruned)


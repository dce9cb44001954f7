"""The FLOPs a pruned forward executes, counted by ``torch.utils.flop_counter.FlopCounterMode``, agree
with the analytic count in its report: pruning saves the compute it claims, not only in the ledger.

What each side counts, per decoder layer, on one batch-1 prompt (no padding):

* **Analytic** (``tokensieve.flops.layer_macs`` x 2, summed into ``SampleReport.flops``): 2 x the
  multiply-accumulates of the q, k, v projections and of ``QK^T`` and ``AV`` for the ``n_in`` tokens
  entering the layer, over the full ``n_in x n_in`` square (no causal halving), and of the o projection
  and the gated MLP (gate, up, down) for the ``n_out`` tokens leaving its attention (``n_out < n_in``
  only where FitPrune prunes inside the layer). Norms, rotary, softmax, activations, residual adds,
  embeddings, the vision tower, the projector and the LM head are not counted.
* **Measured**: ``FlopCounterMode`` counts only matmul-family ops (``mm``, ``addmm``, ``bmm``, ...,
  the fused GPU SDPA kernels) as 2 x M x N x K, i.e. also 2 x MACs, and nothing elementwise. Its
  count is taken inside each decoder layer's ``self_attn`` and ``mlp`` modules (the model's own compute:
  exactly the projections, the two attention products and the MLP). The fused CPU SDPA kernel
  (``_scaled_dot_product_flash_attention_for_cpu``) has no FLOP formula in torch (it counts 0), so
  the counted runs keep ``attn_implementation="sdpa"`` but select SDPA's math backend, which computes
  ``QK^T`` and ``AV`` as two ``bmm`` over the whole square (the mask is added, not skipped) with K/V
  expanded to every query head: ``heads x n x n x head_dim`` = ``n^2 x attn_width`` each, like the
  analytic count (GQA included: the model has 4 query and 2 key-value heads).

So the two sides count the same things and agree to the FLOP here (the tests allow 2%).

**Ranking overhead**, the method's selection work beyond the model's own: measured as a layer's whole
count (from its forward pre-hook to its forward hook, which encloses the engine's shim) less the
analytic count. The engine computes a layer's q/k projections once for the layer and for the attention
rows a method reads (``tokensieve.engine.projections``), so what is left is: for FastV (layer K-1's
rows, read after that layer ran) only the ``heads x q x n x head_dim`` scores; for FitPrune (inside the
layer, all rows ranked) only the ``q x n`` scores as well; for PDrop (layer l's own last-token row,
before l runs on the kept rows) the scores, the one query's projection and the keys of the rows it
drops (the kept rows' keys are handed to the layer); for DivPrune the cosine-distance Gram matrix of
the N projected visual tokens (``2 N^2 d``). It is asserted to match those formulas and to stay under
15% of the layer FLOPs.

The expected per-layer schedules are written by hand from each method's options, independently of the
report, so a run that stops removing rows (or a report that claims more than was run) fails.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from tiny_models import IMAGE, PAD, VOCAB
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tokensieve
from tokensieve.engine import reporting as engine_reporting
from tokensieve.flops import Shape, layer_macs, prefill_flops
from tokensieve.methods.base import Selection
from tokensieve.methods.fastv import FastV

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 4, 128, 344, 4, 2
HEAD_DIM = HIDDEN // HEADS
VISUAL = 64  # a 64 x 64 image in 8 x 8 patches
BEFORE, AFTER = 4, 6  # text tokens before (BOS included) and after the image
TEXT = BEFORE + AFTER
TOLERANCE = 0.02


def scores(queries: int, n: int) -> int:
    """FLOPs of the ``queries x n`` attention scores of every head (``tokensieve.attention.attention_rows``)."""
    return 2 * queries * n * HEADS * HEAD_DIM


def query_projection(rows: int) -> int:
    return 2 * rows * HIDDEN * HEADS * HEAD_DIM


def key_projection(rows: int) -> int:
    return 2 * rows * HIDDEN * KV_HEADS * HEAD_DIM


# method, options, hand-written visual tokens entering / leaving the attention of each layer, and the
# ranking overhead expected at each layer (every other layer: none)
CASES: dict[str, tuple[str, dict[str, Any], list[int], list[int], dict[int, int]]] = {
    # K = 2, keep 16 of 64, ranked by the last token's attention row at layer 1 (74 rows)
    "fastv": ("fastv", {"layer": 2, "keep": 0.25}, [64, 64, 16, 16], [64, 64, 16, 16], {2: scores(1, 74)}),
    # FitPrune inside-layer: 16 leave after layer 0's attention, 24 after layer 2's, ranked by all rows
    "fitprune": ("fitprune", {"recipe": {"removed": {0: 16, 2: 24}, "visual_tokens": VISUAL, "num_layers": LAYERS}},
                 [64, 48, 48, 24], [48, 48, 24, 24], {0: scores(74, 74), 2: scores(58, 58)}),
    # before the LLM, keep the 16 most diverse (renumbered positions)
    "divprune": ("divprune", {"keep": 0.25}, [16] * 4, [16] * 4, {0: 2 * VISUAL * VISUAL * HIDDEN}),
    # stages at layers 1, 2, 3 (the default for 4 layers), half kept at each: 74 -> 42 -> 26 -> 18 rows
    "pdrop": ("pdrop", {}, [64, 32, 16, 8], [64, 32, 16, 8],
              {1: query_projection(1) + key_projection(32) + scores(1, 74),
               2: query_projection(1) + key_projection(16) + scores(1, 42),
               3: query_projection(1) + key_projection(8) + scores(1, 26)}),
}

_STATE: dict[str, Any] = {}


def llava() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A random LLaVA wide enough that projections dominate (d 128, MLP 344, GQA 4/2 heads), and one prompt."""
    if "model" not in _STATE:
        torch.manual_seed(0)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=64, patch_size=8, projection_dim=32)
        text = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                           num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=512, pad_token_id=PAD)
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                          vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg).eval()
        for sub in (model.config, model.config.text_config, model.config.vision_config):
            sub._attn_implementation = "sdpa"
        gen = torch.Generator().manual_seed(0)
        ids = [1] + torch.randint(3, 50, (BEFORE - 1,), generator=gen).tolist() + [IMAGE] * VISUAL \
            + torch.randint(3, 50, (AFTER,), generator=gen).tolist()
        inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                  "pixel_values": torch.randn(1, 3, 64, 64, generator=gen)}
        _STATE["model"], _STATE["inputs"] = model, inputs
    return _STATE["model"], _STATE["inputs"]


def count(model: torch.nn.Module, forward: Callable[[], Any]) -> tuple[list[int], list[int]]:
    """Run ``forward`` under one ``FlopCounterMode`` (SDPA math backend) and split its count per decoder
    layer: (FLOPs inside each layer's ``self_attn`` and ``mlp``, FLOPs elsewhere in the layer's forward).
    The sum of the two is the layer's whole count."""
    counter = FlopCounterMode(display=False)
    layers = model.model.language_model.layers
    window, blocks = [0] * len(layers), [0] * len(layers)
    open_at: dict[tuple[int, int], int] = {}
    handles = []

    def hooks(module: torch.nn.Module, into: list[int], i: int) -> None:
        def pre(*_: Any) -> None:
            open_at[id(module), i] = counter.get_total_flops()

        def post(*_: Any) -> None:
            into[i] += counter.get_total_flops() - open_at.pop((id(module), i))

        handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    for i, layer in enumerate(layers):
        hooks(layer, window, i)
        hooks(layer.self_attn, blocks, i)
        hooks(layer.mlp, blocks, i)
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            forward()
    finally:
        for handle in handles:
            handle.remove()
    assert not open_at, "a counted module's forward did not finish"
    return blocks, [w - b for w, b in zip(window, blocks)]


def unpruned_layer_flops() -> list[int]:
    if "unpruned" not in _STATE:
        model, inputs = llava()
        _STATE["unpruned"], overhead = count(model, lambda: model(**inputs))
        assert overhead == [0] * LAYERS
    return _STATE["unpruned"]


def check(case: str) -> dict[str, Any]:
    """Run ``case`` pruned under the counter and assert every claim; returns the numbers."""
    name, options, visual_in, visual_out, expected_overhead = CASES[case]
    model, inputs = llava()
    shape = Shape.from_config(model.config)
    with tokensieve.prune(model, name, **options) as run:
        blocks, rest = count(model, lambda: model(**inputs))
    sample = run.report.samples[0]
    unpruned = unpruned_layer_flops()
    ranking = [expected_overhead.get(l, 0) for l in range(LAYERS)]
    executed = [a + b - r for a, b, r in zip(blocks, rest, ranking)]  # the model's own compute

    # executed matmul FLOPs = the report's analytic count, layer by layer, pruned and unpruned
    for layer, (a, b, got) in enumerate(zip(sample.hidden_lengths, sample.attention_out_lengths, executed)):
        assert got == pytest.approx(2 * layer_macs(shape, a, b), rel=TOLERANCE), f"layer {layer}: executed {got}"
    assert sum(executed) == pytest.approx(sample.flops, rel=TOLERANCE), \
        f"executed {sum(executed)}, the report claims {sample.flops}"
    assert sum(unpruned) == pytest.approx(sample.flops_unpruned, rel=TOLERANCE), \
        f"executed unpruned {sum(unpruned)}, the report claims {sample.flops_unpruned}"
    # fewer FLOPs executed, in the ratio the report claims and the options promise
    ratio = sum(executed) / sum(unpruned)
    promised = prefill_flops(shape, [TEXT + v for v in visual_in], [TEXT + v for v in visual_out]) \
        / prefill_flops(shape, [TEXT + VISUAL] * LAYERS)
    assert ratio == pytest.approx(run.report.flops_ratio, rel=TOLERANCE), \
        f"executed ratio {ratio:.4f}, the report claims {run.report.flops_ratio:.4f}"
    assert ratio == pytest.approx(promised, rel=TOLERANCE), f"executed ratio {ratio:.4f}, the options promise {promised:.4f}"
    assert ratio < 1
    # the report's schedule is the one the options promise (text tokens are never dropped)
    assert sample.hidden_lengths == [TEXT + v for v in visual_in]
    assert sample.attention_out_lengths == [TEXT + v for v in visual_out]
    # the method's own ranking work is small next to the model's (that it is exactly the expected
    # formula per layer is asserted above: executed = whole count - ranking = the analytic count)
    assert sum(ranking) < 0.15 * sum(executed)
    return {"executed": executed, "analytic": sample.flops, "unpruned": sum(unpruned), "ratio": ratio,
            "claimed": run.report.flops_ratio, "overhead": ranking}


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_forward_executes_the_flops_its_report_claims(case):
    check(case)


def test_unpruned_forward_executes_the_analytic_count():
    model, _ = llava()
    shape = Shape.from_config(model.config)
    n = TEXT + VISUAL
    expected = 2 * layer_macs(shape, n)
    # q, k, v, o, MLP and the two attention products of 74 tokens: 29,628,416 FLOPs a layer
    assert expected == 2 * (n * HIDDEN * (HIDDEN + 2 * KV_HEADS * HEAD_DIM) + 2 * n * n * HIDDEN + n * HIDDEN * HIDDEN
                            + 3 * n * HIDDEN * INTERMEDIATE) == 29_628_416
    assert unpruned_layer_flops() == [pytest.approx(expected, rel=TOLERANCE)] * LAYERS
    # projections dominate, as in real models: the attention products are under 10% of a layer
    assert 2 * 2 * n * n * HIDDEN < 0.1 * expected


def test_the_check_fails_when_the_engine_keeps_every_row(monkeypatch):
    """If FastV's selection kept everything, the counter would see the unpruned compute: the check fails."""
    monkeypatch.setattr(FastV, "select", lambda self, view: Selection(keep=view.valid.clone()))
    with pytest.raises(AssertionError, match=r"executed ratio (1\.0000|0\.99\d\d), the options promise 0\.66"):
        check("fastv")


def test_the_check_fails_when_the_report_claims_compute_that_was_not_run(monkeypatch):
    """A report that forgot FitPrune's survivors skip the o projection and MLP disagrees with the counter."""
    monkeypatch.setattr(engine_reporting, "prefill_flops", lambda shape, n_in, n_out=None: prefill_flops(shape, n_in))
    with pytest.raises(AssertionError, match="executed .*, the report claims"):
        check("fitprune")

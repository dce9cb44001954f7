"""VFlowOpt and FitPrune against references written in this file from the authors' code.

FitPrune: ywh187/FitPrune at d28e418, ``LLaVA_1.5/llava/model/language_model/modeling_llama.py``
(``LlamaAttention.forward``, the "fitprune" block: head-max attention, text->visual x visual->visual
product, the ``delete_scheme[layer_idx]`` lowest deleted after the layer's attention;
``LlamaDecoderLayer.forward`` drops their residual rows; ``LlamaModel.forward`` keeps the survivors'
``position_ids``). The reference is the release's inference given a recipe (its ``delete_scheme``),
an explicit loop over the decoder layers run from their parts.

VFlowOpt: sihany077/VFlowOpt at 129eeef. The importance map: ``src/LLaVA-OneVision/llava/model/
multimodal_encoder/siglip_encoder.py`` (``SigLipEncoderLayer.forward``, ``perform_self_selection``:
head-mean attention, received attention = mean over query rows, global tokens above ``t`` times its
mean, map = their mean attention row, plus ``alpha_v * softmax(entropy)``); recycling:
``src/LLaVA-OneVision/llava/model/language_model/llava_qwen_training_free.py``
(``prepare_inputs_labels_for_multimodal``, the "token merging" block of the multi-patch branch, applied
here to the one base grid a LLaVA-1.5 image has); the LLM stages:
``src/transformers-4.46.0/src/transformers/models/qwen2/modeling_qwen2.py`` (``Qwen2Model.
forward_illava``, the ``use_cache`` branch: every stage's mask computed at the first stage layer from
the ViT map of the tokens left, ``round(L * (1 - r))`` removed of the ``L`` entering each stage; the
survivors keep their ``position_ids``). Fixed hyperparameters, no search. The release runs SigLIP
(no [CLS]); on LLaVA-1.5's CLIP tower the map is computed on the whole ``(1 + N)`` attention, [CLS]
included, and read at the patches (tokensieve's adaptation, ``methods/vflowopt.py``).

Nothing here calls tokensieve's own helpers: only ``tokensieve.prune`` is run and its report read.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_models import (
    causal,
    decoder_input,
    image_span,
    last_logits,
    shipped,
    shipped_inputs,
    tiny_llava,
)
from tiny_models import collate, samples

import tokensieve
from tokensieve.recipe import Recipe

ROWS_ATOL = 1e-5
LOGITS_ATOL = 1e-4


def tiny_inputs(index: int) -> dict:
    return collate("llava", [samples("llava", tiny_llava(), [1, 1, 1])[index]])


# ---------------------------------------------------------------------------------------------- common parts
def _lm(model):
    return model.model.language_model


def _attend(model, layer, x: torch.Tensor, pos: torch.Tensor):
    """Layer ``layer``'s attention sublayer on rows ``x`` at positions ``pos``: its output (``(n, d)``,
    after ``o_proj``) and softmax weights ``(H, n, n)``."""
    out, weights = layer.self_attn(hidden_states=layer.input_layernorm(x[None]),
                                   position_embeddings=_lm(model).rotary_emb(x[None], pos[None]),
                                   attention_mask=causal(x.shape[0], x.dtype))
    return out[0], weights[0].float()


def _finish(layer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Residual, post-attention norm, MLP, residual."""
    h = x + attn_out
    return h + layer.mlp(layer.post_attention_layernorm(h[None]))[0]


# ---------------------------------------------------------------------------------------------- FitPrune
def fit_order(cross: torch.Tensor, self_: torch.Tensor) -> list[int]:
    """The order in which the fitting rule (``statistical_analysis.py``, ``fit_model``) removes tokens as
    its two prefixes grow together: at prefix length m, the intersection of the m lowest by cross and the
    m lowest by self (``combined.unique(return_counts=True)``, ``counts > 1``); tokens entering at the
    same m in increasing product. Not a release rule at inference: tokensieve's ``score="fit"``."""
    sorted_cross, sorted_self = torch.argsort(cross), torch.argsort(self_)
    product = cross * self_
    order: list[int] = []
    for m in range(1, cross.numel() + 1):
        combined = torch.cat([sorted_cross[:m], sorted_self[:m]])
        values, counts = combined.unique(return_counts=True)
        new = [j for j in values[counts > 1].tolist() if j not in order]
        order += sorted(new, key=lambda j: float(product[j]))
    return order


def fitprune_reference(model, inputs, delete_scheme: dict[int, int], score: str = "product"):
    """FitPrune inference with ``delete_scheme`` (layer -> tokens deleted there). At a layer with a
    non-zero entry, on that layer's softmax attention ``attn_weights`` (prefill):
    ``attn_weights_headmax = max over heads``; ``attn_self_attention = headmax[img, img] / left`` summed
    over the image rows; ``attn_cross_attention = headmax[after the image, img]`` summed over those
    rows; the ``delete_scheme[layer]`` lowest of their product (``torch.sort(...).indices``) leave: every
    row attended (they stay keys and values of this layer), their attention output rows and residual
    rows are dropped before the MLP; ``left_vtoken_num`` shrinks; ``position_ids = position_ids[:,
    topk_idx]``. ``score="fit"`` orders by :func:`fit_order` instead (tokensieve's option).
    Returns the kept image positions after each pruning layer and the last-token logits."""
    start, n_image = image_span(model, inputs)
    left = n_image
    kept = {}
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = torch.arange(x.shape[0])
        for idx, layer in enumerate(_lm(model).layers):
            attn_out, attn_weights = _attend(model, layer, x, pos)
            if delete_scheme.get(idx, 0) and left > 0:
                headmax = attn_weights.max(dim=0).values
                self_attention = (headmax[start:start + left, start:start + left] / left).sum(dim=0)
                cross_attention = headmax[start + left:, start:start + left].sum(dim=0)
                if score == "product":
                    order = torch.sort(cross_attention * self_attention, dim=-1).indices
                else:
                    order = torch.tensor(fit_order(cross_attention, self_attention))
                topk = order[:delete_scheme[idx]]
                topk_idx = torch.ones(x.shape[0], dtype=torch.bool)
                topk_idx[topk + start] = False
                attn_out, x, pos = attn_out[topk_idx], x[topk_idx], pos[topk_idx]
                left -= int((~topk_idx).sum())
                kept[f"inside:{idx}"] = pos[start:start + left].tolist()
            x = _finish(layer, x, attn_out)
        return kept, last_logits(model, x)


def _fitprune(model, inputs, recipe: Recipe, score: str):
    with torch.no_grad(), tokensieve.prune(model, "fitprune", recipe=recipe, score=score) as run:
        logits = model(**inputs).logits[0, -1]
    sample = run.report.samples[0]
    return {k: v for k, v in sample.visual_kept.items() if k.startswith("inside:")}, logits


@pytest.mark.parametrize("score", ["product", "fit"])
@pytest.mark.parametrize("scheme,index", [({0: 2, 1: 5, 3: 3}, 0), ({1: 4, 2: 4}, 1), ({0: 6, 2: 1, 3: 6}, 2)])
def test_fitprune_matches_the_release_on_a_tiny_llava(scheme, index, score):
    model = tiny_llava()
    inputs = tiny_inputs(index)
    expected, ref_logits = fitprune_reference(model, inputs, scheme, score)
    kept, logits = _fitprune(model, inputs, Recipe(removed=scheme, visual_tokens=16, num_layers=4), score)
    assert kept == expected
    assert [len(v) for v in kept.values()] == list(16 - torch.tensor(list(scheme.values())).cumsum(0))
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


@pytest.mark.parametrize("score", ["product", "fit"])
def test_fitprune_matches_the_release_on_the_shipped_model(score):
    """A hand-made schedule for 144 tokens and 8 layers (the shape of the release's 7B schemes: most at
    the early layers, a few late ones), one item of each task."""
    model, _ = shipped()
    scheme = {0: 8, 1: 30, 2: 25, 3: 6, 4: 10, 6: 3}
    recipe = Recipe(removed=scheme, visual_tokens=144, num_layers=8)
    for inputs in shipped_inputs():
        expected, ref_logits = fitprune_reference(model, inputs, scheme, score)
        kept, logits = _fitprune(model, inputs, recipe, score)
        assert kept == expected
        assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


# ---------------------------------------------------------------------------------------------- VFlowOpt
def vflowopt_map(model, pixel_values: torch.Tensor, t: float) -> torch.Tensor:
    """``(N,)`` the release's importance map of a one-image input, ``alpha_v = 0``: the tower's attention
    at the feature layer (``illava_vit_k``: the layer whose output the LLM receives; here LLaVA's
    ``vision_feature_layer``), mean over heads; ``received_attn = mean over rows``; global tokens
    ``received_attn > t * received_attn.mean()``; ``combined_attn`` = the mean of their rows; read at
    the patches (the columns after [CLS])."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True)
    attn_weights_mean = out.attentions[model.config.vision_feature_layer][0].float().mean(0)
    received_attn = attn_weights_mean.mean(0)
    global_token_indice = torch.nonzero(received_attn > t * received_attn.mean(), as_tuple=True)[0]
    combined_attn = attn_weights_mean[global_token_indice, :].mean(0)
    return combined_attn[1:]


def vflowopt_recycle(image_feature: torch.Tensor, image_attn_map: torch.Tensor, vit_r: float, a: float):
    """The release's "token merging" block on one grid of ``L`` tokens (``side x side``, row-major):
    ``reduce_tokens = round(L * (1 - vit_r))``, ``num_merged_tokens = int(L / (a * a))``; the
    ``reduce_tokens + num_merged_tokens`` lowest of the map are marked; grouped by the cell
    ``floor(point / a)`` of their grid point (``torch.unique(dim=0, return_inverse=True)``); in each group
    the map-weighted mean of the (projected) features replaces the group's highest-map token, which
    stays. Returns the kept mask, the features (recycled in place) and the map."""
    image_feature = image_feature.clone()
    length = image_attn_map.shape[0]
    side = math.isqrt(length)
    reduce_tokens = round(length * (1 - vit_r))
    num_merged_tokens = int(length / (a * a))
    sorted_indices = torch.sort(image_attn_map, dim=-1).indices
    low_k = sorted_indices[:reduce_tokens + num_merged_tokens]
    to_keep_mask = torch.ones(length, dtype=torch.bool)
    to_keep_mask[low_k] = False
    points = torch.stack([low_k // side, low_k % side], dim=1)
    grid_coords = (points.float() / a).floor().long()
    _, inverse = torch.unique(grid_coords, dim=0, return_inverse=True)
    for i in range(int(inverse.max()) + 1 if inverse.numel() else 0):
        group_indices = low_k[inverse == i]
        weights = image_attn_map[group_indices].float()
        weights /= weights.sum()
        merged_feature = (weights[:, None] * image_feature[group_indices]).sum(dim=0)
        max_weight_index = group_indices[image_attn_map[group_indices].argmax()]
        image_feature[max_weight_index] = merged_feature
        to_keep_mask[max_weight_index] = True
    return to_keep_mask, image_feature, image_attn_map


def vflowopt_reference(model, inputs, vit_r: float, t: float, a: float, llm_k: list[int], llm_r: list[float],
                       renumber: bool = True):
    """VFlowOpt on a one-image prompt: the map, the recycling, the LLM sequence (text with the kept,
    recycled image features in order), then the layer loop of ``forward_illava``: at ``llm_k[0]`` every
    stage's mask is drawn from the map of the tokens left (``r = round(L * (1 - r_val))`` lowest out,
    ``L`` the tokens entering that stage), each applied before its layer, positions kept. The release
    builds the shorter prompt before the LLM, whose positions are ``0..L-1`` (``renumber``);
    ``renumber=False`` keeps the input's positions instead.

    Returns the kept image positions (in the input) after the vision stage and each LLM stage, the LLM's
    input rows of the kept image tokens, and the last-token logits."""
    start, n_image = image_span(model, inputs)
    x0 = decoder_input(model, inputs)
    image_attn_map = vflowopt_map(model, inputs["pixel_values"], t)
    mask, features, image_attn_map = vflowopt_recycle(x0[start:start + n_image], image_attn_map, vit_r, a)
    image_pos = torch.arange(start, start + n_image)[mask]
    x = torch.cat([x0[:start], features[mask], x0[start + n_image:]])
    orig = torch.cat([torch.arange(start), image_pos, torch.arange(start + n_image, x0.shape[0])])
    pos = torch.arange(x.shape[0]) if renumber else orig.clone()
    kept = {"encoder:0": image_pos.tolist()}
    image_rows = features[mask]
    combined_attn = image_attn_map[mask]
    image_token_length = int(mask.sum())
    del_musks: list[torch.Tensor] = []
    with torch.no_grad():
        for layer_idx, layer in enumerate(_lm(model).layers):
            if layer_idx in llm_k:
                if not del_musks:
                    length = x.shape[0]
                    for r_val in llm_r:
                        all_indices = torch.sort(combined_attn, dim=-1).indices
                        r = round(image_token_length * (1 - r_val))
                        low_k = all_indices[:r]
                        del_musk = torch.ones(length, dtype=torch.bool)
                        del_musk[start + low_k] = False
                        del_musks.append(del_musk)
                        combined_attn = combined_attn[del_musk[start:start + image_token_length]]
                        image_token_length -= r
                        length -= r
                del_musk = del_musks[llm_k.index(layer_idx)]
                x, pos, orig = x[del_musk], pos[del_musk], orig[del_musk]
                n_left = int((orig >= start).logical_and(orig < start + n_image).sum())
                kept[f"prefill:{layer_idx}"] = orig[start:start + n_left].tolist()
            attn_out, _ = _attend(model, layer, x, pos)
            x = _finish(layer, x, attn_out)
        return kept, image_rows, last_logits(model, x)


def _vflowopt(model, inputs, **options):
    seen = []
    hook = _lm(model).layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), tokensieve.prune(model, "vflowopt", **options) as run:
            logits = model(**inputs).logits[0, -1]
    finally:
        hook.remove()
    sample = run.report.samples[0]
    kept = {k: v for k, v in sample.visual_kept.items() if k.split(":")[0] in ("encoder", "prefill")}
    return kept, seen[0][0], logits


def _in_tokensieve_terms(kept: dict[str, list[int]], n_image: int, layers: list[int]) -> tuple[float, ...]:
    """tokensieve's ``stage_keep`` are fractions of the input's N; the release's ``illava_llm_r`` of the
    tokens entering each stage. The release's counts as fractions of N (``round(f * N)`` gives them)."""
    return tuple(len(kept[f"prefill:{layer}"]) / n_image for layer in layers)


VFLOWOPT_TINY = [  # (index, vit_r, t, m, llm_k, llm_r)
    (0, 0.5, 1.0, 2.0, [1, 2], [0.75, 0.5]),
    (1, 0.75, 0.5, 1.5, [2], [0.5]),   # real m: 3 x 3 cells on the 4 x 4 grid, int(16 / 2.25) = 7 marked more
    (2, 0.5, 1.0, 3.0, [1, 3], [0.6, 0.4]),  # m 3: 2 x 2 cells, 1 marked more: up to 11 survive the vision stage
]


def _check_vflowopt(model, inputs, vit_r, t, m, llm_k, llm_r, renumber):
    start, n_image = image_span(model, inputs)
    expected, image_rows, ref_logits = vflowopt_reference(model, inputs, vit_r, t, m, llm_k, llm_r, renumber)
    stage_keep = _in_tokensieve_terms(expected, n_image, llm_k)
    kept, rows, logits = _vflowopt(model, inputs, vit_keep=vit_r, stage_keep=stage_keep, layers=tuple(llm_k),
                                   t=t, m=m, alpha=0.0, positions="auto" if renumber else "keep")
    assert kept == expected
    got = rows[start:start + image_rows.shape[0]]
    assert torch.allclose(got, image_rows, atol=ROWS_ATOL), (got - image_rows).abs().max()
    return logits, ref_logits


@pytest.mark.parametrize("renumber", [True, False])
@pytest.mark.parametrize("index,vit_r,t,m,llm_k,llm_r", VFLOWOPT_TINY)
def test_vflowopt_matches_the_release_on_a_tiny_llava(index, vit_r, t, m, llm_k, llm_r, renumber):
    """Kept positions after the vision stage and each LLM stage, and the recycled rows the LLM receives
    (to 1e-5); logits to 1e-4 against the release's loop: the shorter prompt numbered 0..L-1 (the
    default, ``positions="auto"``), or each kept token at its input position (``positions="keep"``)."""
    model = tiny_llava()
    logits, ref_logits = _check_vflowopt(model, tiny_inputs(index), vit_r, t, m, llm_k, llm_r, renumber=renumber)
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_vflowopt_matches_the_release_on_the_shipped_model():
    """The 12 x 12 grid, two settings (m 2: 36 cells; m 3.5: 4 x 4 cells, ``int(144 / 12.25)`` = 11
    marked more; t 1.2 keeps 6-8 global tokens: this tower's received attention peaks at 1.3-1.6 times
    its mean, so the release's t of 28-39 would leave none), stages at 2 and 5 of 8, one item of each task."""
    model, _ = shipped()
    for inputs in shipped_inputs():
        for vit_r, t, m, llm_r in ((0.5, 1.0, 2.0, [0.75, 0.5]), (0.3, 1.2, 3.5, [0.75, 0.6])):
            logits, ref_logits = _check_vflowopt(model, inputs, vit_r, t, m, [2, 5], llm_r, renumber=True)
            assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()

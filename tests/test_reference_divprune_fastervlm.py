"""DivPrune and FasterVLM (LLaVA-1.5) against references written in this file from the authors' code.

Both prune before the LLM and build the shorter prompt the released LLaVA code builds: the text
embeddings with each image's kept (projected) tokens in their original order, positions ``0..L-1``
(``position_ids`` is None at inference, so the LLM numbers the shorter sequence). The references below
select the tokens as the releases do, build that sequence, run the LLM on it and compare the kept
positions, the LLM's input rows and the last-token logits with tokensieve's.

DivPrune: vbdi/divprune at 799e2d9, ``LLaVA/llava/model/llava_arch.py``
(``LlavaMetaForCausalLM.DivPrune``, ``pairwise_cosine_similarity`` and the ``LAYER_INDEX == '0'`` block
of ``prepare_inputs_labels_for_multimodal``). FasterVLM: Theia-4869/FasterVLM at f5d5f12,
``llava/model/llava_arch.py`` (``encode_images``, ``prepare_inputs_labels_for_multimodal``) and
``llava/model/multimodal_encoder/clip_encoder.py`` (``CLIPVisionTower.feature_select``, ``forward``).

Nothing here calls tokensieve's own helpers: only ``tokensieve.prune`` is run and its report read.
"""

from __future__ import annotations

import pytest
import torch
from reference_models import decoder_input, shipped, shipped_inputs, tiny_llava
from tiny_models import IMAGE, collate, samples

import tokensieve

ROWS_ATOL = 1e-5
LOGITS_ATOL = 1e-4


def tiny_inputs(sizes: list[int], index: int) -> dict:
    """Batch-1 input: sample ``index`` of a tiny-LLaVA layout with ``sizes`` images per sample."""
    return collate("llava", [samples("llava", tiny_llava(), sizes)[index]])


# ---------------------------------------------------------------------------------------------- common parts
def _spans(model, inputs) -> list[torch.Tensor]:
    """The image-token positions of each image of a batch-1 input (each image one contiguous run)."""
    ids = inputs["input_ids"][0]
    assert inputs["input_ids"].shape[0] == 1 and bool(inputs["attention_mask"].bool().all())
    pos = (ids == model.config.image_token_id).nonzero().squeeze(1)
    cuts = (pos.diff() != 1).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(pos, cuts.tolist()))


def _release_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The LLM on the release's shorter sequence at positions ``0..L-1``; last-token logits."""
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=sequence[None], position_ids=torch.arange(sequence.shape[0])[None])
        return model.lm_head(out.last_hidden_state[0, -1])


def _pruned(model, inputs, method: str, **options):
    """tokensieve's kept positions, the LLM's input rows and the last-token logits."""
    seen = []
    hook = model.model.language_model.layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), tokensieve.prune(model, method, **options) as run:
            logits = model(**inputs).logits[0, -1]
    finally:
        hook.remove()
    sample = run.report.samples[0]
    return sample.visual_kept["encoder:0"], seen[0][0], logits, run


def _check(model, inputs, kept_expected: list[int], method: str, **options):
    """tokensieve's run against the release's selection ``kept_expected`` (positions in the input)."""
    x = decoder_input(model, inputs)
    ids = inputs["input_ids"][0]
    drop = torch.zeros(ids.numel(), dtype=torch.bool)
    drop[ids == model.config.image_token_id] = True
    drop[kept_expected] = False
    sequence = x[~drop]  # keep_indexs sorted: text, and the kept image tokens in their order
    kept, rows, logits, run = _pruned(model, inputs, method, **options)
    assert kept == kept_expected
    assert run.report.positions == "renumber"
    assert rows.shape == sequence.shape and torch.allclose(rows, sequence, atol=ROWS_ATOL), (rows - sequence).abs().max()
    ref_logits = _release_logits(model, sequence)
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


# ---------------------------------------------------------------------------------------------- DivPrune
def divprune_release(visual_feature_vectors: torch.Tensor, threshold_ratio: float) -> torch.Tensor:
    """``DivPrune`` of the release: ``threshold_terms = int(round(threshold_ratio * N))`` picks on the
    distance matrix ``1 - cos``; the first pick maximises each column's second smallest entry (its
    nearest other token: ``topk(m2, 2, largest=False).values[1]``), every later pick maximises the
    column minimum over the rows picked so far. Returns the picks in the order they were made."""
    n = visual_feature_vectors.shape[0]
    threshold_terms = int(round(threshold_ratio * n))
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - norm_matrix @ norm_matrix.t()
    s = torch.empty(threshold_terms, dtype=torch.long)
    for i in range(threshold_terms):
        if i == 0:
            scores = torch.topk(cosine_matrix, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(cosine_matrix.index_select(0, s[:i]), dim=0).values
        s[i] = torch.argmax(scores)
    return s


def divprune_reference(model, inputs, ratio: float) -> list[int]:
    """The ``LAYER_INDEX == '0'`` block: the image's rows of ``new_input_embeds`` (projected tokens;
    the release finds them at ``SYS_TOKEN_LEN = 35``, here by the image token id), the picks shifted to
    sequence positions, ``keep_indexs`` sorted. One image per prompt, as the release."""
    (span,) = _spans(model, inputs)
    x = decoder_input(model, inputs)
    with torch.no_grad():
        picks = divprune_release(x[span], ratio)
    return sorted((picks + int(span[0])).tolist())


@pytest.mark.parametrize("keep,index", [(0.5, 0), (0.25, 1), (0.1, 2), (0.75, 2)])
def test_divprune_matches_the_release_on_a_tiny_llava(keep, index):
    """``keep`` 0.1 of 16: ``int(round(1.6))`` = 2 picks."""
    model = tiny_llava()
    inputs = tiny_inputs([1, 1, 1], index)
    expected = divprune_reference(model, inputs, keep)
    assert len(expected) == int(round(keep * 16))
    _check(model, inputs, expected, "divprune", keep=keep)


def test_divprune_matches_the_release_on_the_shipped_model():
    """Default keep 0.5 (72 of 144) and 0.1 (``int(round(14.4))`` = 14), one item of each task."""
    model, _ = shipped()
    for inputs in shipped_inputs():
        for keep in (0.5, 0.1):
            _check(model, inputs, divprune_reference(model, inputs, keep), "divprune", keep=keep)


# ---------------------------------------------------------------------------------------------- FasterVLM
def fastervlm_release(model, pixel_values: torch.Tensor, visual_token_num: int):
    """``encode_images`` with ``CLIPVisionTower.forward`` / ``feature_select`` (``select_feature =
    'patch'``): the tower's ``hidden_states[select_layer][:, 1:]`` and ``attentions[select_layer][:, :, 0,
    1:]`` (the [CLS] row) at ``select_layer = mm_vision_select_layer`` (-2), the attention averaged over
    heads, the top ``visual_token_num`` of each image's row (``index_masks``). Returns per image the kept
    patch indices (ascending: ``image_feature[index_mask]`` keeps their order) and the projected kept
    features."""
    tower = model.model.vision_tower
    select_layer = model.config.vision_feature_layer
    with torch.no_grad():
        out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        image_features = out.hidden_states[select_layer][:, 1:]
        image_attentions = out.attentions[select_layer][:, :, 0, 1:].mean(dim=1)
        token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1]
        index_masks = torch.zeros(image_features.shape[:2], dtype=torch.bool)
        index_masks.scatter_(1, token_indices, True)
        projected = model.model.multi_modal_projector(image_features)
    return [(mask.nonzero().squeeze(1), feats[mask]) for mask, feats in zip(index_masks, projected)]


def fastervlm_reference(model, inputs, visual_token_num: int) -> tuple[list[int], list[torch.Tensor]]:
    """The release's kept image positions of a batch-1 prompt (its images in order, each pruned alone)
    and the projected features that fill them."""
    spans = _spans(model, inputs)
    per_image = fastervlm_release(model, inputs["pixel_values"], visual_token_num)
    assert len(per_image) == len(spans)
    kept, features = [], []
    for span, (index, feats) in zip(spans, per_image):
        kept += span[index].tolist()
        features.append(feats)
    return kept, features


@pytest.mark.parametrize("sizes,index,keep", [([1, 1], 0, 0.5), ([1, 1], 1, 0.25), ([2, 1], 0, 0.25), ([1, 2], 1, 0.75)])
def test_fastervlm_matches_the_release_on_a_tiny_llava(sizes, index, keep):
    """One and two images per prompt (the release's prompt may hold several ``<image>``s, each image
    keeps its own ``visual_token_num``); ``keep * 16`` is whole, so tokensieve's ``round(keep * N)`` per
    image is the release's count. The LLM's input rows are the kept projected features, to 1e-5."""
    model = tiny_llava()
    inputs = tiny_inputs(sizes, index)
    expected, features = fastervlm_reference(model, inputs, int(keep * 16))
    _check(model, inputs, expected, "fastervlm", keep=keep)
    _, rows, _, _ = _pruned(model, inputs, "fastervlm", keep=keep)
    ids = inputs["input_ids"][0]
    keep_rows = ids != IMAGE
    keep_rows[expected] = True
    image_rows = rows[(ids[keep_rows] == IMAGE)]
    assert torch.allclose(image_rows, torch.cat(features), atol=ROWS_ATOL)


def test_fastervlm_matches_the_release_on_the_shipped_model():
    """Default keep 0.5 (``visual_token_num`` 72 of 144) and 0.25 (36), one item of each task."""
    model, _ = shipped()
    for inputs in shipped_inputs():
        for keep, count in ((None, 72), (0.25, 36)):
            expected, _ = fastervlm_reference(model, inputs, count)
            options = {} if keep is None else {"keep": keep}
            _check(model, inputs, expected, "fastervlm", **options)

"""FastV and DART against references written in this file from the authors' releases.

Both releases prune once, before decoder layer K, inside the LLM's layer loop (batch 1, no padding),
and both pass the kept rows on with their original positions (``position_ids = keep_indexs``), so the
references below are explicit loops over the decoder layers of a LLaVA model (eager attention), each
layer run from its parts (input norm, attention, residual, post-attention norm, MLP, residual) the
way the releases' ``LlamaDecoderLayer.forward`` runs it, and the last-token logits are compared too.

FastV: pkunlp-icler/FastV at d165972, ``src/transformers/src/transformers/models/llama/modeling_llama.py``
(``LlamaModel.forward``, the ``FASTV_INPLACE`` branch, ~l.729-761; the eval scripts give the kept
count ``--fast-v-attention-rank`` as ``(1 - R) * N``). DART: ZichenWen1/DART, read at 5a19452 through
the fork xqy1111111/DART (the upstream repository has no snapshot here; the fork's later commits do not
touch these files), ``llava/model/language_model/modeling_llama_self.py`` (``DART.forward``,
``DART.get_retained_image_token``; the attention classes return their post-rotary, kv-repeated keys).

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
from tiny_models import IMAGE, batch, collate, samples

import tokensieve

LOGITS_ATOL = 1e-4  # fp32: the reference and the engine run the same layers on the same rows


def tiny_inputs(index: int) -> dict:
    """Batch-1 input of the tiny LLaVA: sample ``index`` of a [1, 1, 1] layout (16 image tokens,
    4 + 2 * index text tokens after the image)."""
    model = tiny_llava()
    return collate("llava", [samples("llava", model, [1, 1, 1])[index]])


# ---------------------------------------------------------------------------------------------- the layer loop
def _lm(model):
    return model.model.language_model


def _rotary(model, x: torch.Tensor, pos: torch.Tensor):
    return _lm(model).rotary_emb(x[None], pos[None])


def _layer(model, layer, x: torch.Tensor, pos: torch.Tensor):
    """One decoder layer from its parts, on rows ``x`` at rotary positions ``pos``; returns its output
    and its softmax attention ``(H, n, n)`` (the release's ``output_attentions`` of that layer)."""
    normed = layer.input_layernorm(x[None])
    attn_out, weights = layer.self_attn(hidden_states=normed, position_embeddings=_rotary(model, x, pos),
                                        attention_mask=causal(x.shape[0], x.dtype))
    h = x[None] + attn_out
    out = h + layer.mlp(layer.post_attention_layernorm(h))
    return out[0], weights[0].float()


def _keys(model, layer, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``(T, H * head_dim)``: the post-rotary keys the release's attention returns (``key_states`` after
    ``apply_rotary_pos_emb`` and ``repeat_kv``), heads side by side as ``get_retained_image_token``
    lays them out (``permute(0, 2, 1, 3).reshape``)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    k = attn.k_proj(layer.input_layernorm(x[None])).view(1, x.shape[0], -1, attn.head_dim).transpose(1, 2)
    cos, sin = _rotary(model, x, pos)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # repeat_kv
    return k[0].transpose(0, 1).reshape(x.shape[0], -1)


def _run_pruned_at(model, inputs, K: int, choose):
    """The releases' loop: layers ``0..K-1`` on every row; before layer K, ``choose(x, pos, last_probs,
    before)`` (``x``: the output of layer K-1, ``last_probs``: its attention, ``before``: its input rows
    and positions) returns the image positions to keep;
    ``keep_indexs`` = the rows before the image, those, the rows after it, sorted; ``position_ids =
    keep_indexs``. Returns the kept image positions and the last-token logits."""
    start, n_image = image_span(model, inputs)
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = torch.arange(x.shape[0])
        kept, probs, before = None, None, None
        for idx, layer in enumerate(_lm(model).layers):
            if idx == K:
                retained = torch.as_tensor(choose(x, pos, probs, before), dtype=torch.long)
                keep_indexs = torch.cat([torch.arange(start), retained, torch.arange(start + n_image, x.shape[0])])
                keep_indexs = keep_indexs.sort().values
                x, pos = x[keep_indexs], keep_indexs
                kept = sorted(retained.tolist())
            before = (x, pos)
            x, probs = _layer(model, layer, x, pos)
        return kept, last_logits(model, x)


def _pruned(model, inputs, method: str, **options):
    with torch.no_grad(), tokensieve.prune(model, method, **options) as run:
        logits = model(**inputs).logits[0, -1]
    sample = run.report.samples[0]
    return {k: v for k, v in sample.visual_kept.items() if k.startswith("prefill:")}, logits, sample


# ---------------------------------------------------------------------------------------------- FastV
def fastv_reference(model, inputs, agg_layer: int, attention_rank: int):
    """FastV inference, token-drop ("inplace") implementation: ``LlamaModel.forward`` of the release's
    ``modeling_llama.py`` (~l.729-761). At ``idx == AGG_LAYER`` (K), ``layer_outputs[1]`` (the
    attention of layer K-1) is averaged over heads, the last token's row is read over the image span
    (``SYS_LENGTH : SYS_LENGTH + IMAGE_TOKEN_LENGTH``), the ``ATTENTION_RANK`` highest stay; the kept
    rows go on with ``position_ids = keep_indexs``. The image span here comes from the image token id
    (the release hard-codes ``--fast-v-sys-length 36``)."""
    start, n_image = image_span(model, inputs)

    def choose(x, pos, last_layer_attention, before):
        last_tok = last_layer_attention.mean(0)[-1]
        image = last_tok[start:start + n_image]
        return image.topk(attention_rank).indices + start

    return _run_pruned_at(model, inputs, agg_layer, choose)


@pytest.mark.parametrize("layer,keep,index", [(2, 0.5, 0), (1, 0.25, 1), (3, 0.75, 2)])
def test_fastv_matches_the_release_on_a_tiny_llava(layer, keep, index):
    """The rank is the release's integer ``(1 - R) * N``; ``keep * 16`` is whole here, so tokensieve's
    ``round(keep * N)`` is the same count."""
    model = tiny_llava()
    inputs = tiny_inputs(index)
    expected, ref_logits = fastv_reference(model, inputs, layer, int(keep * 16))
    kept, logits, sample = _pruned(model, inputs, "fastv", layer=layer, keep=keep)
    assert kept == {f"prefill:{layer}": expected}
    assert sample.visual_lengths == [16] * layer + [int(keep * 16)] * (4 - layer)
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_fastv_matches_the_release_on_the_shipped_model():
    """Defaults (K = 2, keep 0.5: the release's rank 72 of 144), one item of each task."""
    model, _ = shipped()
    for inputs in shipped_inputs():
        expected, ref_logits = fastv_reference(model, inputs, 2, 72)
        kept, logits, _ = _pruned(model, inputs, "fastv")
        assert kept == {"prefill:2": expected}
        assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_fastv_paper_variant_averages_every_query_row():
    """``variant="paper"`` has no released code; it follows the paper's "average attention received":
    layer K-1's attention (HF's own eager weights of the unpruned model), mean over heads, then over all
    query rows (a row that cannot see a token by causality counts 0)."""
    model = tiny_llava()
    inputs = tiny_inputs(1)
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    score = attentions[1][0].mean(0).mean(0)[vis]
    kept, _, _ = _pruned(model, inputs, "fastv", layer=2, keep=0.25, variant="paper")
    assert kept == {"prefill:2": sorted(vis[score.topk(4).indices].tolist())}


# ---------------------------------------------------------------------------------------------- DART
def dart_reference(model, inputs, K: int, budget: float, pivot_image_token: int, pivot_text_token: int,
                   takes: list[int] | None = None):
    """DART inference: ``DART.forward`` and ``DART.get_retained_image_token`` of the release's
    ``modeling_llama_self.py``.

    At ``layer_idx == K``: ``last_layer_state`` is the output of layer K-1 through the final norm,
    ``any_states`` its post-rotary keys; ``TOKEN_TOPK = ceil(B // (pivot_image_token +
    pivot_text_token))`` with ``B`` = ``max_num_trunction`` (the scripts' 128) or ``N * (1 -
    reduction_ratio)``, here ``budget`` (a count or ``keep * N``). Pivots: the ``pivot_image_token`` image
    tokens and the ``pivot_text_token`` tokens after the image with the largest L1 norm of their keys.
    The pivots are visited in the order of ``list(set(image_indices + query_indices))``; each takes the
    ``TOKEN_TOPK`` image tokens (image pivots excluded) least cosine-similar to it out of the pool. The
    retained image tokens: image pivots + the chosen ones, ``pivot_image_token + P * TOKEN_TOPK``.
    The release asserts batch 1 and crashes with fewer text tokens than ``pivot_text_token``.

    ``takes`` (not the release): the count of the i-th pivot visited instead of ``TOKEN_TOPK``, for
    tokensieve's ``split="exact"``."""
    start, n_image = image_span(model, inputs)
    lm = _lm(model)
    token_topk = math.ceil(budget // (pivot_image_token + pivot_text_token))

    def choose(x, pos, probs, before):
        last_layer_state = lm.norm(x[None])[0]
        keys = _keys(model, lm.layers[K - 1], *before)
        image_norm = keys[start:start + n_image].norm(p=1, dim=-1)
        query_norm = keys[start + n_image:].norm(p=1, dim=-1)
        image_indices = (image_norm.topk(pivot_image_token).indices + start).tolist()
        query_indices = (query_norm.topk(pivot_text_token).indices + start + n_image).tolist()
        indices_set = set(image_indices + query_indices)
        valid_indices = set(range(start, start + n_image)) - set(image_indices)
        valid_indices_list = list(valid_indices)
        for visit, item in enumerate(list(indices_set)):
            topk = token_topk if takes is None else takes[visit]
            if topk == 0:
                continue
            valid_vectors = last_layer_state[valid_indices_list]
            cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[item], valid_vectors, dim=-1)
            top_k_real_indices = [valid_indices_list[i] for i in cos_sim.topk(topk).indices]
            indices_set.update(top_k_real_indices)
            valid_indices.difference_update(top_k_real_indices)
            valid_indices_list = list(valid_indices)
        indices_set.difference_update(query_indices)
        return sorted(indices_set)

    return _run_pruned_at(model, inputs, K, choose)


def _release_count(n: int, keep: float, image_pivots: int, pivots: int) -> int:
    return image_pivots + pivots * int((keep * n) // pivots)


@pytest.mark.parametrize("index,layer,keep,image_pivots,text_pivots", [
    (0, 2, 0.5, 4, 4),   # 4 + 8 * 1 = 12 of 16 (round(keep * N) would be 8)
    (0, 2, 0.75, 4, 4),  # 12 either way; the pivots' visiting order decides the set here
    (1, 2, 0.5, 2, 2),   # 2 + 4 * 2 = 10
    (2, 1, 0.75, 2, 2),  # 2 + 4 * 3 = 14
    (2, 3, 0.5, 1, 3),   # 1 + 4 * 2 = 9
    (2, 2, 0.25, 3, 6),  # 3 + 9 * 0 = 3: the image pivots alone
])
def test_dart_matches_the_release_on_a_tiny_llava(index, layer, keep, image_pivots, text_pivots):
    model = tiny_llava()
    inputs = tiny_inputs(index)
    expected, ref_logits = dart_reference(model, inputs, layer, keep * 16, image_pivots, text_pivots)
    kept, logits, sample = _pruned(model, inputs, "dart", layer=layer, keep=keep, image_pivots=image_pivots,
                                   text_pivots=text_pivots)
    assert kept == {f"prefill:{layer}": expected}
    count = _release_count(16, keep, image_pivots, image_pivots + text_pivots)
    assert len(expected) == count and sample.visual_lengths == [16] * layer + [count] * (4 - layer)
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


@pytest.mark.parametrize("index,keep,image_pivots,text_pivots", [(0, 0.5, 4, 4), (1, 0.5, 2, 2), (2, 0.75, 1, 3)])
def test_dart_exact_split_keeps_round_keep_n(index, keep, image_pivots, text_pivots):
    """``split="exact"``: the release's loop with the ``round(keep * N) - image_pivots`` slots spread
    over the pivots in their visiting order, the first ones one more."""
    model = tiny_llava()
    inputs = tiny_inputs(index)
    k, pivots = round(keep * 16), image_pivots + text_pivots
    slots = k - image_pivots
    takes = [slots // pivots + (1 if i < slots % pivots else 0) for i in range(pivots)]
    expected, ref_logits = dart_reference(model, inputs, 2, 0, image_pivots, text_pivots, takes=takes)
    kept, logits, _ = _pruned(model, inputs, "dart", keep=keep, image_pivots=image_pivots, text_pivots=text_pivots,
                              split="exact")
    assert kept == {"prefill:2": expected} and len(expected) == k
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_dart_matches_the_release_on_the_shipped_model():
    """Defaults (K = 2, 4 + 4 pivots, keep 0.5: 4 + 8 * 9 = 76 of 144), and the scripts' shape of
    budget, a count (``max_num_trunction``; 32 of 144 here: 4 + 8 * 4 = 36), one item of each task."""
    model, _ = shipped()
    for inputs in shipped_inputs():
        for options, budget, count in (({}, 72, 76), ({"keep": 32 / 144}, 32, 36)):
            expected, ref_logits = dart_reference(model, inputs, 2, budget, 4, 4)
            kept, logits, _ = _pruned(model, inputs, "dart", **options)
            assert kept == {"prefill:2": expected} and len(expected) == count
            assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_dart_release_counts_and_schedule():
    """The scripts' ``--max_num_trunction 128`` of 576 with 4 + 4 pivots keeps 132; ``tokensieve flops``
    predicts the release's count; ``split="exact"`` keeps ``round(keep * N)``; ``keep=1`` keeps all."""
    from tokensieve.methods import DART

    method = DART(keep=128 / 576)
    method.bind(32)
    assert method.release_count(576) == 132
    n_in, _ = method.visual_schedule(32, 576)
    assert n_in[:2] == [576, 576] and set(n_in[2:]) == {132}
    exact = DART(keep=128 / 576, split="exact")
    exact.bind(32)
    assert set(exact.visual_schedule(32, 576)[0][2:]) == {128}
    assert DART(keep=1.0).release_count(17) == 17 and DART(keep=0.5).release_count(144) == 76
    with pytest.raises(TypeError, match="split"):
        DART(split="paper")


def test_dart_meets_a_flops_budget_in_the_release_shape():
    """With ``flops`` the affordable count k becomes ``image_pivots + P * floor((k - image_pivots) / P)``:
    never above the budget, and of the release's shape."""
    model = tiny_llava()
    inputs = batch("llava", model, [1, 2, 1])
    with torch.no_grad(), tokensieve.prune(model, "dart", flops=0.7, layer=1, image_pivots=2, text_pivots=2) as run:
        model(**inputs)
    for s in run.report.samples:
        assert s.flops / s.flops_unpruned <= 0.7
        assert (s.visual_lengths[-1] - 2) % 4 == 0 and s.visual_lengths[-1] < s.visual_tokens


def test_dart_in_a_padded_batch_keeps_what_each_sample_keeps_alone():
    """The pivots' visiting order comes from their positions in the sample, not from the padded rows
    (CPython orders a set of ints by their value modulo its table size, so a shift can reorder it): in
    a left-padded batch of the shipped model's prompts of different lengths each sample keeps the tokens
    it keeps alone. Positions from the attention mask, as ``generate`` gives them (the key norms are read
    after the rotary, so they depend on them)."""
    from tokensieve.tasks import TASKS, generate
    from tokensieve.tiny import build_inputs

    model, processor = shipped()
    examples = [e for task in TASKS for e in generate(task, "test", 2)]

    def with_positions(inputs):
        return dict(inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))

    inputs = with_positions(build_inputs(processor, examples))
    pads = (inputs["attention_mask"] == 0).sum(1).tolist()
    assert len(set(pads)) > 2
    with torch.no_grad(), tokensieve.prune(model, "dart") as run:
        model(**inputs)
        together = [s.visual_kept["prefill:2"] for s in run.report.samples]
        for example, kept, pad in zip(examples, together, pads):
            model(**with_positions(build_inputs(processor, [example])))
            assert [p - pad for p in kept] == run.report.samples[0].visual_kept["prefill:2"]

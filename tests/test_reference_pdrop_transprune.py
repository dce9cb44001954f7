"""PDrop and TransPrune against references written in this file from the authors' releases.

Each reference is an explicit loop over the decoder layers of a LLaVA model (eager attention, batch 1,
no padding) that follows the release's control flow: after decoder layer ``layer_idx`` has run,
``rank_layer = layer_idx + 1``; if ``rank_layer`` is a stage layer, the visual tokens entering
``rank_layer`` are ranked with *that* layer's input norm and q/k projections applied to its input, and
only the kept ones go on into it. The layers themselves are run from their parts (input norm, attention,
residual, post-attention norm, MLP, residual), as the release's decoder layer does.

Positions as the releases assign them: after each drop the kept rows are renumbered
(``position_ids = arange(cur_len)``; PyramidDrop ``pdrop_rank_drop`` ~l.1446, TransPrune
``transprune_rank_drop`` ~l.1575), and while decoding the new token's position moves down at each
stage layer by the tokens that stage dropped (``pdrop_forward`` ~l.1259-1268, ``transprune_forward``
the same way). With ``renumber=False`` the references keep the original positions instead
(tokensieve's ``positions="keep"``).

Nothing here calls tokensieve's own helpers: only ``tokensieve.prune`` is run and its report read.
"""

from __future__ import annotations

import pytest
import torch
from reference_models import (
    causal,
    decoder_input,
    image_span,
    last_logits,
    shipped,
    shipped_items,
    tiny_llava,
)
from tiny_models import IMAGE, batch

import tokensieve

LOGITS_ATOL = 1e-4  # fp32: the reference and the engine compute the same layers on the same rows


# ---------------------------------------------------------------------------------------------- common parts
def _language_model(model):
    return model.model.language_model


def _rotary(model, x: torch.Tensor, pos: torch.Tensor):
    return _language_model(model).rotary_emb(x[None], pos[None])


def _attention(model, layer, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``(H, n, n)`` softmax attention of ``layer`` on its input ``x``: its input norm, q/k projections,
    rotary at ``pos``, causal mask (the release's ``pdrop_rank_drop`` / ``transprune_rank_drop``)."""
    _, weights = layer.self_attn(hidden_states=layer.input_layernorm(x[None]), position_embeddings=_rotary(model, x, pos),
                                 attention_mask=causal(x.shape[0], x.dtype))
    return weights[0].float()


def _transf_weight(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """TransPrune ``LlamaDecoderLayer_TransPrune.compute_transf_weight`` (modeling_llama_transprune.py
    ~l.917): ||after|| / ||before|| times exp(1 - cos) normalised over the sequence (batch 1)."""
    ratio = after.norm(dim=-1) / before.norm(dim=-1)
    e = torch.exp(1 - torch.nn.functional.cosine_similarity(before, after, dim=-1))
    return ratio * e / e.sum()


def _run_layer(model, layer, x: torch.Tensor, pos: torch.Tensor, transf: bool = False):
    """One decoder layer from its parts (``LlamaDecoderLayer_TransPrune.forward`` ~l.839); with ``transf``
    also the token transition of its attention and MLP sublayers (normed input vs. output before the
    residual add), summed."""
    normed = layer.input_layernorm(x[None])
    attn_out = layer.self_attn(hidden_states=normed, position_embeddings=_rotary(model, x, pos),
                               attention_mask=causal(x.shape[0], x.dtype))[0]
    h = x[None] + attn_out
    normed2 = layer.post_attention_layernorm(h)
    mlp_out = layer.mlp(normed2)
    out = (h + mlp_out)[0]
    weight = None
    if transf:
        weight = _transf_weight(normed[0], attn_out[0]) + _transf_weight(normed2[0], mlp_out[0])
    return out, weight


def _rope(model, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x`` ``(H, n, D)`` rotated at ``pos`` ``(n,)`` (``apply_rotary_pos_emb``'s formula)."""
    cos, sin = _rotary(model, x[0], pos)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _kv(model, layer, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (rotated at ``pos``) and values ``(H_kv, n, D)`` that ``layer`` caches for input ``x``."""
    attn = layer.self_attn
    normed = layer.input_layernorm(x)
    k = attn.k_proj(normed).view(x.shape[0], -1, attn.head_dim).transpose(0, 1)
    v = attn.v_proj(normed).view(x.shape[0], -1, attn.head_dim).transpose(0, 1)
    return _rope(model, k, pos), v


def decode_reference(model, caches: list, token: int, positions: list[int]) -> torch.Tensor:
    """Logits of one decoded ``token``: at layer ``l`` rotated at ``positions[l]`` and attending to
    that layer's prefill cache ``caches[l]`` (keys, values) and itself; layers run from their parts."""
    lm = _language_model(model)
    with torch.no_grad():
        h = lm.embed_tokens(torch.tensor([token]))
        for layer, (ck, cv), p in zip(lm.layers, caches, positions):
            attn = layer.self_attn
            normed = layer.input_layernorm(h)
            q = _rope(model, attn.q_proj(normed).view(1, -1, attn.head_dim).transpose(0, 1), torch.tensor([p]))
            k, v = _kv(model, layer, h, torch.tensor([p]))
            k, v = torch.cat([ck, k], 1), torch.cat([cv, v], 1)
            groups = q.shape[0] // k.shape[0]
            k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
            probs = torch.softmax(q @ k.transpose(1, 2) * attn.scaling, -1)
            h = h + attn.o_proj((probs @ v).transpose(0, 1).reshape(1, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return model.lm_head(lm.norm(h))[0]


# ---------------------------------------------------------------------------------------------- PDrop reference
def pdrop_reference(model, inputs, layer_list: list[int], ratio_list: list[float], renumber: bool = True):
    """PyramidDrop inference, from Cooperx521/PyramidDrop ``llava/model/modeling_llama_pdrop.py``,
    ``LlamaModel.pdrop_forward`` (~l.1187-1238) and ``LlamaModel.pdrop_rank_drop`` (~l.1291-1416).

    ``layer_list`` is the release's ``--layer_list`` (e.g. [8, 16, 24]), ``ratio_list`` its
    ``--image_token_ratio_list`` (e.g. [0.5, 0.25, 0.125]; the eval scripts insert 1.0 in front).
    After layer ``layer_idx``: ``rank_layer = layer_idx + 1``; if it is in ``layer_list`` (stage ``s``),
    the query is the last instruction token (``prompt_total_len - 1``, the prompt's last token at
    inference), its attention at ``self.layers[rank_layer]`` (input norm, q/k of that layer on the
    hidden states entering it) is averaged over heads, and the top ``int(N * ratio_list[s + 1])`` of the
    image tokens are kept (``N``: the image's tokens in the input; ``int`` floors).

    Returns the kept visual positions per stage (keyed like tokensieve's report), last-token logits, each
    layer's prefill cache, and the position of the first decoded token at each layer.
    """
    ratios = [1.0] + list(ratio_list)
    lm = _language_model(model)
    start, n_image = image_span(model, inputs)
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = orig = torch.arange(x.shape[0])
        kept, caches, decode_pos = {}, [], []
        next_pos = x.shape[0]  # the first decoded token's position_ids, before any stage moves it
        for layer_idx, layer in enumerate(lm.layers):
            caches.append(_kv(model, layer, x, pos))
            decode_pos.append(next_pos)
            x, _ = _run_layer(model, layer, x, pos)
            rank_layer = layer_idx + 1
            if rank_layer not in layer_list:
                continue
            stage = layer_list.index(rank_layer)
            image_tokens, keep_length = int(n_image * ratios[stage]), int(n_image * ratios[stage + 1])
            probs = _attention(model, lm.layers[rank_layer], x, pos)
            last = x.shape[0] - 1  # prompt_total_len - 1
            score = probs[:, last].mean(0)[start:start + image_tokens]
            top = score.topk(keep_length).indices.sort().values + start
            rows = torch.cat([torch.arange(start), top, torch.arange(start + image_tokens, x.shape[0])])
            x, orig = x[rows], orig[rows]
            pos = torch.arange(x.shape[0]) if renumber else orig
            if renumber:
                next_pos -= image_tokens - keep_length
            kept[f"prefill:{rank_layer}"] = orig[start:start + keep_length].tolist()
        return kept, last_logits(model, x), caches, decode_pos


# ---------------------------------------------------------------------------------------------- TransPrune reference
def transprune_reference(model, inputs, pruning_layer_list: list[int], ratio_list: list[float],
                         accumulating_layer_list: list[int] | None = None, iga: bool = True, renumber: bool = True):
    """TransPrune inference, from liaolea/TransPrune ``llava/model/modeling_llama_transprune.py``,
    ``LlamaModel.transprune_forward`` (~l.1306-1393) and ``LlamaModel.transprune_rank_drop``
    (~l.1425-1545), with ``compute_transf_weight`` (~l.917).

    The release's scripts pass ``--pruning_layer_list [7,9,12]``, ``--accmulating_layer_list
    [7,8,9,10,11,12]`` and ``--image_token_ratio_list [0.875,0.625,0.125]`` (1.0 inserted in front);
    ``accumulating_layer_list`` defaults to the same span, ``pruning[0] .. pruning[-1]``.
    Both lists are read through ``rank_layer = layer_idx + 1``: layer ``layer_idx`` contributes its
    TTV when ``layer_idx + 1`` is an accumulating layer (so 6..11 for the scripts), and the tokens
    entering ``rank_layer`` are pruned when it is a pruning layer (7, 9, 12), scored by the TTV of all
    accumulating layers run so far (kept rows carry theirs along) normalised over the image, plus the
    instruction-guided attention (IGA) at ``self.layers[rank_layer]``: queries the tokens after the image
    up to the prompt's end, mean over heads and queries, normalised over the image. The top
    ``int(N * ratio_list[s + 1])`` stay. ``iga=False`` scores by TTV alone (tokensieve's ``ttv_only``).
    """
    ratios = [1.0] + list(ratio_list)
    if accumulating_layer_list is None:
        accumulating_layer_list = list(range(pruning_layer_list[0], pruning_layer_list[-1] + 1))
    lm = _language_model(model)
    start, n_image = image_span(model, inputs)
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = orig = torch.arange(x.shape[0])
        kept, weights, caches, decode_pos = {}, [], [], []
        next_pos = x.shape[0]
        for layer_idx, layer in enumerate(lm.layers):
            caches.append(_kv(model, layer, x, pos))
            decode_pos.append(next_pos)
            x, w = _run_layer(model, layer, x, pos, transf=layer_idx + 1 in accumulating_layer_list)
            if w is not None:
                weights.append(w)
            rank_layer = layer_idx + 1
            if rank_layer not in pruning_layer_list:
                continue
            stage = pruning_layer_list.index(rank_layer)
            image_tokens, keep_length = int(n_image * ratios[stage]), int(n_image * ratios[stage + 1])
            ttv = torch.zeros(image_tokens)
            for w in weights:
                ttv += w[start:start + image_tokens]
            score = ttv / (ttv.sum() + 1e-8)
            if iga:
                probs = _attention(model, lm.layers[rank_layer], x, pos)
                prompt_ids = start + image_tokens
                attention = probs[:, prompt_ids:].mean(0)[:, start:start + image_tokens].mean(0)
                score = score + attention / (attention.sum() + 1e-8)
            top = score.topk(keep_length).indices.sort().values + start
            rows = torch.cat([torch.arange(start), top, torch.arange(start + image_tokens, x.shape[0])])
            x, orig = x[rows], orig[rows]
            pos = torch.arange(x.shape[0]) if renumber else orig
            if renumber:
                next_pos -= image_tokens - keep_length
            weights = [w[rows] for w in weights]
            kept[f"prefill:{rank_layer}"] = orig[start:start + keep_length].tolist()
        return kept, last_logits(model, x), caches, decode_pos


def _pruned(model, inputs, method: str, **options):
    with torch.no_grad(), tokensieve.prune(model, method, **options) as run:
        logits = model(**inputs).logits[0, -1]
    sample = run.report.samples[0]
    return {k: v for k, v in sample.visual_kept.items() if k.startswith("prefill:")}, logits, sample, run


def _decoded(model, inputs, token: int, method: str, **options) -> torch.Tensor:
    """Logits of one forced decoded ``token`` after the pruned prefill, inside one prune() context."""
    from transformers import DynamicCache

    cache = DynamicCache()
    keyword = tokensieve.compat.cache_keyword(type(model).forward)
    with torch.no_grad(), tokensieve.prune(model, method, **options):
        model(**inputs, use_cache=True, **{keyword: cache})
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=inputs["attention_mask"].dtype)], 1)
        return model(input_ids=torch.tensor([[token]]), attention_mask=mask, use_cache=True,
                     **{keyword: cache}).logits[0, -1]


# ---------------------------------------------------------------------------------------------- PDrop tests
@pytest.mark.parametrize("layers,ratio,ratio_list", [
    ((1, 2, 3), 0.5, [0.5, 0.25, 0.125]),
    ((1, 2, 3), 0.6, [0.6, 0.36, 0.216]),  # floor: 9, 5, 3 of 16 (rounding would give 10, 6, 4)
    ((2,), 0.25, [0.25]),
])
@pytest.mark.parametrize("positions", ["auto", "keep"])
def test_pdrop_matches_the_release_on_a_tiny_llava(layers, ratio, ratio_list, positions):
    """Prefill and one decoded token; ``"auto"`` renumbers as the release, ``"keep"`` keeps positions."""
    model = tiny_llava()
    inputs = batch("llava", model, [1])
    expected, ref_logits, caches, decode_pos = pdrop_reference(model, inputs, list(layers), ratio_list,
                                                               renumber=positions == "auto")
    kept, logits, _, run = _pruned(model, inputs, "pdrop", layers=layers, ratio=ratio, positions=positions)
    assert run.report.positions == ("renumber" if positions == "auto" else "keep")
    assert kept == expected
    assert [len(v) for v in kept.values()] == [int(16 * r) for r in ratio_list]
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()
    token = int(ref_logits.argmax())
    ref_next = decode_reference(model, caches, token, decode_pos)
    next_logits = _decoded(model, inputs, token, "pdrop", layers=layers, ratio=ratio, positions=positions)
    assert torch.allclose(next_logits, ref_next, atol=LOGITS_ATOL), (next_logits - ref_next).abs().max()


def test_pdrop_ranks_the_tokens_entering_a_layer_with_that_layers_own_attention():
    """The release's rule in one line: the tokens entering layer 2 are the top half by the attention
    the last token pays them in layer 2 (HF's own eager attention weights of the unpruned model)."""
    model = tiny_llava()
    inputs = batch("llava", model, [1])
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    score = attentions[2][0].mean(0)[-1, vis]
    kept, _, _, _ = _pruned(model, inputs, "pdrop", layers=(2,), ratio=0.5)
    assert kept["prefill:2"] == sorted(vis[score.topk(8).indices].tolist())


def test_pdrop_kept_counts_floor_the_input_count_times_lambda_powers():
    """``int(N * ratio_list[s + 1])`` of the input's N image tokens (not of the previous stage's)."""
    from tokensieve.methods import PDrop

    method = PDrop(layers=(8, 16, 24), ratio=0.3)
    method.bind(32)
    n_in, _ = method.visual_schedule(32, 576)
    # the release with --image_token_ratio_list [0.3,0.09,0.027]: 172, 51, 15 (576 * 0.3 = 172.8 ...)
    assert [n_in[l] for l in (0, 8, 16, 24)] == [576, 172, 51, 15]


def test_pdrop_matches_the_release_on_the_shipped_model():
    from tokensieve.tiny import build_inputs

    model, processor = shipped()
    for example in shipped_items():
        inputs = build_inputs(processor, [example])
        expected, ref_logits, caches, decode_pos = pdrop_reference(model, inputs, [2, 4, 6], [0.5, 0.25, 0.125])
        kept, logits, _, _ = _pruned(model, inputs, "pdrop")  # defaults: stages at 2, 4, 6 of 8, lambda 0.5
        assert kept == expected
        assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL)
        token = int(ref_logits.argmax())
        assert torch.allclose(_decoded(model, inputs, token, "pdrop"), decode_reference(model, caches, token, decode_pos),
                              atol=LOGITS_ATOL)


# ---------------------------------------------------------------------------------------------- TransPrune tests
@pytest.mark.parametrize("layers,keep,ttv_only", [
    ((1, 2, 3), (0.875, 0.625, 0.125), False),
    ((1, 3), (0.7, 0.3), False),  # floor: 11 and 4 of 16 (rounding would give 11 and 5)
    ((2,), (0.5,), True),
])
@pytest.mark.parametrize("positions", ["auto", "keep"])
def test_transprune_matches_the_release_on_a_tiny_llava(layers, keep, ttv_only, positions):
    model = tiny_llava()
    inputs = batch("llava", model, [1])
    expected, ref_logits, caches, decode_pos = transprune_reference(model, inputs, list(layers), list(keep),
                                                                    iga=not ttv_only, renumber=positions == "auto")
    options = dict(layers=layers, keep=keep, ttv_only=ttv_only, positions=positions)
    kept, logits, _, _ = _pruned(model, inputs, "transprune", **options)
    assert kept == expected
    assert [len(v) for v in kept.values()] == [int(16 * k) for k in keep]
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()
    token = int(ref_logits.argmax())
    ref_next = decode_reference(model, caches, token, decode_pos)
    next_logits = _decoded(model, inputs, token, "transprune", **options)
    assert torch.allclose(next_logits, ref_next, atol=LOGITS_ATOL), (next_logits - ref_next).abs().max()


def test_transprune_iga_is_the_instruction_attention_of_the_layer_the_tokens_enter():
    """IGA from HF's own eager attention weights of the unpruned model (each stage here is the first, so
    the layer's input is the one the stage sees): rows of the tokens after the image, mean over heads and
    those rows. A stage at layer 0 has no TTV, so it ranks by this IGA alone; a stage at layer 2 ranks by
    TTV(layer 1) / sum + IGA(layer 2) / sum (the release's accumulating span for a stage at 2 is [2],
    i.e. ``layer_idx`` 1)."""
    model = tiny_llava()
    inputs = batch("llava", model, [1])
    ids = inputs["input_ids"][0]
    vis = (ids == IMAGE).nonzero().squeeze(1)
    lm = _language_model(model)
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tap(key):
        def hook(module, args, kwargs, output):
            before = args[0] if args else kwargs["hidden_states"]
            captured[key] = (before[0], (output[0] if isinstance(output, tuple) else output)[0])
        return hook

    handles = [getattr(lm.layers[1], part).register_forward_hook(tap(part), with_kwargs=True) for part in ("self_attn", "mlp")]
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        for h in handles:
            h.remove()
    text = torch.arange(ids.numel()) > int(vis[-1])

    def iga(layer: int) -> torch.Tensor:
        return attentions[layer][0].mean(0)[text][:, vis].mean(0)

    for keep, k in ((0.25, 4), (0.5, 8)):
        kept, _, _, _ = _pruned(model, inputs, "transprune", layers=(0,), keep=(keep,))
        assert kept["prefill:0"] == sorted(vis[iga(0).topk(k).indices].tolist())
    ttv = sum(_transf_weight(*captured[part]) for part in captured)[vis]
    score = ttv / ttv.sum() + iga(2) / iga(2).sum()
    for keep, k in ((0.25, 4), (0.5, 8), (0.75, 12)):
        kept, _, _, _ = _pruned(model, inputs, "transprune", layers=(2,), keep=(keep,))
        assert kept["prefill:2"] == sorted(vis[score.topk(k).indices].tolist())


def test_transprune_published_stages_mean_what_the_release_means():
    """32 layers: prune before 0-based layers 7, 9, 12 (the release's [7, 9, 12] via rank_layer =
    layer_idx + 1), TTV accumulated over layers 6..11 (its accumulating list [7..12], read the same way)."""
    from tokensieve.methods import TransPrune

    method = TransPrune()
    method.bind(32)
    assert method.layers == (7, 9, 12)
    assert [(p.before, p.attention_layer) for p in method.points()] == [(7, 7), (9, 9), (12, 12)]
    assert method.transition_layers() == list(range(6, 12))
    n_in, _ = method.visual_schedule(32, 576)
    assert n_in[6:8] == [576, 504] and n_in[9] == 360 and n_in[11:13] == [360, 72]


def test_transprune_matches_the_release_on_the_shipped_model():
    from tokensieve.tiny import build_inputs

    model, processor = shipped()
    _, _, _, run = _pruned(model, build_inputs(processor, shipped_items()[:1]), "transprune")
    layers = list(run.method.layers)
    assert layers == [2, 3, 4]  # the published 7, 9, 12 of 32, moved to 8 layers
    for example in shipped_items():
        inputs = build_inputs(processor, [example])
        expected, ref_logits, _, _ = transprune_reference(model, inputs, layers, [0.875, 0.625, 0.125])
        kept, logits, _, _ = _pruned(model, inputs, "transprune")
        assert kept == expected
        assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL)


def test_stage_layers_are_checked_in_the_releases_terms():
    """PDrop's stages must increase (the release's stage index is the list position); a TransPrune stage
    at layer 0 is allowed (IGA alone) but not with ``ttv_only``: no layer runs before it; a stage at the
    last layer is allowed (the release's ``rank_layer`` reaches ``num_layers - 1``)."""
    from tokensieve.methods import PDrop, TransPrune

    with pytest.raises(ValueError, match="increase"):
        PDrop(layers=(2, 1)).bind(4)
    with pytest.raises(ValueError, match="ttv_only"):
        TransPrune(layers=(0, 1), keep=(0.5, 0.25), ttv_only=True).bind(4)
    TransPrune(layers=(0, 3), keep=(0.5, 0.25)).bind(4)
    method = TransPrune(layers=(3,), keep=(0.5,))
    method.bind(4)
    assert method.transition_layers() == [2]

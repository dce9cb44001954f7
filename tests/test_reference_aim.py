"""AIM against references written in this file from the authors' release, LaVi-Lab/AIM at edc24e9.

Merge: ``llava/model/token_merge.py`` ``bipartite_soft_matching_merge`` applied as
``llava/model/llava_arch.py`` ``LlavaMetaForCausalLM.get_2dPool`` applies it (l.193-195: ``r = N // 2``
then ``N // 4``, every frame of the batch on its own), the merged tokens replacing the image in the
prompt, positions ``0 .. L-1`` (``prepare_inputs_labels_for_multimodal``, l.531).
Prune: ``other_packages/transformers/src/transformers/models/qwen2/modeling_qwen2.py``, ``get_importance``
(l.61), ``Qwen2Attention.forward`` (l.357-363) and ``Qwen2Model.forward`` (l.934-1020), written as an
explicit loop over the decoder layers of a LLaVA model (eager, batch 1, no padding), the layers run
from their parts as in ``tests/test_reference_pdrop_transprune.py``.

The prefill reference masks pruned tokens as the release does (they stay as query rows). With
``leave=True`` it differs in the one point tokensieve differs: PageRank runs on the tokens still
visible only (pruned tokens have left), started uniformly on them. tokensieve must equal that variant
exactly; against the release itself the first pruning layer must be equal and later ones close
(stated per test).

Nothing here calls tokensieve's own helpers: only ``tokensieve.prune`` is run and its report and
logits read.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_models import shipped, shipped_items, tiny_llava
from tiny_models import IMAGE, batch, build
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import tokensieve

FEATURE_ATOL = 1e-6  # fp32: the same merge arithmetic on the same projected tokens
LOGITS_ATOL = 1e-4  # fp32: the same layers on the same rows, in another grouping of the matmuls


# ---------------------------------------------------------------------------------------------- common parts
def _lm(model):
    return model.model.language_model


def _forward(model, inputs, method: str | None = None, **options):
    """``(B, T', d)`` the rows decoder layer 0 runs on (its input norm's input), ``(B, vocab)`` last-token
    logits and the run (None unpruned) of ``model`` on ``inputs`` under ``tokensieve.prune(model, method,
    **options)``."""
    seen = []
    hook = _lm(model).layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            if method is None:
                logits, run = model(**inputs).logits[:, -1], None
            else:
                with tokensieve.prune(model, method, **options) as run:
                    logits = model(**inputs).logits[:, -1]
    finally:
        hook.remove()
    return seen[0], logits, run


def _image_positions(ids: torch.Tensor, image_token: int, per_image: int) -> list[torch.Tensor]:
    """Per image, the ``(per_image,)`` positions of its tokens in ``ids`` (``(T,)``)."""
    vis = (ids == image_token).nonzero().squeeze(1)
    assert vis.numel() % per_image == 0
    return list(vis.view(-1, per_image))


def _llm(model, sequence: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Last-token logits of the unpruned LLM on ``sequence`` (``(L, d)``), at ``positions`` (default
    ``0 .. L-1``: the release's contiguous positions)."""
    positions = torch.arange(sequence.shape[0]) if positions is None else positions
    with torch.no_grad():
        out = _lm(model)(inputs_embeds=sequence[None], position_ids=positions[None])
        return model.lm_head(out.last_hidden_state[:, -1])[0]


# ---------------------------------------------------------------------------------------------- merge reference
def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``(F, k, d)`` rows ``index`` (``(F, k)``) of each frame of ``tokens`` (``(F, t, d)``)."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def release_merge(frames: torch.Tensor, removals: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``bipartite_soft_matching_merge(metric=x, r, x)`` (``llava/model/token_merge.py``), once per entry
    of ``removals``, as ``get_2dPool`` (``llava/model/llava_arch.py`` l.193-195) calls it on a batch of
    frames ``(F, N, d)`` (the metric is the current tokens themselves).

    One call: ``r = min(r, t // 2)``; metric L2-normalised; ``a`` the even, ``b`` the odd tokens; scores
    ``a @ b^T``; each ``a`` token's best ``b`` (``max``); ``a`` tokens ranked by that score (``argsort``
    descending); the first ``r`` are scatter-``"mean"``-reduced into their ``b`` tokens (the ``b`` token
    itself counts); output ``cat([a tokens not merged, in ranked order, all b tokens])``.

    Returns ``(F, k, d)`` merged tokens and ``(F, k)`` the frame index of the token each stands on
    (the unmerged ``a`` token, or the ``b`` token), both in the release's order.
    """
    tokens = frames
    frames_n, n, dim = frames.shape
    origin = torch.arange(n).expand(frames_n, n)
    for r in removals:
        r = min(r, tokens.shape[1] // 2)
        if r <= 0:
            break  # the release returns None here
        unit = tokens / tokens.norm(dim=-1, keepdim=True)
        similarity = unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)  # (F, sources, destinations)
        best, partner = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)  # sources, most similar first
        merging, staying = order[:, :r], order[:, r:]
        evens, odds = tokens[:, 0::2], tokens[:, 1::2]
        into = partner.gather(1, merging)
        odds = odds.scatter_reduce(1, into[..., None].expand(-1, -1, dim), _take(evens, merging), reduce="mean")
        tokens = torch.cat([_take(evens, staying), odds], dim=1)
        origin = torch.cat([origin[:, 0::2].gather(1, staying), origin[:, 1::2]], dim=1)
    return tokens, origin


def release_sequence(model, ids: torch.Tensor, rows: torch.Tensor, removals: list[int], per_image: int):
    """The release's LLM input for one unpadded sample: ``rows`` (``(T, d)``, the unpruned LLM input of
    ``ids``) with each image's ``per_image`` tokens replaced by :func:`release_merge` of them.

    Returns the ``(L, d)`` sequence, ``(L,)`` each row's original position (for merged tokens: the row
    tokensieve carries it on, the image's ``j``-th surviving position for its ``j``-th token) and the
    surviving positions of all images (ascending): what ``visual_kept["encoder:0"]`` must name.
    """
    images = _image_positions(ids, model.config.image_token_id, per_image)
    merged, origin = release_merge(torch.stack([rows[p] for p in images]), removals)
    parts, where, survivors, cursor = [], [], [], 0
    for i, positions in enumerate(images):
        first = int(positions[0])
        parts.append(rows[cursor:first])
        where.append(torch.arange(cursor, first))
        carriers = positions[origin[i]].sort().values
        parts.append(merged[i])
        where.append(carriers)
        survivors += carriers.tolist()
        cursor = int(positions[-1]) + 1
    parts.append(rows[cursor:])
    where.append(torch.arange(cursor, rows.shape[0]))
    return torch.cat(parts), torch.cat(where), survivors


# ---------------------------------------------------------------------------------------------- prune reference
def release_importance(attention_score: torch.Tensor) -> torch.Tensor:
    """``get_importance`` (``modeling_qwen2.py`` l.61-78): ``(1, H, N, N)`` attention logits with the
    mask added -> ``(1, N)``: softmax of logits / 0.1, ``dist = 1/N`` on every token, five steps
    ``(dist @ M) * (1 - d) + d / N`` with ``d = 0``, root mean square over heads."""
    _, heads, n, _ = attention_score.shape
    m = torch.softmax(attention_score / 0.1, dim=-1, dtype=torch.float32)
    dist = torch.ones(1, heads, 1, n) / n
    for _ in range(5):
        dist = dist @ m
    return dist.pow(2).mean(1).sqrt().view(1, n)


def _logits_and_layer(layer, x: torch.Tensor, rope, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, H, T, T)`` the layer's attention logits with ``mask`` added, as ``Qwen2Attention.forward``
    hands them to ``get_importance`` (``q k^T / sqrt(head_dim) + causal_mask``, float32), and the
    layer's output ``(T, d)`` (input norm, attention, residual, post-attention norm, MLP, residual)."""
    attn = layer.self_attn
    normed = layer.input_layernorm(x[None])
    t = x.shape[0]
    q = attn.q_proj(normed).view(1, t, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, t, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rope)
    k = repeat_kv(k, attn.num_key_value_groups)
    scores = torch.matmul(q.float(), k.float().transpose(2, 3)) / math.sqrt(attn.head_dim) + mask
    h = x[None] + attn(hidden_states=normed, position_embeddings=rope, attention_mask=mask)[0]
    out = h + layer.mlp(layer.post_attention_layernorm(h))
    return scores, out[0]


def release_prefill(model, sequence: torch.Tensor, first: int, count: int, start: int, step: float,
                    leave: bool = False) -> tuple[dict[str, list[int]], torch.Tensor]:
    """The release's prefill with token pruning (``Qwen2Model.forward`` l.934-1020), batch 1.

    ``sequence`` ``(T, d)`` is the LLM input with its ``count`` visual tokens at ``first ..``
    (``boundaries = [first, first + count, T]``: the other tokens are protected); positions ``0 .. T-1``.
    ``retain_rate[l] = max(0, 1 - (l - start + 1) * step)`` for ``l >= start``, else 1 (the release:
    ``start=14, step=0.125``). After each layer ``l``: importance from that layer's logits (masked
    tokens set to -1, protected ones to 1), sorted descending, the first ``int(count * rate + P)`` stay
    visible; the attention mask of every later layer hides the others as keys (they stay as queries).
    ``leave``: PageRank on the visible rows and columns only (tokensieve's rule).

    Returns per layer whose ranking left visual tokens to rank, ``"prefill:<l+1>"`` -> the visible visual
    tokens after it (indices ``0 .. count-1`` in the merged order), and the last token's logits.
    """
    lm = _lm(model)
    t = sequence.shape[0]
    rope = lm.rotary_emb(sequence[None], torch.arange(t)[None])
    protected = torch.ones(t, dtype=torch.bool)
    protected[first:first + count] = False
    n_protected = int(protected.sum())
    visible = torch.ones(t, dtype=torch.bool)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    kept: dict[str, list[int]] = {}
    x = sequence
    with torch.no_grad():
        for l, layer in enumerate(lm.layers):
            allowed = causal & visible[None, :]
            mask = torch.zeros(t, t).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            scores, x = _logits_and_layer(layer, x, rope, mask)
            if leave:
                rows = visible.nonzero().squeeze(1)
                importance = torch.full((1, t), -1.0)
                importance[0, rows] = release_importance(scores[:, :, rows][:, :, :, rows])[0]
            else:
                importance = release_importance(scores)
            rate = max(0.0, 1.0 - (l - start + 1) * step) if l >= start else 1.0
            importance[0, ~visible] = -1.0
            importance[0, protected] = 1.0
            inds = importance.sort(dim=-1, descending=True).indices
            keep_num = int((t - n_protected) * rate + n_protected)
            ranked = bool((visible & ~protected).any()) and l >= start and l + 1 < len(lm.layers)
            visible = torch.zeros(t, dtype=torch.bool)
            visible[inds[0, :keep_num]] = True
            if ranked:
                kept[f"prefill:{l + 1}"] = ((visible & ~protected).nonzero().squeeze(1) - first).tolist()
        return kept, model.lm_head(lm.norm(x[-1]))


def _prefill_kept(run) -> dict[str, list[int]]:
    """The first sample's kept visual positions after each pruning layer, from the report."""
    return {k: v for k, v in run.report.samples[0].visual_kept.items() if k.startswith("prefill:")}


def _as_positions(kept: dict[str, list[int]], carriers: list[int]) -> dict[str, list[int]]:
    """Reference kept indices (merged order) -> the original positions tokensieve carries them on."""
    return {k: [carriers[j] for j in v] for k, v in kept.items()}


def _overlap(a: list[int], b: list[int]) -> float:
    """Share of ``a`` also in ``b`` (1 for two empty sets)."""
    return len(set(a) & set(b)) / len(a) if a else float(not b)


# ---------------------------------------------------------------------------------------------- merge tests
@pytest.mark.parametrize("merge_keep,removals", [(0.25, [8, 4]), (0.375, [8, 2]), (0.125, [8, 4, 2])])
def test_merge_feeds_the_release_sequence_image_by_image(merge_keep, removals):
    """A padded batch of a 1-image and a 2-image sample (16 tokens an image), no pruning in the LLM
    (``start=stop=3`` of 4 layers): each image is merged on its own by the release's rounds (``N // 2``,
    ``N // 4``, ``N // 8``; 0.375: ``N // 2`` then a partial round of 2, which leaves sources unmerged
    and so reorders the tokens), so each keeps ``16 - sum(removals)`` tokens; ``visual_kept`` names the
    surviving tokens; the LLM's input rows equal the release's sequence to 1e-6 and the logits equal the
    unpruned LLM on that shorter sequence at positions ``0 .. L-1`` to 1e-4 (``positions="auto"``
    renumbers on LLaVA)."""
    model = tiny_llava()
    inputs = batch("llava", model, [1, 2])
    plain, _, _ = _forward(model, inputs)
    rows, logits, run = _forward(model, inputs, "aim", merge_keep=merge_keep, start=3, stop=3)
    assert run.report.positions == "renumber"
    for b in range(2):
        real = inputs["attention_mask"][b].bool()
        sequence, _, survivors = release_sequence(model, inputs["input_ids"][b][real], plain[b][real], removals, 16)
        s = run.report.samples[b]
        assert s.visual_lengths == [(16 - sum(removals)) * (b + 1)] * 4
        assert s.visual_kept["encoder:0"] == [p + int((~real).sum()) for p in survivors]
        got = rows[b, -sequence.shape[0]:]
        assert torch.allclose(got, sequence, atol=FEATURE_ATOL), (got - sequence).abs().max()
        assert torch.allclose(logits[b], _llm(model, sequence), atol=LOGITS_ATOL)


def test_positions_keep_and_rows_order_place_the_merged_tokens_as_stated():
    """One sample with two images, ``merge_keep=0.375`` (rounds of 8 and 2, so the release's order is
    not the row order): ``positions="keep"`` feeds the release's sequence at the carrying
    rows' original positions (logits of the LLM on it at those positions, 1e-4); ``order="rows"`` puts
    each merged token on the row of the token it grew from (a destination or an unmerged source), so the
    rows differ from the release's order (which is not sorted by origin); on Qwen2-VL "auto" keeps the
    positions."""
    model = tiny_llava()
    inputs = batch("llava", model, [2])
    ids = inputs["input_ids"][0]
    plain, _, _ = _forward(model, inputs)
    sequence, where, survivors = release_sequence(model, ids, plain[0], [8, 2], 16)
    _, logits, run = _forward(model, inputs, "aim", merge_keep=0.375, start=3, stop=3, positions="keep")
    assert run.report.positions == "keep"
    assert torch.allclose(logits[0], _llm(model, sequence, where), atol=LOGITS_ATOL)
    assert not torch.allclose(logits[0], _llm(model, sequence), atol=LOGITS_ATOL)

    rows, logits, run = _forward(model, inputs, "aim", merge_keep=0.375, start=3, stop=3, order="rows")
    images = _image_positions(ids, IMAGE, 16)
    merged, origin = release_merge(torch.stack([plain[0][p] for p in images]), [8, 2])
    assert run.report.samples[0].visual_kept["encoder:0"] == survivors
    for i, positions in enumerate(images):
        for j in range(merged.shape[1]):
            row = int((where == positions[origin[i, j]]).nonzero())
            assert torch.allclose(rows[0, row], merged[i, j], atol=FEATURE_ATOL)
    assert any(bool((o.diff() < 0).any()) for o in origin)
    qwen = build("qwen2-vl")
    with torch.no_grad(), tokensieve.prune(qwen, "aim", start=3, stop=3) as run:
        qwen(**batch("qwen2-vl", qwen, [1]))
    assert run.report.positions == "keep"


# ---------------------------------------------------------------------------------------------- prune tests
@pytest.mark.parametrize("merge_keep,removals,start,stop,step", [
    (0.25, [8, 4], 0, 3, 0.25),   # 4 merged tokens: 3, 2, 1 stay after layers 0, 1, 2
    (0.5, [8], 1, 2, 0.5),        # 8: 4 after layer 1, none after layer 2
    (1.0, [], 0, 3, 0.25),        # no merging, 16: 12, 8, 4
])
def test_prefill_matches_the_release_on_a_tiny_llava(merge_keep, removals, start, stop, step):
    """Kept sets at every pruning layer equal the reference with ``leave=True`` exactly, last-token
    logits to 1e-4, kept counts are the release's floors; on these inputs the release itself (masked
    rows in PageRank) keeps the same tokens at every layer too (measured; the shipped model below shows
    where it does not)."""
    model = tiny_llava()
    inputs = batch("llava", model, [1])
    ids = inputs["input_ids"][0]
    plain, _, _ = _forward(model, inputs)
    sequence, where, _ = release_sequence(model, ids, plain[0], removals, 16)
    first, count = int(ids.tolist().index(IMAGE)), 16 - sum(removals)
    carriers = where[first:first + count].tolist()
    _, logits, run = _forward(model, inputs, "aim", merge_keep=merge_keep, start=start, stop=stop)
    kept = _prefill_kept(run)
    expected, ref_logits = release_prefill(model, sequence, first, count, start, step, leave=True)
    assert kept == _as_positions(expected, carriers)
    assert [len(v) for v in kept.values()] == [int(count * (1 - (l - start + 1) * step)) for l in range(start, stop + 1) if l < 3]
    assert torch.allclose(logits[0], ref_logits, atol=LOGITS_ATOL), (logits[0] - ref_logits).abs().max()
    release, _ = release_prefill(model, sequence, first, count, start, step)
    release = _as_positions(release, carriers)
    assert kept == release


def test_schedule_floors_the_release_retain_rate():
    """28 layers, 169 tokens a frame (a pooled 13 x 13 grid): 43 stay after merging (169 - 84 - 42;
    ``round(0.25 * 169)`` would be 42), then the release's ``int(43 * retain_rate[l])``
    (``modeling_qwen2.py`` l.936) enter layer ``l + 1``: 37 after layer 14 (rounding would give 38), ...,
    none from layer 22. 32 layers: the LLaVA-1.5 script's ``retain_rate`` (``modeling_llama.py`` l.703)."""
    method = tokensieve.methods.AIM()
    method.bind(28)
    assert (method.start, method.stop) == (14, 21)
    n_in, _ = method.visual_schedule(28, 169)
    retain_rate = [max(0, 1.0 - (l - 14 + 1) * 0.125) if l >= 14 else 1.0 for l in range(28)]
    assert n_in == [43] + [int(43 * retain_rate[l]) for l in range(27)]
    assert n_in[15] == 37 and n_in[22:] == [0] * 6
    method = tokensieve.methods.AIM()  # LLaVA-1.5-7B: its script prunes after layers 13..20 of 32
    method.bind(32)
    assert (method.start, method.stop) == (13, 20)
    n_in, _ = method.visual_schedule(32, 576)
    retain_rate = [max(0, 1.0 - (l - 13 + 1) * 0.125) if l >= 13 else 1.0 for l in range(32)]
    assert n_in == [144] + [int(144 * retain_rate[l]) for l in range(31)]


@pytest.mark.parametrize("options,removals,start,step,counts,min_overlap,logit_gap", [
    # defaults: 144 tokens, 72 then 36 merged away; pruning after layers 4, 5, 6 of 8 (the release's
    # 14..21 of 28, scaled); measured against the release: 11 or 12 of 12 at the second stage,
    # logits within 0.134
    ({}, [72, 36], 4, 1 / 3, [24, 12, 0], 0.9, 0.2),
    # one round (72 kept), seven pruning layers 0..6 (1/8 of 72 less each): the masked rows the
    # release keeps weigh more; measured: >= 6 of 9 at the last stage, logits within 1.38
    ({"merge_keep": 0.5, "start": 0, "stop": 7}, [72], 0, 0.125, [63, 54, 45, 36, 27, 18, 9], 0.6, 2.0),
])
def test_matches_the_release_on_the_shipped_model(options, removals, start, step, counts, min_overlap, logit_gap):
    """The shipped model, every task's first test item: ``visual_kept["encoder:0"]`` is the release's
    survivors, the LLM input is its sequence (1e-6), every pruning layer keeps exactly the reference's
    tokens with ``leave=True`` and the logits match to 1e-4. Against the release itself (masked rows in
    PageRank) the first pruning layer is equal, each later one shares at least ``min_overlap`` of its
    tokens, the logits differ by less than ``logit_gap`` and the top token is the same."""
    from tokensieve.tiny import build_inputs

    model, processor = shipped()
    token = model.config.image_token_id
    count = 144 - sum(removals)
    for example in shipped_items():
        inputs = build_inputs(processor, [example])
        ids = inputs["input_ids"][0]
        plain, _, _ = _forward(model, inputs)
        rows, logits, run = _forward(model, inputs, "aim", **options)
        sequence, where, survivors = release_sequence(model, ids, plain[0], removals, 144)
        first = int((ids == token).nonzero()[0])
        carriers = where[first:first + count].tolist()
        assert run.report.samples[0].visual_kept["encoder:0"] == survivors
        assert torch.allclose(rows[0], sequence, atol=FEATURE_ATOL), (rows[0] - sequence).abs().max()
        expected, ref_logits = release_prefill(model, sequence, first, count, start, step, leave=True)
        kept = _prefill_kept(run)
        assert kept == _as_positions(expected, carriers)
        assert [len(v) for v in kept.values()] == counts
        assert torch.allclose(logits[0], ref_logits, atol=LOGITS_ATOL), (logits[0] - ref_logits).abs().max()
        release, release_logits = release_prefill(model, sequence, first, count, start, step)
        release = _as_positions(release, carriers)
        stages = list(kept)
        assert kept[stages[0]] == release[stages[0]]
        assert all(_overlap(kept[k], release[k]) >= min_overlap for k in stages), {k: _overlap(kept[k], release[k]) for k in stages}
        assert (logits[0] - release_logits).abs().max() < logit_gap
        assert int(logits[0].argmax()) == int(release_logits.argmax())

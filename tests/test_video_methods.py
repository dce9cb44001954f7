"""The video methods (EVS, uniform frame subsampling, METok, DivPrune, FastV, FitPrune) on a LLaVA-NeXT-Video
model, against references written in this file from the authors' code.

* EVS: vllm-project/vllm at 094f117, ``vllm/multimodal/evs.py`` (``compute_retained_tokens_count``,
  ``compute_retention_mask``).
* Uniform frames: ``np.linspace(0, total - 1, n, dtype=int)``, the frame sampling of LLaVA-NeXT's
  ``playground/demo/video_demo.py`` and lmms-eval's video loaders.
* METok: mnyuew/METok at b5abde1: stage 1 from ``llava/model/llava_arch.py`` (``segment_shots``,
  ``process_events``, the ``outside_compression`` branch of ``prepare_inputs_labels_for_multimodal``),
  stages 2 and 3 from ``llava/model/language_model/modeling_qwen2.py`` (``Qwen2Model.forward``: the
  ``inside_compression`` pruning at ``pruning_layers``, the cache re-indexing after the prefill). Where
  the release cannot carry over, the reference makes tokensieve's documented choices, and says so:
  the frame-text similarity against the mean input embedding of the text after the video (the release
  uses a SigLIP dual encoder), strides relative to the model's own frame grid with ``avg_pool2d``'s
  ``ceil_mode`` windows, no event newline token.
* DivPrune per frame and across all frames: the release's selection (``divprune_release`` of the
  DivPrune reference test) run on each frame alone, and on every video token at once.
* FastV and FitPrune on the multi-frame prompt: their release references (``fastv_reference``,
  ``fitprune_reference`` of their reference tests) with the video's tokens as the image span, on the
  random model and on the shipped tiny video model.

The references build the shorter prompt the releases build (stage 1 and the encoder methods: the kept
rows in order, numbered ``0..L-1``), run the decoder from its parts, and compare kept positions, the
LLM's input rows, the last-token logits and, for METok's stage 3, the logits of a decoded token.
Nothing here calls tokensieve's own helpers: only ``tokensieve.prune`` is run and its report read.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_models import causal, decoder_input, last_logits, shipped_video, shipped_video_inputs
from test_reference_divprune_fastervlm import _pruned as encoder_run
from test_reference_divprune_fastervlm import divprune_release
from test_reference_fastv_dart import _pruned as fastv_run
from test_reference_fastv_dart import fastv_reference
from test_reference_vflowopt_fitprune import _fitprune as fitprune_run
from test_reference_vflowopt_fitprune import fitprune_reference
from test_reference_pdrop_transprune import _kv, decode_reference
from tiny_models import TEXT, VIDEO
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
)

import tokensieve
from tokensieve.recipe import Recipe

FRAMES, SIDE = 8, 3
PER_FRAME = SIDE * SIDE
ROWS_ATOL = 1e-5
LOGITS_ATOL = 1e-4
_MODEL: dict[str, torch.nn.Module] = {}


def video_model() -> torch.nn.Module:
    """A random LLaVA-NeXT-Video: 48 px frames, 6 x 6 patches pooled to 3 x 3, a 4-layer Llama; eager."""
    if "m" not in _MODEL:
        torch.manual_seed(0)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=48, patch_size=8, projection_dim=32)
        cfg = LlavaNextVideoConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_index=60,
                                   video_token_index=VIDEO, image_grid_pinpoints=[[48, 48]], spatial_pool_stride=2,
                                   vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaNextVideoForConditionalGeneration(cfg)
        for c in (model.config, model.config.text_config, model.config.vision_config):
            c._attn_implementation = "eager"
        with torch.no_grad():  # sharper attention rows, so that rankings depend on content
            for layer in model.model.language_model.layers:
                layer.self_attn.q_proj.weight.mul_(4.0)
                layer.self_attn.k_proj.weight.mul_(4.0)
        _MODEL["m"] = model.eval()
    return _MODEL["m"]


def video_inputs(seed: int, groups: tuple[int, ...] = (3, 3, 2), suffix: int = 5) -> dict:
    """Batch-1 input: a video of ``FRAMES`` frames in ``groups`` of near-identical frames (scenes), text
    before and ``suffix`` tokens after it."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for size in groups:
        scene = torch.randn(3, 48, 48, generator=gen)
        frames += [scene + 0.05 * torch.randn(3, 48, 48, generator=gen) for _ in range(size)]
    ids = [1, 5, 6, 7] + [VIDEO] * (FRAMES * PER_FRAME) + torch.randint(8, 50, (suffix,), generator=gen).tolist()
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values_videos": torch.stack(frames)[None]}


def _span(inputs) -> torch.Tensor:
    return (inputs["input_ids"][0] == VIDEO).nonzero().squeeze(1)


def _release_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The LLM on a shorter sequence numbered ``0..L-1``; last-token logits."""
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=sequence[None], position_ids=torch.arange(sequence.shape[0])[None])
        return model.lm_head(out.last_hidden_state[0, -1])


def _pruned(model, inputs, method: str, **options):
    """tokensieve's report, the LLM's input rows and the last-token logits (the DivPrune test's run)."""
    _, rows, logits, run = encoder_run(model, inputs, method, **options)
    return run.report.samples[0], rows, logits


def _check_encoder(model, inputs, kept_expected: list[int], method: str, **options) -> None:
    """tokensieve's kept positions, rows and logits against a release that drops the other video rows."""
    x = decoder_input(model, inputs)
    drop = torch.zeros(x.shape[0], dtype=torch.bool)
    drop[_span(inputs)] = True
    drop[kept_expected] = False
    sequence = x[~drop]
    sample, rows, logits = _pruned(model, inputs, method, **options)
    assert sample.visual_kept["encoder:0"] == kept_expected
    assert rows.shape == sequence.shape and torch.allclose(rows, sequence, atol=ROWS_ATOL)
    assert torch.allclose(logits, _release_logits(model, sequence), atol=LOGITS_ATOL)


# ---------------------------------------------------------------------------------------------- EVS
def evs_release(video_embeds: torch.Tensor, t: int, h: int, w: int, q: float) -> torch.Tensor:
    """``compute_retention_mask`` with ``spatial_merge_size`` 1: ``(T*h*w, D)`` embeddings in time, row,
    column order -> bool mask. Dissimilarity ``1 - cos`` with the same cell of the previous frame,
    255 for frame 0, one stable descending sort over all frames, the top
    ``compute_retained_tokens_count = max(h*w, int(T*h*w*(1-q)))``."""
    e = video_embeds.reshape(t, h, w, -1)
    similarity = torch.nn.functional.cosine_similarity(e[1:, ...], e[:-1, ...], dim=-1)
    dissimilarity = 1 - similarity
    dissimilarity = torch.cat([255 * torch.ones_like(video_embeds[:h * w]).reshape(1, h, w, -1)[..., 0], dissimilarity])
    dissimilarity = dissimilarity.view(-1)
    retain = max(h * w, int(t * h * w * (1 - q)))
    order = torch.argsort(dissimilarity, dim=-1, descending=True, stable=True)
    mask = torch.zeros_like(dissimilarity, dtype=torch.bool)
    mask[order[:retain]] = True
    return mask


@pytest.mark.parametrize("seed,keep", [(0, 0.5), (1, 0.25), (2, 0.1), (3, 0.8)])
def test_evs_matches_vllm(seed, keep):
    """keep 0.1 of 72: ``int(7.2)`` = 7 is below one frame (9), so frame 0 alone stays."""
    model = video_model()
    inputs = video_inputs(seed)
    span = _span(inputs)
    x = decoder_input(model, inputs)
    mask = evs_release(x[span], FRAMES, SIDE, SIDE, 1 - keep)
    assert int(mask.sum()) == max(PER_FRAME, int(FRAMES * PER_FRAME * keep))
    _check_encoder(model, inputs, span[mask].tolist(), "evs", keep=keep)


def test_evs_keeps_frame_zero_and_needs_a_video():
    model = video_model()
    sample, _, _ = _pruned(model, video_inputs(4), "evs", keep=0.2)
    assert set(_span(video_inputs(4))[:PER_FRAME].tolist()) <= set(sample.visual_kept["encoder:0"])
    from tiny_models import build

    with pytest.raises(TypeError, match="frames of a video"):
        with tokensieve.prune(build("llava"), "evs"):
            pass


# ---------------------------------------------------------------------------------------------- uniform frames
@pytest.mark.parametrize("keep,frames", [(0.5, [0, 2, 4, 7]), (0.25, [0, 7]), (0.1, [0]), (1.0, list(range(8)))])
def test_uniform_frames_keep_linspace_frames(keep, frames):
    model = video_model()
    inputs = video_inputs(5)
    span = _span(inputs)
    n = max(1, round(keep * FRAMES))
    expected = sorted(set(np.linspace(0, FRAMES - 1, n, dtype=int).tolist()))
    assert expected == frames
    kept = [int(p) for f in expected for p in span[f * PER_FRAME:(f + 1) * PER_FRAME]]
    _check_encoder(model, inputs, kept, "uniform-frames", keep=keep)


# ---------------------------------------------------------------------------------------------- DivPrune per frame
@pytest.mark.parametrize("keep,per_frame", [(1 / 3, 3), (2 / 3, 6)])
def test_divprune_per_frame_runs_the_release_on_each_frame(keep, per_frame):
    """The kept count ``round(keep * 72)`` splits evenly, ``int(round(keep * 9))`` per frame."""
    model = video_model()
    inputs = video_inputs(6)
    span = _span(inputs)
    x = decoder_input(model, inputs)
    kept = []
    for f in range(FRAMES):
        rows = span[f * PER_FRAME:(f + 1) * PER_FRAME]
        picks = divprune_release(x[rows], keep)
        assert len(picks) == per_frame
        kept += rows[picks].tolist()
    _check_encoder(model, inputs, sorted(kept), "divprune", keep=keep, scope="frame")


@pytest.mark.parametrize("seed,keep", [(6, 1 / 3), (7, 0.5), (8, 0.1)])
def test_divprune_across_frames_runs_the_release_on_the_whole_video(seed, keep):
    """The default ``scope="all"``: the release's selection on every video token of every frame at once."""
    model = video_model()
    inputs = video_inputs(seed)
    span = _span(inputs)
    picks = divprune_release(decoder_input(model, inputs)[span], keep)
    assert len(picks) == round(keep * FRAMES * PER_FRAME)
    _check_encoder(model, inputs, sorted(span[picks].tolist()), "divprune", keep=keep)


# ---------------------------------------------------------------------------------------------- FastV and FitPrune
@pytest.mark.parametrize("seed,layer,keep", [(0, 2, 0.5), (1, 1, 0.25), (2, 3, 0.75)])
def test_fastv_on_the_multi_frame_prompt_is_the_release(seed, layer, keep):
    """The video's tokens are FastV's image span (``SYS_LENGTH`` to ``SYS_LENGTH + IMAGE_TOKEN_LENGTH``):
    the release's rule, unchanged, on a prompt of 8 frames."""
    model = video_model()
    inputs = video_inputs(seed)
    expected, ref_logits = fastv_reference(model, inputs, layer, int(keep * FRAMES * PER_FRAME))
    kept, logits, _ = fastv_run(model, inputs, "fastv", layer=layer, keep=keep)
    assert kept == {f"prefill:{layer}": expected}
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


@pytest.mark.parametrize("score", ["product", "fit"])
@pytest.mark.parametrize("seed,scheme", [(3, {0: 10, 1: 20, 3: 6}), (4, {1: 30, 2: 12})])
def test_fitprune_on_the_multi_frame_prompt_is_the_release(seed, scheme, score):
    model = video_model()
    inputs = video_inputs(seed)
    expected, ref_logits = fitprune_reference(model, inputs, scheme, score)
    recipe = Recipe(removed=scheme, visual_tokens=FRAMES * PER_FRAME, num_layers=4)
    kept, logits = fitprune_run(model, inputs, recipe, score)
    assert kept == expected
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_fastv_and_fitprune_are_the_release_on_the_shipped_video_model():
    """Defaults of FastV (K = 2, rank 288 of 576) and a FitPrune schedule for 576 tokens over 8 layers,
    test item 0 of every video task."""
    model, _ = shipped_video()
    scheme = {0: 40, 1: 120, 2: 100, 3: 30, 4: 40, 6: 12}
    recipe = Recipe(removed=scheme, visual_tokens=576, num_layers=8)
    for inputs in shipped_video_inputs():
        expected, ref_logits = fastv_reference(model, inputs, 2, 288)
        kept, logits, _ = fastv_run(model, inputs, "fastv")
        assert kept == {"prefill:2": expected}
        assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()
        expected, ref_logits = fitprune_reference(model, inputs, scheme)
        kept, logits = fitprune_run(model, inputs, recipe, "product")
        assert kept == expected
        assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


# ---------------------------------------------------------------------------------------------- METok
def segment_shots(similarity_matrix: torch.Tensor, frame_text_sim: torch.Tensor, k: int):
    """The release's ``segment_shots``: the ``k`` lowest adjacent similarities cut the frames into
    events (a tuple ``(first, last)`` or a single frame index), each scored by its frames' maximum
    text similarity."""
    num_frames = similarity_matrix.shape[0]
    entropies = torch.tensor([similarity_matrix[i][i + 1] for i in range(num_frames - 1)])
    top_k_indices = sorted(torch.topk(entropies, k=k, largest=False).indices.tolist())
    segments, frame_text_list, previous_index = [], [], 0
    for index in top_k_indices:
        if previous_index == index:
            segments.append(index)
            frame_text_list.append(frame_text_sim[previous_index:previous_index + 1])
        else:
            segments.append((previous_index, index))
            frame_text_list.append(frame_text_sim[previous_index:index + 1])
        previous_index = index + 1
    if previous_index != num_frames - 1:
        segments.append((previous_index, num_frames - 1))
        frame_text_list.append(frame_text_sim[previous_index:num_frames])
    else:
        segments.append(previous_index)
        frame_text_list.append(frame_text_sim[previous_index:previous_index + 1])
    avg_frame_text = torch.stack([f.max() for f in frame_text_list])
    return segments, frame_text_list, avg_frame_text


def pool_2d(frame: torch.Tensor, stride: int) -> tuple[torch.Tensor, list[int]]:
    """``get_2dPool`` on one ``(SIDE*SIDE, d)`` frame, ``avg_pool2d`` with ``ceil_mode`` windows
    (tokensieve's choice: the whole frame covered); returns the pooled tokens and each one's window's
    top-left token index."""
    if stride == 1:
        return frame, list(range(frame.shape[0]))
    grid = frame.view(SIDE, SIDE, -1).permute(2, 0, 1)[None]
    pooled = F.avg_pool2d(grid, stride, ceil_mode=True)[0].permute(1, 2, 0)
    anchors = [r * SIDE + c for r in range(0, SIDE, stride) for c in range(0, SIDE, stride)]
    return pooled.reshape(-1, frame.shape[-1]), anchors


def metok_stage1(model, inputs, key_events: int = 3, key_frames: int = 6, events: int = 5, strides=(1, 2, 4)):
    """The ``outside_compression`` branch: per event (key or not) ``process_events`` pools each frame.
    Returns the stage-1 sequence, each row's original position, the events' token counts and the key
    events."""
    x = decoder_input(model, inputs)
    span = _span(inputs)
    image_feat = x[span].view(FRAMES, PER_FRAME, -1)
    text = x[int(span[-1]) + 1:].mean(0)
    image_feat_flat = image_feat.mean(dim=1)
    similarity = F.cosine_similarity(image_feat_flat.unsqueeze(1), image_feat_flat.unsqueeze(0), dim=-1)
    frame_text_sim = F.cosine_similarity(image_feat_flat, text[None], dim=-1)
    segments, frame_text_list, avg_frame_text = segment_shots(similarity, frame_text_sim, events - 1)
    sorted_indices = torch.sort(avg_frame_text, descending=True).indices
    rows, origin, event_len, key_idx = [], [], [], []
    for event_idx, segment in enumerate(segments):
        first, last = segment if isinstance(segment, tuple) else (segment, segment)
        key = event_idx in sorted_indices[:key_events].tolist()
        if key:
            key_idx.append(event_idx)
        s1, s2 = (strides[0], strides[1]) if key else (strides[1], strides[2])
        scores = frame_text_list[event_idx]
        top = scores.argsort(descending=True)[:key_frames].tolist() if last > first else [0]
        count = 0
        for i, f in enumerate(range(first, last + 1)):
            pooled, anchors = pool_2d(image_feat[f], s1 if i in top else s2)
            rows.append(pooled)
            origin += [int(span[f * PER_FRAME + a]) for a in anchors]
            count += pooled.shape[0]
        event_len.append(count)
    start, end = int(span[0]), int(span[-1]) + 1
    sequence = torch.cat([x[:start], *rows, x[end:]])
    origin = list(range(start)) + origin + list(range(end, x.shape[0]))
    return sequence, torch.tensor(origin), event_len, key_idx


def _layer(model, layer, x: torch.Tensor, pos: torch.Tensor):
    """One decoder layer from its parts at rotary positions ``pos``; its output and attention ``(H, n, n)``."""
    rotary = model.model.language_model.rotary_emb(x[None], pos[None])
    attn_out, weights = layer.self_attn(hidden_states=layer.input_layernorm(x[None]), position_embeddings=rotary,
                                        attention_mask=causal(x.shape[0], x.dtype))
    h = x[None] + attn_out
    return (h + layer.mlp(layer.post_attention_layernorm(h)))[0], weights[0].float()


def metok_reference(model, inputs, pruning_layers: list[int], ratio: float, parts=(1, 2, 3), **stage1):
    """Stage 1 (or, without it, the events alone: every frame at stride 1), then the ``inside_compression``
    loop: at each pruning layer, ``vt_attn_score`` = the previous layer's attention from every row
    after the video to the rows up to its end, mean over those rows then over heads; per event
    ``topk`` of ``keep_count`` (key: ``max(1, ceil(ratio * len))``, 0 at the last pruning layer; other:
    ``max(1, ceil(ratio * len / 2))`` at the first, 0 later); rows kept with their positions. Stage 3:
    the caches of layers from ``pruning_layers[0]`` on hold the rows alive after the last pruning
    layer. Returns kept original positions per stage, last-token logits, the caches, the decode position."""
    if 1 not in parts:
        stage1 = dict(stage1, strides=(1, 1, 1))
    x, origin, event_len, key_idx = metok_stage1(model, inputs, **stage1)
    visual_idx = int(_span(inputs)[0])
    kept = {"encoder:0": origin[visual_idx:visual_idx + sum(event_len)].tolist()}
    pos = torch.arange(x.shape[0])
    layers = model.model.language_model.layers
    caches, probs = [], None
    with torch.no_grad():
        for layer_idx, layer in enumerate(layers):
            if 2 in parts and layer_idx in pruning_layers:
                visual_len, seq_len = sum(event_len), x.shape[0]
                vt = probs[:, visual_idx + visual_len:seq_len, :visual_idx + visual_len].mean(dim=1).mean(dim=0)
                keep_visual, start_idx, pruned = [], visual_idx, []
                for idx, length in enumerate(event_len):
                    end_idx = start_idx + length
                    if idx in key_idx:
                        keep_count = 0 if layer_idx == pruning_layers[-1] else max(1, math.ceil(ratio * length))
                    else:
                        keep_count = max(1, math.ceil(ratio * length / 2)) if layer_idx == pruning_layers[0] else 0
                    if keep_count > 0:
                        keep_visual.append(torch.topk(vt[start_idx:end_idx], keep_count, sorted=False).indices + start_idx)
                    pruned.append(keep_count)
                    start_idx = end_idx
                keep = torch.cat([torch.arange(visual_idx), *keep_visual,
                                  torch.arange(visual_idx + visual_len, seq_len)]).sort().values
                x, pos, origin, event_len = x[keep], pos[keep], origin[keep], pruned
                kept[f"prefill:{layer_idx}"] = origin[visual_idx:visual_idx + sum(event_len)].tolist()
            caches.append((_kv(model, layer, x, pos), origin.clone()))
            x, probs = _layer(model, layer, x, pos)
        logits = last_logits(model, x)
    visual = set(_span(inputs).tolist())
    out = []
    for layer_idx, ((k, v), rows) in enumerate(caches):
        if 3 in parts and layer_idx >= pruning_layers[0]:
            text = torch.tensor([int(r) not in visual for r in rows])
            k, v = k[:, text], v[:, text]
        out.append((k, v))
    return kept, logits, out, int(pos.max()) + 1


def _decoded(model, inputs, token: int, method: str, **options) -> torch.Tensor:
    """Logits of one forced decoded ``token`` after the pruned prefill, in one prune() context."""
    from transformers import DynamicCache

    cache = DynamicCache()
    keyword = tokensieve.compat.cache_keyword(type(model).forward)
    with torch.no_grad(), tokensieve.prune(model, method, **options):
        model(**inputs, use_cache=True, **{keyword: cache})
        mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
        return model(input_ids=torch.tensor([[token]]), attention_mask=mask, use_cache=True,
                     **{keyword: cache}).logits[0, -1]


@pytest.mark.parametrize("seed,layers,ratio,counts", [
    (0, (1, 2, 3), 0.76, {}),
    (1, (1, 3), 0.5, {"key_events": 2, "key_frames": 1}),
    (2, (2, 3), 0.9, {"events": 3, "key_events": 1, "key_frames": 2}),
])
def test_metok_matches_the_release(seed, layers, ratio, counts):
    model = video_model()
    inputs = video_inputs(seed)
    kept, logits, caches, decode_at = metok_reference(model, inputs, list(layers), ratio, **counts)
    options = dict(layers=layers, ratio=ratio, **counts)
    sample, _, ours = _pruned(model, inputs, "metok", **options)
    assert {k: v for k, v in sample.visual_kept.items() if k != "input"} == kept
    assert len(kept["encoder:0"]) < FRAMES * PER_FRAME and kept[f"prefill:{layers[-1]}"] == []
    assert torch.allclose(ours, logits, atol=LOGITS_ATOL), (ours - logits).abs().max()
    token = 9
    expected = decode_reference(model, caches, token, [decode_at] * len(caches))
    assert torch.allclose(_decoded(model, inputs, token, "metok", **options), expected, atol=LOGITS_ATOL)


@pytest.mark.parametrize("parts", [(1,), (2,), (3,), (2, 3), (1, 3)])
def test_each_metok_stage_alone_is_the_release_with_the_others_off(parts):
    model = video_model()
    inputs = video_inputs(7)
    kept, logits, caches, decode_at = metok_reference(model, inputs, [1, 3], 0.76, parts=parts)
    sample, _, ours = _pruned(model, inputs, "metok", parts=parts, layers=(1, 3))
    assert {k: v for k, v in sample.visual_kept.items() if k != "input"} == kept
    assert torch.allclose(ours, logits, atol=LOGITS_ATOL)
    expected = decode_reference(model, caches, 9, [decode_at] * len(caches))
    assert torch.allclose(_decoded(model, inputs, 9, "metok", parts=parts, layers=(1, 3)), expected, atol=LOGITS_ATOL)


def test_metok_stage3_frees_the_visual_kv_of_the_deeper_layers():
    model = video_model()
    inputs = video_inputs(8)
    with torch.no_grad(), tokensieve.prune(model, "none") as run:
        model(**inputs)
    full = run.report.samples[0]
    alone, _, _ = _pruned(model, inputs, "metok", parts=(3,), layers=(1, 3))
    per_token = full.kv_bytes_prefill / inputs["input_ids"].shape[1] / 4  # one token in one of the 4 layers
    text = inputs["input_ids"].shape[1] - FRAMES * PER_FRAME
    assert alone.kv_bytes_prefill == pytest.approx(per_token * (4 * text + 1 * FRAMES * PER_FRAME))


def test_metok_options_are_checked():
    for bad, message in [({"parts": (4,)}, "parts"), ({"strides": (1, 0, 2)}, "strides"), ({"ratio": 0.0}, "ratio"),
                         ({"key_events": 0}, "key_events")]:
        with pytest.raises(ValueError, match=message):
            tokensieve.methods.get("metok", **bad)
    with pytest.raises(TypeError, match="strides"):
        tokensieve.methods.get("metok", strides=(1, 2))
    with pytest.raises(ValueError, match="layers"):
        with tokensieve.prune(video_model(), "metok", layers=(3, 1)):
            pass


@pytest.mark.parametrize("target", [0.5, 0.35, 0.3])
def test_metok_flops_solves_the_largest_ratio_within_the_budget(target):
    """Per sample, the largest stage-2 ratio whose prefill (stage 1 counted) meets ``target``: the
    report's FLOPs share is within it, and the next larger ratio of a fine grid exceeds it."""
    model = video_model()
    inputs = video_inputs(9)
    sample, _, _ = _pruned(model, inputs, "metok", flops=target, layers=(1, 3))
    share = sample.flops / sample.flops_unpruned
    assert share <= target + 1e-9
    shares = []
    for ratio in [i / 50 for i in range(1, 51)]:
        s, _, _ = _pruned(model, inputs, "metok", ratio=ratio, layers=(1, 3))
        shares.append(s.flops / s.flops_unpruned)
    reachable = [x for x in shares if x <= target]
    assert reachable and share >= max(reachable) - 1e-9
    with pytest.raises(ValueError, match="needs 2 in parts"):
        tokensieve.methods.get("metok", flops=0.5, parts=(1, 3))
    with pytest.raises(ValueError, match="out of reach"):  # layer 0 sees every stage-1 token
        _pruned(model, inputs, "metok", flops=0.1, layers=(1, 3))


@pytest.mark.parametrize("method", ["evs", "uniform-frames"])
def test_frame_methods_meet_a_flops_budget_with_whole_frames_or_tokens(method):
    """``flops``: the most tokens (EVS: at least frame 0; uniform frames: whole frames) within the target."""
    model = video_model()
    inputs = video_inputs(10)
    for target in (0.6, 0.4):
        sample, _, _ = _pruned(model, inputs, method, flops=target)
        kept = len(sample.visual_kept["encoder:0"])
        assert sample.flops / sample.flops_unpruned <= target + 1e-9
        step = 1 if method == "evs" else PER_FRAME
        more, _, _ = _pruned(model, inputs, method, keep=min(1.0, (kept + step) / (FRAMES * PER_FRAME) + 1e-6))
        assert more.flops / more.flops_unpruned > target
        if method == "uniform-frames":
            assert kept % PER_FRAME == 0

"""VisionZip, random and pool against references written here from the authors' code.

VisionZip: dvlab-research/VisionZip at 3151f6d (``visionzip/main.py``, ``visionzip/clip_encoder.py``,
``visionzip/utils.py``, ``visionzip/llava_arch.py``). Pool: LLaVA-VL/LLaVA-NeXT at df17966
(``llava/model/llava_arch.py``, ``get_2dPool``). Nothing here calls a tokensieve helper to build a
reference.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference_models import shipped as shipped_eager
from reference_models import shipped_inputs
from tiny_models import IMAGE, batch, build, collate, layer_input, samples

import tokensieve
from tokensieve import vision

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def model_of(family: str, attn: str = "sdpa") -> torch.nn.Module:
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = build(family, attn)
    return _MODELS[family, attn]


# ---------------------------------------------------------------------------------------------- VisionZip
def release_visionzip_tokens(model: torch.nn.Module, pixel_values: torch.Tensor, dominant: int, contextual: int):
    """The release's tokens per image, from the CLIP tower's own outputs (eager attention).

    ``visionzip/main.py`` ``visionzip``: ``apply_info(dominant_num=dominant - 1, contextual_num)``;
    ``visionzip/utils.py`` ``CLIPAttention_forward`` returns the metric ``raw_key_states.mean(1)`` (keys
    of the layer's normed input, mean over heads), kept for the layer with ``r > 0`` (index 22 of 24:
    ``hidden_states[-2]``'s layer); ``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward``:
    top ``dominant_num`` of the [CLS] attention summed over heads, [CLS] plus those in original order,
    the rest's targets at stride ``max(1, rest // contextual_num)``, each other token assigned to its
    most similar target (normalised metric), contextual = target + mean of its members, then
    ``torch.cat([dominant_tokens, contextual_tokens])``.

    Returns per image the ``(dominant + contextual, d)`` vision-space tokens, the dominant patch indices
    (0-based, ascending) and the contextual target patch indices.
    """
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
        hidden = out.hidden_states[-2]  # (I, 1 + N, d): vision_feature_layer -2, [CLS] first
        attention = out.attentions[-2]  # the same layer's attention
        transformer = getattr(tower, "vision_model", tower)
        layer = transformer.encoder.layers[-2]
        x = layer.layer_norm1(out.hidden_states[-3])  # that layer's input, normed
        images, tokens, _ = x.shape
        heads = layer.self_attn.num_heads
        metric = layer.self_attn.k_proj(x).view(images, tokens, heads, -1).mean(2)  # raw_key_states.mean(1)
    dominant_num = dominant - 1
    result = []
    for i in range(images):
        cls_attention_sum = attention[i, :, 0, 1:].sum(0)
        topk = cls_attention_sum.topk(dominant_num).indices + 1
        all_indices = torch.cat([torch.zeros(1, dtype=topk.dtype), topk])
        mask = torch.ones(tokens, dtype=torch.bool)
        mask[all_indices] = False
        dominant_tokens = hidden[i][~mask]  # original order, [CLS] first
        metric_filtered = metric[i][mask]
        hidden_filtered = hidden[i][mask]
        metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
        step = max(1, metric_normalized.shape[0] // contextual)
        target_indices = torch.arange(0, metric_normalized.shape[0], step)[:contextual]
        others = ~torch.isin(torch.arange(metric_normalized.shape[0]), target_indices)
        similarity = metric_normalized[others] @ metric_normalized[target_indices].T
        assign = torch.zeros(int(others.sum()), contextual)
        assign.scatter_(1, similarity.argmax(1, keepdim=True), 1)
        counts = assign.sum(0).clamp(min=1)[:, None]
        aggregated = assign.T @ hidden_filtered[others] / counts
        contextual_tokens = hidden_filtered[target_indices] + aggregated
        rest = mask[1:].nonzero().squeeze(1)  # patch indices of the filtered tokens
        result.append((torch.cat([dominant_tokens, contextual_tokens]), topk.sort().values - 1, rest[target_indices]))
    return result


def release_llm_inputs(model, inputs, per_image, drop_cls: bool, image_token: int = IMAGE):
    """Per sample, the release's LLM input sequence (``visionzip/llava_arch.py``
    ``prepare_inputs_labels_for_multimodal_visionzip``: text embeddings with each image's projected
    ``encode_images_visionzip`` tokens in its place), without the padding."""
    embed = model.get_input_embeddings()
    projector = model.model.multi_modal_projector
    image = 0
    sequences = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[mask.bool()]
        parts, i = [], 0
        while i < ids.numel():
            if ids[i] == image_token:
                tokens = per_image[image][0][1:] if drop_cls else per_image[image][0]
                with torch.no_grad():
                    parts.append(projector(tokens[None])[0])
                image += 1
                while i < ids.numel() and ids[i] == image_token:
                    i += 1
            else:
                with torch.no_grad():
                    parts.append(embed(ids[i : i + 1]))
                i += 1
        sequences.append(torch.cat(parts))
    return sequences


def release_last_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The LLM on the release's sequence, positions 0..L-1 (the release renumbers the shorter prompt)."""
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=sequence[None], position_ids=torch.arange(sequence.shape[0])[None])
        return model.lm_head(out.last_hidden_state[:, -1])[0]


def _split(total: int) -> tuple[int, int]:
    """The budget's split in the README's 54:10 proportion (``visionzip(model, dominant=54, contextual=10)``)."""
    contextual = max(1, round(total * 10 / 64)) if total > 1 else 0
    return total - contextual, contextual


def _with_cls_feature(monkeypatch, present: bool) -> None:
    """Give the vision tap's signals a ``cls_features`` (the [CLS] row of the feature layer's output,
    as requested of ``tokensieve/vision.py``), or take it away."""
    original = vision.VisionTap._post

    def post(self, module, args, output):
        original(self, module, args, output)
        out = output[0] if isinstance(output, tuple) else output
        self.signals.cls_features = out[:, 0] if present else None

    monkeypatch.setattr(vision.VisionTap, "_post", post)


@pytest.mark.parametrize("opts", [{"dominant": 4, "contextual": 3}, {"keep": 0.5}])
@pytest.mark.parametrize("cls_feature", [True, False])
def test_visionzip_feeds_the_release_sequence(monkeypatch, opts, cls_feature):
    """Default layout on a tiny LLaVA, a batch of a 1-image and a 2-image sample: the LLM's input rows
    equal the release's sequence per sample (``[CLS, dominant in order, contextual]`` per image, each
    image its own count) to 1e-5, with the vision tap's [CLS] feature; without it, the same sequence
    less each image's [CLS] token. Last-token logits match the LLM run on that sequence to 1e-4 (padded
    batch). ``visual_kept`` names the dominant patches, the contextual targets and, with [CLS], the
    image's first other patch."""
    _with_cls_feature(monkeypatch, cls_feature)
    model = model_of("llava")
    inputs = batch("llava", model, [1, 2])
    if "keep" in opts:
        dominant, contextual = _split(round(opts["keep"] * 16))
    else:
        dominant, contextual = opts["dominant"], opts["contextual"]
    per_image = release_visionzip_tokens(model_of("llava", "eager"), inputs["pixel_values"], dominant, contextual)
    expected = release_llm_inputs(model, inputs, per_image, drop_cls=not cls_feature)
    seen = []
    hook = model.model.language_model.layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), tokensieve.prune(model, "visionzip", **opts) as run:
            logits = model(**inputs).logits[:, -1]
    finally:
        hook.remove()
    per_token = dominant + contextual - (0 if cls_feature else 1)
    image = 0
    for b, sequence in enumerate(expected):
        s = run.report.samples[b]
        n_images = s.visual_tokens // 16
        assert s.visual_lengths == [per_token * n_images] * 4
        rows = seen[0][b, -sequence.shape[0]:]
        assert torch.allclose(rows, sequence, atol=1e-5), (rows - sequence).abs().max()
        assert torch.allclose(logits[b], release_last_logits(model, sequence), atol=1e-4)
        vis = (inputs["input_ids"][b] == IMAGE).nonzero().squeeze(1).view(n_images, 16)
        kept = []
        for j in range(n_images):
            _, top, targets = per_image[image]
            chosen = set(top.tolist()) | set(targets.tolist())
            if cls_feature:
                chosen.add(min(set(range(16)) - chosen))
            kept += vis[j, sorted(chosen)].tolist()
            image += 1
        assert s.visual_kept["encoder:0"] == kept
    assert run.report.positions == "renumber"


@pytest.mark.parametrize("opts", [{}, {"dominant": 20, "contextual": 8}])
def test_visionzip_matches_the_release_on_the_shipped_model(opts):
    """The shipped model, one test item per task, default options (keep 0.5: 72 tokens per image, 61
    dominant and 11 contextual) and explicit counts: ``visual_kept`` names the release's dominant
    patches, its contextual targets and the [CLS] carrier (the first other patch); the LLM's input is
    the release's sequence (``[CLS, dominant in order, contextual]`` projected, in the image's place) to
    1e-5, and the last-token logits are the unpruned language model's on that sequence at positions
    0..L-1 to 1e-4."""
    model, _ = shipped_eager()
    image_token = model.config.image_token_id
    dominant, contextual = (opts["dominant"], opts["contextual"]) if opts else _split(round(0.5 * 144))
    layers = len(model.model.language_model.layers)
    for inputs in shipped_inputs():
        per_image = release_visionzip_tokens(model, inputs["pixel_values"], dominant, contextual)
        (expected,) = release_llm_inputs(model, inputs, per_image, drop_cls=False, image_token=image_token)
        seen = []
        hook = model.model.language_model.layers[0].input_layernorm.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.append(a[0]))
        try:
            with torch.no_grad(), tokensieve.prune(model, "visionzip", **opts) as run:
                logits = model(**inputs).logits[0, -1]
        finally:
            hook.remove()
        s = run.report.samples[0]
        assert s.visual_lengths == [dominant + contextual] * layers
        rows = seen[0][0]
        assert rows.shape == expected.shape
        assert torch.allclose(rows, expected, atol=1e-5), (rows - expected).abs().max()
        reference = release_last_logits(model, expected)
        assert torch.allclose(logits, reference, atol=1e-4), (logits - reference).abs().max()
        vis = (inputs["input_ids"][0] == image_token).nonzero().squeeze(1)
        assert vis.numel() == 144
        _, top, targets = per_image[0]
        chosen = set(top.tolist()) | set(targets.tolist())
        chosen.add(min(set(range(144)) - chosen))
        assert s.visual_kept["encoder:0"] == vis[sorted(chosen)].tolist()
        assert run.report.positions == "renumber"


def test_visionzip_counts_dominant_like_the_release():
    """``dominant`` counts [CLS]: the release's ``dominant=1`` feeds [CLS] alone (``dominant - 1 = 0``
    patches), so ``dominant=0`` is refused; the earlier rule stays as ``layout="tokensieve"``."""
    with pytest.raises(ValueError, match="dominant >= 1"):
        tokensieve.methods.VisionZip(dominant=0, contextual=4)
    assert tokensieve.methods.VisionZip().layout == "release"
    tokensieve.methods.VisionZip(dominant=0, contextual=4, layout="tokensieve")


# ---------------------------------------------------------------------------------------------- random
def _relative(kept: list[int], first: int) -> list[int]:
    return [p - first for p in kept]


@pytest.mark.parametrize("layer", [0, 1])
def test_random_draws_per_sample_and_keeps_it_in_any_batch(layer):
    """Two samples of equal size (one image each, 16 tokens) keep different relative sets; at the
    encoder stage also two with the same layout but one different text token; every sample keeps the
    same tokens alone as in a padded batch."""
    model = model_of("llava")
    parts = samples("llava", model, [1, 1, 2])
    twin = dict(parts[0], ids=list(parts[0]["ids"]))
    twin["ids"][1] = 3 if twin["ids"][1] != 3 else 4  # same layout, other text
    parts.append(twin)
    inputs = collate("llava", parts)
    stage = "encoder:0" if layer == 0 else f"prefill:{layer}"
    with torch.no_grad(), tokensieve.prune(model, "random", keep=0.5, layer=layer) as run:
        model(**inputs)
        together = [s.visual_kept[stage] for s in run.report.samples]
        alone = []
        for part in parts:
            model(**collate("llava", [part]))
            alone.append(run.report.samples[0].visual_kept[stage])
    width = inputs["input_ids"].shape[1]
    for i, part in enumerate(parts):
        pad = width - len(part["ids"])
        assert _relative(together[i], pad) == alone[i]
    first_image = [part["ids"].index(IMAGE) for part in parts]
    rel = [_relative(k, f) for k, f in zip(alone, first_image)]
    assert len(rel[0]) == len(rel[1]) == 8 and rel[0] != rel[1]
    if layer == 0:
        assert rel[0] != rel[3]


@pytest.mark.parametrize("family,expected", [("llava", "renumber"), ("qwen2-vl", "keep")])
def test_random_before_the_llm_renumbers_like_the_other_encoder_methods(family, expected):
    """``positions="auto"`` at layer 0: on LLaVA the LLM sees the shorter prompt, numbered 0..m-1 (the
    plain language model fed the kept embeddings gives the same logits); M-RoPE models keep positions.
    At a decoder layer, positions stay the original ones and other modes are refused."""
    model = model_of(family)
    inputs = batch(family, model, [1])
    with torch.no_grad(), tokensieve.prune(model, "random", keep=0.5) as run:
        logits = model(**inputs).logits[0, -1]
    assert run.report.positions == expected
    if family == "llava":
        x, _ = layer_input(model, 0, inputs)
        vis = set(torch.nonzero(inputs["input_ids"][0] == IMAGE).squeeze(1).tolist())
        kept = set(run.report.samples[0].visual_kept["encoder:0"])
        rows = [i for i in range(x.shape[1]) if i not in vis or i in kept]
        with torch.no_grad():
            h = model.model.language_model(inputs_embeds=x[:, rows]).last_hidden_state
            assert torch.allclose(model.lm_head(h)[0, -1], logits, atol=1e-5)
    with pytest.raises(ValueError, match="applies to layer=0"):
        tokensieve.methods.RandomDrop(layer=2, positions="renumber")


# ---------------------------------------------------------------------------------------------- pool
@pytest.fixture(scope="module")
def shipped():
    from tokensieve.tasks import TASKS, generate
    from tokensieve.tiny import build_inputs, load_tiny

    model, processor = load_tiny()
    inputs = build_inputs(processor, generate(sorted(TASKS)[0], "test", 1))
    return model, inputs


def reference_pool(grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(rows * cols, d)`` cells of ``grid`` (``(H, W, d)``), average-pooled: ``get_2dPool``'s
    ``avg_pool2d`` (``llava/model/llava_arch.py``) with the output size fixed instead of the stride."""
    x = grid.permute(2, 0, 1)[None]
    return torch.nn.functional.adaptive_avg_pool2d(x, (rows, cols))[0].permute(1, 2, 0).reshape(rows * cols, -1)


@pytest.mark.parametrize("keep", [0.5, 0.3, 0.2])
def test_pool_meets_keep_on_the_shipped_grid(shipped, keep):
    """The shipped model's 12x12 grid: pool keeps at most ``keep * 144`` tokens and at least 85% of
    that; the kept positions form an ``r x c`` grid of bin top-left tokens
    (``floor(i * 12 / r), floor(j * 12 / c)``) whose LLM inputs equal the adaptive average pool to 1e-5;
    positions are renumbered (LLaVA, "auto")."""
    model, inputs = shipped
    seen = []
    hook = model.model.language_model.layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model(**inputs)
            with tokensieve.prune(model, "pool", keep=keep) as run:
                model(**inputs)
    finally:
        hook.remove()
    full, pooled = seen[0][0], seen[1][0]
    vis = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    assert vis.numel() == 144
    s = run.report.samples[0]
    kept = s.visual_kept["encoder:0"]
    assert 0.85 * keep * 144 <= len(kept) <= keep * 144
    local = [(p - int(vis[0])) for p in kept]
    r_starts, c_starts = sorted({p // 12 for p in local}), sorted({p % 12 for p in local})
    r, c = len(r_starts), len(c_starts)
    assert r * c == len(kept)
    assert r_starts == [math.floor(i * 12 / r) for i in range(r)]
    assert c_starts == [math.floor(j * 12 / c) for j in range(c)]
    expected = reference_pool(full[vis].view(12, 12, -1), r, c)
    first = int(vis[0])
    assert torch.allclose(pooled[first : first + r * c], expected, atol=1e-5)
    assert run.report.positions == "renumber"


def test_pool_meets_flops_keeps_everything_at_keep_1_and_refuses_what_no_grid_meets(shipped):
    """``flops=0.5``: at most 0.5 of the unpruned prefill and above 0.45 (the stride rule reached 0.319);
    ``keep=1``: logits bit-equal to the plain model's; a keep below one token per image: a clear error."""
    model, inputs = shipped
    with torch.no_grad():
        plain = model(**inputs).logits
        with tokensieve.prune(model, "pool", flops=0.5) as run:
            model(**inputs)
        s = run.report.samples[0]
        assert 0.45 < s.flops / s.flops_unpruned <= 0.5
        with tokensieve.prune(model, "pool", keep=1.0):
            assert torch.equal(model(**inputs).logits, plain)
        with pytest.raises(ValueError, match="at least one cell"):
            with tokensieve.prune(model, "pool", keep=0.005):
                model(**inputs)

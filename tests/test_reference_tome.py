"""ToMe against a reference written here from the authors' code (facebookresearch/ToMe at af95e4b).

The reference runs the tiny CLIP tower's blocks eagerly, as ``tome/patch/timm.py`` ``ToMeBlock.forward``
and ``ToMeAttention.forward`` do (attention with ``log(size)`` added to the logits, keys averaged over
heads as the metric, merging between the attention residual and the MLP), with ``tome/merge.py``
``bipartite_soft_matching`` ([CLS] protected), ``merge_wavg`` and ``merge_source``; it calls no
tokensieve helper. It runs on a tiny random LLaVA (64 patches) and on the shipped tiny LLaVA (144
patches, ToMe in the 3 blocks up to its feature layer). The old rule (repeated bipartite rounds on the
LLM inputs) kept the odd positions at keep 0.5 whatever the image; every test here fails on it.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import IMAGE, PAD, TEXT, build, collate
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import tokensieve
from tokensieve.compat import clip_transformer

SIDE = 64  # 64 x 64 pixels, patch 8: 64 patches; 4 layers, features from layer -2: ToMe in 3 blocks
N = (SIDE // 8) ** 2
_MODELS: dict[str, torch.nn.Module] = {}


def big_llava(attn: str = "sdpa") -> torch.nn.Module:
    if attn not in _MODELS:
        torch.manual_seed(0)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  image_size=SIDE, patch_size=8, projection_dim=32)
        cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**TEXT), image_token_id=IMAGE,
                          vision_feature_layer=-2, vision_feature_select_strategy="default")
        model = LlavaForConditionalGeneration(cfg)
        for c in (model.config, model.config.text_config, model.config.vision_config):
            c._attn_implementation = attn
        model.generation_config.pad_token_id = PAD
        _MODELS[attn] = model.eval()
    return _MODELS[attn]


def parts(images: list[int], seed: int = 0) -> list[dict]:
    """Samples with ``images[i]`` images each (64 patch tokens per image), text around them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, k in enumerate(images):
        ids, pixels = [1] + torch.randint(3, 50, (2 + i,), generator=gen).tolist(), []
        for _ in range(k):
            ids += [IMAGE] * N + torch.randint(3, 50, (1,), generator=gen).tolist()
            pixels.append(torch.randn(3, SIDE, SIDE, generator=gen))
        ids += torch.randint(3, 50, (3 + 2 * i,), generator=gen).tolist()
        out.append({"ids": ids, "pixels": pixels, "meta": []})
    return out


# ---------------------------------------------------------------------- the reference
def reference_matching(metric: torch.Tensor, r: int):
    """``bipartite_soft_matching(metric, r, class_token=True)``: its ``merge`` function."""
    t = metric.shape[1]
    r = min(r, (t - 1) // 2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :].sort(dim=1)[0]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

    def merge(x: torch.Tensor, mode: str) -> torch.Tensor:
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


@torch.no_grad()
def reference_tome(model, pixels: torch.Tensor, schedule: list[int], prop_attn: bool = True):
    """ToMe in the tower up to the feature layer, eagerly. Returns, per image, the patch features the
    projector receives (each patch its group's), the representative of each patch and the group sizes."""
    tower = clip_transformer(model.model.vision_tower)
    x = tower.pre_layrnorm(tower.embeddings(pixels))
    images, t0, _ = x.shape
    size = None
    source = torch.eye(t0)[None].expand(images, t0, t0)
    for layer, r in zip(tower.encoder.layers, schedule):
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        b, n, c = h.shape
        q, k, v = (p(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if size is not None and prop_attn:
            logits = logits + size.log()[:, None, None, :, 0]
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        x = x + attn.out_proj(out)
        if r > 0:
            merge = reference_matching(k.mean(1), r)
            source = merge(source, mode="amax")
            size = torch.ones_like(x[..., 0, None]) if size is None else size
            x, size = merge(x * size, mode="sum"), merge(size, mode="sum")
            x = x / size
        x = x + layer.mlp(layer.layer_norm2(x))
    group = source[:, :, 1:].argmax(1)  # (I, N): the merged token holding each patch
    features = x.gather(1, group[..., None].expand(-1, -1, x.shape[-1]))
    members = source[:, :, 1:].bool()
    first = torch.where(members, torch.arange(t0 - 1), t0).min(-1).values  # smallest patch of each group
    representative = first.gather(1, group)
    sizes = members.sum(-1).gather(1, group)
    return features, representative, sizes


def run_pruned(model, inputs, **options):
    seen = {}
    hooks = [
        model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.setdefault("features", a[0])),
        model.model.language_model.layers[0].input_layernorm.register_forward_pre_hook(
            lambda m, a: seen.setdefault("llm", a[0])),
    ]
    try:
        with torch.no_grad(), tokensieve.prune(model, "tome", **options) as run:
            logits = model(**inputs).logits
    finally:
        for h in hooks:
            h.remove()
    return run, seen, logits


# ---------------------------------------------------------------------- tests
@pytest.mark.parametrize("attn,prop_attn", [("sdpa", True), ("eager", True), ("sdpa", False)])
def test_groups_features_and_llm_tokens_match_the_authors_tome(attn, prop_attn):
    """keep 0.5 of 64 patches in 3 blocks: r = 11, 11, 10 (R = 32, the remainder on the first blocks)."""
    model = big_llava(attn)
    sample = parts([1], seed=3)
    inputs = collate("llava", sample)
    run, seen, _ = run_pruned(model, inputs, keep=0.5, prop_attn=prop_attn)
    features, rep, sizes = reference_tome(model, inputs["pixel_values"], [11, 11, 10], prop_attn)
    tower = run.tower
    assert tower.schedule == [[11, 11, 10]]
    assert tower.tokens == [[65, 54, 43, 33]]
    assert torch.equal(tower.representative, rep)
    assert torch.equal(tower.size, sizes)
    assert torch.allclose(seen["features"], features, atol=1e-5), (seen["features"] - features).abs().max()
    # one LLM token per group, at the representative's position, carrying the group's projected feature
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    reps = sorted(set(rep[0].tolist()))
    assert len(reps) == 32
    kept = run.report.samples[0].visual_kept["encoder:0"]
    assert kept == vis[reps].tolist()
    assert run.report.samples[0].visual_lengths == [32] * 4
    rows = [p for p in range(inputs["input_ids"].shape[1]) if p not in set(vis.tolist()) - set(kept)]
    with torch.no_grad():
        projected = model.model.multi_modal_projector(features)[0]
    llm = seen["llm"][0]
    assert llm.shape[0] == len(rows)
    for j in reps:
        assert torch.allclose(llm[rows.index(int(vis[j]))], projected[j], atol=1e-5)
    expected = {}
    for p in range(N):
        expected.setdefault(int(vis[rep[0, p]]), []).append(int(vis[p]))
    assert tower.merged == [expected]
    assert sum(len(m) for m in expected.values()) == N


_SHIPPED: dict[str, tuple] = {}  # the shipped model and its processor


def shipped_model():
    """The shipped tiny LLaVA: a 4-block CLIP tower on 96 x 96 pixels (patch 8: 144 patches), features
    from layer -2 (ToMe in 3 blocks), an 8-layer Llama decoder."""
    if "shipped" not in _SHIPPED:
        from tokensieve.tiny import load_tiny

        _SHIPPED["shipped"] = load_tiny()
    return _SHIPPED["shipped"]


def shipped_inputs() -> list:
    """One test item of each task of the shipped model, as batch-1 inputs."""
    from tokensieve.tasks import TASKS, generate
    from tokensieve.tiny import build_inputs

    _, processor = shipped_model()
    return [build_inputs(processor, [e]) for task in TASKS for e in generate(task, "test", 1)]


@pytest.mark.parametrize("options,schedule", [
    ({"keep": 0.5}, [24, 24, 24]),  # R = 144 - 72 over the 3 blocks up to the feature layer
    ({"r": 20}, [20, 20, 20]),      # parse_r(3, 20)
])
def test_groups_features_llm_tokens_and_logits_match_the_authors_tome_on_the_shipped_model(options, schedule):
    """The shipped model, one test item per task: the tower merges in the blocks up to the feature layer
    (``vision_feature_layer`` -2 of 4 blocks: 3), with the reference's schedule; the groups
    (representative and size of each patch's group), the features the projector receives (to 1e-5), the
    LLM's image tokens (one per group, at its representative's row, the group's projected feature, to
    1e-5) and the last-token logits (to 1e-4) of the unpruned language model fed the reference's shorter
    sequence at positions 0..L-1 (the prompt renumbered, ``positions="auto"`` on LLaVA)."""
    model, _ = shipped_model()
    image_token = model.config.image_token_id
    layers = clip_transformer(model.model.vision_tower).encoder.layers
    assert len(layers) == 4 and model.config.vision_feature_layer == -2
    kept_count = 144 - sum(schedule)
    tokens = [145]
    for r in schedule:
        tokens.append(tokens[-1] - r)
    for inputs in shipped_inputs():
        run, seen, logits = run_pruned(model, inputs, **options)
        features, rep, sizes = reference_tome(model, inputs["pixel_values"], schedule)
        tower = run.tower
        assert tower.schedule == [schedule]
        assert tower.tokens == [tokens]
        assert torch.equal(tower.representative, rep)
        assert torch.equal(tower.size, sizes)
        assert torch.allclose(seen["features"], features, atol=1e-5), (seen["features"] - features).abs().max()
        vis = (inputs["input_ids"][0] == image_token).nonzero().squeeze(1)
        assert vis.numel() == 144
        reps = sorted(set(rep[0].tolist()))
        assert len(reps) == kept_count
        s = run.report.samples[0]
        assert s.visual_kept["encoder:0"] == vis[reps].tolist()
        assert s.visual_lengths == [kept_count] * len(model.model.language_model.layers)
        assert run.report.positions == "renumber"
        # the reference's LLM input: the text's embeddings, the image's place taken by one projected
        # group feature per group, in the order of the representatives
        with torch.no_grad():
            projected = model.model.multi_modal_projector(features)[0]
            text = model.get_input_embeddings()(inputs["input_ids"][0])
            first = int(vis[0])
            sequence = torch.cat([text[:first], projected[reps], text[first + 144:]])
            out = model.model.language_model(inputs_embeds=sequence[None],
                                             position_ids=torch.arange(sequence.shape[0])[None])
            expected = model.lm_head(out.last_hidden_state[:, -1])[0]
        llm = seen["llm"][0]
        assert llm.shape == sequence.shape
        assert torch.allclose(llm, sequence, atol=1e-5), (llm - sequence).abs().max()
        assert torch.allclose(logits[0, -1], expected, atol=1e-4), (logits[0, -1] - expected).abs().max()


def test_proportional_attention_changes_the_features():
    model = big_llava()
    inputs = collate("llava", parts([1], seed=3))
    _, with_bias, _ = run_pruned(model, inputs, keep=0.5)
    _, without, _ = run_pruned(model, inputs, keep=0.5, prop_attn=False)
    assert not torch.allclose(with_bias["features"], without["features"], atol=1e-4)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_kept_sets_depend_on_the_image(keep):
    """The old rule kept one stripe (1 distinct set across 8 images); ToMe's groups follow the image."""
    model = big_llava()
    kept = set()
    for seed in range(8):
        inputs = collate("llava", parts([1], seed=seed))
        run, _, _ = run_pruned(model, inputs, keep=keep)
        start = int((inputs["input_ids"][0] == IMAGE).nonzero()[0])
        positions = run.report.samples[0].visual_kept["encoder:0"]
        assert len(positions) == round(keep * N)
        kept.add(tuple(p - start for p in positions))
    assert len(kept) == 8


def test_a_batch_merges_each_image_as_alone():
    """Two samples, one image each, left-padded: each image's groups and features are the reference's
    for that image alone, the two images' groups differ, each sample's LLM input has one token per group."""
    model = big_llava()
    sample = parts([1, 1], seed=5)
    inputs = collate("llava", sample)
    run, seen, _ = run_pruned(model, inputs, keep=0.25)
    schedule = [16, 16, 16]
    assert run.tower.schedule == [schedule] * 2
    reps = []
    for i in range(2):
        features, rep, _ = reference_tome(model, inputs["pixel_values"][i:i + 1], schedule)
        assert torch.equal(run.tower.representative[i:i + 1], rep)
        assert torch.allclose(seen["features"][i:i + 1], features, atol=1e-5)
        reps.append(rep[0])
        vis = (inputs["input_ids"][i] == IMAGE).nonzero().squeeze(1)
        assert run.report.samples[i].visual_kept["encoder:0"] == vis[sorted(set(rep[0].tolist()))].tolist()
        assert run.report.samples[i].visual_lengths[0] == 16
    assert not torch.equal(reps[0], reps[1])


def test_flops_budgets_plan_each_image_and_meet_the_target_under_generate():
    """A two-image sample and a one-image sample under flops: per-sample budgets, split over the images
    (possibly different schedules in one tower batch); each image matches the reference with its schedule,
    and generate() (which may encode the images before its first forward) keeps the same tokens."""
    model = big_llava()
    inputs = collate("llava", parts([2, 1], seed=7))
    run, seen, _ = run_pruned(model, inputs, flops=0.6)
    schedules = run.tower.schedule
    assert len(schedules) == 3 and all(sum(s) > 0 for s in schedules)
    for i, schedule in enumerate(schedules):
        features, rep, _ = reference_tome(model, inputs["pixel_values"][i:i + 1], schedule)
        assert torch.equal(run.tower.representative[i:i + 1], rep)
        assert torch.allclose(seen["features"][i:i + 1], features, atol=1e-5)
    kept = [s.visual_kept["encoder:0"] for s in run.report.samples]
    for s, images in zip(run.report.samples, ([0, 1], [2])):
        assert s.flops / s.flops_unpruned <= 0.6
        assert s.visual_lengths[0] == sum(N - sum(schedules[i]) for i in images)
    with torch.no_grad(), tokensieve.prune(model, "tome", flops=0.6) as run2:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert [s.visual_kept["encoder:0"] for s in run2.report.samples] == kept
    assert run2.tower.schedule == schedules


def test_the_vision_blocks_run_on_fewer_tokens():
    """Attention sees t tokens, the MLP t - r (merging sits between them); the layer after the feature
    layer runs on the expanded 65 rows, as it would unpruned."""
    model = big_llava()
    inputs = collate("llava", parts([1]))
    layers = clip_transformer(model.model.vision_tower).encoder.layers
    seen = {"attn": [], "mlp": []}
    hooks = [l.self_attn.register_forward_pre_hook(lambda m, a, k: seen["attn"].append(k["hidden_states"].shape[1]),
                                                   with_kwargs=True) for l in layers]
    hooks += [l.mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(a[0].shape[1])) for l in layers]
    try:
        run, _, _ = run_pruned(model, inputs, keep=0.5)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"attn": [65, 54, 43, 65], "mlp": [54, 43, 33, 65]}


@pytest.mark.parametrize("options,tokens", [
    ({"r": 8}, [65, 57, 49, 41]),                                   # parse_r(3, 8): 8, 8, 8
    ({"r": 8, "schedule": "decreasing"}, [65, 49, 41, 41]),         # parse_r(3, (8, -1)): 16, 8, 0
    ({"keep": 0.5, "schedule": "decreasing"}, [65, 44, 33, 33]),    # 32 merges as 2 : 1 : 0 -> 21, 11, 0
    ({"r": 40}, [65, 33, 17, 9]),                                   # capped at (t - 1) // 2 per block
])
def test_r_and_schedules_follow_parse_r(options, tokens):
    model = big_llava()
    inputs = collate("llava", parts([1]))
    run, _, _ = run_pruned(model, inputs, **options)
    assert run.tower.tokens == [tokens]
    assert run.report.samples[0].visual_lengths[0] == tokens[-1] - 1


def test_keeping_everything_is_exact_and_merges_nothing():
    model = big_llava()
    inputs = collate("llava", parts([1, 2]))
    with torch.no_grad():
        plain = model(**inputs).logits
    for options in ({"keep": 1.0}, {"r": 0}):
        run, _, logits = run_pruned(model, inputs, **options)
        assert torch.equal(plain, logits)
        assert run.tower.tokens == [[65] * 4] * 3


def test_a_budget_beyond_half_per_block_is_refused_before_anything_runs():
    """The shipped tiny test LLaVA merges in one block (16 patches, features from layer -2 of 2): ToMe can
    remove at most 8 there."""
    model = build("llava")
    with pytest.raises(ValueError, match="at least 8"):
        with tokensieve.prune(model, "tome", keep=0.25):
            pass
    assert all("forward" not in l.__dict__ for l in clip_transformer(model.model.vision_tower).encoder.layers)
    with pytest.raises(ValueError, match="give r .* or keep"):
        tokensieve.methods.ToMe(r=4, keep=0.5)

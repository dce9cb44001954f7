"""The published visual-token methods against slow references written from their papers."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE, batch, build, layer_input

import tokensieve

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def model_of(family: str, attn: str = "sdpa"):
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = build(family, attn)
    return _MODELS[family, attn]


def divprune_reference(x: torch.Tensor, k: int) -> list[int]:
    """Max-min diversity, greedy, straight from the definition (no running minimum)."""
    n = x.shape[0]
    d = 1 - torch.nn.functional.cosine_similarity(x[:, None], x[None], dim=-1)
    nearest = [min(d[i, j].item() for j in range(n) if j != i) for i in range(n)]
    chosen = [max(range(n), key=lambda i: nearest[i])]
    while len(chosen) < k:
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(d[i, s].item() for s in chosen)))
    return sorted(chosen)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_divprune_matches_the_definition(family):
    model = model_of(family)
    inputs = batch(family, model, [1, 2])
    x, _ = layer_input(model, 0, inputs)
    with torch.no_grad(), tokensieve.prune(model, "divprune", keep=0.25) as run:
        model(**inputs)
    for b in range(2):
        vis = (inputs["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        k = round(0.25 * vis.numel())
        expected = vis[divprune_reference(x[b, vis], k)].tolist()
        assert run.report.samples[b].visual_kept["encoder:0"] == expected
    assert run.report.positions == ("keep" if family == "qwen2-vl" else "renumber")


def test_fastervlm_matches_eager_cls_attention():
    """Theia-4869/FasterVLM llava/model/llava_arch.py ``encode_images``: per image, the top
    ``visual_token_num`` patches by the [CLS] row of the feature layer's attention, mean over heads."""
    model = model_of("llava")
    inputs = batch("llava", model, [1, 2])
    tower = model.model.vision_tower
    eager = build("llava", "eager")
    with torch.no_grad():
        out = eager.model.vision_tower(inputs["pixel_values"], output_attentions=True)
    layer = len(out.attentions) - 2  # vision_feature_layer = -2: the layer whose output the LLM receives
    cls = out.attentions[layer][:, :, 0, 1:].mean(1)  # (images, patches)
    with torch.no_grad(), tokensieve.prune(model, "fastervlm", keep=0.25) as run:
        model(**inputs)
    image = 0
    for b in range(2):
        vis = (inputs["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        expected = []
        for j in range(vis.numel() // 16):
            patches = vis[16 * j : 16 * (j + 1)]
            expected += patches[cls[image + j].topk(4).indices].tolist()
        image += vis.numel() // 16
        assert run.report.samples[b].visual_kept["encoder:0"] == sorted(expected)
    del tower


def test_dart_matches_a_loop_from_the_paper():
    """Two images in one sample (one pool), ``split="exact"``: 16 of 32 kept, the 14 slots spread over the
    4 pivots in the release's visiting order (tests/test_reference_fastv_dart.py has the release's counts)."""
    model = model_of("llava", "eager")
    inputs = batch("llava", model, [2])
    lm = model.model.language_model
    seen = {}

    def grab(idx):
        def hook(module, args, kwargs):
            seen[idx] = (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"])
        return hook

    hooks = [lm.layers[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in (1, 2)]
    with torch.no_grad():
        model(**inputs)
        for h in hooks:
            h.remove()
        x1, (cos, sin) = seen[1]
        layer = lm.layers[1]
        k = layer.self_attn.k_proj(layer.input_layernorm(x1)).view(1, x1.shape[1], -1, 8).transpose(1, 2)
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        _, k = apply_rotary_pos_emb(k, k, cos, sin)
        norms = k[0].abs().sum((0, 2))
        h = torch.nn.functional.normalize(lm.norm(seen[2][0])[0], dim=-1)
        with tokensieve.prune(model, "dart", layer=2, keep=0.5, image_pivots=2, text_pivots=2, split="exact") as run:
            model(**inputs)
    ids = inputs["input_ids"][0]
    vis = (ids == IMAGE).nonzero().squeeze(1).tolist()
    text = list(range(max(vis) + 1, ids.numel()))
    kept_total = 16
    img_piv = sorted(vis, key=lambda i: -norms[i].item())[:2]
    txt_piv = sorted(text, key=lambda i: -norms[i].item())[:2]
    pool = [i for i in vis if i not in img_piv]
    chosen = list(img_piv)
    slots = kept_total - 2
    for n, p in enumerate(list(set(img_piv + txt_piv))):  # the release's visiting order
        take = slots // 4 + (1 if n < slots % 4 else 0)
        ranked = sorted(pool, key=lambda i: (h[i] @ h[p]).item())[:take]
        chosen += ranked
        pool = [i for i in pool if i not in ranked]
    assert run.report.samples[0].visual_kept["prefill:2"] == sorted(chosen)


def test_pdrop_stages_follow_last_token_attention():
    model = model_of("llava", "eager")
    inputs = batch("llava", model, [2])
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
        with tokensieve.prune(model, "pdrop", layers=(1,), ratio=0.25) as run:
            model(**inputs)
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    scores = out.attentions[1][0].mean(0)[-1, vis]  # the release ranks with the layer the tokens enter
    expected = sorted(vis[scores.topk(8).indices].tolist())
    assert run.report.samples[0].visual_kept["prefill:1"] == expected
    assert run.report.samples[0].visual_lengths == [32, 8, 8, 8]


def test_visionzip_contextual_tokens_are_target_plus_mean_of_members():
    from tokensieve.adapters import adapter_for
    from tokensieve.vision import VisionTap

    model = model_of("llava")
    inputs = batch("llava", model, [1])
    adapter = adapter_for(model)
    tap = VisionTap(adapter.vision_feature_layer())
    remove = tap.install()
    with torch.no_grad():
        model(**inputs)
    remove()
    sig = tap.signals
    cls, keys, feats = sig.cls_attention[0], sig.keys[0], sig.features[0]
    dominant = cls.topk(3).indices
    rest = torch.tensor([i for i in range(16) if i not in dominant.tolist()])
    targets = rest[torch.arange(0, 13, 13 // 2)[:2]]
    others = torch.tensor([i for i in rest.tolist() if i not in targets.tolist()])
    m = torch.nn.functional.normalize(keys, dim=-1)
    owner = (m[others] @ m[targets].T).argmax(1)
    expected = torch.stack([feats[t] + feats[others[owner == j]].mean(0) for j, t in enumerate(targets.tolist())])
    seen = []
    hook = model.model.language_model.layers[0].input_layernorm.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    with torch.no_grad(), tokensieve.prune(model, "visionzip", dominant=3, contextual=2, layout="tokensieve") as run:
        model(**inputs)
        projected = adapter.projector(expected[None])[0]
    hook.remove()
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    kept = run.report.samples[0].visual_kept["encoder:0"]
    assert kept == sorted(vis[torch.cat([dominant, targets])].tolist())
    dropped = set(vis.tolist()) - set(kept)
    rows = {p: i for i, p in enumerate(p for p in range(inputs["input_ids"].shape[1]) if p not in dropped)}
    for j, t in enumerate(targets.tolist()):
        assert torch.allclose(seen[0][0, rows[int(vis[t])]], projected[j], atol=1e-5)
    assert run.report.samples[0].visual_lengths == [5] * 4
    assert run.report.positions == "renumber"


@pytest.mark.parametrize("name,family", [("fastervlm", "qwen2-vl"), ("visionzip", "qwen2-vl"), ("tome", "qwen2-vl"),
                                         ("visionzip", "llava-next"), ("tome", "llava-next")])
def test_cls_methods_refuse_towers_without_a_patch_layout(name, family):
    """No [CLS] tower (Qwen2-VL), or LLaVA-NeXT's crops for methods that read one grid per image
    (FasterVLM handles the crops: tests/test_reference_fastervlm_next.py)."""
    with pytest.raises(TypeError, match="CLIP|\\[CLS\\]|crops"):
        with tokensieve.prune(model_of(family), name, keep=0.5):
            pass


@pytest.mark.parametrize("name,opts", [("divprune", {}), ("dart", {"layer": 1}), ("pdrop", {}), ("fastervlm", {}),
                                       ("visionzip", {}), ("tome", {})])
def test_each_method_meets_a_flops_budget_in_batches(name, opts):
    model = model_of("llava")
    inputs = batch("llava", model, [1, 2, 1])
    with torch.no_grad(), tokensieve.prune(model, name, flops=0.75, **opts) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    for s in run.report.samples:
        assert s.flops / s.flops_unpruned <= 0.75
        assert s.visual_lengths[-1] < s.visual_tokens


def test_transprune_ttv_matches_its_formula():
    model = model_of("llava", "eager")
    inputs = batch("llava", model, [2])
    lm = model.model.language_model
    x, kwargs = layer_input(model, 1, inputs)
    seen = {"k": kwargs}
    with torch.no_grad():
        layer, x = lm.layers[1], x[0]
        before = layer.input_layernorm(x)
        after = layer.self_attn(before[None], position_embeddings=seen["k"]["position_embeddings"],
                                attention_mask=seen["k"]["attention_mask"])[0][0]
        h = x + after
        before2 = layer.post_attention_layernorm(h)
        after2 = layer.mlp(before2)

        def ttv(b, a):
            direction = torch.softmax(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1), dim=0)
            return a.norm(dim=-1) / b.norm(dim=-1) * direction

        score = ttv(before, after) + ttv(before2, after2)
        # a stage at layer 2 (the tokens entering it) accumulates TTV over layer 1, as the release does
        with tokensieve.prune(model, "transprune", layers=(2,), keep=(0.25,), ttv_only=True) as run:
            model(**inputs)
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    expected = sorted(vis[score[vis].topk(8).indices].tolist())
    assert run.report.samples[0].visual_kept["prefill:2"] == expected


def test_aim_merge_and_pagerank_follow_their_definitions():
    from tokensieve.methods.aim import bipartite_merge, merge_rounds, pagerank

    # the release's rounds: N // 2 then N // 4 (43 of 169 kept, not round(0.25 * 169) = 42); 1/8 adds N // 8
    assert merge_rounds(169, 0.25) == [84, 42] and merge_rounds(576, 0.125) == [288, 144, 72]
    assert merge_rounds(576, 0.4375) == [288, 36] and merge_rounds(16, 1.0) == []
    x = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0], [-1.0, 0.0]])
    # sources 0, 2, 4 match destinations 1, 3, 3 with similarity .9806, .9950, .9952: one round of r=1 merges
    # 4 into 3; the output is the unmerged sources by decreasing similarity (2, 0), then destinations 1, 3, 5
    carrier, rows = bipartite_merge(x, [1])
    assert carrier.tolist() == [2, 0, 1, 3, 5]
    assert torch.equal(rows[:3], x[[2, 0, 1]]) and torch.equal(rows[4], x[5])
    assert torch.allclose(rows[3], (x[3] + x[4]) / 2)
    carrier, rows = bipartite_merge(x, [3])
    assert carrier.tolist() == [1, 3, 5]
    assert torch.allclose(rows[0], (x[0] + x[1]) / 2) and torch.allclose(rows[1], (x[2] + x[3] + x[4]) / 3)
    probs = torch.softmax(torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0)), -1)
    dist = torch.full((2, 1, 4), 0.25)
    for _ in range(5):
        dist = dist @ probs[0]
    expected = dist[:, 0].pow(2).mean(0).sqrt()
    assert torch.allclose(pagerank(probs, torch.ones(1, 4, dtype=torch.bool))[0], expected)


def test_aim_schedule_reaches_zero_visual_tokens():
    model = model_of("llava")
    inputs = batch("llava", model, [1])
    with torch.no_grad(), tokensieve.prune(model, "aim", start=1, stop=2) as run:
        ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert run.report.samples[0].visual_lengths == [4, 4, 2, 0]
    assert ids.shape[1] == inputs["input_ids"].shape[1] + 2


ALL_FAMILIES = ["llava", "llava-next", "llava-next-video", "qwen2-vl", "qwen2.5-vl"]


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("name,opts", [
    ("fastv", {"layer": 1, "keep": 0.5}), ("random", {"keep": 0.5}), ("divprune", {"keep": 0.5}),
    ("dart", {"layer": 1, "keep": 0.5, "image_pivots": 1, "text_pivots": 1}), ("pdrop", {}), ("transprune", {"layers": (0, 1), "keep": (0.5, 0.25)}),
    ("aim", {"start": 1, "stop": 2}),
])
def test_methods_run_on_every_adapter_in_padded_batches(family, name, opts):
    model = model_of(family)
    inputs = batch(family, model, [1, 2, 1])
    with torch.no_grad(), tokensieve.prune(model, name, **opts) as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    for s in run.report.samples:
        assert s.visual_lengths[-1] < s.visual_tokens
        assert s.flops < s.flops_unpruned


def test_vflowopt_map_and_entropy_follow_their_definitions():
    from tokensieve.methods.vflowopt import importance_map, patch_entropy

    # [CLS] + 3 patches; column means: [.4, .1, .3, .2] -> global tokens (> mean .25): 0 and 2
    attention = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.4, 0.1, 0.3, 0.2], [0.4, 0.1, 0.3, 0.2], [0.4, 0.1, 0.3, 0.2]])
    assert torch.allclose(importance_map(attention, torch.zeros(3), t=1.0, alpha=0.0), torch.tensor([0.1, 0.3, 0.2]))
    assert torch.allclose(importance_map(attention, torch.tensor([0.0, 0.0, 0.0]), 1.0, 0.3),
                          torch.tensor([0.2, 0.4, 0.3]))
    pixels = torch.zeros(3, 4, 8)
    pixels[:, :, 4:6] = 1.0  # right patch: half its pixels bright -> 1 bit; left patch flat -> 0
    assert torch.allclose(patch_entropy(pixels, 4), torch.tensor([0.0, 1.0]))


def test_vflowopt_recycles_into_the_best_token_of_each_cell():
    model = model_of("llava")
    inputs = batch("llava", model, [1])
    with torch.no_grad(), tokensieve.prune(model, "vflowopt", vit_keep=0.5, stage_keep=(0.25,), layers=(2,), m=2) as run:
        model(**inputs)
    s = run.report.samples[0]
    # 16 patches on a 4x4 grid: 8 to remove + 16/4 marked = 12 marked; the 4 cells each keep one
    marked_groups = 16 - len(s.visual_kept["encoder:0"])
    assert 4 <= len(s.visual_kept["encoder:0"]) <= 8 and marked_groups >= 8
    assert s.visual_lengths == [len(s.visual_kept["encoder:0"])] * 2 + [4, 4]


def test_vflowopt_search_meets_its_budget():
    from tokensieve import vflowopt_search

    model = model_of("llava")
    inputs = batch("llava", model, [1, 1, 1])
    result = vflowopt_search.search(model, [inputs], 0.6, trials=6, progress=False)
    assert -1.0 <= result["objective"] <= 1.0
    options = {**result["options"], "stage_keep": tuple(result["options"]["stage_keep"])}
    with torch.no_grad(), tokensieve.prune(model, "vflowopt", **options) as run:
        model(**inputs)
    assert all(s.flops / s.flops_unpruned <= 0.6 for s in run.report.samples)


def test_the_vflowopt_search_refuses_a_model_it_cannot_run_on_before_any_trial(monkeypatch):
    import optuna

    from tokensieve import vflowopt_search

    model = model_of("llava-next-video")
    monkeypatch.setattr(optuna, "create_study", lambda **kwargs: pytest.fail("a study was created"))
    with pytest.raises(TypeError, match="pools each frame's patches before the LLM"):
        vflowopt_search.search(model, [], 0.6, trials=2, progress=False)


def test_vflowopt_searches_the_release_space():
    """The ranges of the release's optimiser (sihany077/VFlowOpt, src/lmms_eval-0.2.4/lmms_eval/models/
    llava_ov_opt_all.py, optimize_ratios): t in [0, 50], m in [3, 24] real, alpha in [-1, 1], the first
    stage's share of the vision keep in [0.2/0.375, 1]; its released optimum (t 39.3, m 17.4) is a valid
    setting, and m is real."""
    import optuna

    from tokensieve import vflowopt_search

    model = model_of("llava")
    inputs = batch("llava", model, [1, 1])
    seen = []
    original = optuna.Study.optimize

    def record(study, objective, n_trials, **kwargs):
        original(study, objective, n_trials=n_trials, **kwargs)
        seen.extend(t.params for t in study.trials)

    optuna.Study.optimize = record
    try:
        vflowopt_search.search(model, [inputs], 0.6, trials=8, progress=False)
    finally:
        optuna.Study.optimize = original
    assert len(seen) == 8
    for p in seen:
        assert 0 <= p["t"] <= 50 and 3 <= p["m"] <= 24 and -1 <= p["alpha"] <= 1
        assert 0.2 / 0.375 <= p["stage_share"] <= 1 and 0.6 <= p["vit_keep"] <= 0.9
    assert any(p["m"] != int(p["m"]) for p in seen)
    tokensieve.methods.VFlowOpt(t=39.26, m=17.39, alpha=-0.5).bind(4)
    with pytest.raises(ValueError, match="the release's ranges"):
        tokensieve.methods.VFlowOpt(m=0.5).bind(4)


@pytest.mark.parametrize("budget", [0.9, 0.75])
def test_vflowopt_scales_its_whole_schedule_up_to_a_budget_above_its_default_cost(budget):
    model = model_of("llava")
    inputs = batch("llava", model, [1, 2, 1])
    with torch.no_grad(), tokensieve.prune(model, "vflowopt", flops=budget) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    for s in run.report.samples:  # the default schedule alone costs about 0.43-0.58 here
        assert budget - 0.06 <= s.flops / s.flops_unpruned <= budget

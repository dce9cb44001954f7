"""Engine mechanics on tiny random-weight models of every supported family."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import IMAGE, batch, build, collate, layer_input, samples

import tokensieve
from tokensieve import compat
from tokensieve.flops import Shape, prefill_flops

VISION = ["llava", "llava-next", "llava-next-video", "qwen2-vl", "qwen2.5-vl"]
TEXT = ["llama", "qwen2"]
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def model_of(family: str, attn: str = "sdpa") -> torch.nn.Module:
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = build(family, attn)
    return _MODELS[family, attn]


def keep_all(family: str) -> tuple[str, dict]:
    return ("streamingllm", {"sinks": 4, "window": 10_000}) if family in TEXT else ("fastv", {"layer": 2, "keep": 1.0})


def greedy(model, inputs, steps=5):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, min_new_tokens=steps)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", VISION + TEXT)
@pytest.mark.parametrize("sizes", [[1], [1, 2, 1]])
def test_keeping_everything_is_exact(family, attn, sizes):
    model = model_of(family, attn)
    inputs = batch(family, model, [0] * len(sizes) if family in TEXT else sizes)
    with torch.no_grad():
        logits = model(**inputs).logits
        ids = greedy(model, inputs)
        name, opts = keep_all(family)
        with tokensieve.prune(model, name, **opts) as run:
            pruned_logits = model(**inputs).logits
            pruned_ids = greedy(model, inputs)
    assert torch.equal(logits, pruned_logits)
    assert torch.equal(ids, pruned_ids)
    assert run.report.decode_steps == 4


@pytest.mark.parametrize("family", VISION)
@pytest.mark.parametrize("method,opts", [("fastv", {"layer": 2, "keep": 0.5}), ("random", {"keep": 0.4, "layer": 1}),
                                         ("pdrop", {"layers": (1, 2), "ratio": 0.5})])  # renumbers inside the LLM
def test_batch_equals_each_sample_alone(family, method, opts):
    """Tolerance: last-token logits within 1e-4 (padded batches change float summation order)."""
    model = model_of(family)
    parts = samples(family, model, [1, 2, 1])
    inputs = collate(family, parts)
    with torch.no_grad(), tokensieve.prune(model, method, **opts) as run:
        logits = model(**inputs).logits[:, -1]
        ids = greedy(model, inputs)
        report = run.report
        for i, part in enumerate(parts):
            alone = collate(family, [part])
            one = model(**alone).logits[:, -1]
            assert torch.allclose(one, logits[i : i + 1], atol=1e-4), (one - logits[i]).abs().max()
            one_ids = greedy(model, alone)
            assert torch.equal(one_ids[0, -5:], ids[i, -5:])
            pad = inputs["input_ids"].shape[1] - len(part["ids"])
            stage = [k for k in report.samples[i].visual_kept if k != "input"][0]
            batch_kept = [p - pad for p in report.samples[i].visual_kept[stage]]
            assert batch_kept == run.report.samples[0].visual_kept[stage]


def fastv_reference(model, inputs, layer, keep, variant, steps):
    """FastV straight from the paper, batch 1: eager attention, an explicit loop over layers, original
    positions; the kept set is fixed at prefill and decoded tokens are always kept."""
    lm = model.model.language_model
    embeds = layer_input(model, 0, inputs)[0][0]
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    prompt = embeds.shape[0]
    generated, kept, first_logits = [], None, None
    with torch.no_grad():
        for step in range(steps):
            x = embeds if not generated else torch.cat([embeds, lm.embed_tokens(torch.tensor(generated))])
            pos = torch.arange(x.shape[0])
            for idx, dec in enumerate(lm.layers):
                if idx == layer:
                    alive = torch.cat([torch.tensor([p for p in range(prompt) if p not in set(vis.tolist()) or p in kept]),
                                       torch.arange(prompt, x.shape[0] + (0 if idx else 0))]).long()
                    alive = alive[alive < pos.max() + 1]
                    sel = torch.searchsorted(pos, alive)
                    x, pos = x[sel], pos[sel]
                cos, sin = lm.rotary_emb(x[None], pos[None])
                mask = torch.where(pos[None, :] <= pos[:, None], 0.0, torch.finfo(x.dtype).min)[None, None]
                if idx == layer - 1 and kept is None:
                    _, w = dec.self_attn(dec.input_layernorm(x[None]), position_embeddings=(cos, sin), attention_mask=mask)
                    a = w[0].mean(0)
                    score = a[-1, vis] if variant == "code" else a[:, vis].mean(0)
                    k = max(1, round(keep * vis.numel()))
                    kept = set(vis[score.topk(k).indices].tolist())
                x = dec(x[None], attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos[None])[0]
            logits = model.lm_head(lm.norm(x))[-1]
            first_logits = logits if first_logits is None else first_logits
            generated.append(int(logits.argmax()))
    return sorted(kept), first_logits, generated


@pytest.mark.parametrize("variant", ["code", "paper"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_matches_paper_reference(variant, attn):
    model = model_of("llava", attn)
    reference = model_of("llava", "eager")
    inputs = batch("llava", model, [2])
    kept, ref_logits, ref_ids = fastv_reference(reference, inputs, layer=2, keep=0.375, variant=variant, steps=4)
    with torch.no_grad(), tokensieve.prune(model, "fastv", layer=2, keep=0.375, variant=variant) as run:
        logits = model(**inputs).logits[0, -1]
        ids = greedy(model, inputs, steps=4)[0, -4:].tolist()
    assert run.report.samples[0].visual_kept["prefill:2"] == kept
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert ids == ref_ids


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "llama"])
def test_partial_attention_matches_eager(family):
    from tokensieve.attention import attention_rows

    model = model_of(family, "eager")
    inputs = batch(family, model, [0, 0] if family in TEXT else [1, 2])
    lm = model.model.language_model if family != "llama" else model.model
    x, kwargs = layer_input(model, 2, inputs)
    seen = {"x": x}
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    cos, sin = kwargs["position_embeddings"]
    eager = out.attentions[2]
    n = eager.shape[-1]
    mask = inputs["attention_mask"].bool()
    allowed = (torch.arange(n)[None, :] <= torch.arange(n)[:, None])[None] & mask[:, None, :]
    allowed |= torch.eye(n, dtype=torch.bool)[None]
    queries = torch.tensor([[n - 1, n - 3], [n - 1, n - 2]])
    with torch.no_grad():
        rows = attention_rows(lm.layers[2], seen["x"], cos, sin, queries, allowed.gather(1, queries[..., None].expand(-1, -1, n)))
    expected = eager.gather(2, queries[:, None, :, None].expand(-1, eager.shape[1], -1, n))
    assert torch.allclose(rows, expected, atol=1e-5)


def test_lengths_follow_the_schedule():
    model = model_of("llava")
    inputs = batch("llava", model, [2])
    total = inputs["input_ids"].shape[1]
    with torch.no_grad(), tokensieve.prune(model, "fastv", layer=2, keep=0.25) as run:
        greedy(model, inputs, steps=3)
    sample = run.report.samples[0]
    after = total - 32 + 8
    assert sample.hidden_lengths == [total, total, after, after]
    assert sample.cache_lengths_prefill == [total, total, after, after]
    assert sample.cache_lengths_end == [total + 2, total + 2, after + 2, after + 2]
    assert len(sample.visual_kept["prefill:2"]) == 8
    assert sample.flops < sample.flops_unpruned
    json.dumps(run.report.to_dict())


def test_streamingllm_keeps_cache_constant_and_positions_true():
    from transformers import DynamicCache

    model = model_of("llama")
    inputs = batch("llama", model, [0, 0])
    lengths = []
    seen_positions = []
    def grab(module, args, kwargs):
        seen_positions.append(kwargs["position_ids"].clone())

    hook = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        plain = greedy(model, inputs, steps=6)
        unpruned_positions = list(seen_positions)
        seen_positions.clear()
        cache = DynamicCache()
        with tokensieve.prune(model, "streamingllm", sinks=2, window=5, positions="keep") as run:
            out = model.generate(**inputs, **compat.cache_argument(model, cache), max_new_tokens=6, min_new_tokens=6, do_sample=False)
            lengths = [layer.keys.shape[-2] for layer in cache.layers]
    hook.remove()
    assert out.shape == plain.shape
    assert all(s.cache_lengths_end == [7] * 4 for s in run.report.samples)
    assert lengths == [7] * 4
    assert all(torch.equal(a, b) for a, b in zip(seen_positions, unpruned_positions))


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_decoded_tokens_keep_true_positions(family):
    model = model_of(family)
    inputs = batch(family, model, [1, 2])
    lm = model.model.language_model
    seen = []
    def grab(module, args, kwargs):
        seen.append((kwargs["position_ids"].clone(), kwargs["position_embeddings"][0].clone()))

    hook = lm.layers[3].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        greedy(model, inputs, steps=4)
        plain = list(seen)
        seen.clear()
        with tokensieve.prune(model, "fastv", layer=2, keep=0.5):
            greedy(model, inputs, steps=4)
    hook.remove()
    for (p0, c0), (p1, c1) in list(zip(plain, seen))[1:]:
        assert torch.equal(p0, p1) and torch.equal(c0, c1)


def test_pool_averages_grid_cells():
    model = model_of("llava")
    inputs = batch("llava", model, [1])
    norm_inputs = []
    lm = model.model.language_model
    h = lm.layers[0].input_layernorm.register_forward_pre_hook(lambda m, a: norm_inputs.append(a[0]))
    with torch.no_grad():
        model(**inputs)
        with tokensieve.prune(model, "pool", stride=2) as run:
            model(**inputs)
    h.remove()
    full, pooled = norm_inputs[0][0], norm_inputs[1][0]
    vis = (inputs["input_ids"][0] == IMAGE).nonzero().squeeze(1)
    grid = full[vis].view(4, 4, -1)
    expected = grid.view(2, 2, 2, 2, -1).permute(0, 2, 1, 3, 4).reshape(4, 4, -1).mean(1)
    kept = run.report.samples[0].visual_kept["encoder:0"]
    assert kept == [vis[i].item() for i in (0, 2, 8, 10)]
    first = int(vis[0])
    assert torch.allclose(pooled[first : first + 4], expected, atol=1e-6)


def test_random_is_seeded():
    model = model_of("llava")
    inputs = batch("llava", model, [2, 1])
    kept = []
    for seed in (0, 0, 1):
        with torch.no_grad(), tokensieve.prune(model, "random", keep=0.25, seed=seed) as run:
            model(**inputs)
        kept.append(run.report.samples[0].visual_kept["encoder:0"])
    assert kept[0] == kept[1] != kept[2]
    assert len(kept[0]) == 8


def _is_clean(model) -> bool:
    layers = model.model.language_model.layers if hasattr(model.model, "language_model") else model.model.layers
    return all("forward" not in layer.__dict__ for layer in layers) and not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize("call,error,message", [
    (lambda m: tokensieve.prune(m, "fastv", keep=0.0), ValueError, "keep must be in (0, 1]"),
    (lambda m: tokensieve.prune(m, "fastv", keep=1.5), ValueError, "keep must be in (0, 1]"),
    (lambda m: tokensieve.prune(m, "fastv", layer=9), ValueError, "outside this model"),
    (lambda m: tokensieve.prune(m, "fastvv"), ValueError, "did you mean 'fastv'"),
    (lambda m: tokensieve.prune(m, "fastv", ratio=0.5), TypeError, "its options are"),
    (lambda m: tokensieve.prune(torch.nn.Linear(2, 2), "fastv"), TypeError, "supported model classes"),
    (lambda m: tokensieve.prune(model_of("llama"), "fastv"), ValueError, "text-only model"),
])
def test_bad_arguments_raise_before_touching_the_model(call, error, message):
    model = model_of("llava")
    inputs = batch("llava", model, [1])
    with torch.no_grad():
        before = model(**inputs).logits
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            with call(model):
                pass
        assert torch.equal(model(**inputs).logits, before)
    assert _is_clean(model) and _is_clean(model_of("llama"))


def test_bad_inputs_raise_and_leave_the_model_as_it_was():
    from transformers import StaticCache

    model = model_of("llava")
    inputs = batch("llava", model, [1])
    with torch.no_grad():
        before = model(**inputs).logits
        with tokensieve.prune(model, "fastv"):
            cache = StaticCache(config=model.config.text_config, max_cache_len=64)
            with pytest.raises(TypeError, match="DynamicCache"):
                model(**inputs, **compat.cache_argument(model, cache))
        assert _is_clean(model)
        assert torch.equal(model(**inputs).logits, before)


def test_context_restores_the_model_when_the_body_raises():
    model = model_of("qwen2-vl")
    inputs = batch("qwen2-vl", model, [1])
    with torch.no_grad():
        before = model(**inputs).logits
        with pytest.raises(RuntimeError, match="boom"):
            with tokensieve.prune(model, "fastv", keep=0.25):
                model(**inputs)
                raise RuntimeError("boom")
        assert _is_clean(model)
        assert torch.equal(model(**inputs).logits, before)


def test_method_classes_are_accepted():
    model = model_of("llava")
    inputs = batch("llava", model, [1])
    with torch.no_grad(), tokensieve.prune(model, tokensieve.methods.FastV(layer=1, keep=0.25)) as run:
        model(**inputs)
    assert run.report.samples[0].hidden_lengths[1] == inputs["input_ids"].shape[1] - 12


@pytest.mark.parametrize("method,opts,target", [("fastv", {"layer": 1}, 0.7), ("random", {"layer": 0}, 0.7), ("random", {"layer": 2}, 0.85)])
def test_flops_budget_is_met_per_sample(method, opts, target):
    model = model_of("llava")
    inputs = batch("llava", model, [2, 1, 1])
    with torch.no_grad(), tokensieve.prune(model, method, flops=target, **opts) as run:
        model(**inputs)
    for s in run.report.samples:
        assert s.flops / s.flops_unpruned <= target
        kept = s.visual_lengths[-1]
        more = list(s.hidden_lengths)
        for layer in range(opts["layer"], len(more)):
            more[layer] += 1
        shape = Shape.from_config(model.config.text_config)
        assert prefill_flops(shape, more) / s.flops_unpruned > target, "one more visual token would still fit"
        assert 0 < kept < s.visual_tokens
    with pytest.raises(ValueError, match="keep or flops, not both"):
        with tokensieve.prune(model, method, keep=0.5, flops=0.5, **opts):
            pass


def test_pool_meets_flops_and_keep():
    model = model_of("llava")
    inputs = batch("llava", model, [1])
    with torch.no_grad(), tokensieve.prune(model, "pool", flops=0.6) as run:
        model(**inputs)
    s = run.report.samples[0]
    assert s.flops / s.flops_unpruned <= 0.6 and s.visual_lengths[0] == 6  # 7 of 16 meet 0.6 -> a 3x2 grid
    with torch.no_grad(), tokensieve.prune(model, "pool", keep=0.1) as run:
        model(**inputs)
    assert run.report.samples[0].visual_lengths[0] == 1  # keep 0.1 -> floor(1.6) = 1 cell


def test_nested_contexts_are_refused():
    model = model_of("llava")
    with tokensieve.prune(model, "fastv"):
        with pytest.raises(ValueError, match="already inside"):
            with tokensieve.prune(model, "random"):
                pass
    assert _is_clean(model) and not hasattr(model, "_tokensieve_engine")

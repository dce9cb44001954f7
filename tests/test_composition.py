"""Methods composed across stages on one ledger (``tokensieve.methods.composition``)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import IMAGE, batch, build, collate, samples

import tokensieve
from tokensieve import methods
from tokensieve.cli.options import composition_options

_MODELS: dict[str, torch.nn.Module] = {}


def model_of(family: str = "llava") -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = build(family)
    return _MODELS[family]


def greedy(model, inputs, steps=5):
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


@pytest.mark.parametrize("family", ["llava", "qwen2-vl"])
def test_a_composition_that_removes_nothing_is_exact(family):
    model = model_of(family)
    inputs = batch(family, model, [1, 2])
    with torch.no_grad():
        logits, ids = model(**inputs).logits, greedy(model, inputs)
        with tokensieve.prune(model, ["divprune", "fastv", "a2sf"], divprune={"keep": 1.0},
                              fastv={"layer": 2, "keep": 1.0}, a2sf={"budget": 10_000}) as run:
            got_logits, got_ids = model(**inputs).logits, greedy(model, inputs)
    assert torch.equal(logits, got_logits)
    assert torch.equal(ids, got_ids)
    assert run.report.method == "divprune+fastv+a2sf"


def test_each_stage_acts_on_what_the_one_before_left():
    """DivPrune keeps half of the visual tokens; FastV keeps half of *those*, among them; A2SF then
    holds its KV budget. The kept sets are each the member's own rule: DivPrune's is what DivPrune
    alone keeps, FastV's is FastV's top-k by layer 1's last-token attention over DivPrune's survivors."""
    model = model_of()
    inputs = batch("llava", model, [2])
    with torch.no_grad():
        with tokensieve.prune(model, "divprune", keep=0.5) as alone:
            model(**inputs)
        with tokensieve.prune(model, "divprune+fastv+a2sf", divprune={"keep": 0.5}, fastv={"layer": 2, "keep": 0.5},
                              a2sf={"keep": 0.5}) as run:
            greedy(model, inputs)
    kept = run.report.samples[0].visual_kept
    encoder, prefill = kept["encoder:0"], kept["prefill:2"]
    assert encoder == alone.report.samples[0].visual_kept["encoder:0"]
    assert len(encoder) == round(0.5 * len(kept["input"]))
    assert len(prefill) == round(0.5 * len(encoder)) and set(prefill) <= set(encoder)
    # FastV's rule on the survivors: the top of layer 1's head-mean attention of the last token
    with torch.no_grad(), tokensieve.prune(model, "divprune", keep=0.5):
        out = model(**inputs, output_attentions=False, output_hidden_states=True)
    lm = model.model.language_model
    hidden = out.hidden_states[1][0]  # input of layer 1 over the alive rows (DivPrune renumbers positions)
    ids = inputs["input_ids"][0]
    alive = [p for p in range(ids.shape[0]) if ids[p] != IMAGE or p in set(encoder)]
    layer = lm.layers[1]
    x = layer.input_layernorm(hidden)
    attn = layer.self_attn
    n = x.shape[0]
    q = attn.q_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    cos, sin = lm.rotary_emb(x[None], torch.arange(n)[None])
    q, k = (t[None] for t in (q, k))
    half = attn.head_dim // 2

    def rot(t):
        return torch.cat((-t[..., half:], t[..., :half]), -1)

    q, k = q * cos[:, None] + rot(q) * sin[:, None], k * cos[:, None] + rot(k) * sin[:, None]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.einsum("hd,hnd->hn", q[0, :, -1], k[0]) * attn.scaling  # (H, n): the last token's row
    probs = scores.softmax(-1).mean(0)
    visual_rows = [i for i, p in enumerate(alive) if ids[p] == IMAGE]
    top = probs[visual_rows].topk(len(prefill)).indices
    assert sorted(alive[visual_rows[i]] for i in top.tolist()) == prefill


def test_batch_equals_each_sample_alone():
    """Tolerance: last-token logits within 1e-4 (padded batches change float summation order)."""
    model = model_of()
    parts = samples("llava", model, [1, 2, 1])
    spec = dict(divprune={"keep": 0.5}, fastv={"layer": 2, "keep": 0.5}, snapkv={"keep": 0.5})
    with torch.no_grad(), tokensieve.prune(model, "divprune+fastv+snapkv", **spec):
        inputs = collate("llava", parts)
        logits = model(**inputs).logits[:, -1]
        for i, part in enumerate(parts):
            one = model(**collate("llava", [part])).logits[:, -1]
            assert torch.allclose(one, logits[i : i + 1], atol=1e-4), (one - logits[i]).abs().max()


def test_one_flops_budget_is_split_among_the_members_that_take_it():
    method = methods.get("divprune+pdrop+h2o", flops=0.36, h2o={"keep": 0.5})
    divprune, pdrop, h2o = method.members
    assert divprune.flops == pytest.approx(0.6) and pdrop.flops == pytest.approx(0.6)
    assert h2o.keep == 0.5
    model = model_of()
    inputs = batch("llava", model, [2])
    with torch.no_grad(), tokensieve.prune(model, method) as run:
        model(**inputs)
    assert run.report.flops_ratio == pytest.approx(0.36, abs=0.04)
    assert run.report.options["flops"] == 0.36 and run.report.options["pdrop"]["flops"] == pytest.approx(0.6)


def test_a_member_given_its_own_budget_takes_no_share():
    method = methods.get("divprune+fastv", flops=0.5, divprune={"keep": 0.5}, fastv={"layer": 2})
    assert method.members[0].keep == 0.5 and method.members[0].flops is None
    assert method.members[1].flops == pytest.approx(0.5)


@pytest.mark.parametrize("spec,options,message", [
    ("divprune+pool", {}, "both act at the encoder stage"),
    ("fastv+pdrop", {}, "both act at the prefill stage"),
    ("aim+fastv", {}, "both act at the prefill stage"),
    ("snapkv+h2o", {}, "both act at the cache stage"),
    ("lazyllm+a2sf", {}, "composes with no other method"),
    ("divprune+fastv", {"keep": 0.5}, "under its members' names"),
    ("divprune+fastv", {"fastv": 2}, "are a dict"),
    ("divprune+divprune", {}, "appears twice"),
    ("fastv+a2sf", {"flops": 0.5, "fastv": {"keep": 0.5}}, "needs a member that solves a FLOPs budget"),
    ("fastv+a2sf", {"flops": 1.5}, "flops"),
    ("divprune+fastx", {}, "did you mean 'fastv'"),
    ("divprune+pdrop", {"divprune": {"positions": "keep"}, "pdrop": {"positions": "renumber"}}, "renumber positions differently"),
])
def test_conflicts_and_bad_options_are_refused(spec, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        with tokensieve.prune(model_of(), spec, **options):
            pass


def test_a_fitprune_recipe_for_the_whole_image_needs_fractions_after_an_encoder_member():
    model = model_of()
    inputs = batch("llava", model, [2])
    visual = int((inputs["input_ids"][0] == IMAGE).sum())
    recipe = {"removed": {1: visual // 4}, "visual_tokens": visual, "num_layers": 4}
    with pytest.raises(ValueError, match="fractions=True"):
        with torch.no_grad(), tokensieve.prune(model, "divprune+fitprune", divprune={"keep": 0.5},
                                               fitprune={"recipe": recipe}):
            model(**inputs)
    with torch.no_grad(), tokensieve.prune(model, "divprune+fitprune", divprune={"keep": 0.5},
                                           fitprune={"recipe": recipe, "fractions": True}) as run:
        model(**inputs)
    kept = run.report.samples[0].visual_kept
    survivors = len(kept["encoder:0"])
    assert len(kept["inside:1"]) == survivors - round(survivors * (visual // 4) / visual)


def test_the_command_line_spec():
    name, options = composition_options("divprune:keep=0.5+pdrop:layers=1,2,3,ratio=0.25+h2o:keep=0.5", {})
    assert name == "divprune+pdrop+h2o"
    assert options == {"divprune": {"keep": 0.5}, "pdrop": {"layers": (1, 2, 3), "ratio": 0.25}, "h2o": {"keep": 0.5}}
    assert composition_options("divprune+fastv", {"flops": "0.3"})[1] == {"divprune": {}, "fastv": {}, "flops": 0.3}
    with pytest.raises(ValueError, match="--keep with a composition"):
        composition_options("divprune+fastv", {"keep": "0.5"})
    with pytest.raises(ValueError, match="takes no option 'layer'"):
        composition_options("divprune:layer=2+fastv", {})
    with pytest.raises(ValueError, match="expected a number"):
        composition_options("divprune:keep=half+fastv", {})


def test_bench_rows_of_compositions():
    from tokensieve import bench
    from tokensieve.recipe import Recipe

    name, fixed = bench.parse_method("divprune+fitprune+a2sf:a2sf.keep=0.5:fitprune.score=fit")
    assert name == "divprune+fitprune+a2sf" and bench.axis(name) == "flops"
    assert fixed == {"divprune": {}, "fitprune": {"score": "fit"}, "a2sf": {"keep": 0.5}}
    fitted = []

    def recipe(share):
        fitted.append(share)
        return Recipe(removed={1: 2}, visual_tokens=16, num_layers=4, budget=share)

    options = bench.composition_cell(name, fixed, 0.25, recipe)
    assert fitted == [pytest.approx(0.5)]  # two members share 0.25: DivPrune and FitPrune, 0.5 each
    assert options["divprune"] == {"flops": pytest.approx(0.5)}
    assert options["fitprune"]["fractions"] is True and options["fitprune"]["score"] == "fit"
    assert options["a2sf"] == {"keep": 0.5}
    with pytest.raises(ValueError, match="both act at the prefill stage"):
        bench.parse_method("fastv+pdrop")
    with pytest.raises(ValueError, match="member.key=value"):
        bench.parse_method("divprune+fastv:layer=2")
    with pytest.raises(ValueError, match="'snapkv' is not one of its members"):
        bench.parse_method("divprune+fastv:snapkv.keep=0.5")
    with pytest.raises(ValueError, match="takes no option 'recipe' here"):
        bench.parse_method("divprune+fitprune:fitprune.recipe=x.json")
    with pytest.raises(ValueError, match="wrong type"):
        bench.parse_method("divprune+fastv:fastv.layer=two")

"""Fitted schedules: an in-LLM scorer pruning by a recipe of layers and counts, and the fit that makes it.

The scorers' rules under a recipe are checked against references written from the authors' releases:
FastV's rule (the last token's attention at layer ``l - 1``, mean over heads, release
``modeling_llama.py``) applied before every layer the recipe names, in an explicit layer loop here;
PDrop and TransPrune against the release references of ``test_reference_pdrop_transprune`` with their
stage layers and ratios set to the recipe's. The fit (``tokensieve.schedule_fitting``) is checked for
its budget, its greedy choice against KL divergences computed here from plain logits, and the
property that one descent for several budgets gives each budget's own fit.
"""

from __future__ import annotations

import json

import pytest
import torch
from reference_models import decoder_input, image_span, last_logits, tiny_llava
from test_reference_fastv_dart import _layer, _lm, tiny_inputs
from test_reference_pdrop_transprune import pdrop_reference, transprune_reference
from tiny_models import batch

import tokensieve
from tokensieve import bench, methods
from tokensieve.recipe import Recipe
from tokensieve.schedule_fitting import fit_schedule, fit_schedules

LOGITS_ATOL = 1e-4


def _recipe(method: str, removed: dict[int, int], visual: int = 16, layers: int = 4) -> Recipe:
    return Recipe(removed=removed, visual_tokens=visual, num_layers=layers, method=method)


def _pruned(model, inputs, method):
    with torch.no_grad(), tokensieve.prune(model, method) as run:
        logits = model(**inputs).logits[0, -1]
    sample = run.report.samples[0]
    return {k: v for k, v in sample.visual_kept.items() if k.startswith("prefill:")}, logits, sample


def fastv_at_layers(model, inputs, kept_from: dict[int, int]):
    """FastV's rule before every layer ``l`` of ``kept_from`` (visual tokens kept from ``l`` on): the
    attention of layer ``l - 1`` (``layer_outputs[1]``) averaged over heads, the last token's row over
    the image tokens still alive, the top ones stay; rows keep their original positions
    (``position_ids = keep_indexs``)."""
    start, n_image = image_span(model, inputs)
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = torch.arange(x.shape[0])
        kept, probs = {}, None
        for idx, layer in enumerate(_lm(model).layers):
            if idx in kept_from:
                image = (pos >= start) & (pos < start + n_image)
                rows = image.nonzero().squeeze(1)
                score = probs.mean(0)[-1][rows]
                top = rows[score.topk(kept_from[idx]).indices]
                keep = (~image).clone()
                keep[top] = True
                x, pos = x[keep], pos[keep]
                kept[f"prefill:{idx}"] = sorted(pos[(pos >= start) & (pos < start + n_image)].tolist())
            x, probs = _layer(model, layer, x, pos)
        return kept, last_logits(model, x)


@pytest.mark.parametrize("removed,index", [({1: 4, 3: 6}, 0), ({2: 8}, 1), ({1: 2, 2: 3, 3: 4}, 2)])
def test_fastv_by_a_recipe_applies_its_rule_before_each_recipe_layer(removed, index):
    model = tiny_llava()
    inputs = tiny_inputs(index)
    left, kept_from = 16, {}
    for layer, n in sorted(removed.items()):
        left -= n
        kept_from[layer] = left
    expected, ref_logits = fastv_at_layers(model, inputs, kept_from)
    kept, logits, sample = _pruned(model, inputs, methods.get("fastv", recipe=_recipe("fastv", removed)))
    assert kept == expected
    assert sample.visual_lengths == [min([16] + [kept_from[l] for l in kept_from if l <= i]) for i in range(4)]
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


@pytest.mark.parametrize("removed", [{1: 4, 3: 6}, {2: 10}])
def test_pdrop_by_a_recipe_is_the_release_with_those_stages(removed):
    """The release keeps ``int(N * ratio_list[s])`` at stage ``s``: ratios of count / 16 are exact."""
    model = tiny_llava()
    inputs = batch("llava", model, [1])
    layers, left, ratios = sorted(removed), 16, []
    for layer in layers:
        left -= removed[layer]
        ratios.append(left / 16)
    expected, ref_logits, _, _ = pdrop_reference(model, inputs, layers, ratios)
    kept, logits, _ = _pruned(model, inputs, methods.get("pdrop", recipe=_recipe("pdrop", removed)))
    assert kept == expected
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_transprune_by_a_recipe_is_the_release_with_those_stages():
    model = tiny_llava()
    inputs = batch("llava", model, [1])
    expected, ref_logits, _, _ = transprune_reference(model, inputs, [1, 3], [12 / 16, 5 / 16])
    kept, logits, _ = _pruned(model, inputs, methods.get("transprune", recipe=_recipe("transprune", {1: 4, 3: 7})))
    assert kept == expected
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_dart_by_a_recipe_keeps_the_recipe_counts_at_its_layers():
    model = tiny_llava()
    kept, _, sample = _pruned(model, tiny_inputs(0), methods.get("dart", recipe=_recipe("dart", {1: 5, 2: 4})))
    assert [len(v) for v in kept.values()] == [11, 7] and list(kept) == ["prefill:1", "prefill:2"]
    assert set(kept["prefill:2"]) < set(kept["prefill:1"])
    assert sample.visual_lengths == [16, 11, 7, 7]


def test_a_recipe_scales_to_other_visual_token_counts_by_its_cumulative_fraction():
    recipe = _recipe("fastv", {1: 4, 3: 6})  # 10 of 16 removed by layer 3
    assert [recipe.kept_from(l, 16) for l in range(4)] == [16, 12, 12, 6]
    assert [recipe.kept_from(l, 32) for l in range(4)] == [32, 24, 24, 12]
    assert recipe.kept_from(3, 3) == 1  # 3 - round(1.875) = 1, and never below one


def test_a_recipe_replaces_the_methods_own_budget_and_is_refused_by_others():
    recipe = _recipe("fastv", {1: 4})
    with pytest.raises(ValueError, match="drop keep"):
        methods.get("fastv", recipe=recipe, keep=0.5)
    with pytest.raises(ValueError, match="drop layer"):
        methods.get("fastv", recipe=recipe, layer=3)
    with pytest.raises(ValueError, match="fitted for fastv, not pdrop"):
        methods.get("pdrop", recipe=recipe)
    with pytest.raises(ValueError, match="use --method fastv"):
        methods.get("fitprune", recipe=recipe)
    with pytest.raises(ValueError, match="fitted for fitprune"):
        methods.get("fastv", recipe=Recipe(removed={1: 4}, visual_tokens=16, num_layers=4))
    with pytest.raises(ValueError, match="names layer 0"):
        methods.get("pdrop", recipe=_recipe("pdrop", {0: 4})).bind(4)
    with pytest.raises(ValueError, match="6 layers"):
        methods.get("pdrop", recipe=_recipe("pdrop", {1: 4}, layers=6)).bind(4)
    loaded = Recipe.from_dict(recipe.to_dict())
    assert loaded.method == "fastv" and loaded.removed == {1: 4}


# ---------------------------------------------------------------------------------------------- the fit
def _calibration(model):
    return [batch("llava", model, [1, 1, 1], seed=s) for s in (3, 4)]


def _kl(model, batches, pruner) -> float:
    """Mean KL(unpruned || pruned) of the last position's next-token distribution, from plain logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs in batches:
            p = torch.log_softmax(model(**inputs, use_cache=False).logits[:, -1].double(), -1)
            with tokensieve.prune(model, pruner):
                q = torch.log_softmax(model(**inputs, use_cache=False).logits[:, -1].double(), -1)
            total += float((p.exp() * (p - q)).sum())
            count += p.shape[0]
    return total / count


def test_the_fit_meets_the_budget_and_its_first_step_is_the_least_divergence_per_flop():
    model = tiny_llava()
    batches = _calibration(model)
    recipe = fit_schedule(model, batches, "fastv", 0.8, step=0.25, progress=False)
    assert recipe.method == "fastv" and recipe.objective == "kl" and recipe.budget == 0.8
    assert recipe.achieved <= 0.8 and min(recipe.removed) >= 1
    measured = []
    with torch.no_grad(), tokensieve.prune(model, methods.get("fastv", recipe=recipe)) as run:
        model(**batches[0], use_cache=False)
    measured = sum(s.flops for s in run.report.samples) / sum(s.flops_unpruned for s in run.report.samples)
    assert measured <= 0.8 + 0.02  # the ledger also counts the ranking's own cost
    # the first step: 4 tokens (step 0.25 of 16) before the layer with the least KL per FLOP saved
    from tokensieve.flops import Shape, prefill_flops
    shape = Shape.from_config(model.config.text_config)
    lengths = [(int(m.sum()), 16) for inputs in batches for m in inputs["attention_mask"]]

    def ratio(layer: int) -> float:
        pruned = sum(prefill_flops(shape, [n] * layer + [n - 4] * (shape.layers - layer)) for n, _ in lengths)
        return pruned / sum(prefill_flops(shape, [n] * shape.layers) for n, _ in lengths)

    costs = {l: _kl(model, batches, methods.get("fastv", recipe=_recipe("fastv", {l: 4}))) / (1 - ratio(l))
             for l in range(1, shape.layers)}
    assert recipe.extra["path"][0]["layer"] == min(costs, key=costs.get)
    assert recipe.extra["kl"] == pytest.approx(_kl(model, batches, methods.get("fastv", recipe=recipe)), abs=1e-9)


def test_one_descent_for_several_budgets_gives_each_budgets_own_fit():
    model = tiny_llava()
    batches = _calibration(model)
    both = fit_schedules(model, batches, "pdrop", [0.9, 0.7], step=0.25, progress=False)
    alone = [fit_schedule(model, batches, "pdrop", b, step=0.25, progress=False) for b in (0.9, 0.7)]
    assert [r.removed for r in both] == [r.removed for r in alone]
    assert both[0].achieved <= 0.9 and both[1].achieved <= 0.7


def test_the_fit_refuses_bad_requests():
    model = tiny_llava()
    batches = _calibration(model)[:1]
    with pytest.raises(ValueError, match="can be fitted for"):
        fit_schedule(model, batches, "divprune", 0.5)
    with pytest.raises(ValueError, match="drop keep"):
        fit_schedule(model, batches, "fastv", 0.5, options={"keep": 0.5})
    with pytest.raises(ValueError, match="out of reach"):
        fit_schedule(model, batches, "fastv", 0.01)
    with pytest.raises(ValueError, match="budgets must be in"):
        fit_schedules(model, batches, "fastv", [1.5])


def test_bench_takes_a_fitted_schedule_as_a_row():
    assert bench.parse_method("fastv:schedule=fitted") == ("fastv", {"schedule": "fitted"})
    assert bench.parse_method("fastv:variant=paper:schedule=fitted") == ("fastv", {"variant": "paper", "schedule": "fitted"})
    bench.check_specs(["fastv:schedule=fitted", "pdrop:schedule=fitted"], [0.5, 0.3])
    with pytest.raises(ValueError, match="schedule takes one of"):
        bench.parse_method("fastv:schedule=best")
    with pytest.raises(ValueError, match="takes no option 'schedule'"):
        bench.parse_method("fitprune:schedule=fitted")
    with pytest.raises(ValueError, match="cannot run"):
        bench.check_specs(["fastv:layer=3:schedule=fitted"], [0.5])


def test_flops_and_eval_take_a_fitted_recipe_file(tmp_path, capsys):
    from tokensieve.cli import main
    from tokensieve.cli.eval_cmd import check_method

    path = tmp_path / "r.json"
    Recipe(removed={1: 72, 4: 36}, visual_tokens=144, num_layers=32, method="pdrop").save(path)
    assert main(["flops", "--model", "llava-1.5-7b", "--recipe", str(path), "--image-tokens", "144", "--text-tokens", "0",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["visual_tokens_per_layer"] == [144] + [72] * 3 + [36] * 28
    options = {"recipe": str(path)}
    check_method("pdrop", options)
    assert isinstance(options["recipe"], Recipe) and options["recipe"].method == "pdrop"
    with pytest.raises(ValueError, match="fitted for pdrop"):
        check_method("fastv", {"recipe": str(path)})

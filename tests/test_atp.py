"""ATP: its scores against a loop written here, the method's kept tokens against a layer loop written
here (thresholds, SAP, progressive drops, original positions), keep-everything exactness, batching,
errors, and the training's soft masks, budget losses and shipped heads."""

from __future__ import annotations

import math

import pytest
import torch
from reference_models import decoder_input, image_span, last_logits
from test_reference_fastv_dart import _layer, _lm, tiny_inputs
from tiny_models import build

import tokensieve
from tokensieve import methods
from tokensieve.flops import Shape, layer_macs
from tokensieve.learned.atp_heads import ATPConfig, ThresholdHeads
from tokensieve.learned.batches import Batch
from tokensieve.learned.train_atp import SoftThresholds, budget_losses, budget_spent
from tokensieve.methods.atp import attention_scores

LOGITS_ATOL = 1e-4
_MODEL: dict[str, torch.nn.Module] = {}


def sharpened_llava() -> torch.nn.Module:
    """The tiny random LLaVA (4 layers, a 4 x 4 image), eager, its q/k projections scaled by 10 so that
    attention ranks tokens by content rather than by age (built once)."""
    if "m" not in _MODEL:
        model = build("llava", "eager")
        with torch.no_grad():
            for layer in _lm(model).layers:
                layer.self_attn.q_proj.weight.mul_(10)
                layer.self_attn.k_proj.weight.mul_(10)
        _MODEL["m"] = model
    return _MODEL["m"]


def _heads(tmp_path, theta_r: tuple[float, ...], theta_s: tuple[float, ...], layers=(0, 1), seed=0, name="heads"):
    """Heads whose thresholds are about ``theta_r`` / ``theta_s`` per module, with small random weights
    so that they also depend on the statistics."""
    torch.manual_seed(seed)
    config = ATPConfig(attention_layers=layers, num_layers=4, budget="flops", target=0.5)
    heads = ThresholdHeads(config)
    with torch.no_grad():
        for head, r, s in zip(heads.heads, theta_r, theta_s):
            head[2].weight.normal_(0, 0.05)
            head[2].bias.copy_(torch.tensor([math.log(r), math.log(s / (1 - s))]))
    path = tmp_path / f"{name}.safetensors"
    heads.save(path, {"kept": [0.5] * len(layers)})
    return heads.eval(), str(path)


# ---------------------------------------------------------------------------------------------- the scores
def scores_reference(a: torch.Tensor, visual: list[int], instruction: list[int], w: dict[int, float]):
    """The rule as loops: ``a`` ``(H, n, n)``; S_self(j) = sum of ``w_i a[i, j]`` over visual queries
    ``i >= j`` over the sum of their ``w_i``; S_cross(j) = mean over instruction queries of ``a[t, j]``;
    each over its ``w``-weighted mean on the visual tokens; S_red their average; the shares."""
    a = a.double().mean(0)
    s_self, s_cross = {}, {}
    for j in visual:
        senders = [i for i in visual if i >= j]
        s_self[j] = sum(w[i] * a[i, j] for i in senders) / sum(w[i] for i in senders)
        s_cross[j] = sum(a[t, j] for t in instruction) / len(instruction)
    total = sum(w.values())
    m_self = sum(w[j] * s_self[j] for j in visual) / total
    m_cross = sum(w[j] * s_cross[j] for j in visual) / total
    red = {j: (s_self[j] / m_self + s_cross[j] / m_cross) / 2 for j in visual}
    share_self = sum(w[i] * sum(w[j] * a[i, j] for j in visual) for i in visual) / total
    share_cross = sum(sum(w[j] * a[t, j] for j in visual) for t in instruction) / len(instruction)
    return red, (float(share_self), float(share_cross))


@pytest.mark.parametrize("soft", [False, True])
def test_attention_scores_match_the_rule_written_as_loops(soft):
    torch.manual_seed(3)
    n = 12
    logits = torch.randn(1, 2, n, n) * 2
    logits.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    a = logits.softmax(-1)
    visual, instruction = list(range(2, 8)), [9, 10, 11]
    w = {j: (float(torch.rand(())) if soft else 1.0) for j in visual}
    weight = torch.zeros(1, n)
    for j, v in w.items():
        weight[0, j] = v
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, instruction] = True
    red, shares = attention_scores(a, weight, mask)
    expected, expected_shares = scores_reference(a[0], visual, instruction, w)
    assert torch.allclose(red[0, visual].double(), torch.tensor([expected[j] for j in visual]), atol=1e-5)
    assert torch.allclose(shares[0].double(), torch.tensor(expected_shares, dtype=torch.float64), atol=1e-6)


# ---------------------------------------------------------------------------------------------- the method
def atp_reference(model, inputs, heads: ThresholdHeads):
    """The release-style layer loop: before each module's layer, the scores of the attention the layer
    before returned, over the alive rows; the head's thresholds from the statistics; a visual token stays
    if S_red > theta_r, or if it is a sampled grid cell (every ``stride``-th row and column of the 4 x 4
    image) and S_sp > theta_s (at least one: the best S_red); original positions."""
    config = heads.config
    start, n_image = image_span(model, inputs)
    side = int(n_image ** 0.5)
    sampled = {start + r * side + c for r in range(0, side, config.stride) for c in range(0, side, config.stride)}
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = torch.arange(x.shape[0])
        kept, probs = {}, None
        for idx, layer in enumerate(_lm(model).layers):
            if idx in config.pruned_layers:
                module = config.pruned_layers.index(idx)
                rows = pos.tolist()
                visual = [r for r, p in enumerate(rows) if start <= p < start + n_image]
                instruction = [r for r, p in enumerate(rows) if p >= start + n_image]
                red, shares = scores_reference(probs, visual, instruction, {r: 1.0 for r in visual})
                stats = torch.tensor([[shares[0], shares[1], len(visual) / n_image]])
                first, _, second = heads.heads[module]
                out = torch.nn.functional.gelu(stats @ first.weight.T + first.bias) @ second.weight.T + second.bias
                theta_r, theta_s = math.exp(float(out[0, 0])), 1 / (1 + math.exp(-float(out[0, 1])))
                stay = [r for r in visual if red[r] > theta_r
                        or (rows[r] in sampled and config.spatial_score > theta_s)]
                if not stay:
                    stay = [max(visual, key=lambda r: red[r])]
                keep = torch.tensor([r not in visual or r in stay for r in range(len(rows))])
                x, pos = x[keep], pos[keep]
                kept[f"prefill:{idx}"] = sorted(rows[r] for r in stay)
            x, probs = _layer(model, layer, x, pos)
        return kept, last_logits(model, x)


def _pruned(model, inputs, **options):
    with torch.no_grad(), tokensieve.prune(model, "atp", **options) as run:
        logits = model(**inputs).logits
    return run.report, logits


@pytest.mark.parametrize("index,theta_r,theta_s", [(0, (1.0, 1.2), (0.9, 0.9)), (1, (0.8, 1.5), (0.1, 0.9)),
                                                   (2, (1.3, 0.7), (0.9, 0.1))])
def test_atp_keeps_what_the_rule_keeps_before_each_module(tmp_path, index, theta_r, theta_s):
    model = sharpened_llava()
    heads, path = _heads(tmp_path, theta_r, theta_s, seed=index)
    inputs = tiny_inputs(index)
    expected, ref_logits = atp_reference(model, inputs, heads)
    report, logits = _pruned(model, inputs, weights=path)
    sample = report.samples[0]
    kept = {k: v for k, v in sample.visual_kept.items() if k.startswith("prefill:")}
    assert kept == expected
    assert 0 < len(expected["prefill:2"]) <= len(expected["prefill:1"]) < 16  # it prunes, progressively
    assert torch.allclose(logits[0, -1], ref_logits, atol=LOGITS_ATOL), (logits[0, -1] - ref_logits).abs().max()


def test_the_spatial_samples_stay_when_their_threshold_is_low(tmp_path):
    model = sharpened_llava()
    inputs = tiny_inputs(0)
    start, _ = image_span(model, inputs)
    _, path = _heads(tmp_path, (50.0, 50.0), (0.05, 0.05))  # no token beats theta_r; SAP keeps its cells
    report, _ = _pruned(model, inputs, weights=path)
    assert report.samples[0].visual_kept["prefill:1"] == [start + r * 4 + c for r in (0, 2) for c in (0, 2)]


def test_keeping_everything_is_exact(tmp_path):
    model = sharpened_llava()
    _, path = _heads(tmp_path, (1e-9, 1e-9), (0.5, 0.5))
    inputs = tiny_inputs(1)
    with torch.no_grad():
        plain = model(**inputs).logits
    report, logits = _pruned(model, inputs, weights=path)
    assert torch.equal(logits, plain) and report.samples[0].visual_lengths == [16] * 4


def test_a_padded_batch_keeps_what_each_sample_keeps_alone(tmp_path):
    """Left-padded rows of prompts of different lengths, positions from the attention mask as
    ``generate`` gives them; reported positions count the padding."""
    from tiny_models import collate, samples

    def with_positions(inputs):
        return dict(inputs, position_ids=(inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0))

    def prefill(kept: dict, shift: int) -> dict:
        return {k: [p - shift for p in v] for k, v in kept.items() if k.startswith("prefill:")}

    model = sharpened_llava()
    _, path = _heads(tmp_path, (1.0, 1.1), (0.9, 0.9))
    items = samples("llava", model, [1, 1, 1])
    batch = with_positions(collate("llava", items))
    pads = (batch["attention_mask"] == 0).sum(1).tolist()
    assert len(set(pads)) == 3
    together, _ = _pruned(model, batch, weights=path)
    for item, sample, pad in zip(items, together.samples, pads):
        alone, _ = _pruned(model, with_positions(collate("llava", [item])), weights=path)
        assert prefill(sample.visual_kept, pad) == prefill(alone.samples[0].visual_kept, 0)


def test_bad_options_and_files_are_refused(tmp_path):
    _, path = _heads(tmp_path, (1.0, 1.0), (0.5, 0.5))
    with pytest.raises(ValueError, match="heads are shipped for flops 0.5, 0.4"):
        methods.get("atp", flops=0.3)
    with pytest.raises(ValueError, match="weights or flops"):
        methods.get("atp", weights=path, flops=0.5)
    with pytest.raises(ValueError, match="no ATP threshold-head weights"):
        methods.get("atp", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="holds no ATP threshold-head config"):
        methods.get("atp", weights=str(methods.lvpruning.SHIPPED))
    with pytest.raises(ValueError, match="this one has 6 layers"):
        methods.get("atp", weights=path).bind(6)
    with pytest.raises(ValueError, match="attention layers must increase"):
        ATPConfig(attention_layers=(2, 1), num_layers=4, budget="flops", target=0.5)
    with pytest.raises(ValueError, match="target must be in"):
        ATPConfig(attention_layers=(1,), num_layers=4, budget="keep", target=1.5)
    with pytest.raises(ValueError, match="budget must be"):
        ATPConfig(attention_layers=(1,), num_layers=4, budget="tokens", target=0.5)


def test_the_shipped_heads_load_for_the_shipped_model_with_their_schedule():
    for flops in (None, 0.5, 0.4):
        method = methods.get("atp") if flops is None else methods.get("atp", flops=flops)
        method.bind(8)
        assert method.config.budget == "flops" and method.config.target == (flops or 0.5)
        counts, _ = method.visual_schedule(8, 144)
        assert counts[0] == 144 and counts[-1] < counts[0]
        assert counts == sorted(counts, reverse=True)


# ---------------------------------------------------------------------------------------------- training
def _batch(model, inputs) -> Batch:
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    visual = (ids[0] == image_id).nonzero().squeeze(1)[None]
    last = int(visual.max())
    text = torch.arange(last + 1, ids.shape[1])[None]
    return Batch(dict(inputs), visual, (text, torch.ones_like(text, dtype=torch.bool)), torch.tensor([ids.shape[1]]))


def test_training_masks_follow_the_thresholds_and_send_the_answer_loss_to_the_heads(tmp_path):
    """Thresholds near 0 keep every token (with the hard forward of straight-through masks the masked
    forward is the plain one; soft masks never reach 1 exactly), high thresholds drop (it differs), the
    first module's soft mask is the sigmoid of the inference scores, and the loss has a gradient on the
    heads."""
    model = sharpened_llava()
    layers = _lm(model).layers
    inputs = tiny_inputs(0)
    batch = _batch(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
    keep_all, _ = _heads(tmp_path, (1e-6, 1e-6), (0.5, 0.5))
    soft = SoftThresholds(keep_all, layers, "straight-through")
    with torch.no_grad(), soft.masks(batch).applied(layers, batch.visual, inputs["attention_mask"]):
        kept_all = model(**inputs).logits
    assert torch.allclose(kept_all, plain, atol=1e-5)
    assert all(abs(float(k.min()) - 1) < 1e-6 for k in soft.kept)

    heads, _ = _heads(tmp_path, (1.0, 1.2), (0.9, 0.9), name="drop")
    soft = SoftThresholds(heads, layers)
    with torch.no_grad(), soft.masks(batch).applied(layers, batch.visual, inputs["attention_mask"]):
        dropped = model(**inputs).logits
    assert not torch.allclose(dropped[0, -1], plain[0, -1], atol=1e-3)
    # module 0 sees the unmasked attention of layer 0: its mask is the inference rule's, softened
    start, n_image = image_span(model, inputs)
    with torch.no_grad():
        _, probs = _layer(model, layers[0], decoder_input(model, inputs), torch.arange(inputs["input_ids"].shape[1]))
        visual = list(range(start, start + n_image))
        red, shares = scores_reference(probs, visual, list(range(start + n_image, probs.shape[-1])),
                                       {r: 1.0 for r in visual})
        theta_r, theta_s = heads(torch.tensor([[shares[0], shares[1], 1.0]]), 0)
        sampled = torch.tensor([(r % 4) % 2 == 0 and (r // 4) % 2 == 0 for r in range(16)])
        expected = torch.maximum(torch.sigmoid((torch.tensor([red[r] for r in visual]).float() - theta_r) * 10),
                                 torch.where(sampled, torch.sigmoid((0.25 - theta_s) * 10), 0.0))
    assert torch.allclose(soft.kept[0], expected.mean()[None], atol=1e-4)

    with soft.masks(batch).applied(layers, batch.visual, inputs["attention_mask"]):
        loss = model(**inputs).logits[0, -1].logsumexp(-1)
    spent = budget_spent(soft.kept, heads.config, Shape.from_config(model.config.text_config), 16, batch.prompt)
    target, depth = budget_losses(soft.kept, heads.config, spent)
    (loss + target + depth).backward()
    assert all(float(h[2].weight.grad.abs().sum()) > 0 for h in heads.heads)


def test_the_budget_is_the_flops_ratio_of_the_soft_counts_or_their_mean_keep():
    shape = Shape(layers=4, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4)
    config = ATPConfig(attention_layers=(0, 2), num_layers=4, budget="flops", target=0.5)
    kept = [torch.tensor([0.5]), torch.tensor([0.25])]  # entering layers 1 and 3
    prompt = torch.tensor([26])  # 16 visual + 10 text
    spent = budget_spent(kept, config, shape, 16, prompt)
    by_hand = sum(layer_macs(shape, n) for n in (26, 18, 18, 14)) / (4 * layer_macs(shape, 26))
    assert math.isclose(float(spent), by_hand, rel_tol=1e-6)
    keep = ATPConfig(attention_layers=(0, 2), num_layers=4, budget="keep", target=0.5)
    assert math.isclose(float(budget_spent(kept, keep, shape, 16, prompt)), (1 + 0.5 + 0.5 + 0.25) / 4, rel_tol=1e-6)
    target, depth = budget_losses(kept, keep, torch.tensor([0.5625]))
    assert math.isclose(float(target), 0.0625, abs_tol=1e-6)
    assert math.isclose(float(depth), 0.5 * 1 / 4 + 0.25 * 3 / 4, rel_tol=1e-6)


def test_bench_takes_atp_rows_on_the_flops_axis():
    from tokensieve import bench

    assert bench.axis("atp") == "flops"
    bench.check_specs(["atp"], [0.5, 0.4], 8)
    with pytest.raises(ValueError, match="cannot run at flops=0.3"):
        bench.check_specs(["atp"], [0.5, 0.3], 8)


def test_eval_reports_each_items_own_counts_and_flops():
    from reference_models import shipped

    from tokensieve import evaluation

    model, processor = shipped()
    result = evaluation.evaluate(model, evaluation.Prompting.for_processor(processor), "counting", "atp", {}, 6,
                                 batch_size=3, progress=False)
    counts = [item["visual_tokens"] for item in result["items"]]
    assert all(len(c) == 8 and c[0] == c[1] == 144 and c[2] < 144 for c in counts)
    assert len({c[2] for c in counts}) > 1  # instance-adaptive
    ratios = [item["flops_ratio"] for item in result["items"]]
    assert math.isclose(sum(ratios) / len(ratios), result["tflops"] / result["tflops_unpruned"], rel_tol=0.05)


def test_the_bench_command_checks_atp_against_the_models_depth_before_it_loads(tmp_path, capsys):
    from tokensieve import models
    from tokensieve.cli import main

    assert models.decoder_layers("tiny") == 8 and models.decoder_layers(str(tmp_path)) is None
    assert main(["bench", "--model", "tiny", "--methods", "atp", "--flops", "0.5,0.3", "-o", str(tmp_path / "b")]) == 2
    assert "heads are shipped for flops 0.5, 0.4" in capsys.readouterr().err


def test_straight_through_training_masks_count_what_inference_keeps(tmp_path):
    """``masks="straight-through"``: the forward's keep weights are the inference rule's decisions
    (module 0's kept fraction is the count the method keeps there), the gradient still reaches the heads."""
    model = sharpened_llava()
    layers = _lm(model).layers
    inputs = tiny_inputs(0)
    heads, path = _heads(tmp_path, (1.0, 1.2), (0.9, 0.9))
    soft = SoftThresholds(heads, layers, "straight-through")
    batch = _batch(model, inputs)
    with soft.masks(batch).applied(layers, batch.visual, inputs["attention_mask"]):
        loss = model(**inputs).logits[0, -1].logsumexp(-1)
    report, _ = _pruned(model, inputs, weights=path)
    assert math.isclose(float(soft.kept[0].detach()), len(report.samples[0].visual_kept["prefill:1"]) / 16, abs_tol=1e-6)
    loss.backward()
    assert float(heads.heads[0][2].weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="masks must be one of"):
        SoftThresholds(heads, layers, "hard")

"""LVPruning: the decision module's rule, the method's kept tokens against a layer loop written here,
budgets, keep-everything exactness, errors, and the training's masking and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from reference_models import decoder_input, image_span, last_logits, tiny_llava
from test_reference_fastv_dart import _layer, _lm, tiny_inputs

import tokensieve
from tokensieve import methods
from tokensieve.learned.batches import instruction_rows
from tokensieve.learned.decision import DecisionConfig, DecisionModules
from tokensieve.learned.partial import load_partial, save_partial
from tokensieve.learned.train_lvpruning import SoftDrop

LOGITS_ATOL = 1e-4


def _modules(tmp_path, model, layers=(1, 3), keep=(0.5, 0.25), seed=0):
    """Random modules whose keep margins depend mostly on the text they attend to (the attention's
    out-projection scaled up), so that a rule reading other text rows ranks the tokens differently."""
    torch.manual_seed(seed)
    text = model.config.text_config
    modules = DecisionModules(DecisionConfig(hidden=text.hidden_size, layers=layers, keep=keep,
                                             num_layers=text.num_hidden_layers))
    with torch.no_grad():
        for layer in layers:
            modules.at(layer).attention.out_proj.weight.mul_(30)
    path = tmp_path / "modules.safetensors"
    modules.save(path, {"note": "random"})
    return modules.eval(), str(path)


def test_the_decision_module_is_cross_attention_from_vision_to_text_then_an_mlp():
    """The rule written out: pre-norms, scaled dot-product attention per head with the packed in-projection,
    the out-projection, a residual on the normed vision tokens, a norm, Linear-GELU-Linear."""
    torch.manual_seed(1)
    config = DecisionConfig(hidden=16, layers=(1,), keep=(0.5,), num_layers=2, heads=2, mlp=8)
    module = DecisionModules(config).at(1).eval()
    vision, text = torch.randn(1, 5, 16), torch.randn(1, 3, 16)
    with torch.no_grad():
        got = module(vision, text, torch.ones(1, 3, dtype=torch.bool))
        att = module.attention
        q = torch.nn.functional.layer_norm(vision, (16,), module.norm_vision.weight, module.norm_vision.bias)
        t = torch.nn.functional.layer_norm(text, (16,), module.norm_text.weight, module.norm_text.bias)
        wq, wk, wv = att.in_proj_weight.chunk(3)
        bq, bk, bv = att.in_proj_bias.chunk(3)
        heads = []
        for h in range(2):
            sl = slice(8 * h, 8 * h + 8)
            qh, kh, vh = (q @ wq.T + bq)[..., sl], (t @ wk.T + bk)[..., sl], (t @ wv.T + bv)[..., sl]
            heads.append(((qh @ kh.transpose(1, 2)) / math.sqrt(8)).softmax(-1) @ vh)
        context = torch.cat(heads, -1) @ att.out_proj.weight.T + att.out_proj.bias
        r = q + context
        r = torch.nn.functional.layer_norm(r, (16,), module.norm_out.weight, module.norm_out.bias)
        first, _, second = module.head
        expected = torch.nn.functional.gelu(r @ first.weight.T + first.bias) @ second.weight.T + second.bias
    assert torch.allclose(got, expected, atol=1e-5)


def lvpruning_reference(model, inputs, modules: DecisionModules, counts: dict[int, int]):
    """Before each module layer: its module on the hidden states entering the layer, the visual tokens
    alive as queries and the text after the image as keys/values; the ``counts[layer]`` visual tokens of
    highest keep probability stay; original positions."""
    start, n_image = image_span(model, inputs)
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = torch.arange(x.shape[0])
        kept = {}
        for idx, layer in enumerate(_lm(model).layers):
            if idx in counts:
                vis = ((pos >= start) & (pos < start + n_image)).nonzero().squeeze(1)
                txt = (pos >= start + n_image).nonzero().squeeze(1)
                logits = modules.at(idx)(x[vis][None], x[txt][None], torch.ones(1, txt.numel(), dtype=torch.bool))
                top = vis[logits[0].softmax(-1)[:, 0].topk(counts[idx]).indices]
                keep = (pos < start) | (pos >= start + n_image)
                keep[top] = True
                x, pos = x[keep], pos[keep]
                kept[f"prefill:{idx}"] = sorted(pos[(pos >= start) & (pos < start + n_image)].tolist())
            x, _ = _layer(model, layer, x, pos)
        return kept, last_logits(model, x)


def _pruned(model, inputs, **options):
    with torch.no_grad(), tokensieve.prune(model, "lvpruning", **options) as run:
        logits = model(**inputs).logits[0, -1]
    sample = run.report.samples[0]
    return {k: v for k, v in sample.visual_kept.items() if k.startswith("prefill:")}, logits, sample


@pytest.mark.parametrize("index,seed", [(0, 0), (1, 1), (2, 2)])
def test_lvpruning_keeps_the_top_keep_probabilities_before_each_module_layer(tmp_path, index, seed):
    model = tiny_llava()
    modules, path = _modules(tmp_path, model, seed=seed)
    inputs = tiny_inputs(index)
    expected, ref_logits = lvpruning_reference(model, inputs, modules, {1: 8, 3: 4})
    kept, logits, sample = _pruned(model, inputs, weights=path)
    assert kept == expected
    assert sample.visual_lengths == [16, 8, 8, 4]
    assert torch.allclose(logits, ref_logits, atol=LOGITS_ATOL), (logits - ref_logits).abs().max()


def test_threshold_decisions_keep_the_tokens_the_modules_keep(tmp_path):
    model = tiny_llava()
    modules, path = _modules(tmp_path, model, layers=(2,), keep=(0.5,))
    inputs = tiny_inputs(0)
    start, n_image = image_span(model, inputs)
    with torch.no_grad():
        x = decoder_input(model, inputs)
        pos = torch.arange(x.shape[0])
        for layer in _lm(model).layers[:2]:
            x, _ = _layer(model, layer, x, pos)
        vis, txt = torch.arange(start, start + n_image), torch.arange(start + n_image, x.shape[0])
        p = modules.at(2)(x[vis][None], x[txt][None], torch.ones(1, txt.numel(), dtype=torch.bool))[0].softmax(-1)[:, 0]
    kept, _, _ = _pruned(model, inputs, weights=path, decision="threshold")
    assert kept["prefill:2"] == (vis[p > 0.5].tolist() or [int(vis[p.argmax()])])


def test_keeping_everything_is_exact_and_flops_budgets_are_met(tmp_path):
    model = tiny_llava()
    _, path = _modules(tmp_path, model)
    inputs = tiny_inputs(1)
    with torch.no_grad():
        plain = model(**inputs).logits[0, -1]
    _, logits, sample = _pruned(model, inputs, weights=path, keep=(1.0, 1.0))
    assert torch.equal(logits, plain) and sample.visual_lengths == [16] * 4
    _, _, sample = _pruned(model, inputs, weights=path, flops=0.6)
    assert sample.flops / sample.flops_unpruned <= 0.6


def tokensieve_model_of_depth(layers: int):
    """The tiny LLaVA's shape with another number of decoder layers (random weights)."""
    from tiny_models import TEXT, _vision
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    base = tiny_llava()
    config = LlavaConfig(vision_config=_vision(), text_config=LlamaConfig(**{**TEXT, "num_hidden_layers": layers}),
                         image_token_id=base.config.image_token_id, vision_feature_layer=base.config.vision_feature_layer)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def test_bad_options_are_refused(tmp_path):
    model = tiny_llava()
    _, path = _modules(tmp_path, model)
    with pytest.raises(ValueError, match="one fraction per module layer"):
        methods.get("lvpruning", weights=path, keep=(0.5,))
    with pytest.raises(ValueError, match="threshold"):
        methods.get("lvpruning", weights=path, decision="threshold", keep=(0.5, 0.25))
    with pytest.raises(ValueError, match="no decision-module weights"):
        methods.get("lvpruning", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="this model has 3 layers"):
        methods.get("lvpruning", weights=path).bind(3)
    other = tokensieve_model_of_depth(6)
    with pytest.raises(ValueError, match="trained for a 4-layer model of hidden size 32; this one has 6 layers"):
        with torch.no_grad(), tokensieve.prune(other, "lvpruning", weights=path):
            other(**tiny_inputs(0))
    with pytest.raises(ValueError, match="module layers must increase"):
        DecisionConfig(hidden=8, layers=(3, 1), keep=(0.5, 0.25), num_layers=4)
    assert DecisionModules.record(path) == {"note": "random"}


def test_the_shipped_modules_load_for_the_shipped_model():
    method = methods.get("lvpruning")
    assert method.layers == (2, 4) and method.fractions() == (0.5, 0.1)
    method.bind(8)


# ---------------------------------------------------------------------------------------------- training
def test_training_masks_dropped_keys_and_sends_the_answer_loss_to_the_modules():
    """With every decision forced to keep, the masked forward is the plain one (``log(1 + eps)`` shifts
    every score alike); forced to drop, it differs; the answer loss has a gradient on the modules."""
    model = tiny_llava()
    text = model.config.text_config
    modules = DecisionModules(DecisionConfig(hidden=text.hidden_size, layers=(1,), keep=(0.5,), num_layers=4))
    inputs = tiny_inputs(0)
    ids = inputs["input_ids"]
    image_id = model.config.image_token_index
    visual = (ids[0] == image_id).nonzero().squeeze(1)[None]
    rows = instruction_rows(ids, image_id, [ids.shape[1]])
    layers = _lm(model).layers
    drop = SoftDrop(modules)
    with torch.no_grad():
        plain = model(**inputs).logits
        modules.at(1).head[2].bias.copy_(torch.tensor([100.0, -100.0]))
        with drop.applied(layers, visual, rows, inputs["attention_mask"]):
            kept_all = model(**inputs).logits
        modules.at(1).head[2].bias.copy_(torch.tensor([-100.0, 100.0]))
        with drop.applied(layers, visual, rows, inputs["attention_mask"]):
            dropped = model(**inputs).logits
    assert torch.allclose(kept_all, plain, atol=1e-4)
    assert not torch.allclose(dropped[0, -1], plain[0, -1], atol=1e-3)
    modules.at(1).head[2].bias.data.zero_()
    model.requires_grad_(False)
    with drop.applied(layers, visual, rows, inputs["attention_mask"]):
        loss = model(**inputs).logits[0, -1].logsumexp(-1)
    loss.backward()
    assert modules.at(1).head[2].weight.grad.abs().sum() > 0
    assert drop.kept[0].shape == (1,)


def test_a_partial_checkpoint_resumes_the_modules_and_the_optimiser(tmp_path):
    config = DecisionConfig(hidden=8, layers=(1,), keep=(0.5,), num_layers=2, heads=2, mlp=4)
    modules = DecisionModules(config)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=1e-2)
    out = modules.at(1)(torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)).sum()
    out.backward()
    optimizer.step()
    save_partial(tmp_path / "p.safetensors", modules, optimizer, 7)
    again = DecisionModules(config)
    optimizer2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    assert load_partial(tmp_path / "p.safetensors", again, optimizer2) == (7, {})
    for a, b in zip(modules.parameters(), again.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(optimizer.state[a]["exp_avg"], optimizer2.state[b]["exp_avg"])
    with pytest.raises(ValueError, match="nothing to resume"):
        load_partial(tmp_path / "none.safetensors", again, optimizer2)


def test_bench_takes_lvpruning_rows_on_the_flops_axis():
    from tokensieve import bench

    assert bench.axis("lvpruning") == "flops"
    bench.check_specs(["lvpruning", "lvpruning:decision=topk"], [0.5, 0.3])


@pytest.mark.parametrize("command", [["train-lvpruning"], ["train-atp", "--flops", "0.5"]])
def test_the_learned_pruners_refuse_a_model_without_the_image_tasks(tmp_path, capsys, command):
    from tokensieve.cli import main

    assert main([*command, "--model", "tiny-video", "--out", str(tmp_path / "w.safetensors"), "--steps", "1"]) == 2
    assert "runs the video tasks; the learned pruners train and are measured on the image tasks" in capsys.readouterr().err
    assert not (tmp_path / "w.safetensors").exists()

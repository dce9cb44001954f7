"""Training-time token drop of the tiny model: masking keys from a layer on is removing the tokens."""

from __future__ import annotations

import pytest
import torch

from tokensieve.tasks import generate
from tokensieve.tiny import NUM_IMAGE_TOKENS, build_inputs, load_tiny
from tokensieve.tiny.token_drop import TokenDrop


@pytest.fixture(scope="module")
def shipped():
    return load_tiny()


def logits_without(model, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    """Last-position logits of each row run alone with the tokens where ``keep`` is False cut out
    of its input embeddings (survivors keep their positions)."""
    vis = inputs["input_ids"] == model.config.image_token_index
    rows = []
    for b in range(len(keep)):
        embeds = model.model.get_input_embeddings()(inputs["input_ids"][b : b + 1]).clone()
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"][b : b + 1]).pooler_output
        embeds[0, vis[b]] = torch.cat(list(features)).reshape(-1, embeds.shape[-1])
        real = inputs["attention_mask"][b].bool()
        alive = keep[b] & real
        positions = (real.long().cumsum(-1) - 1)[alive][None]
        out = model.model.language_model(inputs_embeds=embeds[:, alive], position_ids=positions)
        rows.append(model.lm_head(out.last_hidden_state[:, -1]))
    return torch.cat(rows)


@torch.no_grad()
def test_masking_from_layer_zero_equals_removing_the_tokens(shipped) -> None:
    model, processor = shipped
    inputs = build_inputs(processor, generate("counting", "test", 3))
    visual = inputs["input_ids"] == model.config.image_token_index
    keep = torch.ones_like(visual)
    where = visual.nonzero()
    cut = where[torch.randperm(len(where), generator=torch.Generator().manual_seed(0))[:200]]
    keep[cut[:, 0], cut[:, 1]] = False
    full = model(**inputs).logits[:, -1]
    with TokenDrop.applied(model.model.language_model.layers, 0, keep):
        masked = model(**inputs).logits[:, -1]
    assert (full - masked).abs().max() > 1e-2, "dropping 200 of 432 visual tokens changes the logits"
    torch.testing.assert_close(masked, logits_without(model, inputs, keep), atol=1e-4, rtol=1e-4)
    assert torch.equal(model(**inputs).logits[:, -1], full), "the hooks are gone after the block"


@torch.no_grad()
def test_masking_from_a_later_layer_leaves_earlier_layers_alone(shipped) -> None:
    model, processor = shipped
    inputs = build_inputs(processor, generate("attribute", "test", 2))
    keep = inputs["input_ids"] != model.config.image_token_index  # drop every visual token
    full = model(**inputs, output_hidden_states=True).hidden_states
    with TokenDrop.applied(model.model.language_model.layers, 3, keep):
        masked = model(**inputs, output_hidden_states=True).hidden_states
    for layer in range(4):  # hidden_states[l] is the input of layer l
        torch.testing.assert_close(masked[layer], full[layer])
    assert (masked[4] - full[4]).abs().max() > 1e-3


def test_sample_keeps_one_evidence_patch_per_cell_and_every_text_token() -> None:
    drop = TokenDrop(prob=1.0, max_layer=5, min_keep=0.15, evidence_drop=1.0)
    batch, length, start = 2, 150, 3
    visual = torch.zeros(batch, length, dtype=torch.bool)
    visual[:, start : start + NUM_IMAGE_TOKENS] = True
    targets = torch.zeros(batch, NUM_IMAGE_TOKENS, 4, dtype=torch.long)
    targets[:, :, 3] = torch.arange(NUM_IMAGE_TOKENS) % 9
    targets[0, [5, 14, 23], 0] = 1  # three occupied patches in cell 5
    targets[1, [0, 9, 1], 0] = 2  # two in cell 0, one in cell 1
    evidence = torch.tensor([[0, 149, 1 << 5], [1, 148, 1 << 0], [1, 149, 1 << 1]])
    generator = torch.Generator().manual_seed(0)
    layers = set()
    for _ in range(200):
        layer, keep = drop.sample(visual, targets, evidence, generator)
        layers.add(layer)
        assert keep[~visual].all()
        patches = keep[:, start : start + NUM_IMAGE_TOKENS]
        assert patches[0, [5, 14, 23]].any() and patches[1, [0, 9]].any() and patches[1, 1]
    assert layers == set(range(6))
    assert TokenDrop(prob=0.0).sample(visual, targets, evidence, generator) is None


@pytest.mark.parametrize("options", [{"prob": 1.5}, {"min_keep": 0.0}, {"evidence_drop": -0.1}])
def test_bad_options_are_refused(options) -> None:
    with pytest.raises(ValueError, match="token drop needs"):
        TokenDrop(**options)

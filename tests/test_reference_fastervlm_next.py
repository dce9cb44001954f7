"""FasterVLM on LLaVA-NeXT against a reference written here from the authors' code.

Theia-4869/FasterVLM at f5d5f12: ``llava/model/multimodal_encoder/clip_encoder.py``
``CLIPVisionTower.feature_select`` (the [CLS] row of the select layer's attention,
``attentions[select_layer][:, :, 0, 1:]``, select layer -2), ``llava/model/llava_arch.py``
``LlavaMetaForCausalLM.encode_images`` (mean over heads, ``topk(k=visual_token_num)`` per row of the
tower's batch) and ``prepare_inputs_labels_for_multimodal`` (every crop of every image in one tower
batch, the base image first; the index masks split per image; ``scripts/v1_6/eval`` give
``visual_token_num`` per crop). The release then merges with ``'spatial'`` (no unpadding, no newline
tokens); the stock ``LlavaNextForConditionalGeneration`` unpads and adds a newline after each row, and
the kept patches are mapped onto its tokens by the arrangement and unpadding of
``LlavaNextModel.pack_image_features`` written out here on patch indices, which the first test checks
against the model's own input embeddings. Nothing here calls a tokensieve helper.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from tiny_models import IMAGE, PAD, build
from transformers.image_processing_utils import select_best_resolution

import tokensieve

_MODELS: dict[str, torch.nn.Module] = {}
# Per sample, the (height, width) of its images: rows unpadded (20x64 on a 1x2 grid; 40x30 on 2x1, where
# the margins leave 6 rows for 5), columns unpadded (60x16 on 2x1), nothing unpadded (32x32 on 1x1).
SIZES = [[(20, 64)], [(40, 30), (32, 32)], [(60, 16)]]
PER_CROP = 4  # visual_token_num: keep=0.25 of the 16 patches of a tiny crop


def model_of(attn: str) -> torch.nn.Module:
    if attn not in _MODELS:
        _MODELS[attn] = build("llava-next", attn)
    return _MODELS[attn]


@dataclass
class Packed:
    """Where one image's crops land among its LLM tokens, on the stock model.

    ``offsets``: ``(crops, N)`` token index of each crop's patches (-1: unpadded away); ``newlines``:
    token indices of the row-end newlines; ``tokens``: the image's token count.
    """

    offsets: torch.Tensor
    newlines: list[int]
    tokens: int


def unpad_window(size: tuple[int, int], rows: int, cols: int) -> tuple[int, int, int, int]:
    """``(top, kept_rows, left, kept_cols)`` of a ``rows x cols`` patch grid unpadded to an image of
    ``size`` (height, width), as ``unpad_image`` computes it (margin ``(current - new) // 2`` each side)."""
    height, width = size
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        margin = (rows - new) // 2
        return margin, rows - 2 * margin, 0, cols
    new = int(round(width * (rows / height), 7))
    margin = (cols - new) // 2
    return 0, rows, margin, cols - 2 * margin


def pack(model, size: tuple[int, int]) -> Packed:
    """``pack_image_features``' steps on patch indices: the base crop's patches in order, then the
    high-res crops as a ``(grid_h, grid_w, side, side)`` block laid out as one grid row by row
    (``permute`` of crop rows and patch rows), unpadded, a newline column appended, flattened."""
    cfg = model.config
    crop_px = cfg.vision_config.image_size
    side = crop_px // cfg.vision_config.patch_size
    n = side * side
    best_h, best_w = select_best_resolution(size, cfg.image_grid_pinpoints)
    grid_h, grid_w = best_h // crop_px, best_w // crop_px
    crops = 1 + grid_h * grid_w
    ids = torch.arange(n, crops * n).view(grid_h, grid_w, side, side)
    plane = ids.permute(0, 2, 1, 3).reshape(grid_h * side, grid_w * side)
    top, rows, left, cols = unpad_window(size, grid_h * side, grid_w * side)
    plane = plane[top : top + rows, left : left + cols]
    plane = torch.cat([plane, torch.full((rows, 1), -1)], 1).flatten()
    sequence = torch.cat([torch.arange(n), plane])
    offsets = torch.full((crops * n,), -1)
    offsets[sequence[sequence >= 0]] = (sequence >= 0).nonzero().squeeze(1)
    return Packed(offsets.view(crops, n), (sequence < 0).nonzero().squeeze(1).tolist(), sequence.numel())


def make_inputs(model, sizes: list[list[tuple[int, int]]], seed: int = 0) -> tuple[dict, list[list[Packed]]]:
    """A left-padded batch: per sample, text, its images (each followed by one text token), text."""
    gen = torch.Generator().manual_seed(seed)
    seqs, pixels, packs = [], [], []
    for i, images in enumerate(sizes):
        ids = [1] + torch.randint(3, 50, (2 + i,), generator=gen).tolist()
        packs.append([pack(model, s) for s in images])
        for p in packs[-1]:
            ids += [IMAGE] * p.tokens + torch.randint(3, 50, (1,), generator=gen).tolist()
            pixels.append(torch.randn(p.offsets.shape[0], 3, 32, 32, generator=gen))
        seqs.append(ids + torch.randint(3, 50, (3 + 2 * i,), generator=gen).tolist())
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), PAD)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, width - len(s):] = torch.tensor(s)
        mask[b, width - len(s):] = 1
    most = max(x.shape[0] for x in pixels)
    pixel_values = torch.stack([torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])]) for x in pixels])
    image_sizes = torch.tensor([s for images in sizes for s in images])
    return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": image_sizes}, packs


def image_token_positions(inputs: dict, packs: list[list[Packed]]) -> list[list[torch.Tensor]]:
    """Per sample, per image, the prompt positions of its tokens (the model fills the image tokens of
    the batch in order, image after image)."""
    out = []
    for b, images in enumerate(packs):
        where = (inputs["input_ids"][b] == IMAGE).nonzero().squeeze(1)
        starts = torch.tensor([0] + [p.tokens for p in images]).cumsum(0).tolist()
        out.append([where[s:e] for s, e in zip(starts, starts[1:])])
    return out


def tower_crops(inputs: dict, packs: list[list[Packed]]) -> torch.Tensor:
    """``(I, 3, H, W)``: every crop of every image, as the release concatenates them for the tower."""
    counts = [p.offsets.shape[0] for images in packs for p in images]
    return torch.cat([x[:k] for x, k in zip(inputs["pixel_values"], counts)])


def release_cls_rows(model, crops: torch.Tensor) -> torch.Tensor:
    """``(I, N)``: ``feature_select``'s ``attentions[-2][:, :, 0, 1:]``, mean over heads (``encode_images``)."""
    with torch.no_grad():
        out = model.model.vision_tower(crops, output_attentions=True)
    return out.attentions[-2][:, :, 0, 1:].mean(1)


def release_kept(inputs: dict, packs, cls: torch.Tensor, counts: list[list[list[int]]] | None,
                 newlines: bool, among_fed: bool = False) -> list[list[int]]:
    """Per sample, the prompt positions of the patches each crop keeps (top ``PER_CROP`` of its [CLS]
    row, or ``counts[b][image][crop]``, among all its patches or, with ``among_fed``, among those the
    model feeds), those unpadding removes left out, plus the newline tokens if ``newlines``."""
    out, crop = [], 0
    for b, (images, positions) in enumerate(zip(packs, image_token_positions(inputs, packs))):
        kept: list[int] = []
        for i, (p, where) in enumerate(zip(images, positions)):
            for c in range(p.offsets.shape[0]):
                score = cls[crop].clone()
                if among_fed:
                    score[p.offsets[c] < 0] = float("-inf")
                k = PER_CROP if counts is None else counts[b][i][c]
                top = p.offsets[c, score.topk(k).indices] if k else torch.zeros(0, dtype=torch.long)
                kept += where[top[top >= 0]].tolist()
                crop += 1
            if newlines:
                kept += where[p.newlines].tolist()
        out.append(sorted(kept))
    return out


def llm_inputs(model, inputs: dict) -> torch.Tensor:
    """``(B, T, d)``: the unpruned model's LLM input embeddings."""
    seen = {}

    def grab(module, args, kwargs) -> None:
        seen.setdefault("x", kwargs["inputs_embeds"])

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen["x"]


def last_logits_on(model, sequence: torch.Tensor) -> torch.Tensor:
    """The LLM on one sample's kept embeddings, positions 0..L-1 (the release concatenates them)."""
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=sequence[None], position_ids=torch.arange(sequence.shape[0])[None])
        return model.lm_head(out.last_hidden_state[:, -1])[0]


def test_the_packing_written_here_is_the_models():
    """Each mapped patch's LLM input row is the projector of that crop's patch feature at the feature
    layer (1e-5), each newline row is ``image_newline``, and the batch exercises both unpadding
    directions and an image with no unpadding."""
    model = model_of("sdpa")
    inputs, packs = make_inputs(model, SIZES)
    embeds = llm_inputs(model, inputs)
    with torch.no_grad():
        hidden = model.model.vision_tower(tower_crops(inputs, packs), output_hidden_states=True).hidden_states[-2]
        projected = model.model.multi_modal_projector(hidden[:, 1:])
    crop = 0
    for b, (images, positions) in enumerate(zip(packs, image_token_positions(inputs, packs))):
        assert sum(p.tokens for p in images) == int((inputs["input_ids"][b] == IMAGE).sum())
        for p, where in zip(images, positions):
            for c in range(p.offsets.shape[0]):
                fed = p.offsets[c] >= 0
                torch.testing.assert_close(embeds[b, where[p.offsets[c, fed]]], projected[crop, fed], atol=1e-5, rtol=0)
                crop += 1
            assert torch.equal(embeds[b, where[p.newlines]], model.model.image_newline.expand(len(p.newlines), -1))
    dropped = [int((p.offsets < 0).sum()) for images in packs for p in images]
    assert dropped == [16, 8, 0, 16]  # 20x64: the top and bottom rows; 40x30: the grid's first and last
    # rows; 60x16: the first and last columns


@pytest.mark.parametrize("newlines", ["keep", "drop"])
def test_fastervlm_keeps_each_crops_top_k_on_a_padded_next_batch(newlines):
    """keep=0.25 (4 of each crop's 16 patches): per sample, ``visual_kept`` is the release's per-crop
    top-k mapped onto the model's tokens, plus every newline token with ``newlines="keep"``; the same
    through ``generate()`` (which encodes the images before its first forward on newer releases).
    Last-token logits match the LLM on the kept embeddings, positions renumbered (1e-4)."""
    model = model_of("sdpa")
    inputs, packs = make_inputs(model, SIZES)
    expected = release_kept(inputs, packs, release_cls_rows(model_of("eager"), tower_crops(inputs, packs)), None,
                            newlines == "keep")
    embeds = llm_inputs(model, inputs)
    with torch.no_grad(), tokensieve.prune(model, "fastervlm", keep=0.25, newlines=newlines) as run:
        logits = model(**inputs).logits[:, -1]
    real = inputs["attention_mask"].bool()
    for b, s in enumerate(run.report.samples):
        assert s.visual_kept["encoder:0"] == expected[b]
        kept = real[b] & (inputs["input_ids"][b] != IMAGE)
        kept[expected[b]] = True
        torch.testing.assert_close(logits[b], last_logits_on(model, embeds[b, kept]), atol=1e-4, rtol=0)
    assert run.report.positions == "renumber"
    with torch.no_grad(), tokensieve.prune(model, "fastervlm", keep=0.25, newlines=newlines) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert [s.visual_kept["encoder:0"] for s in run.report.samples] == expected


@pytest.mark.parametrize("newlines", ["keep", "drop"])
def test_fastervlm_meets_a_flops_budget_on_a_padded_next_batch(newlines):
    """flops=0.6 through ``generate()``: every sample meets it; each crop keeps its top patches among
    those the model feeds, in counts within one of the sample's kept patches shared in proportion to
    the crops' fed patches; newline tokens are all kept or all dropped."""
    model = model_of("sdpa")
    inputs, packs = make_inputs(model, SIZES)
    with torch.no_grad(), tokensieve.prune(model, "fastervlm", flops=0.6, newlines=newlines) as run:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    counts: list[list[list[int]]] = []
    for b, (images, positions) in enumerate(zip(packs, image_token_positions(inputs, packs))):
        s = run.report.samples[b]
        assert s.flops / s.flops_unpruned <= 0.6
        kept = set(s.visual_kept["encoder:0"])
        counts.append([[sum(int(t) in kept for t in where[p.offsets[c, p.offsets[c] >= 0]])
                        for c in range(p.offsets.shape[0])] for p, where in zip(images, positions)])
        fed = [int((p.offsets[c] >= 0).sum()) for p in images for c in range(p.offsets.shape[0])]
        patches = sum(sum(c) for c in counts[-1])
        assert 0 < patches < sum(fed)
        for k, f in zip((k for image in counts[-1] for k in image), fed):
            assert abs(k - patches * f / sum(fed)) <= 1
    cls = release_cls_rows(model_of("eager"), tower_crops(inputs, packs))
    expected = release_kept(inputs, packs, cls, counts, newlines == "keep", among_fed=True)
    assert [s.visual_kept["encoder:0"] for s in run.report.samples] == expected


@pytest.mark.parametrize("name", ["visionzip", "vflowopt", "tome"])
def test_other_tower_methods_refuse_next_at_prune(name):
    """Methods that read one patch grid per image refuse LLaVA-NeXT's crops before the model is touched."""
    model = model_of("sdpa")
    with pytest.raises(TypeError, match="supported"), tokensieve.prune(model, name):
        pass
    assert "get_image_features" not in model.model.__dict__ and not model._forward_pre_hooks

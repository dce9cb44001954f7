"""The LLaVA-NeXT-Video adapter: frames laid out as images on their pooled grids, read off the model's
own video token positions."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VIDEO, VIDEO_FRAMES, batch, build

import tokensieve
from tokensieve.adapters import LlavaNextVideoAdapter, adapter_for


@pytest.fixture(scope="module")
def model():
    return build("llava-next-video")


def test_frames_are_images_on_pooled_grids(model) -> None:
    inputs = batch("llava-next-video", model, [1, 2, 0])
    adapter = adapter_for(model)
    assert isinstance(adapter, LlavaNextVideoAdapter) and adapter.frame_side() == 2
    layout = adapter.layout(inputs["input_ids"], inputs)
    ids = inputs["input_ids"]
    assert torch.equal(layout.visual, ids == VIDEO)
    for b, videos in enumerate([1, 2, 0]):
        pos = (ids[b] == VIDEO).nonzero().squeeze(1)
        assert pos.numel() == videos * VIDEO_FRAMES * 4
        expected = torch.arange(videos * VIDEO_FRAMES).repeat_interleave(4)
        assert torch.equal(layout.image_index[b, pos], expected)
        assert (layout.image_index[b][ids[b] != VIDEO] == -1).all()
        assert [(g[1], g[2]) for g in layout.grids[b]] == [(2, 2)] * (videos * VIDEO_FRAMES)
        for frame, (positions, _, _) in enumerate(layout.grids[b]):
            assert torch.equal(positions, pos[4 * frame:4 * frame + 4])


def test_per_frame_methods_keep_per_frame(model) -> None:
    inputs = batch("llava-next-video", model, [2])
    with torch.no_grad(), tokensieve.prune(model, "pool", keep=0.25) as run:  # each frame's 2x2 grid to 1x1
        model(**inputs)
    sample = run.report.samples[0]
    assert sample.visual_tokens == 2 * VIDEO_FRAMES * 4 and sample.visual_lengths[0] == 2 * VIDEO_FRAMES
    video = (inputs["input_ids"][0] == VIDEO).nonzero().squeeze(1).tolist()
    kept = [video.index(p) for stage, positions in sample.visual_kept.items() if stage != "input" for p in positions]
    assert kept == [4 * frame for frame in range(2 * VIDEO_FRAMES)]  # each frame's cell at its top-left token


def test_tower_methods_are_refused(model) -> None:
    with pytest.raises(TypeError, match="supported"):
        with tokensieve.prune(model, "tome", keep=0.5):
            pass

"""STA inside a stock VideoMAE classifier (tokensieve.video) and the synthetic video generator: the score
and kept positions against a reference written from the authors' code (Mark12Ding/STA model_vit.py
``merge``), ToMe's matching against facebookresearch/ToMe ``bipartite_soft_matching``, keep-everything
exactness, budgets and FLOPs by hand, determinism, the generator's splits and labels, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import VideoMAEForVideoClassification

from tokensieve.tasks import video as vt
from tokensieve.video import data, prune, sta, tome
from tokensieve.video.model import CHECKPOINT, grid, tiny_config


@pytest.fixture(scope="module")
def model() -> VideoMAEForVideoClassification:
    torch.manual_seed(0)
    return VideoMAEForVideoClassification(tiny_config(hidden=16, depth=6, heads=2)).eval()


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    return data.batch("test", 3)[0]


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def reference_stage(x: torch.Tensor, keys: torch.Tensor, groups: int, reverse: bool, r: int) -> list[int]:
    """Rows one sample keeps at one STA stage, by ``model_vit.py`` ``merge``, in plain Python loops.

    ``x``: ``(n, C)`` the block output, ``keys``: ``(n, c)`` keys averaged over heads."""
    n = x.shape[0]
    size = n // groups
    rows = [[float(v) for v in k] for k in keys.double()]
    metric = [[v / math.sqrt(dot(k, k)) for v in k] for k in rows]
    caam = [float(v) for v in x.double().abs().sum(-1)]
    perm = list(range(groups))[::-1] if reverse else list(range(groups))
    kept: dict[int, list[int]] = {}

    def token(g: int, i: int) -> list[float]:
        return metric[g * size + i]

    # tome_drop on the first group: B tokens (odd) in order, then A tokens (even) by ascending best match
    g0 = perm[0]
    evens, odds = list(range(0, size, 2)), list(range(1, size, 2))
    best = {i: max(dot(token(g0, i), token(g0, j)) for j in odds) for i in evens}
    ult = odds + sorted(evens, key=lambda i: (best[i], i))
    kept[g0] = ult[: size - r]
    s_prev: list[float] = []
    for t in range(1, groups):
        g, prev = perm[t], perm[t - 1]
        lo = min(caam[g * size:(g + 1) * size])
        hi = max(caam[g * size:(g + 1) * size])
        importance = [(caam[g * size + j] - lo) / (hi - lo) for j in range(size)]
        sources = list(range(size)) if t == 1 else kept[prev]
        weights = [1.0] * size if t == 1 else s_prev
        s = [0.0] * size
        for k, w in zip(sources, weights):  # column k: softmax over the current group's tokens
            logits = [dot(token(g, j), token(prev, k)) for j in range(size)]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            for j in range(size):
                s[j] += exps[j] / sum(exps) * w
        score = [s[j] * (1 - importance[j]) for j in range(size)]
        kept[g] = sorted(range(size), key=lambda j: (score[j], j))[: size - r]
        total = sum(s[j] for j in kept[g])
        s_prev = [s[j] / total for j in kept[g]]
    return [g * size + i for g in range(groups) for i in kept[g]]


def reference_keys(layer, x: torch.Tensor) -> torch.Tensor:
    """``(B, n, head_dim)`` a VideoMAE layer's keys (no key bias) averaged over heads, from its weights."""
    attention = layer.attention.attention
    k = layer.layernorm_before(x) @ attention.key.weight.T
    return k.view(*k.shape[:2], attention.num_attention_heads, -1).mean(2)


def test_sta_stage_matches_the_release_loop():
    torch.manual_seed(1)
    for groups, reverse, size, r in ((8, False, 12, 5), (4, True, 18, 7), (2, False, 30, 9), (4, False, 9, 5)):
        x = torch.randn(2, groups * size, 6, dtype=torch.float64)
        keys = torch.randn(2, groups * size, 4, dtype=torch.float64)
        got = sta.stage(x, keys, groups, reverse, r)
        assert got.shape == (2, groups * (size - r))
        for b in range(2):
            assert got[b].tolist() == reference_stage(x[b], keys[b], groups, reverse, r)


# The release's schedule (model_vit.py: merges after blocks 0, 4, 8 of 12, in 8, 4 and 2 groups, the
# middle stage visiting the groups in reverse) on this model's 6 blocks: after blocks 0, 2, 4.
STA_STAGES = {0: (8, False), 2: (4, True), 4: (2, False)}
# keep 0.5 of 288 tokens (8 tubelets x 36): each stage removes r per group, 288 - (8 + 4 + 2) r <= 144
# first at r = 11: 8 x 25 = 200, 4 x 39 = 156, 2 x 67 = 134 tokens after the three stages.
STA_R, STA_AFTER = 11, [200, 156, 134]


@torch.no_grad()
def test_sta_in_the_model_matches_the_release(model, clips):
    """Score and kept positions through the hooked stock model equal the loop reference applied to the
    block outputs and keys recomputed from the layers' weights; logits equal the reference forward."""
    logits, kept = prune.run(model, clips, prune.VideoPrune("sta", keep=0.5))
    x = model.videomae.embeddings(clips, None)
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    expected = []
    for b, layer in enumerate(model.videomae.encoder.layer):
        keys = reference_keys(layer, x)
        x = layer(x)
        if b in STA_STAGES:
            rows = torch.tensor([reference_stage(x[i], keys[i], *STA_STAGES[b], STA_R) for i in range(x.shape[0])])
            x = x.gather(1, rows[..., None].expand(-1, -1, x.shape[-1]))
            positions = positions.gather(1, rows)
            expected.append(positions)
    assert [k.tolist() for k in kept] == [e.tolist() for e in expected]
    torch.testing.assert_close(logits, model.classifier(model.fc_norm(x.mean(1))), atol=1e-5, rtol=1e-5)
    assert [k.shape[1] for k in kept] == STA_AFTER


@pytest.mark.parametrize("method", prune.METHODS)
def test_keep_everything_is_the_unpruned_model(model, clips, method):
    with torch.no_grad():
        ref = model(pixel_values=clips).logits
    for budget in ({"keep": 1.0}, {"flops": 1.0}):
        logits, kept = prune.run(model, clips, prune.VideoPrune(method, **budget))
        assert torch.equal(logits, ref) and kept == []
    assert model.config._attn_implementation == "sdpa"


def reference_tome_map(metric: torch.Tensor, r: int) -> list[int]:
    """ToMe's ``bipartite_soft_matching`` (class_token=False) for one sequence ``(t, c)``, in loops: the
    merged sequence is the unmerged A tokens in descending-similarity order, then the B tokens."""
    t = metric.shape[0]
    m = [[float(v) for v in row / row.norm()] for row in metric.double()]
    a, b = list(range(0, t, 2)), list(range(1, t, 2))
    edge = {}
    for i in a:
        sims = [dot(m[i], m[j]) for j in b]
        edge[i] = (max(sims), sims.index(max(sims)))
    order = sorted(a, key=lambda i: (-edge[i][0], i))
    unmerged = order[r:]
    dest = [0] * t
    for pos, i in enumerate(unmerged):
        dest[i] = pos
    for i in order[:r]:
        dest[i] = len(unmerged) + edge[i][1]
    for pos, j in enumerate(b):
        dest[j] = len(unmerged) + pos
    return dest


def test_tome_matching_and_weighted_merge():
    torch.manual_seed(2)
    metric = torch.randn(2, 11, 5, dtype=torch.float64)
    dest = tome.bipartite_merge_map(metric, 4)
    assert [row.tolist() for row in dest] == [reference_tome_map(metric[i], 4) for i in range(2)]
    assert int(tome.bipartite_merge_map(metric, 100).max()) + 1 == 11 - 5  # capped at t // 2
    x, size = torch.randn(2, 11, 3, dtype=torch.float64), torch.rand(2, 11, dtype=torch.float64) + 1
    merged, total = tome.merge_weighted(x, size, dest)
    expected, expected_total = reference_merge(x, size, dest)
    torch.testing.assert_close(merged, expected)
    torch.testing.assert_close(total, expected_total)
    for i in range(2):
        for k in range(7):
            members = [j for j in range(11) if dest[i, j] == k]
            assert math.isclose(float(total[i, k]), sum(float(size[i, j]) for j in members))


def reference_merge(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMe's ``merge_wavg``: rows ``x`` ``(B, t, C)`` of sizes ``(B, t)`` summed into ``dest``'s slots
    weighted by size, divided by the slots' total size; ``(B, k, C)`` and ``(B, k)``."""
    slots = int(dest.max()) + 1
    merged = [torch.zeros(slots, x.shape[-1], dtype=x.dtype).index_add_(0, dest[i], x[i] * size[i, :, None])
              for i in range(x.shape[0])]
    total = [torch.zeros(slots, dtype=size.dtype).index_add_(0, dest[i], size[i]) for i in range(x.shape[0])]
    return torch.stack(merged) / torch.stack(total)[..., None], torch.stack(total)


# keep 0.6 of 288 tokens: 172 left, 116 merges over the 6 blocks, the remainder in the first blocks.
TOME_MERGES = [20, 20, 19, 19, 19, 19]


@torch.no_grad()
def test_tome_in_the_model_matches_a_block_by_block_reference(model, clips):
    """ToMeBlock restated from the release on the layers' weights: attention with log(size) added to the
    logits, merge between the attention residual and the MLP, size-weighted."""
    logits, kept = prune.run(model, clips, prune.VideoPrune("tome", keep=0.6))
    x = model.videomae.embeddings(clips, None)
    size = torch.ones(x.shape[:2])
    for b, layer in enumerate(model.videomae.encoder.layer):
        att = layer.attention.attention
        h = layer.layernorm_before(x)
        heads = att.num_attention_heads
        q, k, v = (lin(h).view(*h.shape[:2], heads, -1).transpose(1, 2) for lin in (att.query, att.key, att.value))
        weights = (q @ k.transpose(-1, -2) * att.scaling + size.log()[:, None, None, :]).softmax(-1)
        x = x + layer.attention.output.dense((weights @ v).transpose(1, 2).reshape(h.shape))
        dest = torch.stack([torch.tensor(reference_tome_map(k.mean(1)[i], TOME_MERGES[b])) for i in range(x.shape[0])])
        x, size = reference_merge(x, size, dest)
        x = x + layer.output.dense(layer.intermediate(layer.layernorm_after(x)))
    torch.testing.assert_close(logits, model.classifier(model.fc_norm(x.mean(1))), atol=1e-5, rtol=1e-4)
    assert [k.shape[1] for k in kept] == (288 - torch.tensor(TOME_MERGES).cumsum(0)).tolist()
    assert model.config._attn_implementation == "sdpa"


def test_flops_and_budgets_by_hand():
    config = tiny_config()
    n, d, inner = 288, 64, 256
    block = 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * inner
    full = 2 * n * 3 * 2 * 16 * 16 * d + 6 * block + 2 * d * 8
    assert prune.flops(config) == full
    # r = 3: 8 groups of 36 -> 264, 4 groups -> 252, 2 groups -> 246, after blocks 0, 2, 4
    plan = prune.plan(config, prune.VideoPrune("sta", flops=0.9))
    assert (plan.r, plan.attention, plan.after_stages) == (3, (288, 264, 264, 252, 252, 246), (264, 252, 246))
    assert prune.plan(config, prune.VideoPrune("random", flops=0.9)) == prune.Plan("random", *[getattr(plan, f) for f in
                                                                                              ("r", "merges", "attention", "mlp", "after_stages", "flops", "flops_unpruned")])
    two = prune.flops(config, [288, 272, 272, 264, 264, 260]) / full  # r = 2: 272, 264, 260
    assert two > 0.9 >= plan.flops_ratio == prune.flops(config, list(plan.attention)) / full
    assert prune.plan(config, prune.VideoPrune("sta", flops=two)).r == 2
    # keep = 0.5: r = 11 leaves 288 - 14 * 11 = 134 <= 144; r = 10 leaves 148
    assert prune.plan(config, prune.VideoPrune("sta", keep=0.5)).after_stages[-1] == 134
    assert prune.sta_counts(config, 18) == [144, 72, 36] and prune.sta_counts(config, 19) is None
    tm = prune.plan(config, prune.VideoPrune("tome", keep=0.5))
    assert tm.merges == (24,) * 6 and tm.attention == (288, 264, 240, 216, 192, 168) and tm.mlp[-1] == 144
    assert prune.tome_shares(10, 6, "decreasing") == [3, 3, 2, 1, 1, 0]  # 10 * (5, 4, 3, 2, 1, 0) / 15, largest remainder


def test_stage_schedule_scales_the_release():
    assert sta.stage_blocks(12) == (0, 4, 8) and sta.stage_blocks(6) == (0, 2, 4)
    assert [sta.stage_grouping(b, 12, 8) for b in (0, 4, 8)] == [(8, False), (4, True), (2, False)]
    assert sta.stage_grouping(1, 6, 8) is None


def test_determinism_and_random_drop_does_not_depend_on_the_batch(model, clips):
    for method in prune.METHODS:
        setting = prune.VideoPrune(method, flops=0.7)
        a, ka = prune.run(model, clips, setting, seeds=[5, 6, 7])
        b, kb = prune.run(model, clips, setting, seeds=[5, 6, 7])
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ka, kb))
    setting = prune.VideoPrune("random", keep=0.5)
    _, whole = prune.run(model, clips, setting, seeds=[5, 6, 7])
    _, alone = prune.run(model, clips[1:2], setting, seeds=[6])
    assert all(torch.equal(w[1:2], s) for w, s in zip(whole, alone))
    _, other = prune.run(model, clips, prune.VideoPrune("random", keep=0.5, seed=1), seeds=[5, 6, 7])
    assert not torch.equal(whole[0], other[0])


def test_generator_splits_are_fixed_and_disjoint():
    a = vt.generate_clips("change", "test", 3)
    b = vt.generate_clips("change", "test", 2, 1)
    assert all((x.frames == y.frames).all() for x, y in zip(a[1:], b))
    train = vt.generate_clips("change", "train", 3)
    assert all(not (x.frames == y.frames).all() for x, y in zip(a, train))
    seeds = {vt.clip_seed("change", "train", i) for i in range(100)}
    assert not seeds & {vt.clip_seed("change", "test", i) for i in range(100)}
    assert vt.clip_seed("change", "test", 0)[0] >= vt.SEED_TAG > 100  # apart from the image/text tasks' tags
    assert data.to_tensor(a).shape == (3, 16, 3, 96, 96)


def test_generator_labels_follow_the_tracks():
    clips = vt.generate_clips("change", "train", 200)
    counts = {label: 0 for label in vt.CHANGE_CLASSES}
    for clip in clips:
        counts[str(clip.label)] += 1
        actor = clip.tracks[0]
        first, last = actor[0], actor[-1]
        assert len(clip.events) == 1 and clip.events[0].item == 0
        for other in clip.tracks[1:]:
            assert len(set(other)) == 1 and other[0].cell not in {s.cell for s in actor}
        if clip.label.startswith("moved"):
            dy, dx = vt.DIRECTIONS[clip.label.split()[1]]
            assert (last.y - first.y, last.x - first.x) == (dy * 32, dx * 32)
        else:
            kind = {"changed colour": "colour", "changed shape": "shape", "appeared": "visible", "disappeared": "visible"}[clip.label]
            assert getattr(first, kind) != getattr(last, kind) and (first.y, first.x) == (last.y, last.x)
            assert last.visible == (clip.label != "disappeared")
        frames = clip.evidence_frames
        assert (clip.frames[frames[0]] != clip.frames[frames[-1]]).any()
        assert all((clip.frames[f] == clip.frames[0]).all() for f in range(frames[0] + 1))
        assert all((clip.frames[f] == clip.frames[-1]).all() for f in range(frames[-1], 16))
    assert min(counts.values()) >= 12  # uniform over 8 classes: about 25 each


def test_story_questions_follow_the_events():
    for clip in vt.generate_clips("story", "test", 20):
        for question, answer, frames in vt.questions(clip):
            name = question.split("the ")[1].rsplit(" ", 2)[0] if "appeared first" not in question else None
            if question.startswith("is the"):
                o = next(i for i, t in enumerate(clip.tracks) if question == f"is the {t[0].colour} {t[0].shape} present at the end ?")
                assert answer == ("yes" if clip.tracks[o][-1].visible else "no")
            elif question.startswith("how many times"):
                o = next(i for i, t in enumerate(clip.tracks) if f"the {t[0].colour} {t[0].shape} appear" in question)
                track = clip.tracks[o]
                runs = sum(1 for f in range(16) if track[f].visible and (f == 0 or not track[f - 1].visible))
                assert answer == str(runs)
            assert name is None or isinstance(name, str)
            assert all(0 <= f < 16 for f in frames)


def test_bad_inputs_are_refused(model, tmp_path):
    for kwargs in ({"method": "bogus", "keep": 0.5}, {"method": "sta"}, {"method": "sta", "keep": 0.5, "flops": 0.5},
                   {"method": "sta", "keep": 0.0}, {"method": "sta", "flops": 1.5}, {"method": "sta", "keep": True},
                   {"method": "tome", "keep": 0.5, "schedule": "bogus"}):
        with pytest.raises(ValueError):
            prune.VideoPrune(**kwargs)
    with pytest.raises(ValueError, match="out of reach"):
        prune.plan(model.config, prune.VideoPrune("sta", keep=0.05))
    with pytest.raises(ValueError, match="at most"):
        sta.stage(torch.randn(1, 16, 4), torch.randn(1, 16, 4), 8, False, 2)
    with pytest.raises(ValueError, match="equal temporal groups"):
        sta.stage(torch.randn(1, 15, 4), torch.randn(1, 15, 4), 8, False, 1)
    with pytest.raises(ValueError, match="depth"):
        sta.stage_blocks(2)
    with pytest.raises(ValueError):
        vt.generate_clips("change", "validation", 1)
    with pytest.raises(ValueError):
        vt.generate_clips("nope", "test", 1)
    from tokensieve.video.model import load

    with pytest.raises(ValueError, match="no VideoMAE"):
        load(tmp_path)


@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(), reason="no shipped checkpoint")
def test_shipped_checkpoint_and_cli(tmp_path, capsys):
    import json

    from tokensieve.video import train
    from tokensieve.video.evaluate import load

    shipped = load(None)
    assert shipped.config.use_mean_pooling and grid(shipped.config) == (8, 36)
    summary = json.loads((CHECKPOINT / "training_summary.json").read_text())
    assert summary["heldout_accuracy"] >= 0.95 and summary["steps"] == 2000
    assert train.accuracy(shipped, 20) >= 0.9
    import argparse

    from tokensieve.cli import eval_video_vit_cmd

    parser = argparse.ArgumentParser()
    eval_video_vit_cmd.add_parser(parser.add_subparsers())
    out = tmp_path / "r.json"
    args = parser.parse_args(["eval-video-vit", "--method", "sta", "--flops", "0.7", "--items", "4", "-o", str(out)])
    assert args.handler(args) == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 4 and len(report["items"]) == 4 and report["flops_ratio"] <= 0.7
    assert "accuracy" in capsys.readouterr().out


def test_evidence_tokens_mark_the_changed_tubelet_and_cells():
    clips = vt.generate_clips("change", "test", 40)
    mask = data.evidence_tokens(clips)
    pixels = data.to_tensor(clips)
    tokens = pixels.view(40, 8, 2, 3, 6, 16, 6, 16).permute(0, 1, 4, 6, 2, 3, 5, 7).reshape(40, 288, -1)
    for i, clip in enumerate(clips):
        marked = mask[i].nonzero()[:, 0].tolist()
        assert marked and all(t // 36 in {f // 2 for f in clip.evidence_frames[1:]} for t in marked)
        if not clip.label.startswith("moved"):  # a change inside one tubelet: its two frames differ there
            t = clip.events[0].frame // 2
            differs = [(tokens[i, t * 36 + p].view(2, -1)[0] != tokens[i, t * 36 + p].view(2, -1)[1]).any() for p in range(36)]
            assert any(differs[p] for p in range(36) if t * 36 + p in marked)
            assert not any(differs[p] for p in range(36) if t * 36 + p not in marked)


def test_training_resumes_to_the_same_weights(tmp_path, interrupted):
    from tokensieve.video import train
    from tokensieve.video.model import load

    kwargs = dict(steps=4, batch_size=2, warmup=2, save_every=2, eval_items=0, hidden=8, depth=1, heads=2, progress=False)
    straight, _ = train.train(tmp_path / "a", **kwargs)
    interrupted(train, "generate_clips", 3, lambda: train.train(tmp_path / "b", **kwargs))
    assert (tmp_path / "b" / "partial.safetensors").is_file()
    resumed, summary = train.train(tmp_path / "b", resume=True, **kwargs)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["step"] for h in summary["history"]] == [2, 4]
    assert not (tmp_path / "b" / "partial.safetensors").exists()
    loaded = load(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), resumed.state_dict().values()))


def test_cli_errors_exit_2(capsys, tmp_path):
    from tokensieve.cli import Parser, _run, eval_video_vit_cmd, train_tiny_videomae_cmd

    parser = Parser(prog="tokensieve")
    sub = parser.add_subparsers(dest="command", required=True)
    eval_video_vit_cmd.add_parser(sub)
    train_tiny_videomae_cmd.add_parser(sub)
    for argv, message in ([["eval-video-vit", "--keep", "2"], "keep must be"],
                          [["eval-video-vit", "--keep", "0.5", "--model", str(tmp_path)], "no VideoMAE classifier"],
                          [["eval-video-vit", "--keep", "0.5", "--items", "0"], "--items must be"],
                          [["train-tiny-videomae", "--out", str(tmp_path), "--hidden", "30"], "not a multiple"],
                          [["train-tiny-videomae", "--out", str(tmp_path), "--steps", "0"], "--steps must be"]):
        assert _run(parser.parse_args(argv), "tokensieve") == 2
        assert message in capsys.readouterr().err
    for argv in (["eval-video-vit", "--keep", "0.5", "--flops", "0.5"], ["eval-video-vit", "--method", "vit", "--keep", "0.5"],
                 ["eval-video-vit"]):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        assert stop.value.code == 2

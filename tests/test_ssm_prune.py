"""ToP token pruning in the tiny vision SSM (tokensieve.ssm): exactness, the score and the kept
positions against references written from the authors' code (ZLKong/ToP-ViM), the alignment, FLOPs,
errors, training's resume, and the shipped checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tokensieve.ssm import data, prune
from tokensieve.ssm.model import CHECKPOINT, TinyVim, VimConfig


@pytest.fixture(scope="module")
def model() -> TinyVim:
    torch.manual_seed(0)
    return TinyVim(VimConfig(hidden=16, depth=4, state=4, dt_rank=2, prune_after=(0, 1, 2))).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return data.batch("test", 3)[0]


def reference_gated_output(mixer, h: torch.Tensor) -> torch.Tensor:
    """``(L, E)`` ``y * silu(z)`` of one Mamba mixer on one sequence ``(L, d)``, step by step as
    ``mamba_ssm`` ``Mamba.step`` / ``selective_scan_ref`` compute it (ToP-ViM ``mamba-1p1p1``)."""
    e, n, r = mixer.intermediate_size, mixer.ssm_state_size, mixer.time_step_rank
    k = mixer.conv1d.weight.shape[-1]
    xz = h @ mixer.in_proj.weight.T
    x, z = xz[:, :e], xz[:, e:]
    length = h.shape[0]
    A = -torch.exp(mixer.A_log.float())
    state = torch.zeros(e, n)
    out = []
    for t in range(length):
        acc = mixer.conv1d.bias.clone()
        for j in range(k):
            src = t - (k - 1) + j
            if src >= 0:
                acc = acc + mixer.conv1d.weight[:, 0, j] * x[src]
        u = F.silu(acc)
        dbc = u @ mixer.x_proj.weight.T
        dt, B, C = dbc[:r], dbc[r:r + n], dbc[r + n:]
        delta = F.softplus(dt @ mixer.dt_proj.weight.T + mixer.dt_proj.bias)
        state = torch.exp(delta[:, None] * A) * state + delta[:, None] * B[None, :] * u[:, None]
        y = state @ C + mixer.D * u
        out.append(y * F.silu(z[t]))
    return torch.stack(out)


@torch.no_grad()
def reference_scores(model: TinyVim, x: torch.Tensor, block: int) -> torch.Tensor:
    """The release's importance: the backward scan's gated output of ``block`` summed over channels
    after clipping at 0 (``xai_b.clamp(min=0).sum(dim=1)``), indexed by token (flipped back)."""
    h = model.blocks[block].norm(x)
    rows = []
    for sample in h:
        y = reference_gated_output(model.blocks[block].backward_mixer, sample.flip(0)).flip(0)
        rows.append([sum(max(float(v), 0.0) for v in y[i]) for i in range(y.shape[0])])
    return torch.tensor(rows)


def reference_topk(scores: torch.Tensor, count: int, alive: list[int] | None = None) -> list[list[int]]:
    """The best ``count`` positions per row, sorted by position (plain loop; ties to the lower one)."""
    out = []
    for row in scores.tolist():
        candidates = [i for i in range(len(row)) if alive is None or i in alive]
        best = sorted(candidates, key=lambda i: (-row[i], i))[:count]
        out.append(sorted(best))
    return out


def test_mixer_is_the_sequential_torch_path(model, images):
    """The transformers mixer on a CPU computes the plain Mamba recurrence (no kernels)."""
    mixer = model.blocks[1].forward_mixer
    h = model.blocks[1].norm(model.embed(images))
    with torch.no_grad():
        got = []
        handle = mixer.out_proj.register_forward_pre_hook(lambda m, a: got.append(a[0]))
        mixer(h)
        handle.remove()
    ref = torch.stack([reference_gated_output(mixer, s) for s in h])
    torch.testing.assert_close(got[0], ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", list(prune.METHODS))
def test_keep_everything_is_the_unpruned_model(model, images, method):
    with torch.no_grad():
        ref = model(images)
    logits, kept = prune.run(model, images, prune.SsmPrune(method, keep=1.0))
    assert torch.equal(logits, ref)
    assert [k.shape for k in kept] == [(3, 64)] * 3
    assert prune.plan(model.config, prune.SsmPrune(method, flops=1.0)).counts == (64, 64, 64)


def test_score_and_kept_positions_match_the_release(model, images):
    setting = prune.SsmPrune("aligned", keep=0.4)
    resolved = prune.plan(model.config, setting)
    _, kept = prune.run(model, images, setting, resolved)
    with torch.no_grad():
        x = model.blocks[0](model.embed(images))
    scores = reference_scores(model, model.embed(images), 0)
    # the library's score from the captured signal equals the reference
    outputs = {}
    handle = model.blocks[0].backward_mixer.out_proj.register_forward_pre_hook(
        lambda m, a: outputs.__setitem__("backward", a[0].flip(1)))
    with torch.no_grad():
        model.blocks[0](model.embed(images))
    handle.remove()
    torch.testing.assert_close(prune.token_scores(outputs, "clip"), scores, atol=1e-4, rtol=1e-4)
    assert kept[0].tolist() == reference_topk(scores, resolved.counts[0])
    assert x.shape == (3, 64, 16)


def test_aligned_is_the_release_masking(model, images):
    """Pruned rows zeroed and kept in the sequence (hidden * mask), later stages among live rows only,
    the head averaging the live rows; the zero rows stay zero through later blocks unmasked."""
    setting = prune.SsmPrune("aligned", keep=0.3)
    resolved = prune.plan(model.config, setting)
    logits, kept = prune.run(model, images, setting, resolved)
    with torch.no_grad():
        x = model.embed(images)
        masks = None
        for b, block in enumerate(model.blocks):
            before = x
            x = block(x)
            if masks is not None:
                for i in range(3):
                    dead = [p for p in range(64) if masks[i][p] == 0]
                    assert torch.count_nonzero(x[i, dead]) == 0  # a zero row stays zero
            if b in model.config.prune_after:
                stage = model.config.prune_after.index(b)
                scores = reference_scores(model, before, b)
                alive = [None] * 3 if masks is None else [[p for p in range(64) if masks[i][p]] for i in range(3)]
                chosen = [reference_topk(scores[i:i + 1], resolved.counts[stage], alive[i])[0] for i in range(3)]
                assert kept[stage].tolist() == chosen
                masks = torch.zeros(3, 64)
                for i in range(3):
                    masks[i, chosen[i]] = 1
                x = x * masks[..., None]
        h = model.norm_f(x)
        pooled = torch.stack([h[i, masks[i] == 1].mean(0) for i in range(3)])
        ref = model.head(pooled)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("score", ["random", "sum"])
def test_aligned_later_stages_choose_among_live_rows(model, images, score):
    """With scores that can rank a zeroed row above a live one, each stage keeps a subset of the last."""
    _, kept = prune.run(model, images, prune.SsmPrune("aligned", keep=0.2, score=score))
    for earlier, later in zip(kept, kept[1:]):
        for i in range(3):
            assert set(later[i].tolist()) <= set(earlier[i].tolist())


def test_naive_closes_up_the_sequence(model, images):
    setting = prune.SsmPrune("naive", keep=0.3)
    resolved = prune.plan(model.config, setting)
    logits, kept = prune.run(model, images, setting, resolved)
    with torch.no_grad():
        rows = []
        for i in range(3):
            x, positions = model.embed(images[i:i + 1]), list(range(64))
            for b, block in enumerate(model.blocks):
                before = x
                x = block(x)
                if b in model.config.prune_after:
                    stage = model.config.prune_after.index(b)
                    chosen = reference_topk(reference_scores(model, before, b), resolved.counts[stage])[0]
                    x = x[:, chosen]
                    positions = [positions[c] for c in chosen]
                    assert kept[stage][i].tolist() == positions
            rows.append(model.head(model.norm_f(x).mean(1))[0])
    torch.testing.assert_close(logits, torch.stack(rows), atol=1e-5, rtol=1e-4)
    assert [k.shape[1] for k in kept] == list(resolved.counts)


def test_random_is_seeded_per_item(model, images):
    setting = prune.SsmPrune("random", keep=0.5, seed=3)
    _, kept_all = prune.run(model, images, setting, seeds=[10, 11, 12])
    _, kept_one = prune.run(model, images[1:2], setting, seeds=[11])
    assert kept_all[0][1].tolist() == kept_one[0][0].tolist()
    _, other = prune.run(model, images, prune.SsmPrune("random", keep=0.5, seed=4), seeds=[10, 11, 12])
    assert other[0].tolist() != kept_all[0].tolist()


def test_counts_and_budgets(model):
    config = model.config
    assert prune.stage_counts(config, 0.5) == [32, 16, 8]
    assert prune.stage_counts(config, 0.7) == [45, 32, 23]  # ceil(64 * .7) = 45, ceil(31.5) = 32, ceil(22.4) = 23
    assert prune.block_lengths(config, [32, 16, 8]) == [64, 32, 16, 8]
    resolved = prune.plan(config, prune.SsmPrune("naive", keep=0.125))
    assert resolved.counts == (32, 16, 8) and math.isclose(resolved.ratio, 0.5)
    for method in ("aligned", "naive"):
        resolved = prune.plan(config, prune.SsmPrune(method, flops=0.9))
        assert resolved.flops_ratio <= 0.9
        bigger = prune.stage_counts(config, min(1.0, resolved.ratio * 1.05))
        assert prune.flops(config, bigger, method == "aligned") / resolved.flops_unpruned > 0.9 or bigger == list(resolved.counts)


def test_flops_against_a_hand_count():
    config = VimConfig(hidden=8, depth=2, state=2, dt_rank=1, expand=2, conv=4, prune_after=(0,), patch=48)
    # 4 patches of 48x48x3, d = 8, E = 16, N = 2, R = 1, K = 4, 3 classes
    embed = 2 * 4 * (3 * 48 * 48) * 8
    head = 2 * 8 * 3

    def mixer(n_p, n_s):
        return (n_p * (2 * 8 * 32 + 2 * 16 * 8) + n_s * (2 * 16 * 4 + 2 * 16 * (1 + 4) + 2 * 1 * 16 + 16 * (8 * 2 + 3)))

    assert prune.flops(config) == embed + head + 2 * 2 * mixer(4, 4)
    assert prune.flops(config, [2], aligned=False) == embed + head + 2 * mixer(4, 4) + 2 * mixer(2, 2)
    assert prune.flops(config, [2], aligned=True) == embed + head + 2 * mixer(4, 4) + 2 * mixer(2, 4)
    assert mixer(1, 0) == 768 and mixer(0, 1) == 624


@pytest.mark.parametrize("kwargs, message", [
    ({"keep": 1.5}, "keep must be"), ({"keep": 0}, "keep must be"), ({"flops": -0.1}, "flops must be"),
    ({"keep": 0.5, "flops": 0.5}, "exactly one budget"), ({}, "exactly one budget"),
    ({"method": "vit", "keep": 0.5}, "unknown method"), ({"keep": 0.5, "score": "max"}, "unknown score"),
    ({"keep": 0.5, "direction": "up"}, "unknown direction"), ({"keep": 0.5, "alignment": "x"}, "unknown alignment"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune.SsmPrune(**kwargs)


def test_unreachable_flops_and_bad_configs(model):
    with pytest.raises(ValueError, match="lowest ratio is"):
        prune.plan(model.config, prune.SsmPrune("aligned", flops=0.05))
    with pytest.raises(ValueError, match="multiple of the patch"):
        VimConfig(patch=7)
    with pytest.raises(ValueError, match="prune_after"):
        VimConfig(depth=4, prune_after=(2, 1))


def test_cli_errors_exit_2(capsys, tmp_path):
    import argparse

    from tokensieve.cli import Parser, _run, eval_ssm_cmd

    parser = Parser(prog="tokensieve")
    eval_ssm_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    for argv, message in ([["eval-ssm", "--keep", "2"], "keep must be"],
                          [["eval-ssm", "--keep", "0.5", "--model", str(tmp_path)], "no tiny SSM classifier"],
                          [["eval-ssm", "--keep", "0.5", "--items", "0"], "--items must be"]):
        assert _run(parser.parse_args(argv), "tokensieve eval-ssm") == 2
        assert message in capsys.readouterr().err
    for argv in (["eval-ssm", "--keep", "0.5", "--flops", "0.5"], ["eval-ssm", "--method", "vit", "--keep", "0.5"],
                 ["eval-ssm"]):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        assert stop.value.code == 2
    assert isinstance(parser, argparse.ArgumentParser)


def test_training_resumes_to_the_same_weights(tmp_path, interrupted):
    from tokensieve.ssm import train

    config = VimConfig(hidden=8, depth=2, state=2, dt_rank=1, prune_after=(0,))
    straight, _ = train.train(config, tmp_path / "a", steps=4, batch_size=2, warmup=2, save_every=2, eval_items=0,
                              progress=False)
    interrupted(train.data, "batch", 3, lambda: train.train(config, tmp_path / "b", steps=4, batch_size=2, warmup=2,
                                                            save_every=2, eval_items=0, progress=False))
    assert (tmp_path / "b" / "partial.safetensors").is_file()
    resumed, summary = train.train(config, tmp_path / "b", steps=4, batch_size=2, warmup=2, save_every=2, eval_items=0,
                                   resume=True, progress=False)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["step"] for h in summary["history"]] == [2, 4]
    loaded = TinyVim.load(tmp_path / "b")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), resumed.state_dict().values()))


@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").is_file(), reason="no shipped checkpoint")
def test_shipped_checkpoint_answers():
    model = TinyVim.load()
    images, labels = data.batch("test", 40)
    with torch.no_grad():
        right = int((model(images).argmax(1) == labels).sum())
    assert right >= 32
    assert (CHECKPOINT / "model.safetensors").stat().st_size < 3_000_000

"""BAViT and the tiny YOLOS detector (tokensieve.detect): the scenes' exact masks and patch labels,
dropping patches before a stock YOLOS against a forward written out from its modules, BAViT's drop
rule against a loop written from the paper's description, COCO mAP, FLOPs, errors, training's
resume, the command line and the shipped models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import YolosForObjectDetection

from tokensieve.cli import main
from tokensieve.detect import bavit, data, evaluate, model, prune, train_bavit
from tokensieve.tasks.scene import BACKGROUND, COLOURS, INK

pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def detector() -> YolosForObjectDetection:
    torch.manual_seed(0)
    return model.initialise(YolosForObjectDetection(model.config(hidden=32, layers=2, heads=2))).eval()


@pytest.fixture(scope="module")
def classifier() -> bavit.BAViT:
    torch.manual_seed(1)
    return bavit.BAViT(bavit.config(layers=2, hidden=16, heads=2)).eval()


def test_foreground_is_exactly_the_object_pixels() -> None:
    clutter = 0
    for i in range(30):
        s = data.scene("test", i)
        pixels = np.asarray(s.image)
        coloured = np.zeros(pixels.shape[:2], dtype=bool)
        for rgb in COLOURS.values():
            coloured |= (pixels == rgb).all(-1)
        inside = np.zeros_like(coloured)
        assert (s.labels == 0).all() and len(s.kinds) == len(s.labels)
        for (x0, y0, x1, y1), kind in zip(s.boxes.astype(int), s.kinds):
            inside[y0:y1, x0:x1] = True
            shape_pixels = (pixels[y0:y1, x0:x1] == COLOURS[kind.split()[0]]).all(-1)
            assert np.array_equal(s.foreground[y0:y1, x0:x1], shape_pixels)
        assert not (s.foreground & ~inside).any()  # glyph pixels outside the boxes are background
        clutter += int((coloured & ~inside).any())
        assert np.array_equal(coloured | (pixels == BACKGROUND).all(-1), np.ones_like(coloured))
        assert not (pixels == INK).all(-1).any()
        assert 1 <= len(s.labels) <= data.MAX_OBJECTS and s.boxes.shape == (len(s.labels), 4)
    assert clutter > 10  # coloured glyphs appear, and are not foreground


def test_splits_are_disjoint_and_fixed() -> None:
    train, test = data.scene("train", 3), data.scene("test", 3)
    assert not np.array_equal(np.asarray(train.image), np.asarray(test.image))
    assert np.array_equal(np.asarray(data.scene("test", 3).image), np.asarray(test.image))


def test_patch_labels_against_a_loop() -> None:
    scenes = data.scenes("test", 6)
    for min_share in (0.0, 0.5):
        labels = data.patch_labels(scenes, 8, min_share)
        for b, s in enumerate(scenes):
            for p in range(144):
                row, col = divmod(p, 12)
                share = s.foreground[8 * row:8 * row + 8, 8 * col:8 * col + 8].mean()
                expected = share > 0 if min_share == 0.0 else share >= min_share
                assert bool(labels[b, p]) == bool(expected), (b, p, share)


def test_half_a_patch_is_foreground_at_the_papers_share() -> None:
    mask = np.zeros((96, 96), dtype=bool)
    mask[0:4, 0:8] = True  # patch 0: exactly half its pixels
    mask[8, 8] = True  # patch 13: one pixel
    s = data.Scene(data.scene("test", 0).image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), mask)
    assert data.patch_labels([s], 8, 0.5)[0].nonzero().squeeze(1).tolist() == [0]
    assert data.patch_labels([s], 8)[0].nonzero().squeeze(1).tolist() == [0, 13]
    with pytest.raises(ValueError, match="divide"):
        data.patch_labels([s], 7)


def test_targets_are_relative_centre_boxes() -> None:
    s = data.scene("test", 0)
    t = data.targets([s])[0]
    x0, y0, x1, y1 = s.boxes[0]
    expected = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]) / 96
    assert torch.allclose(t["boxes"][0], expected)
    assert torch.equal(t["class_labels"], torch.from_numpy(s.labels))


def reference_forward(detector: YolosForObjectDetection, x: torch.Tensor, kept: torch.Tensor):
    """The detector on the patches ``kept``, written out from its modules: embeddings, rows [CLS] +
    kept patches + detection tokens, every encoder layer, the final norm, the two heads."""
    h = detector.vit.embeddings(x)
    rows = [0] + [1 + int(p) for p in kept] + list(range(145, 145 + detector.config.num_detection_tokens))
    h = h[:, rows]
    for layer in detector.vit.encoder.layer:
        h = layer(h)
    h = detector.vit.layernorm(h)[:, -detector.config.num_detection_tokens:]
    return detector.class_labels_classifier(h), detector.bbox_predictor(h).sigmoid()


@torch.no_grad()
def test_keeping_every_patch_is_exact(detector) -> None:
    x = data.pixels(data.scenes("test", 3))
    with prune.keep_patches(detector, torch.arange(144).expand(3, -1)):
        pruned = detector(x)
    full = detector(x)
    assert torch.equal(pruned.logits, full.logits) and torch.equal(pruned.pred_boxes, full.pred_boxes)


@torch.no_grad()
def test_dropped_patches_match_the_written_out_forward(detector) -> None:
    x = data.pixels(data.scenes("test", 2))
    gen = torch.Generator().manual_seed(0)
    kept = torch.stack([torch.randperm(144, generator=gen)[:40].sort().values for _ in range(2)])
    with prune.keep_patches(detector, kept):
        out = detector(x)
    for b in range(2):
        logits, boxes = reference_forward(detector, x[b:b + 1], kept[b])
        assert torch.allclose(out.logits[b], logits[0], atol=1e-5) and torch.allclose(out.pred_boxes[b], boxes[0], atol=1e-5)
    assert not torch.allclose(out.logits, detector(x).logits)
    assert not detector.vit.embeddings._forward_hooks  # the hook is gone after the block


def test_keep_patches_errors(detector) -> None:
    x = data.pixels(data.scenes("test", 2))
    with pytest.raises(ValueError, match="batch, patches"):
        with prune.keep_patches(detector, torch.arange(5)):
            pass
    with pytest.raises(ValueError, match="rows"):
        with prune.keep_patches(detector, torch.arange(5)[None]):
            detector(x)
    with pytest.raises(ValueError, match=r"\[0, 144\)"):
        with prune.keep_patches(detector, torch.tensor([[0, 144], [1, 2]])):
            detector(x)


def reference_drop(background: list[float], drop: float) -> list[int]:
    """The drop rule as docs/methods.md states it, one patch at a time: background = probability
    above 0.5; the floor of ``drop`` x their number leave, most background first (ties: lower
    index first); at least one patch stays; the rest in grid order."""
    candidates = [p for p, b in enumerate(background) if b > 0.5]
    candidates.sort(key=lambda p: (-background[p], p))
    n = min(math.floor(drop * len(candidates)), len(background) - 1)
    leaving = set(candidates[:n])
    return [p for p in range(len(background)) if p not in leaving]


def test_drop_rule_against_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        background = torch.rand(144, generator=gen) ** (0.3 + trial % 3)
        if trial % 5 == 0:
            background[:70] = 0.9  # ties
        for drop in (0.0, 0.25, 0.5, 0.75, 1.0):
            assert bavit.Drop(drop).kept(background).tolist() == reference_drop(background.tolist(), drop)
    assert bavit.Drop(1.0).kept(torch.ones(144)).tolist() == [143]  # at least one stays
    with pytest.raises(ValueError, match="drop"):
        bavit.Drop(1.5)


def test_bavit_sees_patch_tokens_only(classifier) -> None:
    seen = []
    first_layer = next(m for m in classifier.vit.modules() if type(m).__name__ == "ViTLayer")
    handle = first_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    try:
        logits = classifier(data.pixels(data.scenes("test", 2)))
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 144, 16])] and logits.shape == (2, 144, 2)


def test_bavit_save_and_load(classifier, tmp_path) -> None:
    classifier.save(tmp_path, {"note": "test"})
    loaded = bavit.BAViT.load(tmp_path)
    x = data.pixels(data.scenes("test", 2))
    assert torch.equal(loaded(x), classifier(x))
    with pytest.raises(FileNotFoundError, match="train-bavit"):
        bavit.BAViT.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train-tiny-detector"):
        model.load(tmp_path / "missing")


def test_map_of_exact_and_shifted_detections() -> None:
    scenes = data.scenes("test", 10)
    exact = [{"image_id": i, "category_id": int(label), "score": 1.0, "bbox": [x0, y0, x1 - x0, y1 - y0]}
             for i, s in enumerate(scenes) for (x0, y0, x1, y1), label in zip(s.boxes.tolist(), s.labels.tolist())]
    assert evaluate.coco_map(scenes, exact) == {"map": 1.0, "map_50": 1.0, "map_75": 1.0}
    shifted = [r | {"bbox": [r["bbox"][0] + 4, *r["bbox"][1:]]} for r in exact]  # IoU 10/18 = 0.556
    m = evaluate.coco_map(scenes, shifted)
    assert m == {"map": 0.2, "map_50": 1.0, "map_75": 0.0}  # right at IoU 0.5 and 0.55 of the ten thresholds
    assert evaluate.coco_map(scenes, [])["map"] == 0.0


def test_detections_convert_boxes_and_scores() -> None:
    logits = torch.tensor([[2.0, 0.0, 5.0], [0.0, 3.0, -1.0]])  # two classes + "no object"
    boxes = torch.tensor([[0.5, 0.25, 0.25, 0.5], [0.1, 0.1, 0.2, 0.2]])
    out = evaluate.detections(logits, boxes, 7)
    p = logits.softmax(-1)
    assert [r["category_id"] for r in out] == [0, 1]
    assert out[0]["score"] == pytest.approx(float(p[0, 0])) and out[1]["score"] == pytest.approx(float(p[1, 1]))
    assert out[0]["bbox"] == pytest.approx([36.0, 0.0, 24.0, 48.0]) and out[1]["image_id"] == 7


def test_flops_hand_count(detector, classifier) -> None:
    cfg = detector.config  # hidden 32, 2 layers, MLP 128, 8 detection tokens
    n = 144 + 9
    layer = 4 * n * 32 * 32 + 2 * n * n * 32 + 2 * n * 32 * 128
    assert prune.encoder_flops(cfg, n) == 2 * 2 * layer
    assert prune.embedding_flops(cfg, 144) == 2 * 144 * 3 * 64 * 32
    c = classifier.vit.config
    assert evaluate.classifier_flops(classifier, 144) == (2 * 144 * 3 * 64 * 16 + 2 * 2 * (4 * 144 * 16 * 16 + 2 * 144 * 144 * 16 + 2 * 144 * 16 * 64)
                                                          + 2 * 144 * 16 * 2) and c.hidden_size == 16


def test_evaluate_settings(detector, classifier) -> None:
    none = evaluate.evaluate(detector, "none", items=6, progress=False)
    assert none["flops_ratio"] == 1.0 and none["kept_per_item"] == [144] * 6
    assert {k: none[k] for k in ("map", "map_50", "map_75")} == none["unpruned"]
    oracle = evaluate.evaluate(detector, "oracle", 1.0, items=6, progress=False)
    truth = data.patch_labels(data.scenes("test", 6), 8, bavit.FOREGROUND_SHARE).sum(1)
    assert oracle["kept_per_item"] == [max(int(t), 1) for t in truth] and oracle["flops_ratio"] < 1.0
    b = evaluate.evaluate(detector, "bavit", 0.5, classifier, items=6, progress=False)
    r = evaluate.evaluate(detector, "random", 0.5, classifier, items=6, progress=False)
    extra = 1 + detector.config.num_detection_tokens
    for kept_b, kept_r in zip(b["kept_per_item"], r["kept_per_item"]):  # equal FLOPs: the classifier's cost in patches
        budget = 2 * 2 * (4 * (kept_b + extra) * 32 * 32 + 2 * (kept_b + extra) ** 2 * 32 + 2 * (kept_b + extra) * 32 * 128)
        budget += evaluate.classifier_flops(classifier, 144)

        def cost(n: int) -> int:
            return 2 * 2 * (4 * (n + extra) * 32 * 32 + 2 * (n + extra) ** 2 * 32 + 2 * (n + extra) * 32 * 128)
        assert cost(kept_r) <= budget and (kept_r == 144 or cost(kept_r + 1) > budget) and kept_r > kept_b
    assert r["flops_ratio"] <= b["flops_ratio"]
    att = evaluate.evaluate(detector, "attention", 0.5, classifier, items=6, progress=False)
    assert att["flops_ratio"] <= b["flops_ratio"] or min(att["kept_per_item"]) == 1
    with pytest.raises(ValueError, match="needs the BAViT"):
        evaluate.evaluate(detector, "bavit", 1.0, None, items=2, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        evaluate.evaluate(detector, "fastv", items=2, progress=False)
    with pytest.raises(ValueError, match="patches are 16 px"):
        evaluate.evaluate(detector, "bavit", 1.0, bavit.BAViT(bavit.config(1, 16, 2, patch=16)), items=2, progress=False)


def test_bavit_training_resumes_to_the_same_weights(tmp_path, interrupted) -> None:
    cfg = bavit.config(layers=1, hidden=16, heads=2)
    kwargs = dict(steps=4, batch_size=4, warmup=2, save_every=2, eval_items=0, progress=False)
    straight = train_bavit.train(cfg, tmp_path / "a", **kwargs)
    interrupted(train_bavit.data, "scenes", 3, lambda: train_bavit.train(cfg, tmp_path / "b", **kwargs))
    assert (tmp_path / "b" / "partial.safetensors").is_file()
    resumed = train_bavit.train(cfg, tmp_path / "b", resume=True, **kwargs)
    assert resumed["history"] == straight["history"]
    a, b = bavit.BAViT.load(tmp_path / "a").state_dict(), bavit.BAViT.load(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "partial.safetensors").exists()
    with pytest.raises(ValueError, match="nothing to resume"):
        train_bavit.train(cfg, tmp_path / "c", resume=True, **kwargs)


def test_detector_training_saves_a_loadable_model(tmp_path) -> None:
    from tokensieve.detect import train_detector

    cfg = model.config(hidden=16, layers=1, heads=2)
    summary = train_detector.train(cfg, tmp_path, steps=3, batch_size=2, warmup=1, save_every=3, eval_items=4, progress=False)
    assert summary["history"][-1]["step"] == 3 and set(summary["heldout"]) == {"map", "map_50", "map_75"}
    loaded = model.load(tmp_path)
    assert loaded.config.num_detection_tokens == 8 and loaded.config.use_mid_position_embeddings is False
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 3


def test_a_missing_extra_is_a_one_line_error(capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pycocotools" else real(name, *a))
    assert main(["eval-detect", "--items", "2"]) == 2
    assert "pip install 'tokensieve[detect]'" in capsys.readouterr().err


def test_command_line_errors(capsys) -> None:
    assert main(["eval-detect", "--drop", "1.5"]) == 2
    assert "drop must be in [0, 1]" in capsys.readouterr().err
    assert main(["eval-detect", "--items", "0"]) == 2
    assert main(["train-bavit", "--out", "/tmp/x", "--layers", "0"]) == 2
    assert main(["train-tiny-detector", "--out", "/tmp/x", "--detection-tokens", "2"]) == 2


@torch.no_grad()
def test_attention_baseline_against_a_written_out_forward(detector) -> None:
    x = data.pixels(data.scenes("test", 2))
    with prune.keep_attended(detector, 1, 30) as log:
        out = detector(x)
    heads, width = 2, 16
    for b in range(2):
        h = detector.vit.embeddings(x[b:b + 1])[0]  # (153, 32)
        first = detector.vit.encoder.layer[0]
        normed = first.layernorm_before(h)
        q = first.attention.attention.query(normed).view(-1, heads, width)
        k = first.attention.attention.key(normed).view(-1, heads, width)
        score = torch.zeros(144)
        for head in range(heads):
            for det in range(145, 153):
                weights = torch.softmax(torch.stack([q[det, head] @ k[j, head] / math.sqrt(width) for j in range(153)]), 0)
                score += weights[1:145] / (heads * 8)
        kept = sorted(torch.topk(score, 30).indices.tolist())
        assert log[0][b].tolist() == kept
        h = first(h[None])
        h = h[:, [0] + [1 + p for p in kept] + list(range(145, 153))]
        for layer in detector.vit.encoder.layer[1:]:
            h = layer(h)
        h = detector.vit.layernorm(h)[:, -8:]
        assert torch.allclose(out.logits[b], detector.class_labels_classifier(h)[0], atol=1e-5)
    with pytest.raises(ValueError, match="layer must be"):
        with prune.keep_attended(detector, 0, 10):
            pass
    with pytest.raises(ValueError, match="count must be"):
        with prune.keep_attended(detector, 1, 145):
            pass


def test_batch_drop_keeps_one_count_and_each_images_own_patches() -> None:
    gen = torch.Generator().manual_seed(3)
    background = torch.rand(4, 144, generator=gen) ** 0.5
    for drop in (0.25, 1.0):
        rule = bavit.Drop(drop)
        batch = rule.kept_batch(background)
        k = max(len(reference_drop(row.tolist(), drop)) for row in background)
        assert batch.shape == (4, k)
        for row, kept in zip(background, batch):
            own = reference_drop(row.tolist(), drop)
            assert set(own) <= set(kept.tolist()) and kept.tolist() == sorted(kept.tolist())
            extra = sorted(set(kept.tolist()) - set(own))
            leaving = sorted(set(range(144)) - set(kept.tolist()))
            assert all(row[e] <= row[x] for e in extra for x in leaving)  # the least background come back


def test_sparse_fine_tuning_trains_on_what_bavit_keeps(detector, classifier, tmp_path, monkeypatch) -> None:
    from tokensieve.detect import train_detector

    counts: list[int] = []
    real = prune.keep_patches

    def spy(det, kept):
        counts.append(kept.shape[1])
        return real(det, kept)

    monkeypatch.setattr(train_detector.prune, "keep_patches", spy)
    summary = train_detector.train(detector.config, tmp_path, steps=2, batch_size=3, warmup=1, save_every=2,
                                   eval_items=0, progress=False, initial=detector.state_dict(),
                                   sparse=(classifier, (1.0, 0.0)))
    batch = data.scenes("train", 3, 0)
    with torch.no_grad():
        expected = bavit.Drop(1.0).kept_batch(classifier.background_probability(data.pixels(batch))).shape[1]
    assert counts == [expected, 144] and summary["sparse_drops"] == [1.0, 0.0]
    trained = model.load(tmp_path).state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in detector.state_dict().items())
    assert main(["train-tiny-detector", "--out", str(tmp_path / "x"), "--sparse-classifier", "bavit"]) == 2


def test_throughput_reports_both_pipelines(detector, classifier) -> None:
    both = evaluate.throughput(detector, classifier, 1.0, images=3, repeats=1)
    assert set(both) == {"detector_images_per_s", "bavit_detector_images_per_s", "speedup"}
    assert both["speedup"] == pytest.approx(both["bavit_detector_images_per_s"] / both["detector_images_per_s"], rel=1e-12)
    assert all(v > 0 for v in both.values())
    assert set(evaluate.throughput(detector, None, 1.0, images=3, repeats=1)) == {"detector_images_per_s"}


def test_the_report_rounds_throughput_only_when_printed() -> None:
    from tokensieve.cli.eval_detect_cmd import format_report

    report = {"settings": {"method": "bavit", "drop": 1.0, "items": 2, "detector_patches": 152},
              "map": 0.5, "unpruned": {"map": 0.6, "map_50": 0.8}, "map_50": 0.7, "patches_kept_mean": 40.25,
              "patches_kept_min": 30, "patches_kept_max": 51, "flops_ratio": 0.3,
              "throughput": {"detector_images_per_s": 101.2345, "bavit_detector_images_per_s": 250.5,
                             "speedup": 250.5 / 101.2345}}
    assert format_report(report).splitlines()[-1] == "  throughput at batch 1: 101.2 images/s unpruned, 250.5 with BAViT (x2.474)"


def test_the_shipped_models_load_offline_and_work() -> None:
    detector, classifier = model.load("tiny-detector"), bavit.BAViT.load("bavit")
    assert detector.config.num_labels == len(data.CLASSES) and classifier.vit.config.num_hidden_layers == 2
    assert evaluate.detection_map(detector, 60)["map"] > 0.6  # 0.745 on 500 scenes (training_summary.json)
    assert train_bavit.token_accuracy(classifier, 60)["accuracy"] > 0.99
    record = json.loads((bavit.CHECKPOINT / "record.json").read_text())
    assert record["command"]["layers"] == 2 and record["heldout"]["accuracy"] >= 0.99

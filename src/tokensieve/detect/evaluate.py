"""Detection quality and cost of the tiny YOLOS with and without BAViT: COCO mAP (pycocotools'
``COCOeval``), patch tokens kept, analytic FLOPs with BAViT's own cost included, throughput at batch 1.

Settings (``method``): ``none`` (every patch), ``bavit`` (the classifier's background patches dropped,
a share ``drop`` of them, :class:`.bavit.Drop`), ``oracle`` (the same rule on the exact labels: what a
perfect classifier would drop; costs nothing) and ``random`` (as many patches as BAViT keeps in that
image would keep, plus as many as the classifier's FLOPs pay for, chosen at random: equal FLOPs).
Every image is run alone
(batch 1): each keeps its own number of patches, and the YOLOS encoder takes no attention mask.
"""

from __future__ import annotations

import contextlib
import io
import time

import torch
from tqdm.auto import tqdm
from transformers import YolosForObjectDetection
from transformers.image_transforms import center_to_corners_format

from . import bavit, data, prune

METHODS = ("none", "bavit", "oracle", "random", "attention")


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("mAP needs pycocotools: pip install 'tokensieve[detect]'") from None
    return COCO, COCOeval


def _coco(scenes: list[data.Scene]):
    images, annotations = [], []
    for i, s in enumerate(scenes):
        images.append({"id": i, "width": data.IMAGE_SIZE, "height": data.IMAGE_SIZE})
        for (x0, y0, x1, y1), label in zip(s.boxes.tolist(), s.labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(label), "iscrowd": 0,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0)})
    coco = _pycocotools()[0]()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": i, "name": name} for i, name in enumerate(data.CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections(logits: torch.Tensor, boxes: torch.Tensor, image_id: int) -> list[dict]:
    """COCO result records of one image from YOLOS's ``logits (Q, classes + 1)`` and ``pred_boxes
    (Q, 4)`` (relative centre format): every detection token, scored by its most probable class
    other than "no object" (DETR's evaluation: no threshold)."""
    scores, labels = logits.softmax(-1)[:, :-1].max(-1)
    corners = center_to_corners_format(boxes) * data.IMAGE_SIZE
    return [{"image_id": image_id, "category_id": int(label), "score": float(score),
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
            for score, label, (x0, y0, x1, y1) in zip(scores, labels, corners.tolist())]


def coco_map(scenes: list[data.Scene], results: list[dict]) -> dict[str, float]:
    """COCO box AP of ``results`` on ``scenes``: ``map`` (IoU 0.5:0.95), ``map_50``, ``map_75``."""
    if not results:
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    truth = _coco(scenes)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = _pycocotools()[1](truth, truth.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": round(float(evaluator.stats[0]), 4), "map_50": round(float(evaluator.stats[1]), 4),
            "map_75": round(float(evaluator.stats[2]), 4)}


@torch.no_grad()
def detection_map(detector: YolosForObjectDetection, items: int, batch_size: int = 50) -> dict[str, float]:
    """Unpruned mAP on test scenes ``0 .. items - 1``."""
    scenes = data.scenes("test", items)
    results = []
    for first in range(0, items, batch_size):
        chunk = scenes[first:first + batch_size]
        out = detector(data.pixels(chunk))
        for j in range(len(chunk)):
            results += detections(out.logits[j], out.pred_boxes[j], first + j)
    return coco_map(scenes, results)


ATTENTION_LAYER = 1
"""``attention`` ranks patches by the detection tokens' attention in layer 0 and prunes before layer 1."""


def _bavit_kept(drop: float, pixels: torch.Tensor, scene: data.Scene, classifier: bavit.BAViT | None,
                patch: int, oracle: bool) -> torch.Tensor:
    """``(K,)`` ascending patch indices one image (``pixels (1, 3, 96, 96)``) keeps under BAViT's rule,
    on the classifier's probabilities or (``oracle``) on the exact labels."""
    rule = bavit.Drop(drop)
    if oracle:
        truth = data.patch_labels([scene], patch, bavit.FOREGROUND_SHARE)[0]
        return rule.kept(torch.where(truth, 0.0, 1.0))
    assert classifier is not None
    return rule.kept(classifier.background_probability(pixels)[0])


def detector_flops(config, patches_per_layer: list[int]) -> int:
    """FLOPs of the detector when encoder layer ``l`` sees ``patches_per_layer[l]`` patches (plus its
    [CLS] and detection tokens); the patch embedding always runs on the whole grid."""
    grid = (data.IMAGE_SIZE // config.patch_size) ** 2
    extra = 1 + config.num_detection_tokens
    layers = sum(2 * prune.vit_layer_macs(n + extra, config.hidden_size, config.intermediate_size) for n in patches_per_layer)
    return prune.embedding_flops(config, grid) + layers


def equal_flops_count(config, budget: int, full_layers: int = 0) -> int:
    """The most patches (at least 1) the detector's layers ``full_layers`` on can take when layers
    before them see every patch and the whole pass may cost ``budget`` FLOPs."""
    grid = (data.IMAGE_SIZE // config.patch_size) ** 2
    rest = config.num_hidden_layers - full_layers
    count = 1
    while count < grid and detector_flops(config, [grid] * full_layers + [count + 1] * rest) <= budget:
        count += 1
    return count


@torch.no_grad()
def evaluate(detector: YolosForObjectDetection, method: str = "bavit", drop: float = 1.0,
             classifier: bavit.BAViT | None = None, items: int = 500, seed: int = 0, progress: bool = True) -> dict:
    """mAP, patches kept and FLOPs of ``method`` at ``drop`` on test scenes ``0 .. items - 1``, with the
    unpruned mAP beside it; the report as a dict.

    Raises:
        ValueError: unknown method, ``items`` below 1, ``drop`` outside [0, 1], a classifier whose
            patches are not the detector's, or ``bavit`` / ``random`` / ``attention`` without a classifier.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if items < 1:
        raise ValueError(f"items must be at least 1, got {items}")
    bavit.Drop(drop)
    cfg = detector.config
    if method in ("bavit", "random", "attention"):
        if classifier is None:
            raise ValueError(f"method {method!r} needs the BAViT classifier")
        if classifier.vit.config.patch_size != cfg.patch_size:
            raise ValueError(f"the classifier's patches are {classifier.vit.config.patch_size} px, the detector's {cfg.patch_size} px")
    generator = torch.Generator().manual_seed(seed)
    scenes = data.scenes("test", items)
    grid = (data.IMAGE_SIZE // cfg.patch_size) ** 2
    layers = cfg.num_hidden_layers
    full = detector_flops(cfg, [grid] * layers)
    results, unpruned, counts, spent = [], [], [], 0
    for i, scene in enumerate(tqdm(scenes, desc=f"eval-detect {method}", disable=not progress)):
        pixels = data.pixels([scene])
        if method == "none":
            out, count, cost = detector(pixels), grid, full
        else:
            kept = _bavit_kept(drop, pixels, scene, classifier, cfg.patch_size, method == "oracle")
            cost = detector_flops(cfg, [kept.numel()] * layers)
            if method in ("bavit", "random", "attention"):
                cost += classifier_flops(classifier, grid)  # random and attention get BAViT's whole budget
            if method == "attention":
                count = equal_flops_count(cfg, cost, ATTENTION_LAYER)
                with prune.keep_attended(detector, ATTENTION_LAYER, count):
                    out = detector(pixels)
                cost = detector_flops(cfg, [grid] * ATTENTION_LAYER + [count] * (layers - ATTENTION_LAYER))
            else:
                if method == "random":
                    kept = torch.randperm(grid, generator=generator)[: equal_flops_count(cfg, cost)].sort().values
                    cost = detector_flops(cfg, [kept.numel()] * layers)
                with prune.keep_patches(detector, kept[None]):
                    out = detector(pixels)
                count = int(kept.numel())
        results += detections(out.logits[0], out.pred_boxes[0], i)
        reference = detector(pixels)
        unpruned += detections(reference.logits[0], reference.pred_boxes[0], i)
        counts.append(count)
        spent += cost
    return {"settings": {"method": method, "drop": drop, "items": items, "seed": seed, "detector_patches": grid,
                         "foreground_share": bavit.FOREGROUND_SHARE},
            **coco_map(scenes, results), "unpruned": coco_map(scenes, unpruned),
            "patches_kept_mean": round(sum(counts) / items, 2), "patches_kept_min": min(counts),
            "patches_kept_max": max(counts), "flops": round(spent / items), "flops_unpruned": full,
            "flops_ratio": round(spent / items / full, 4), "kept_per_item": counts}


def classifier_flops(classifier: bavit.BAViT, patches: int) -> int:
    """FLOPs of one BAViT pass on ``patches`` patches: embedding, layers (no [CLS]) and the linear head."""
    cfg = classifier.vit.config
    return prune.embedding_flops(cfg, patches) + prune.encoder_flops(cfg, patches) + 2 * patches * cfg.hidden_size * 2


@torch.no_grad()
def throughput(detector: YolosForObjectDetection, classifier: bavit.BAViT | None, drop: float, images: int = 200,
               repeats: int = 3) -> dict[str, float]:
    """Images per second at batch 1 on test scenes ``0 .. images - 1``: the detector on every patch and,
    given a classifier, BAViT + the detector on what it keeps (the classifier's time included); the
    best of ``repeats`` passes after one warm-up pass each. Unrounded: the speedup is the exact ratio of
    the two throughputs, whatever the load on the machine."""
    pixels = [data.pixels([s]) for s in data.scenes("test", images)]
    rule = bavit.Drop(drop)

    def full() -> None:
        for x in pixels:
            detector(x)

    def pruned() -> None:
        for x in pixels:
            with prune.keep_patches(detector, rule.kept(classifier.background_probability(x)[0])[None]):
                detector(x)

    runs = {"detector": full} | ({"bavit_detector": pruned} if classifier is not None else {})
    timings = {}
    for name, fn in runs.items():
        fn()
        timings[f"{name}_images_per_s"] = images / min(_seconds(fn) for _ in range(repeats))
    if classifier is not None:
        timings["speedup"] = timings["bavit_detector_images_per_s"] / timings["detector_images_per_s"]
    return timings


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

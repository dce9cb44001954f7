"""The engine's contract with a new user: keep-everything is exact for every method on every adapter,
text-only requests and right-padded batches work, options are checked where they are given, and a
transformers release that passes the cache differently fails loudly."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from tiny_models import PAD, TEXT, batch, build, collate, samples

import tokensieve
from tokensieve import compat, methods

VISION = ["llava", "llava-next", "llava-next-video", "qwen2-vl", "qwen2.5-vl"]
_MODELS: dict[str, torch.nn.Module] = {}

def _decision_modules() -> str:
    """Random LVPruning decision modules for the 4-layer, 32-wide tiny models (weights are a file)."""
    from tokensieve.learned.decision import DecisionConfig, DecisionModules

    path = Path(tempfile.mkdtemp()) / "lvpruning.safetensors"
    torch.manual_seed(0)
    DecisionModules(DecisionConfig(hidden=TEXT["hidden_size"], layers=(1, 2), keep=(0.5, 0.25), num_layers=4)).save(path)
    return str(path)


def _atp_heads(keep_all: bool) -> str:
    """ATP threshold heads for the 4-layer tiny models: thresholds near 0 (every token stays) or the
    untrained ones (``theta_r = 1``: tokens above the mean score stay)."""
    from tokensieve.learned.atp_heads import ATPConfig, ThresholdHeads

    path = Path(tempfile.mkdtemp()) / "atp.safetensors"
    heads = ThresholdHeads(ATPConfig(attention_layers=(0, 2), num_layers=4, budget="flops", target=0.5))
    if keep_all:
        with torch.no_grad():
            for head in heads.heads:
                head[2].bias.copy_(torch.tensor([-30.0, 0.0]))
    heads.save(path, {"kept": [0.5, 0.25]})
    return str(path)


# Each registered method set to keep every token (4-layer tiny models).
KEEP_ALL = {
    "lvpruning": {"weights": _decision_modules(), "keep": (1.0, 1.0)},
    "atp": {"weights": _atp_heads(keep_all=True)},
    "none": {},
    "fastv": {"keep": 1.0},
    "fitprune": {"recipe": {"removed": {}, "visual_tokens": 16, "num_layers": 4}, "fractions": True},
    "random": {"keep": 1.0},
    "pool": {"keep": 1.0},
    "streamingllm": {"window": 10_000},
    "h2o": {"budget": 10_000},
    "snapkv": {"budget": 10_000},
    "a2sf": {"budget": 10_000},
    "pagedeviction": {"budget": 10_000},
    "lazyllm": {"keep": 1.0},
    "divprune": {"keep": 1.0},
    "fastervlm": {"keep": 1.0},
    "dart": {"keep": 1.0},
    "pdrop": {"ratio": 1.0},
    "visionzip": {"keep": 1.0},
    "tome": {"keep": 1.0},
    "transprune": {"layers": (0, 1, 2), "keep": (1.0, 1.0, 1.0)},
    "aim": {"merge_keep": 1.0, "start": 3, "stop": 3},
    "vflowopt": {"vit_keep": 1.0, "stage_keep": (1.0, 1.0)},
    "evs": {"keep": 1.0},
    "uniform-frames": {"keep": 1.0},
    "metok": {"parts": (1,), "strides": (1, 1, 1)},
}
# Methods that need a CLIP [CLS] tower, one patch grid per image or a regular grid refuse these adapters
# at prune() (FasterVLM reads LLaVA-NeXT's crops).
UNSUPPORTED = {
    ("llava-next", m) for m in ("pool", "visionzip", "tome", "vflowopt")
} | {(f, m) for f in ("qwen2-vl", "qwen2.5-vl") for m in ("fastervlm", "visionzip", "tome", "vflowopt")} \
  | {("llava-next-video", m) for m in ("fastervlm", "visionzip", "tome", "vflowopt")} \
  | {(f, m) for f in VISION if f != "llava-next-video" for m in ("evs", "uniform-frames", "metok")}


def model_of(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = build(family)
    return _MODELS[family]


def _is_clean(model) -> bool:
    layers = model.model.language_model.layers
    return all("forward" not in layer.__dict__ for layer in layers) and not model._forward_pre_hooks


def greedy(model, inputs, steps=3):
    return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)


def test_every_registered_method_has_a_keep_everything_setting():
    assert set(KEEP_ALL) == set(methods.REGISTRY)


@pytest.mark.parametrize("family", VISION)
@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_keeping_everything_is_exact_for_every_method(family, name):
    model = model_of(family)
    inputs = batch(family, model, [1, 2, 1])
    with torch.no_grad():
        logits, ids = model(**inputs).logits, greedy(model, inputs)
        if (family, name) in UNSUPPORTED:
            with pytest.raises(TypeError, match="supported"):
                with tokensieve.prune(model, name, **KEEP_ALL[name]):
                    pass
            assert _is_clean(model)
            return
        with tokensieve.prune(model, name, **KEEP_ALL[name]):
            pruned_logits, pruned_ids = model(**inputs).logits, greedy(model, inputs)
    assert torch.equal(logits, pruned_logits)
    assert torch.equal(ids, pruned_ids)


PRUNING = {"fitprune": {"recipe": {"removed": {1: 4, 2: 4}, "visual_tokens": 16, "num_layers": 4}},
           "transprune": {"layers": (0, 1, 2)}, "lvpruning": {"weights": KEEP_ALL["lvpruning"]["weights"]},
           "atp": {"weights": _atp_heads(keep_all=False)}}


@pytest.mark.parametrize("name", sorted(n for n, c in methods.REGISTRY.items() if c.visual and n != "none"))
def test_a_text_only_sample_in_a_batch_is_left_as_it_was(name):
    """Every visual-token method at its defaults, on a batch of one image sample (a video for the video
    methods) and one text-only one: the text-only sample's last-token logits match it alone (1e-5) and
    its report says so."""
    family = "llava-next-video" if "frames" in methods.REGISTRY[name].needs else "llava"
    model = model_of(family)
    parts = samples(family, model, [1, 0])
    with torch.no_grad(), tokensieve.prune(model, name, **PRUNING.get(name, {})) as run:
        mixed = model(**collate(family, parts)).logits[1, -1]
        assert [s.note for s in run.report.samples] == ["", "no visual tokens: passed through unpruned"]
        assert run.report.samples[0].visual_lengths[-1] < (16 if family == "llava" else 12)  # the visual tokens in
    alone = model(**collate(family, [parts[1]])).logits[0, -1]
    assert torch.allclose(mixed, alone, atol=1e-5)


@pytest.mark.parametrize("family", VISION)
def test_a_text_only_request_passes_through_unpruned(family):
    """A fresh model: on transformers 5.2, Qwen2-VL keeps ``rope_deltas`` from an earlier generate() and
    a later text-only call of another batch size then fails inside the plain model itself."""
    model = build(family)
    text_only = batch(family, model, [0])
    with torch.no_grad():
        logits, ids = model(**text_only).logits, greedy(model, text_only)
        with tokensieve.prune(model, "fastv", layer=2, keep=0.25) as run:
            pruned_logits = model(**text_only).logits
            assert run.report.samples[0].note == "no visual tokens: passed through unpruned"
            pruned_ids = greedy(model, text_only)
            mixed = batch(family, model, [1, 0])
            model(**mixed)
            assert [s.note for s in run.report.samples] == ["", "no visual tokens: passed through unpruned"]
    assert torch.equal(logits, pruned_logits)
    assert torch.equal(ids, pruned_ids)


def _right_padded(parts: list[dict]) -> dict[str, torch.Tensor]:
    width = max(len(p["ids"]) for p in parts)
    ids = torch.full((len(parts), width), PAD)
    mask = torch.zeros(len(parts), width, dtype=torch.long)
    for i, p in enumerate(parts):
        ids[i, : len(p["ids"])] = torch.tensor(p["ids"])
        mask[i, : len(p["ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.stack([x for p in parts for x in p["pixels"]])}


@pytest.mark.parametrize("method,opts", [("fastv", {"layer": 2, "keep": 0.5}), ("pdrop", {"layers": (1, 2), "ratio": 0.5})])
def test_right_padding_equals_left_padding_equals_alone(method, opts):
    """Kept visual positions (counted from each sample's first token) agree across right padding, left
    padding and each sample alone; right-padded logits at the last real token match alone to 1e-4."""
    model = model_of("llava")
    parts = samples("llava", model, [1, 1, 1])
    right, left = _right_padded(parts), collate("llava", parts)
    with torch.no_grad(), tokensieve.prune(model, method, **opts) as run:
        right_logits = model(**right).logits
        right_kept = [s.visual_kept for s in run.report.samples]
        model(**left)
        left_kept = [s.visual_kept for s in run.report.samples]
        for i, part in enumerate(parts):
            alone = model(**collate("llava", [part])).logits[0, -1]
            alone_kept = run.report.samples[0].visual_kept
            pad = left["input_ids"].shape[1] - len(part["ids"])
            last = right_logits.shape[1] - 1 - (right["input_ids"].shape[1] - len(part["ids"]))  # pads are never pruned
            assert torch.allclose(right_logits[i, last], alone, atol=1e-4), (right_logits[i, last] - alone).abs().max()
            for stage, kept in alone_kept.items():
                assert right_kept[i][stage] == kept, stage
                assert [p - pad for p in left_kept[i][stage]] == kept, stage


@pytest.mark.parametrize("call,error,message", [
    (lambda: methods.FastV(keep=2), ValueError, "keep must be in"),
    (lambda: methods.FastV(keep="0.5"), TypeError, "keep must be a number or None, got str"),
    (lambda: methods.FastV(layer="2"), TypeError, "layer must be an integer, got str"),
    (lambda: methods.FastV(keep=True), TypeError, "keep must be a number or None, got bool"),
    (lambda: methods.PDrop(ratio=False), TypeError, "ratio must be a number, got bool"),
    (lambda: methods.PDrop(layers=(1, "2")), TypeError, "layers must be a tuple of integers"),
    (lambda: methods.StreamingLLM(window=2.5), TypeError, "window must be an integer"),
    (lambda: methods.get("fastv", variant="fast"), TypeError, "variant must be one of 'code', 'paper'"),
])
def test_options_are_checked_when_the_method_is_made(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_reports_show_the_effective_options_and_recipes_may_be_dicts():
    model = model_of("llava")
    inputs = batch("llava", model, [1])
    with torch.no_grad(), tokensieve.prune(model, "fastv", layer=2) as run:
        model(**inputs)
    assert run.report.options["keep"] == 0.5
    assert run.report.samples[0].visual_lengths[2:] == [8, 8]
    recipe = {"removed": {1: 4}, "visual_tokens": 16, "num_layers": 4}
    assert methods.FitPrune(recipe=recipe).recipe.removed == {1: 4}


def test_a_static_cache_is_refused_naming_cache_implementation():
    from transformers import StaticCache

    model = model_of("llava")
    inputs = batch("llava", model, [1])
    cache = StaticCache(config=model.config.text_config, max_cache_len=64)
    with torch.no_grad(), tokensieve.prune(model, "fastv"):
        with pytest.raises(TypeError, match="cache_implementation"):
            model(**inputs, **{compat.cache_keyword(type(model).forward): cache})


def test_a_cache_the_engine_did_not_adopt_is_a_version_error():
    """What a transformers release that renames the cache keyword again would cause: the decoder
    layers receive another cache than the engine's. The error names the version and the range."""
    from transformers import DynamicCache

    model = model_of("llava")
    inputs = batch("llava", model, [1])
    lm = model.model.language_model
    keyword = compat.cache_keyword(type(lm).forward)

    def swap(module, args, kwargs):
        kwargs[keyword] = DynamicCache(config=model.config.text_config)
        return args, kwargs

    with tokensieve.prune(model, "fastv"):
        hook = lm.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            with torch.no_grad(), pytest.raises(RuntimeError, match=str(compat.TRANSFORMERS_VERSION)) as info:
                model(**inputs)
        finally:
            hook.remove()
    assert compat.supported_range() in str(info.value)
    assert "DynamicCache tokensieve did not adopt" in str(info.value)


def test_installed_transformers_lies_in_the_declared_range():
    from importlib import metadata

    from packaging.requirements import Requirement

    declared = [Requirement(r) for r in metadata.requires("tokensieve") if r.startswith("transformers")]
    assert len(declared) == 1 and declared[0].specifier, declared
    assert compat.TRANSFORMERS_VERSION in declared[0].specifier
    assert compat.supported_range() == str(declared[0].specifier)
    assert declared[0].specifier.contains("5.2.0")


def test_a_failure_while_installing_leaves_the_model_as_it_was(monkeypatch):
    from tokensieve import vision

    model = model_of("llava")

    def broken(self):
        raise RuntimeError("tap failed")

    monkeypatch.setattr(vision.VisionTap, "install", broken)
    with pytest.raises(RuntimeError, match="tap failed"):
        with tokensieve.prune(model, "fastervlm", keep=0.5):
            pass
    assert _is_clean(model) and getattr(model, "_tokensieve_engine", None) is None

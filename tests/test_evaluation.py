"""Evaluation and calibration runtime: inputs in the model's dtype, timings without the first call's
one-off costs nor a CUDA sync for a CPU model, finished progress bars, and records of where they ran."""

from __future__ import annotations

import types

import torch
import transformers
from tiny_models import untrained
from torch import nn

from tokensieve import calibration, evaluation, timing, vflowopt_search
from tokensieve.timing import ForwardTimer

RUNTIME = {"device": "cpu", "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__}


def test_a_result_records_device_dtype_and_versions():
    model, prompting = untrained()
    settings = evaluation.evaluate(model, prompting, "counting", "random", {"keep": 0.5}, 1, 1, progress=False)["settings"]
    assert {k: settings[k] for k in RUNTIME} == RUNTIME


def test_pixel_values_reach_the_vision_tower_in_the_model_dtype():
    model, prompting = untrained()
    model = model.to(torch.bfloat16)
    seen = []
    model.model.vision_tower.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    result = evaluation.evaluate(model, prompting, "counting", "none", limit=1, batch_size=1, progress=False)
    assert seen and set(seen) == {torch.bfloat16}
    assert result["settings"]["dtype"] == "bfloat16"


def test_the_first_call_is_an_untimed_warm_up(monkeypatch):
    model, prompting = untrained()
    clock = [0.0]  # the timer's clock: it moves only when the first forward pays its one-off costs
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []

    def slow_first_call(module, args):
        calls.append(1)
        if len(calls) == 1:
            clock[0] += 1.0

    model.register_forward_pre_hook(slow_first_call)
    result = evaluation.evaluate(model, prompting, "counting", "none", limit=2, batch_size=2, progress=False)
    timed = len(result["timing"]["prefill"]) + len(result["timing"]["decode"])
    assert len(result["timing"]["prefill"]) == 1 and len(calls) > timed
    assert result["ttft_ms"] == 0 and result["decode_ms_per_token"] == 0


def test_the_timer_syncs_cuda_only_for_a_model_on_cuda(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: syncs.append(args))
    model = nn.Linear(2, 2)
    with ForwardTimer(model) as timer:
        timer.start()
        model(torch.zeros(1, 2))
    assert len(timer.prefill_ms) == 1 and syncs == []


def test_the_calibration_bar_ends_full_and_the_recipe_records_the_runtime(record_bars):
    bars = record_bars(calibration)
    model, prompting = untrained()
    recipe = evaluation.calibrate_on_tasks(model, prompting, "counting", 0.5, samples=2, batch_size=2, search="feasible")
    assert bars[-1].n == bars[-1].total < 14  # converged early: the bar still ends full
    assert recipe.extra == {**RUNTIME, "search": "feasible"} and recipe.to_dict()["extra"] == recipe.extra
    release = evaluation.calibrate_on_tasks(model, prompting, "counting", 0.5, samples=2, batch_size=2)
    assert bars[-1].n == bars[-1].total == 7  # the release's bisection: 1 -> 0.0078 in seven halvings
    assert {k: release.extra[k] for k in RUNTIME} == RUNTIME and release.extra["search"] == "release"


def test_the_vflowopt_search_records_the_runtime():
    model, prompting = untrained()
    batches = evaluation.calibration_batches(model, prompting, "counting", 2, batch_size=2)
    result = vflowopt_search.search(model, batches, 0.5, trials=1, progress=False)
    assert {k: result[k] for k in RUNTIME} == RUNTIME

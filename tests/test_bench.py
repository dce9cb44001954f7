"""The benchmark grid: files written, baseline reused, budgets met, and resumption."""

from __future__ import annotations

import json

import pytest
import torch

from tokensieve import bench, evaluation
from tokensieve.tiny.build import build_model, build_processor, build_tokenizer


def untrained():
    torch.manual_seed(0)
    model = build_model(build_tokenizer()).eval()
    processor = build_processor()
    processor.tokenizer.padding_side = "left"
    return model, evaluation.Prompting(processor, tiny=True)


def test_bench_writes_every_output_and_resumes(tmp_path):
    model, prompting = untrained()
    results = bench.run_bench(model, prompting, "counting", ["fastv", "random"], [0.5, 0.1], 3, 3, tmp_path, "untrained")
    for name in ("results.json", "results.csv", "results.md", "accuracy_vs_flops.png", "accuracy_vs_ttft.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    cells = {(r["bench"]["method"], r["bench"]["budget"]): r for r in results}
    assert set(cells) == {("none", 1.0), ("fastv", 0.5), ("fastv", 0.1), ("random", 0.5), ("random", 0.1)}
    assert cells["none", 1.0]["agreement"] == 1.0
    for key in [("fastv", 0.5), ("random", 0.5), ("random", 0.1)]:
        assert cells[key]["tflops"] / cells[key]["tflops_unpruned"] <= key[1]
    assert "error" in cells["fastv", 0.1] and "out of reach" in cells["fastv", 0.1]["error"]
    # the grid is resumed: nothing is run again, the stored cells are kept as they were
    stored = (tmp_path / "results.json").read_text()
    again = bench.run_bench(model, prompting, "counting", ["fastv", "random"], [0.5, 0.1], 3, 3, tmp_path, "untrained")
    assert len(again) == 5 and json.loads(stored) == json.loads((tmp_path / "results.json").read_text())


def test_an_unreachable_fitprune_budget_is_recorded_and_the_grid_goes_on(tmp_path):
    model, prompting = untrained()
    results = bench.run_bench(model, prompting, "counting", ["fitprune", "random"], [0.01], 2, 2, tmp_path, "untrained")
    cells = {(r["bench"]["method"], r["bench"]["budget"]): r for r in results}
    assert set(cells) == {("none", 1.0), ("fitprune", 0.01), ("random", 0.01)}
    assert "no recipe reaches" in cells["fitprune", 0.01]["error"]
    assert "unreachable" in (tmp_path / "results.md").read_text()


def test_a_method_with_fixed_options_is_a_row_of_its_own(tmp_path):
    model, prompting = untrained()
    names = ["fitprune", "fitprune:score=fit", "fastv:layer=3"]
    results = bench.run_bench(model, prompting, "counting", names, [0.5], 2, 2, tmp_path, "untrained")
    cells = {r["bench"]["method"]: r for r in results}
    assert set(cells) == {"none", *names}
    assert cells["fitprune"]["settings"]["options"]["score"] == "product"
    assert cells["fitprune:score=fit"]["settings"]["options"]["score"] == "fit"
    assert cells["fastv:layer=3"]["settings"]["options"]["layer"] == 3
    assert cells["fitprune:score=fit"]["tflops"] / cells["fitprune:score=fit"]["tflops_unpruned"] <= 0.5
    assert len(list(tmp_path.glob("recipe_flops*.json"))) == 1  # both FitPrune rows share the budget's recipe


def test_bad_method_specs_are_refused_before_any_work():
    assert bench.parse_method("fastv:layer=3:keep=0.25") == ("fastv", {"layer": 3, "keep": 0.25})
    for spec, message in [("fitprun", "did you mean 'fitprune'"), ("fitprune:score", "name:key=value"),
                          ("fitprune:colour=red", "takes no option 'colour'"), ("fastv:flops=0.3", "the bench sets flops")]:
        with pytest.raises(ValueError, match=message):
            bench.parse_method(spec)

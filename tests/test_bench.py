"""The benchmark grid: files written, baseline reused, budgets met, and resumption."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny_models import untrained, untrained_text

from tokensieve import bench


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
    specs = ["fitprune:search=feasible", "random"]
    results = bench.run_bench(model, prompting, "counting", specs, [0.01], 2, 2, tmp_path, "untrained")
    cells = {(r["bench"]["method"], r["bench"]["budget"]): r for r in results}
    assert set(cells) == {("none", 1.0), ("fitprune:search=feasible", 0.01), ("random", 0.01)}
    assert "no recipe reaches" in cells["fitprune:search=feasible", 0.01]["error"]
    assert "unreachable" in (tmp_path / "results.md").read_text()


def test_a_method_with_fixed_options_is_a_row_of_its_own(tmp_path):
    model, prompting = untrained()
    names = ["fitprune:search=feasible", "fitprune:search=feasible:score=fit", "fastv:layer=3"]
    results = bench.run_bench(model, prompting, "counting", names, [0.5], 2, 2, tmp_path, "untrained")
    cells = {r["bench"]["method"]: r for r in results}
    assert set(cells) == {"none", *names}
    assert cells["fitprune:search=feasible"]["settings"]["options"]["score"] == "product"
    fit = cells["fitprune:search=feasible:score=fit"]
    assert fit["settings"]["options"]["score"] == "fit"
    assert cells["fastv:layer=3"]["settings"]["options"]["layer"] == 3
    assert fit["tflops"] / fit["tflops_unpruned"] <= 0.5  # the feasible search always meets the budget
    assert len(list(tmp_path.glob("recipe_flops*.json"))) == 1  # both FitPrune rows share the budget's recipe


def test_bad_method_specs_are_refused_before_any_work():
    assert bench.parse_method("fastv:layer=3:variant=paper") == ("fastv", {"layer": 3, "variant": "paper"})
    for spec, message in [("fitprun", "did you mean 'fitprune'"), ("fitprune:score", "name:key=value"),
                          ("fitprune:colour=red", "takes no option 'colour'"), ("fastv:flops=0.3", "the bench sets flops")]:
        with pytest.raises(ValueError, match=message):
            bench.parse_method(spec)


def small_bench(model, prompting, out, **changes):
    args = dict(task="counting", names=["random"], budgets=[0.5], limit=2, batch_size=2, model_name="untrained")
    args.update(changes)
    return bench.run_bench(model, prompting, args["task"], args["names"], args["budgets"], args["limit"],
                           args["batch_size"], out, args["model_name"], overwrite=args.get("overwrite", False))


def test_the_folder_records_what_its_values_depend_on(tmp_path):
    model, prompting = untrained()
    small_bench(model, prompting, tmp_path)
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert {k: settings[k] for k in ("model", "tasks", "limit", "batch_size", "device", "dtype")} == {
        "model": "untrained", "tasks": ["counting"], "limit": 2, "batch_size": 2, "device": "cpu", "dtype": "float32"}
    assert settings["torch"] == torch.__version__ and settings["transformers"] == transformers.__version__
    assert len(settings["items_sha256"]) == 64
    assert settings["items_sha256"] != bench.bench_settings("untrained", "counting", 3, 2, {})["items_sha256"]


@pytest.mark.parametrize("changes,message", [
    ({"limit": 3}, "--limit 2 \\(now 3\\)"),
    ({"task": "existence"}, "--task counting \\(now existence\\)"),
    ({"model_name": "other"}, "--model untrained \\(now other\\)"),
])
def test_a_rerun_with_other_settings_is_refused_naming_them(tmp_path, changes, message):
    model, prompting = untrained()
    small_bench(model, prompting, tmp_path)
    stored = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError, match=message) as refused:
        small_bench(model, prompting, tmp_path, **changes)
    assert "--overwrite" in str(refused.value)
    assert (tmp_path / "results.json").read_text() == stored


def test_a_folder_without_recorded_settings_is_refused(tmp_path):
    model, prompting = untrained()
    (tmp_path / "results.json").write_text("[]\n")
    with pytest.raises(ValueError, match="do not record the settings.*--overwrite"):
        small_bench(model, prompting, tmp_path)


def test_overwrite_starts_afresh_and_keeps_files_the_bench_did_not_write(tmp_path):
    model, prompting = untrained()
    small_bench(model, prompting, tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "recipe_flops0.9.json").write_text("{}\n")
    results = small_bench(model, prompting, tmp_path, limit=3, overwrite=True)
    assert [r["samples"] for r in results] == [3, 3]
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert json.loads((tmp_path / "settings.json").read_text())["limit"] == 3
    assert (tmp_path / "notes.txt").read_text() == "mine\n" and not (tmp_path / "recipe_flops0.9.json").exists()


def test_the_same_settings_resume_without_recomputing_a_cell(tmp_path, monkeypatch):
    model, prompting = untrained()
    small_bench(model, prompting, tmp_path)
    stored = json.loads((tmp_path / "results.json").read_text())
    runs = []
    evaluate = bench.evaluate
    monkeypatch.setattr(bench, "evaluate", lambda *a, **k: runs.append(a[3]) or evaluate(*a, **k))
    assert small_bench(model, prompting, tmp_path) == stored and runs == []
    grown = small_bench(model, prompting, tmp_path, budgets=[0.5, 0.3])  # a new budget: only its cell runs
    assert runs == ["random"] and grown[:2] == stored and grown[2]["bench"] == {"method": "random", "budget": 0.3, "axis": "flops"}


def test_the_bar_ends_at_its_total_when_fastv_falls_back_to_layer_1(tmp_path, record_bars):
    bars = record_bars(bench)
    model, prompting = untrained()
    # flops=0.31 on the untrained model: K=2 meets it on the first attribute item, not on the second
    results = bench.run_bench(model, prompting, "attribute", ["fastv"], [0.31], 2, 1, tmp_path, "untrained")
    assert results[1]["settings"]["options"]["layer"] == 1
    assert (bars[-1].n, bars[-1].total) == (4, 4)


def test_fitprune_rows_fit_their_recipe_with_the_search_they_name(tmp_path):
    model, prompting = untrained()
    bench.run_bench(model, prompting, "counting", ["fitprune", "fitprune:search=feasible"], [0.5], 2, 2, tmp_path, "untrained")
    release = json.loads((tmp_path / "recipe_flops0.5.json").read_text())
    feasible = json.loads((tmp_path / "recipe_flops0.5_feasible.json").read_text())
    assert release["extra"]["search"] == "release" and feasible["extra"]["search"] == "feasible"
    with pytest.raises(ValueError, match="search takes one of release, feasible"):
        bench.parse_method("fitprune:search=exact")
    with pytest.raises(ValueError, match="takes no option 'search'"):
        bench.parse_method("fastv:search=feasible")


@pytest.fixture(scope="module")
def text_model():
    return untrained_text()


def test_cache_methods_run_on_their_kv_budget_axis_with_a_kv_plot(tmp_path, text_model):
    model, prompting = text_model
    results = bench.run_bench(model, prompting, "multikey_512", ["snapkv", "streamingllm:sinks=2"], [], 2, 2, tmp_path,
                              "untrained", keeps=[0.5, 0.25], protocol="question-after")
    cells = {(r["bench"]["method"], r["bench"]["budget"]): r for r in results}
    assert set(cells) == {("none", 1.0), ("snapkv", 0.5), ("snapkv", 0.25), ("streamingllm:sinks=2", 0.5),
                          ("streamingllm:sinks=2", 0.25)}
    rows = {(r["method"], r["budget"]): r for r in bench.rows(results)}
    for (method, keep), row in rows.items():
        assert row["axis"] == ("flops" if method == "none" else "keep")
        if method == "streamingllm:sinks=2":  # the measured bytes held after the context follow the budget
            assert abs(row["kv_ratio"] - keep) < 0.02, (method, keep, row["kv_ratio"])
        elif method == "snapkv":  # each of the 2 KV heads keeps the budget; the cache holds their union
            assert keep - 0.02 < row["kv_ratio"] < min(1.0, 2 * keep) + 0.02, (method, keep, row["kv_ratio"])
        if method != "none":
            assert cells[method, keep]["settings"]["protocol"] == "question-after"
    assert cells["streamingllm:sinks=2", 0.25]["settings"]["options"]["sinks"] == 2
    assert (tmp_path / "accuracy_vs_kv.png").stat().st_size > 0 and not (tmp_path / "accuracy_vs_flops.png").exists()
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["protocol"] == "question-after" and settings["max_new_tokens"] == 5
    with pytest.raises(ValueError, match=r"--protocol question-after \(now whole\)"):
        bench.run_bench(model, prompting, "multikey_512", ["snapkv"], [], 2, 2, tmp_path, "untrained", keeps=[0.5],
                        protocol="whole")


@pytest.mark.parametrize("names,budgets,keeps,message", [
    (["snapkv"], [0.5], [], r"KV budget \(--keep\)"),
    (["snapkv"], [], [1.5], r"must be in \(0, 1\]"),
    (["snapkv:keep=0.5"], [], [0.5], "the bench sets keep"),
    (["h2o:budget=20"], [], [0.5], "the bench sets keep, a KV budget"),
    (["fastv"], [], [0.5], "give at least one FLOPs budget"),
    (["streamingllm:window=8"], [], [0.5], "give one of window, keep and budget"),
])
def test_bad_kv_budget_grids_are_refused_before_any_work(names, budgets, keeps, message):
    with pytest.raises(ValueError, match=message):
        bench.check_specs(names, budgets, keeps=keeps)


def test_fitted_schedule_rows_fit_the_reachable_budgets_in_one_descent(tmp_path, monkeypatch):
    from tokensieve import schedule_fitting

    descents = []
    fit = schedule_fitting.fit_schedules

    def counted(model, batches, method, budgets, **kwargs):  # 8 calibration samples, 4 steps of 1/4: a quick fit
        descents.append(list(budgets))
        few = [{k: v[:8] for k, v in batches[0].items()}]
        return fit(model, few, method, budgets, **{**kwargs, "step": 0.25})

    monkeypatch.setattr(schedule_fitting, "fit_schedules", counted)
    model, prompting = untrained()
    results = bench.run_bench(model, prompting, "counting", ["pdrop:schedule=fitted"], [0.8, 0.6, 0.01], 2, 2, tmp_path,
                              "untrained")
    cells = {r["bench"]["budget"]: r for r in results if r["bench"]["method"] == "pdrop:schedule=fitted"}
    assert "out of reach" in cells[0.01]["error"]
    # 0.01 is out of reach: dropped, the others fitted in one descent; its own cell then fails alone
    assert descents == [[0.8, 0.6, 0.01], [0.8, 0.6], [0.01]]
    for budget in (0.8, 0.6):
        recipe = json.loads((tmp_path / f"recipe_pdrop_flops{budget}.json").read_text())
        assert recipe["method"] == "pdrop" and recipe["achieved"] <= budget
        assert cells[budget]["tflops"] / cells[budget]["tflops_unpruned"] <= budget + 0.02

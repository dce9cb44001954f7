"""``tokensieve bench``: a grid of methods x FLOPs budgets on the task suite, resumable, with plots.

Each cell evaluates one method at one FLOPs budget on the same test items; the unpruned answers come
from one ``none`` run that every cell reuses. Methods meet the budget through their ``flops`` option
(FastV tries K=2 and falls back to K=1 where K=2 cannot reach the budget); FitPrune first fits a
recipe for the budget on training items (kept in the output folder and reused). Results are written
after every cell; a rerun skips the cells already written.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from . import methods
from .evaluation import Prompting, calibrate_on_tasks, evaluate, resolve_tasks
from .recipe import Recipe

FASTV_LAYERS = (2, 1)


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fitprune:score=fit"`` -> ``("fitprune", {"score": "fit"})``; values are read as int, else float,
    else kept as text. Raises ValueError for an unknown method, an option it does not take, a
    malformed ``key=value`` or ``flops`` (the bench sets the budget)."""
    name, *parts = [part.strip() for part in spec.split(":")]
    if name not in methods.REGISTRY:
        methods.get(name)  # raises, naming the closest methods
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, text = part.partition("=")
        if not sep or not key or not text:
            raise ValueError(f"method options are written name:key=value, got {part!r} in {spec!r}")
        if key not in methods.REGISTRY[name].options() or key == "flops":
            raise ValueError(f"{spec!r}: {name} takes no option {key!r} here; its options are "
                             f"{', '.join(o for o in methods.REGISTRY[name].options() if o != 'flops')} "
                             "(the bench sets flops)")
        options[key] = _option_value(text)
    return name, options


def _option_value(text: str) -> int | float | str:
    """``"3"`` -> 3, ``"0.25"`` -> 0.25, anything else stays text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cell_options(name: str, budget: float) -> list[dict[str, Any]]:
    """Option sets to try, in order, for ``name`` at ``budget``."""
    if name == "fastv":
        return [{"layer": k, "flops": budget} for k in FASTV_LAYERS]
    return [{"flops": budget}]


def run_bench(model: Any, prompting: Prompting, task: str, names: list[str], budgets: list[float], limit: int,
              batch_size: int, out: Path, model_name: str) -> list[dict[str, Any]]:
    specs = {spec: parse_method(spec) for spec in names}
    for b in budgets:
        if not 0 < b < 1:
            raise ValueError(f"FLOPs budgets must be in (0, 1), got {b}")
    tasks = resolve_tasks(task)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "results.json"
    results: list[dict[str, Any]] = json.loads(store.read_text()) if store.exists() else []
    done = {(r["bench"]["method"], r["bench"]["budget"]) for r in results}
    cells = [("none", 1.0)] + [(spec, b) for spec in names for b in budgets]
    todo = [c for c in cells if c not in done]
    bar = tqdm(total=len(todo) * limit * len(tasks), desc="bench", unit="item")
    baseline = next((r for r in results if r["bench"]["method"] == "none"), None)
    for spec, budget in todo:
        bar.set_postfix(method=spec, flops=budget)
        name, fixed = specs.get(spec, ("none", {}))
        result = None
        errors = []
        for options in ([{}] if name == "none" else cell_options(name, budget)):
            try:
                if name == "fitprune":
                    options = {"recipe": _recipe(model, prompting, budget, out, model_name)}
                options = {**options, **fixed}
                result = evaluate(model, prompting, task, name, options, limit, batch_size, progress=bar, baseline=baseline)
                break
            except ValueError as err:
                errors.append(str(err))
        if result is None:
            result = {"error": "; ".join(errors)}
            bar.update(limit * len(tasks))
        result["bench"] = {"method": spec, "budget": budget}
        if name == "none":
            baseline = result
        results.append(result)
        store.write_text(json.dumps(results, indent=1) + "\n")
    bar.close()
    write_tables(results, out)
    plot(results, out)
    return results


def _recipe(model: Any, prompting: Prompting, budget: float, out: Path, model_name: str) -> Recipe:
    path = out / f"recipe_flops{budget}.json"
    if path.exists():
        return Recipe.load(path)
    recipe = calibrate_on_tasks(model, prompting, "all", budget, model_name=model_name, progress=False)
    recipe.save(path)
    return recipe


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell."""
    table = []
    for r in results:
        row = {"method": r["bench"]["method"], "budget": r["bench"]["budget"]}
        if "error" in r:
            row.update(error=r["error"])
        else:
            row.update(flops_ratio=r["tflops"] / r["tflops_unpruned"], accuracy=r["accuracy"], agreement=r["agreement"],
                       visual_tokens=r["visual_tokens_kept"]["mean"], ttft_ms=r["ttft_ms"],
                       options=json.dumps({k: v for k, v in r["settings"]["options"].items() if k != "recipe" and v is not None}),
                       **{f"acc_{t}": v["accuracy"] for t, v in r["per_task"].items()})
        table.append(row)
    return table


def write_tables(results: list[dict[str, Any]], out: Path) -> None:
    table = rows(results)
    keys = list(dict.fromkeys(k for row in table for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    lines = ["| method | budget | FLOPs ratio | accuracy | agreement | visual tokens | TTFT ms | options |", "|---|---|---|---|---|---|---|---|"]
    for row in table:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['budget']} | - | - | - | - | - | unreachable: {row['error'][:80]} |")
        else:
            lines.append(f"| {row['method']} | {row['budget']} | {row['flops_ratio']:.3f} | {row['accuracy']:.3f} | "
                         f"{row['agreement']:.3f} | {row['visual_tokens']:.1f} | {row['ttft_ms']:.1f} | {row['options']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def plot(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows(results) if "error" not in r]
    for x_key, x_label, name in (("flops_ratio", "LLM prefill FLOPs (fraction of unpruned)", "accuracy_vs_flops.png"),
                                 ("ttft_ms", "prefill time (ms, median per batch)", "accuracy_vs_ttft.png")):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        base = next((r for r in table if r["method"] == "none"), None)
        colours = plt.get_cmap("tab20").colors
        for i, method in enumerate(dict.fromkeys(r["method"] for r in table if r["method"] != "none")):
            points = sorted((r[x_key], r["accuracy"]) for r in table if r["method"] == method)
            ax.plot(*zip(*points), marker="osD^v<>"[i % 7], color=colours[i % len(colours)], label=method)
        if base is not None:
            ax.axhline(base["accuracy"], color="gray", linestyle="--", label="unpruned")
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)

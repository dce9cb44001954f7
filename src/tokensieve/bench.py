"""``tokensieve bench``: a grid of methods x budgets on the task suite, resumable, with plots.

Each cell evaluates one method at one budget on the same test items; the unpruned answers come from
one ``none`` run that every cell reuses. A method's budget axis is its kind's: prefill and encoder
methods meet a FLOPs budget through their ``flops`` option (FastV tries K=2 and falls back to K=1
where K=2 cannot reach the budget; FitPrune first fits a recipe for the budget on training items,
kept in the output folder and reused, with the authors' search, or tokensieve's with
``fitprune:search=feasible``; the in-LLM scorers FastV, PDrop, DART and TransPrune prune by a
schedule fitted per budget with ``name:schedule=fitted``, :mod:`tokensieve.schedule_fitting`, all the
row's budgets fitted in one descent and kept in the folder); KV-cache methods meet a cache budget through their ``keep`` option
(the fraction of the prompt's cache entries kept per layer; kvpress's ``compression_ratio`` is
``1 - keep``), and LazyLLM takes the same axis as its ``keep`` (the fraction kept at each of its
pruning layers). Results are written after every cell; a rerun skips the cells already written.

The folder records what its values depend on besides a cell's method and budget (``settings.json``,
see :func:`bench_settings`); a rerun with other settings is refused, naming what differs, unless it
starts afresh with ``overwrite``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

from tqdm.auto import tqdm

from . import __version__, methods
from .adapters import adapter_for
from .evaluation import Prompting, calibrate_on_tasks, evaluate, fit_schedules_on_tasks, model_runtime, resolve_tasks
from .flops import Shape
from .methods.composition import split_flops, takes_flops_share
from .protocols import check_protocol, resolve
from .recipe import Recipe
from .schedule_fitting import FITTED
from .tasks import Example, TextExample, generate

FASTV_LAYERS = (2, 1)
MAX_NEW_TOKENS = {False: 3, True: 5}
"""Tokens each cell generates per item: image tasks (one-word answers), text tasks (up to four words)."""
DEFAULT_KEEPS = (0.75, 0.5, 0.25, 0.1)
"""The KV budgets of cache methods when none are given."""
SETTINGS = "settings.json"
OUTPUTS = ("results.json", "results.csv", "results.md", "accuracy_vs_flops.png", "accuracy_vs_kv.png",
           "accuracy_vs_ttft.png")
RECIPES = "recipe_*flops*.json"
PROBE_LAYERS = 1024
"""Decoder depth specs are checked against before a model is loaded: deeper than any model, so that
only a layer beyond the model's own depth is left to catch once it is loaded."""
SET_BY_BENCH = {"flops": {"flops": "the bench sets flops", "recipe": "the bench fits a recipe per budget"},
                "keep": {"keep": "the bench sets keep", "budget": "the bench sets keep, a KV budget"}}
"""Per budget axis, the options the bench sets itself."""
SEARCHES = ("release", "feasible")
"""FitPrune's recipe search (``fitprune:search=feasible``), a bench option: the method does not take it."""
SCHEDULES = ("own", "fitted")
"""A scorer's schedule (``fastv:schedule=fitted``), a bench option: its own (``flops`` solved as the
method does) or a recipe fitted per budget (:mod:`tokensieve.schedule_fitting`)."""
SETTING_NAMES = {"model": "--model", "tasks": "--task", "limit": "--limit", "batch_size": "--batch-size",
                 "device": "--device", "dtype": "--dtype", "items_sha256": "test items (sha256)",
                 "protocol": "--protocol"}
"""How a refusal names each setting: by its command-line flag where it has one."""


def axis(name: str) -> str:
    """The budget axis of method ``name``: ``"flops"`` for the methods that meet a FLOPs budget (and
    the compositions with such a member), ``"keep"`` for the others (the KV-cache methods; LazyLLM,
    whose ``keep`` is per pruning layer)."""
    return "flops" if any("flops" in methods.REGISTRY[m].options() for m in name.split("+")) else "keep"


def composition_cell(name: str, fixed: dict[str, dict[str, Any]], budget: float,
                     recipe: Callable[[float], Recipe]) -> dict[str, Any]:
    """The options of composition ``name`` (members joined by ``+``; ``fixed``: each member's options
    from the spec) at the FLOPs ``budget``: each of the ``k`` members that take a share
    (:func:`~tokensieve.methods.composition.takes_flops_share`, and here FitPrune too, given no recipe)
    is given ``budget ** (1 / k)``. FitPrune's share is a recipe ``recipe(share)`` fitted on the whole
    model; after an encoder-stage member it is scaled to the tokens that reach it (``fractions=True``),
    an approximation: the recipe is fitted without the encoder member."""
    members = name.split("+")
    given = {m: dict(fixed.get(m, {})) for m in members}
    takers = [m for m in members if takes_flops_share(m, methods.REGISTRY[m], given[m])
              or (m == "fitprune" and "recipe" not in given[m])]
    if not takers:
        raise ValueError(f"{name}: no member takes a share of the FLOPs budget (each was given its own)")
    share = split_flops(budget, len(takers))
    encoder = any("encoder" in methods.REGISTRY[m].stages for m in members)
    for m in takers:
        if m == "fitprune":
            given[m].update(recipe=recipe(share), fractions=given[m].get("fractions", encoder))
        else:
            given[m]["flops"] = share
    return given


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fitprune:score=fit"`` -> ``("fitprune", {"score": "fit"})``; each value is read as the type the
    option declares (integer, number, true/false, one of its choices, text).

    Raises:
        ValueError: an unknown method, ``none`` (the bench always runs it), an option the method does
            not take or the bench sets (``flops`` and FitPrune's ``recipe``; a cache method's ``keep``
            and ``budget``), a malformed ``key=value``,
            or a value of the wrong type.
    """
    name, *parts = [part.strip() for part in spec.split(":")]
    if "+" in name:
        return name, _composition_spec(spec, name, parts)
    if name == "none":
        raise ValueError("'none' is the unpruned baseline every bench runs; leave it out of the methods")
    if name not in methods.REGISTRY:
        methods.get(name)  # raises, naming the closest methods
    cls = methods.REGISTRY[name]
    hints = typing.get_type_hints(cls)
    set_here = SET_BY_BENCH[axis(name)]
    settable = ([o for o in cls.options() if o not in set_here] + (["search"] if name == "fitprune" else [])
                + (["schedule"] if name in FITTED else []))
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, text = part.partition("=")
        if not sep or not key or not text:
            raise ValueError(f"method options are written name:key=value, got {part!r} in {spec!r}")
        if name == "fitprune" and key == "search":
            if text not in SEARCHES:
                raise ValueError(f"{spec!r}: search takes one of {', '.join(SEARCHES)}")
            options[key] = text
            continue
        if name in FITTED and key == "schedule":
            if text not in SCHEDULES:
                raise ValueError(f"{spec!r}: schedule takes one of {', '.join(SCHEDULES)}")
            options[key] = text
            continue
        if key not in settable:
            why = f" ({set_here[key]})" if key in set_here else ""
            raise ValueError(f"{spec!r}: {name} takes no option {key!r} here{why}; its options are "
                             f"{', '.join(settable) or 'none'}")
        try:
            options[key] = _read(hints[key], text)
        except ValueError:
            raise ValueError(f"{spec!r}: {key}={text!r} has the wrong type: {key} takes {_describe(hints[key])}") from None
    return name, options


def _composition_spec(spec: str, name: str, parts: list[str]) -> dict[str, dict[str, Any]]:
    """``"divprune+fastv:fastv.layer=1"``'s member options: ``{"fastv": {"layer": 1}}``."""
    members = name.split("+")
    placeholder = {"fitprune": {"recipe": Recipe(removed={}, visual_tokens=1, num_layers=1)}}  # fitted per cell
    methods.get(members, **{m: placeholder.get(m, {}) for m in members})  # two members at one stage raise here
    fixed: dict[str, dict[str, Any]] = {m: {} for m in members}
    for part in parts:
        key, sep, text = part.partition("=")
        member, dot, option = key.partition(".")
        if not sep or not dot or not option or not text:
            raise ValueError(f"a composition's options are written member.key=value, got {part!r} in {spec!r}")
        if member not in fixed:
            raise ValueError(f"{spec!r}: {member!r} is not one of its members ({', '.join(members)})")
        cls = methods.REGISTRY[member]
        if option not in cls.options() or option == "recipe":
            raise ValueError(f"{spec!r}: {member} takes no option {option!r} here; its options are "
                             f"{', '.join(o for o in cls.options() if o != 'recipe')}")
        hint = typing.get_type_hints(cls)[option]
        try:
            fixed[member][option] = _read(hint, text)
        except ValueError:
            raise ValueError(f"{spec!r}: {key}={text!r} has the wrong type: {option} takes {_describe(hint)}") from None
    return fixed


def _read(hint: Any, text: str) -> Any:
    """``text`` as a value of the annotation ``hint``; raises ValueError when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if text not in args:
            raise ValueError(text)
        return text
    if origin in (Union, types.UnionType):
        for member in (a for a in args if a is not type(None)):
            try:
                return _read(member, text)
            except ValueError:
                pass
        raise ValueError(text)
    if hint is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(text)
        return text.lower() == "true"
    if hint in (int, float, str):
        return hint(text)
    raise ValueError(text)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return "a tuple, which a bench spec cannot write (commas separate the methods)"
    return {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(hint, getattr(hint, "__name__", str(hint)))


def cell_options(name: str, budget: float, schedule: str = "own") -> list[dict[str, Any]]:
    """Option sets to try, in order, for ``name`` at ``budget`` (FitPrune's recipe and a fitted
    schedule are added when the cell runs; a composition's options are :func:`composition_cell`'s)."""
    if "+" in name or schedule == "fitted":
        return [{}]
    if name == "fastv":
        return [{"layer": k, "flops": budget} for k in FASTV_LAYERS]
    return [{axis(name): budget}]


def check_specs(names: list[str], budgets: list[float], num_layers: int = PROBE_LAYERS,
                keeps: list[float] = ()) -> dict[str, tuple[str, dict[str, Any]]]:
    """Parse every method spec (:func:`parse_method`) and build it at every budget of its axis
    (``budgets``: FLOPs; ``keeps``: KV-cache budgets, for cache methods) as its cell will, on a model of
    ``num_layers`` decoder layers, so that a spec error surfaces before any work. Returns
    ``{spec: (name, fixed options)}``.

    Raises:
        ValueError: no methods, or no budgets on an axis a method needs, one given twice, a budget
            outside (0, 1) (a KV budget may be 1: nothing evicted), a bad spec, or a spec no option set
            of its cell can run at some budget (such as ``fastv:keep=0.25``: keep and flops are two
            budgets).
    """
    if not names:
        raise ValueError("give at least one method")
    specs = {spec: parse_method(spec) for spec in names}
    axes = {axis(name) for name, _ in specs.values()}
    for what, given, needed in (("method", names, True), ("FLOPs budget", budgets, "flops" in axes),
                                ("KV budget (--keep)", keeps, "keep" in axes)):
        if needed and not given:
            raise ValueError(f"give at least one {what}")
        twice = sorted({str(x) for x in given if list(given).count(x) > 1})
        if twice:
            raise ValueError(f"{what} {', '.join(twice)} given twice")
    for b in budgets:
        if not isinstance(b, (int, float)) or not 0 < b < 1:
            raise ValueError(f"FLOPs budgets must be in (0, 1), got {b}")
    for k in keeps:
        if not isinstance(k, (int, float)) or not 0 < k <= 1:
            raise ValueError(f"KV budgets (--keep) must be in (0, 1], got {k}")
    for spec, (name, fixed) in specs.items():
        schedule = fixed.get("schedule", "own")
        for budget in (keeps if axis(name) == "keep" else budgets):
            errors = []
            for options in cell_options(name, budget, schedule):
                if "+" in name:
                    probe = lambda share: Recipe(removed={}, visual_tokens=1, num_layers=num_layers, budget=share)  # noqa: E731
                    options, fixed = composition_cell(name, fixed, budget, probe), {}
                if name == "fitprune":
                    options = {**options, "recipe": Recipe(removed={}, visual_tokens=1, num_layers=num_layers, budget=budget)}
                if schedule == "fitted":
                    options = {"recipe": Recipe(removed={1: 1}, visual_tokens=2, num_layers=num_layers, method=name)}
                try:
                    rule = {k: v for k, v in fixed.items() if k not in ("search", "schedule")}
                    methods.get(name, **{**options, **rule}).bind(num_layers)
                    break
                except (TypeError, ValueError) as err:
                    errors.append(str(err))
            else:
                raise ValueError(f"{spec!r} cannot run at {axis(name)}={budget} (the bench sets {axis(name)}): {errors[0]}")
    return specs


def items_digest(examples: list[Example] | list[TextExample]) -> str:
    """sha256 of the items' tasks, questions, answers and image pixels (text items: their prompts;
    video items: their frames)."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.task}\0{e.question}\0{e.answer}\0".encode())
        digest.update(e.prompt.encode() if isinstance(e, TextExample) else
                      e.frames.tobytes() if hasattr(e, "frames") else e.image.tobytes())
    return digest.hexdigest()


def bench_settings(model_name: str, task: str, limit: int, batch_size: int, runtime: dict[str, str],
                   suite: str | None = None, protocol: str = "auto") -> dict[str, Any]:
    """What every value in a bench folder depends on besides its cell's method and budget: the model,
    tasks (``suite``: the task suite the model runs, which ``"all"`` then means), limit and a
    digest of the test items, the batch size (answers and FLOPs do not depend on it, but the prefill
    times are per batch), the tokens generated, the prompting ``protocol``
    (:mod:`tokensieve.protocols`), and ``runtime`` (device, dtype, torch and transformers versions;
    :func:`tokensieve.evaluation.runtime`). The methods and budgets are not in it: they only choose
    which cells the folder holds."""
    check_protocol(protocol)
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    tasks = resolve_tasks(task, suite)
    examples = [e for t in tasks for e in generate(t, "test", limit)]
    text = isinstance(examples[0], TextExample)
    protocol = resolve(protocol, text)
    return {"model": model_name, "tasks": tasks, "limit": limit, "items_sha256": items_digest(examples),
            "batch_size": batch_size, "max_new_tokens": MAX_NEW_TOKENS[text], "protocol": protocol,
            "tokensieve": __version__, **runtime}


def bench_files(out: Path) -> list[Path]:
    """The files of ``out`` that a bench writes (and ``overwrite`` removes)."""
    return [out / n for n in (*OUTPUTS, SETTINGS) if (out / n).is_file()] + sorted(out.glob(RECIPES))


def check_folder(out: Path, settings: dict[str, Any]) -> None:
    """Raise ValueError unless the bench files in ``out`` (if any) were made with ``settings``."""
    again = "rerun with --overwrite to start afresh there (its bench files are removed), or give another -o"
    path = out / SETTINGS
    if not path.is_file():
        found = bench_files(out)
        if found:
            raise ValueError(f"-o {out} holds bench files ({', '.join(p.name for p in found)}) that do not record "
                             f"the settings they were made with; {again}")
        return
    try:
        recorded = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        recorded = None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path} is not a bench settings file; {again}")
    differ = [f"{SETTING_NAMES.get(k, k)} {_show(recorded.get(k))} (now {_show(settings.get(k))})"
              for k in dict.fromkeys([*settings, *recorded]) if recorded.get(k) != settings.get(k)]
    if differ:
        raise ValueError(f"-o {out} holds bench results made with other settings: {'; '.join(differ)}; {again}")


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, list):
        return ",".join(map(str, value))
    text = str(value)
    return text[:12] + "..." if len(text) > 40 else text


def run_bench(model: Any, prompting: Prompting, task: str, names: list[str], budgets: list[float], limit: int,
              batch_size: int, out: Path, model_name: str, overwrite: bool = False, keeps: list[float] = DEFAULT_KEEPS,
              protocol: str = "auto") -> list[dict[str, Any]]:
    """Run the cells of ``names`` x their axis's budgets (``budgets``: FLOPs; ``keeps``: KV budgets of
    the cache methods) that ``out`` does not hold yet, under the prompting ``protocol``; returns every cell.

    ``overwrite``: remove the bench files of ``out`` first; otherwise a folder made with other
    settings (:func:`bench_settings`) is refused, naming what differs.
    """
    specs = check_specs(names, budgets, Shape.from_config(adapter_for(model).text_config).layers, keeps)
    settings = bench_settings(model_name, task, limit, batch_size, model_runtime(model), prompting.suite, protocol)
    tasks = settings["tasks"]
    if overwrite:
        for path in bench_files(out):
            path.unlink()
    else:
        check_folder(out, settings)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
    store = out / "results.json"
    results: list[dict[str, Any]] = json.loads(store.read_text()) if store.exists() else []
    done = {(r["bench"]["method"], r["bench"]["budget"]) for r in results}
    cells = [("none", 1.0)] + [(spec, b) for spec in names
                               for b in (keeps if axis(specs[spec][0]) == "keep" else budgets)]
    todo = [c for c in cells if c not in done]
    per_cell = limit * len(tasks)
    bar = tqdm(total=len(todo) * per_cell, desc="bench", unit="item")
    baseline = next((r for r in results if r["bench"]["method"] == "none"), None)
    for spec, budget in todo:
        bar.set_postfix(method=spec, budget=budget)
        name, fixed = specs.get(spec, ("none", {}))
        fixed = dict(fixed)
        search = fixed.pop("search", "release")
        schedule = fixed.pop("schedule", "own")
        start = bar.n
        result = None
        errors = []
        for options in ([{}] if name == "none" else cell_options(name, budget, schedule)):
            try:
                if "+" in name:
                    options, fixed = composition_cell(
                        name, fixed, budget, lambda share: _recipe(model, prompting, share, out, model_name, search)), {}
                if name == "fitprune":
                    options = {**options, "recipe": _recipe(model, prompting, budget, out, model_name, search)}
                if schedule == "fitted":
                    options = {"recipe": _fitted(model, prompting, name, fixed, budget, budgets, out, model_name)}
                result = evaluate(model, prompting, task, name, {**options, **fixed}, limit, batch_size,
                                  settings["max_new_tokens"], progress=bar, baseline=baseline,
                                  protocol=settings["protocol"])
                break
            except ValueError as err:
                errors.append(str(err))
                bar.update(start - bar.n)  # the next option set runs the cell's items again
        if result is None:
            result = {"error": "; ".join(errors)}
        bar.update(start + per_cell - bar.n)
        result["bench"] = {"method": spec, "budget": budget, "axis": "flops" if name == "none" else axis(name)}
        if name == "none":
            baseline = result
        results.append(result)
        store.write_text(json.dumps(results, indent=1) + "\n")
    bar.close()
    write_tables(results, out)
    plot(results, out)
    return results


def _recipe(model: Any, prompting: Prompting, budget: float, out: Path, model_name: str, search: str) -> Recipe:
    path = out / (f"recipe_flops{budget}.json" if search == "release" else f"recipe_flops{budget}_{search}.json")
    if path.exists():
        return Recipe.load(path)
    recipe = calibrate_on_tasks(model, prompting, "all", budget, model_name=model_name, progress=False, search=search)
    recipe.save(path)
    return recipe


def _fitted(model: Any, prompting: Prompting, name: str, rule: dict[str, Any], budget: float, budgets: list[float],
            out: Path, model_name: str) -> Recipe:
    """The recipe fitted for ``name`` (with its rule's options ``rule``) at ``budget``, from the folder or,
    if missing, fitted with the other missing budgets of the row in one descent and saved there."""
    def path(b: float) -> Path:
        tag = "".join(f"_{k}={v}" for k, v in sorted(rule.items()))
        return out / f"recipe_{name}{tag}_flops{b}.json"

    missing = sorted((b for b in budgets if not path(b).exists()), reverse=True)
    while not path(budget).exists():
        try:
            fitted = fit_schedules_on_tasks(model, prompting, name, missing, options=rule, model_name=model_name,
                                            progress=False)
        except ValueError:
            if missing[-1] == budget:
                raise
            missing.pop()  # the lowest budget is out of reach: fit the others
            continue
        for b, recipe in zip(missing, fitted):
            recipe.save(path(b))
    return Recipe.load(path(budget))


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per cell; ``kv_ratio`` is its measured KV bytes over the unpruned cell's."""
    base = next((r for r in results if r["bench"]["method"] == "none" and "error" not in r), None)
    table = []
    for r in results:
        row = {"method": r["bench"]["method"], "axis": r["bench"].get("axis", "flops"), "budget": r["bench"]["budget"]}
        if "error" in r:
            row.update(error=r["error"])
        else:
            row.update(flops_ratio=r["tflops"] / r["tflops_unpruned"],
                       kv_ratio=r["kv_bytes"] / base["kv_bytes"] if base and base["kv_bytes"] else None,
                       accuracy=r["accuracy"], agreement=r["agreement"],
                       visual_tokens=r["visual_tokens_kept"]["mean"], ttft_ms=r["ttft_ms"],
                       options=json.dumps(_shown_options(r["settings"]["options"])),
                       **{f"acc_{t}": v["accuracy"] for t, v in r["per_task"].items()})
        table.append(row)
    return table


def _shown_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options a table shows: set ones, recipes left out (they are files in the bench folder)."""
    return {k: _shown_options(v) if isinstance(v, dict) else v for k, v in options.items()
            if k != "recipe" and v is not None}


def write_tables(results: list[dict[str, Any]], out: Path) -> None:
    table = rows(results)
    keys = list(dict.fromkeys(k for row in table for k in row))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(table)
    lines = ["| method | budget | FLOPs ratio | KV ratio | accuracy | agreement | visual tokens | TTFT ms | options |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table:
        budget = f"{row['axis']} {row['budget']}" if row["method"] != "none" else "-"
        if "error" in row:
            lines.append(f"| {row['method']} | {budget} | - | - | - | - | - | - | unreachable: {row['error'][:80]} |")
        else:
            kv = "-" if row["kv_ratio"] is None else f"{row['kv_ratio']:.3f}"
            lines.append(f"| {row['method']} | {budget} | {row['flops_ratio']:.3f} | {kv} | {row['accuracy']:.3f} | "
                         f"{row['agreement']:.3f} | {row['visual_tokens']:.1f} | {row['ttft_ms']:.1f} | {row['options']} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


PLOTS = (("flops", "flops_ratio", "LLM prefill FLOPs (fraction of unpruned)", "accuracy_vs_flops.png"),
         ("keep", "kv_ratio", "KV bytes held after the prompt (fraction of unpruned, measured)", "accuracy_vs_kv.png"),
         (None, "ttft_ms", "prefill time (ms, median per batch)", "accuracy_vs_ttft.png"))
"""(axis of the methods drawn, or None for all; x column; x label; file)."""


def plot(results: list[dict[str, Any]], out: Path) -> None:
    """Accuracy against FLOPs (prefill and encoder methods), against measured KV bytes (cache methods)
    and against prefill time (all), each where it has a method to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = [r for r in rows(results) if "error" not in r]
    base = next((r for r in table if r["method"] == "none"), None)
    colours = plt.get_cmap("tab20").colors
    for kind, x_key, x_label, name in PLOTS:
        drawn = [m for m in dict.fromkeys(r["method"] for r in table if r["method"] != "none")
                 if kind is None or any(r["axis"] == kind for r in table if r["method"] == m)]
        if not drawn:
            (out / name).unlink(missing_ok=True)
            continue
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for i, method in enumerate(drawn):
            points = sorted((r[x_key], r["accuracy"]) for r in table if r["method"] == method and r[x_key] is not None)
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

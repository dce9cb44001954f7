"""``tokensieve calibrate``: fit a recipe to a FLOPs budget on the task suite: FitPrune's by its own rule,
any other in-LLM scorer's (FastV, PDrop, DART, TransPrune) by the divergence of its output
(:mod:`tokensieve.schedule_fitting`), or VFlowOpt's settings by its search."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import evaluation, models
from ..schedule_fitting import FITTED, check_fit
from .options import add_runtime_flags, check_output_file, composition_options

METHODS = ("fitprune", "vflowopt", *FITTED)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit a recipe (FitPrune, FastV, PDrop, DART, TransPrune) or search VFlowOpt's "
                                         "settings, for a FLOPs budget")
    p.add_argument("--model", default="tiny")
    add_runtime_flags(p)
    p.add_argument("--method", default="fitprune", metavar="{" + ",".join(METHODS) + "}[:key=value,...]",
                   help="fitprune (its own fitting rule), vflowopt (its settings search), or a scorer whose layers and "
                        "counts are fitted to least KL of the next-token distribution (fastv, pdrop, dart, transprune; "
                        "its rule's options after a colon, e.g. fastv:variant=paper)")
    p.add_argument("--step", type=float, default=1 / 16,
                   help="scorers: visual tokens per greedy step, a fraction of the input's (default 1/16)")
    p.add_argument("--trials", type=int, default=40, help="vflowopt: optimiser trials")
    p.add_argument("--task", default="all", help="calibration task(s): a task name or 'all'")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--flops", type=float, required=True, help="target FLOPs ratio in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="which draw of training items to use")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--visual-only", action="store_true",
                   help="count visual tokens only in FLOPs (the release's convention); by default all tokens count. "
                        "The recipe records which (flops_convention)")
    p.add_argument("--search", default="release", choices=["release", "feasible"],
                   help="fitprune: the authors' bisection over alpha, judged by each pass's stop rule, returning the last "
                        "probe's recipe (release), or tokensieve's: the best recipe at or under the budget, repaired to "
                        "within 0.01 of it (feasible)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="recipe (fitprune) or options (vflowopt) JSON to write; its folder is created")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.flops < 1:
        raise ValueError(f"--flops must be in (0, 1), got {args.flops}")
    evaluation.resolve_tasks(args.task)
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    method, _, rule = args.method.partition(":")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if rule and method not in FITTED:
        raise ValueError(f"--method {method} takes no options after a colon")
    if not 0 < args.step < 1:
        raise ValueError(f"--step must be in (0, 1), got {args.step}")
    if method in FITTED and args.visual_only:
        raise ValueError(f"--visual-only is FitPrune's FLOPs convention; a {method} recipe counts all tokens")
    options = composition_options(args.method, {})[1][method] if method in FITTED else {}
    if method in FITTED:
        check_fit(method, options)
    if method == "vflowopt" and args.trials < 1:
        raise ValueError(f"--trials must be at least 1, got {args.trials}")
    check_output_file(args.output, "-o")
    model, processor = models.load(args.model, args.device, args.dtype)
    prompting = evaluation.Prompting.for_processor(processor)
    if method == "vflowopt":
        return _vflowopt(args, model, prompting)
    if method in FITTED:
        return _scorer(args, model, prompting, method, options)
    recipe = evaluation.calibrate_on_tasks(model, prompting, args.task, args.flops, args.samples, args.seed,
                                           args.batch_size, args.visual_only, model_name=args.model, search=args.search)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    recipe.save(args.output)
    removed = ", ".join(f"{l}:{n}" for l, n in recipe.removed.items())
    print(f"recipe for flops={args.flops}: achieved {recipe.achieved:.4f} on {recipe.samples} samples, "
          f"alpha {recipe.alpha:.4f}, fitted in {recipe.seconds:.1f} s\n  removed per layer {{{removed}}}\n  written to {args.output}")
    return 0


def _scorer(args: argparse.Namespace, model, prompting, method: str, options: dict) -> int:
    recipe, = evaluation.fit_schedules_on_tasks(model, prompting, method, [args.flops], args.task, options, args.samples,
                                                args.seed, args.batch_size, args.step, model_name=args.model)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    recipe.save(args.output)
    removed = ", ".join(f"{l}:{n}" for l, n in recipe.removed.items())
    print(f"{method} recipe for flops={args.flops}: achieved {recipe.achieved:.4f} on {recipe.samples} samples, "
          f"KL {recipe.extra['kl']:.4f}, {recipe.extra['passes']} passes in {recipe.seconds:.1f} s\n"
          f"  removed before layer {{{removed}}}\n  written to {args.output} "
          f"(use: tokensieve eval --method {method} --recipe {args.output})")
    return 0


def _vflowopt(args: argparse.Namespace, model, prompting) -> int:
    from .. import vflowopt_search

    batches = evaluation.calibration_batches(model, prompting, args.task, args.samples, args.seed, args.batch_size)
    result = vflowopt_search.search(model, batches, args.flops, args.trials, args.seed)
    result.update(model=args.model, calibration=f"tasks={args.task} split=train ({args.samples} samples)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"vflowopt for flops={args.flops}: objective {result['objective']:.4f} after {args.trials} trials "
          f"in {result['seconds']:.1f} s\n  options {result['options']}\n  written to {args.output} "
          f"(use: tokensieve eval --method vflowopt --options {args.output})")
    return 0

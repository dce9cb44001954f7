"""FitPrune's search over alpha as the authors run it (ywh187/FitPrune@d28e418,
LLaVA_1.5/llava/eval/statistical_analysis.py: ``statistical_analysis`` and ``fit_model``)."""

from __future__ import annotations

import pytest

from tokensieve import calibration


def authors_bisection(reaches) -> tuple[list[float], float]:
    """The loop of ``statistical_analysis``: min 0, max 1; while max - min > 0.01 (+1e-6) probe the middle;
    a probe whose fitting pass reached the budget (``flops_reach``) lowers max, else raises min; the
    scheme printed is the last probe's."""
    lo, hi, probes = 0.0, 1.0, []
    while hi - lo > 0.01 + 1e-6:
        mid = (lo + hi) / 2
        probes.append(mid)
        if reaches(mid):
            hi = mid
        else:
            lo = mid
    return probes, probes[-1]


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.3, 0.61, 1.0])
def test_release_search_probes_and_returns_what_the_authors_loop_does(threshold):
    seen = []

    def fit(alpha):
        seen.append(alpha)
        return {0: round(100 * alpha)}, alpha >= threshold

    counts, alpha, reached = calibration._release_search(fit, 0.5, progress=False)
    probes, last = authors_bisection(lambda a: a >= threshold)
    assert seen == probes
    assert alpha == last and counts == {0: round(100 * last)} and reached == (last >= threshold)
    assert len(seen) == 7


def test_release_search_reproduces_the_release_recipe_on_the_shipped_model():
    """64 training items, visual-only FLOPs, budget 0.5: the release's rule gives this schedule (the
    figure in the FitPrune faithfulness issue); tokensieve's feasible search gives a front-loaded one."""
    from tokensieve import evaluation
    from tokensieve.tiny import load_tiny

    model, processor = load_tiny()
    prompting = evaluation.Prompting.for_processor(processor)
    release = evaluation.calibrate_on_tasks(model, prompting, "all", 0.5, 64, visual_only=True, progress=False)
    assert release.removed == {0: 17, 1: 46, 2: 6, 3: 6, 4: 7, 5: 6}
    assert release.extra["search"] == "release" and release.extra["last_probe_reached_budget"] is True
    assert release.flops_convention == "visual"
    feasible = evaluation.calibrate_on_tasks(model, prompting, "all", 0.5, 64, visual_only=True, progress=False,
                                             search="feasible")
    assert feasible.removed == {0: 19, 1: 49, 2: 8, 3: 6}
    assert 0.49 <= feasible.achieved <= 0.5


def test_an_unknown_search_is_refused():
    with pytest.raises(ValueError, match="search must be 'release' or 'feasible'"):
        calibration.calibrate(None, [], 0.5, search="exact")

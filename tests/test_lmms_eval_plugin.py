"""lmms-eval 0.7.3 running tokensieve (``--model tokensieve``) on the exported tasks, end to end and
offline: the accuracy and every answer lmms-eval records equal ``tokensieve eval``'s on the same
items, unpruned, pruned and composed, through the chat and the simple class.

lmms-eval is heavy and not in the main environment: this module runs in its own virtual environment
(``.ci/run``; recipe in ``docs/lmms_eval.md``). Elsewhere it is skipped, saying so, unless
``TOKENSIEVE_REQUIRE_LMMS_EVAL=1``, which makes a missing lmms-eval an error (CI's dedicated run sets it).

lmms-eval exits 0 when an evaluation fails, so each run is judged by its results file, never by its
exit status alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("TOKENSIEVE_REQUIRE_LMMS_EVAL") == "1":
    import lmms_eval  # noqa: F401  (a missing lmms-eval fails the dedicated run)
else:
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed here: this test runs in its own virtual "
                                            "environment (.ci/run, docs/lmms_eval.md)")

from tokensieve import evaluation, models  # noqa: E402
from tokensieve.integrations.lmms_eval.export import export  # noqa: E402
from tokensieve.tasks import TASKS  # noqa: E402

LIMIT = 8
"""Items per task (40 in all); a multiple of BATCH, so both tools run the same batches."""
BATCH = 4
SETTINGS = [
    # (id, model_args after pretrained=tiny, tokensieve method, its options, chat class?)
    ("unpruned-chat", "", "none", {}, True),
    ("fastv-simple", "method=fastv,layer=2,keep=0.25", "fastv", {"layer": 2, "keep": 0.25}, False),
    ("composition-chat", "method=divprune+fastv,divprune.keep=0.5,fastv.layer=2,fastv.keep=0.5", "divprune+fastv",
     {"divprune": {"keep": 0.5}, "fastv": {"layer": 2, "keep": 0.5}}, True),
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lmms_tasks")
    export(out, LIMIT, list(TASKS))
    return out


@pytest.fixture(scope="module")
def tokensieve_results() -> dict[str, dict]:
    """``tokensieve eval``'s results for each setting, on the same items and batches."""
    model, processor = models.load("tiny")
    prompting = evaluation.Prompting.for_processor(processor)
    base = evaluation.evaluate(model, prompting, "all", "none", {}, LIMIT, BATCH, progress=False)
    return {sid: base if method == "none" else
            evaluation.evaluate(model, prompting, "all", method, options, LIMIT, BATCH, progress=False, baseline=base)
            for sid, _, method, options, _ in SETTINGS}


def run_lmms_eval(task_dir: Path, out: Path, model_args: str, chat: bool) -> tuple[dict, Path]:
    """Run the lmms-eval command line; its results JSON and its output folder."""
    env = dict(os.environ, HF_HOME=str(out / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    tasks = ",".join(f"tokensieve_{t}" for t in TASKS)
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "tokensieve", "--model_args", model_args,
           "--include_path", str(task_dir), "--tasks", tasks, "--batch_size", str(BATCH),
           "--output_path", str(out / "results"), "--log_samples"] + ([] if chat else ["--force_simple"])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    found = sorted((out / "results").glob("**/*_results.json"))
    assert proc.returncode == 0 and len(found) == 1, f"rc {proc.returncode}; no results file:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(found[0].read_text()), found[0].parent


@pytest.mark.parametrize("sid,args,method,options,chat", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_lmms_eval_reports_tokensieve_eval_accuracy(tmp_path, task_dir, tokensieve_results, sid, args, method, options, chat):
    report = tmp_path / "tokensieve_report.json"
    model_args = ",".join(filter(None, ["pretrained=tiny", args, f"report={report}"]))
    results, folder = run_lmms_eval(task_dir, tmp_path, model_args, chat)
    ours = tokensieve_results[sid]
    assert results["config"]["model_backend"].endswith("(chat)" if chat else "(simple)")
    for task in TASKS:
        name = f"tokensieve_{task}"
        assert results["n-samples"][name]["effective"] == LIMIT
        assert results["results"][name]["exact_match,none"] == pytest.approx(ours["per_task"][task]["accuracy"], abs=1e-12)
        logged = [json.loads(line) for line in next(folder.glob(f"*_samples_{name}.jsonl")).read_text().splitlines()]
        answers = {s["doc_id"]: s["filtered_resps"] for s in logged}  # one response: logged as the text itself
        assert [answers[i] for i in range(LIMIT)] == [it["predicted"] for it in ours["items"] if it["task"] == task]
    written = json.loads(report.read_text())
    assert written["method"] == method and len(written["samples"]) == LIMIT * len(TASKS)
    assert written["summary"]["flops_ratio"] == pytest.approx(ours["tflops"] / ours["tflops_unpruned"], rel=1e-9)
    assert written["summary"]["visual_tokens_kept"] == pytest.approx(ours["visual_tokens_kept"]["mean"], rel=1e-9)
    assert written["summary"]["kv_bytes_prefill"] == pytest.approx(ours["kv_bytes"], rel=1e-9)
    if method != "none":
        assert written["summary"]["flops_ratio"] < 0.9


def test_registered_through_the_entry_point():
    from lmms_eval.models import get_model, list_available_models

    from tokensieve.integrations.lmms_eval.model import TokensieveChat, TokensieveSimple

    assert "tokensieve" in list_available_models(include_aliases=True)
    assert get_model("tokensieve") is TokensieveChat
    assert get_model("tokensieve", force_simple=True) is TokensieveSimple


def test_bad_model_args_give_tokensieve_errors():
    from tokensieve.integrations.lmms_eval.model import TokensieveChat

    with pytest.raises(TypeError, match="takes no option 'bogus'"):
        TokensieveChat.create_from_arg_string("method=fastv,bogus=1", {"batch_size": "1"})
    with pytest.raises(ValueError, match="did you mean 'fastv'"):
        TokensieveChat.create_from_arg_string("method=fastvv", {"batch_size": "1"})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TokensieveChat.create_from_arg_string("method=none", {"batch_size": "auto"})


def test_other_request_types_are_refused(tmp_path):
    from lmms_eval.api.instance import Instance

    from tokensieve.integrations.lmms_eval.model import TokensieveSimple

    lm = TokensieveSimple.create_from_arg_string(f"report={tmp_path / 'r.json'}", {"batch_size": "1"})
    request = Instance(request_type="loglikelihood", arguments=("ctx", "target", None, 0, "t", "test"), idx=0,
                       metadata={"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError, match="generate_until .* only, not loglikelihood"):
        lm.loglikelihood([request])
    with pytest.raises(NotImplementedError, match="only, not loglikelihood"):
        lm.generate_until([request])

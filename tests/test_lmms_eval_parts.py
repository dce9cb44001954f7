"""The parts of the lmms-eval integration that need no lmms-eval: ``tokensieve export-lmms-tasks`` (its
files, rows and YAML) and the reading of ``--model_args``. The plugin itself, run by lmms-eval, is
tested in ``test_lmms_eval_plugin.py`` (its own virtual environment)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tokensieve.cli import main
from tokensieve.integrations.lmms_eval.model_args import default_report, parse
from tokensieve.tasks import TASKS, generate

yaml = pytest.importorskip("yaml", reason="PyYAML (a transformers dependency) reads the exported YAML")


class TaskLoader(yaml.SafeLoader):
    """A YAML loader that reads lmms-eval's ``!function module.name`` tags as ``("!function", name)``."""


TaskLoader.add_constructor("!function", lambda loader, node: ("!function", loader.construct_scalar(node)))


def test_export_writes_the_generators_items(tmp_path, capsys):
    assert main(["export-lmms-tasks", "--out", str(tmp_path), "--limit", "3", "--task", "counting,detail"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokensieve_counting", "tokensieve_detail"]
    assert "--include_path" in capsys.readouterr().out
    for task in ("counting", "detail"):
        folder = tmp_path / f"tokensieve_{task}"
        rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()]
        examples = generate(task, "test", 3)
        assert [(r["id"], r["question"], r["answer"]) for r in rows] == [(i, e.question, e.answer) for i, e in enumerate(examples)]
        spec = importlib.util.spec_from_file_location("utils", folder / "utils.py")
        utils = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(utils)  # as lmms-eval loads it: from the YAML's folder
        for row, example in zip(rows, examples):
            (image,) = utils.doc_to_visual(row)
            assert np.array_equal(np.asarray(image), np.asarray(example.image))  # PNG: lossless
        config = yaml.load((folder / f"tokensieve_{task}.yaml").read_text(), Loader=TaskLoader)
        assert config["task"] == f"tokensieve_{task}"
        assert config["doc_to_visual"] == ("!function", "utils.doc_to_visual")
        assert config["dataset_path"] == "json" and config["dataset_kwargs"]["data_files"] == {"test": "test.jsonl"}
        assert (config["doc_to_text"], config["doc_to_target"]) == ("question", "answer")
        assert config["generation_kwargs"] == {"max_new_tokens": 3, "do_sample": False}
        assert config["metric_list"] == [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]


def test_export_all_and_refusals(tmp_path, capsys):
    assert main(["export-lmms-tasks", "--out", str(tmp_path), "--limit", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"tokensieve_{t}" for t in TASKS)
    capsys.readouterr()
    assert main(["export-lmms-tasks", "--out", str(tmp_path), "--limit", "1", "--task", "counting"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(["export-lmms-tasks", "--out", str(tmp_path / "new"), "--task", "needle_1024"]) == 2
    assert "unknown task 'needle_1024'" in capsys.readouterr().err  # a text task: not an image task
    assert main(["export-lmms-tasks", "--out", str(tmp_path / "new"), "--limit", "0"]) == 2
    assert not (tmp_path / "new").exists()


def test_model_args_are_read_as_the_methods_declare(tmp_path):
    report = tmp_path / "r.json"
    s = parse({"pretrained": "tiny", "method": "fastv", "layer": 2, "keep": 1, "batch_size": "4", "report": str(report)})
    assert (s.method, s.options, s.batch_size, s.report) == ("fastv", {"layer": 2, "keep": 1.0}, 4, report)
    assert isinstance(s.options["keep"], float)
    s = parse({"method": "divprune+fastv", "divprune.keep": 0.5, "fastv.layer": 2, "report": False})
    assert s.options == {"divprune": {"keep": 0.5}, "fastv": {"layer": 2}} and s.report is None
    s = parse({"method": "divprune+pdrop", "pdrop.layers": '"1,2,3"', "flops": 0.3, "report": False})
    assert s.options == {"divprune": {}, "pdrop": {"layers": (1, 2, 3)}, "flops": 0.3}
    s = parse({"method": "fitprune", "flops": 0.5, "report": False})
    assert s.calibrate == 0.5
    assert parse({}).report.parent == default_report().parent


@pytest.mark.parametrize("args,error,match", [
    ({"method": "fastv", "bogus": 1}, TypeError, "takes no option 'bogus'; its options are"),
    ({"method": "fastvv"}, ValueError, "did you mean 'fastv'"),
    ({"method": "fastv", "keep": 2}, ValueError, r"keep must be in \(0, 1\], got 2.0"),
    ({"method": "fastv", "layer": 0.5}, ValueError, "layer for fastv: expected an integer"),
    ({"method": "fastv", "fastv.layer": 2}, ValueError, "member.option names are for compositions"),
    ({"method": "divprune+fastv", "keep": 0.5}, ValueError, "as in divprune.keep=0.5"),
    ({"method": "divprune+fastv", "pool.stride": 2}, ValueError, "'pool' is not one of the members"),
    ({"method": "divprune+fastv", "fastv.bogus": 2}, TypeError, "takes no option 'bogus'"),
    ({"batch_size": "auto"}, ValueError, "batch_size must be a positive integer"),
    ({"max_batch_size": 8}, ValueError, "max_batch_size bounds"),
    ({"dtype": "float64"}, ValueError, "dtype='float64'"),
    ({"protocol": "later"}, ValueError, "protocol must be one of"),
    ({"prompt": "mine"}, ValueError, "prompt='mine'"),
])
def test_bad_model_args(tmp_path, args, error, match):
    with pytest.raises(error, match=match):
        parse({"report": str(tmp_path / "r.json"), **args})


def test_report_path_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        parse({"report": str(tmp_path)})


def test_runner_answers_as_tokensieve_eval_and_reports(tmp_path):
    from tokensieve import evaluation
    from tokensieve.integrations.lmms_eval.runner import Request, Runner

    examples = generate("counting", "test", 4)
    requests = [Request(task="tokensieve_counting", doc_id=i, text=e.question, images=[e.image],
                        generation={"max_new_tokens": 3, "do_sample": False, "until": ["\n\n"]}) for i, e in enumerate(examples)]
    runner = Runner(parse({"method": "fastv", "layer": 2, "keep": 0.25, "batch_size": "4", "report": False}))
    ours = evaluation.evaluate(runner.model, runner.prompting, "counting", "fastv", {"layer": 2, "keep": 0.25}, 4, 4,
                               progress=False)
    assert runner.generate(requests) == [item["predicted"] for item in ours["items"]]
    runner.write_report(tmp_path / "r" / "report.json")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["options"]["keep"] == 0.25 and [r["doc_id"] for r in report["samples"]] == [0, 1, 2, 3]
    assert report["summary"]["flops_ratio"] == pytest.approx(ours["tflops"] / ours["tflops_unpruned"], rel=1e-9)
    assert report["per_task"]["tokensieve_counting"]["visual_tokens_kept"] == pytest.approx(ours["visual_tokens_kept"]["mean"])


def test_task_prompt_conversation():
    from PIL import Image

    from tokensieve.integrations.lmms_eval.runner import Request, _conversation

    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    simple = Request(task="mme", doc_id=0, text="Is it red?", images=images, generation={})
    assert _conversation(simple) == [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                  {"type": "text", "text": "Is it red?"}]}]
    turns = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}, {"type": "text", "text": "Red?"}]}]
    chat = Request(task="mme", doc_id=0, text="Red?", images=images[:1], generation={}, messages=turns)
    assert _conversation(chat) is turns
    assert _conversation(chat, text_only=True) == [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Look:\nRed?"}]

"""``bench`` and ``calibrate`` on the command line: bad input and output paths fail before any model
loads, the runtime flags reach the loader, and a new output folder is created."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tokensieve import bench, evaluation, models
from tokensieve.cli import main
from tokensieve.tiny import TINY_DIR
from tokensieve.tiny.build import build_model, build_processor, build_tokenizer


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded."""
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: pytest.fail("a model was loaded"))


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--methods", "", "--methods '' is empty"),
    ("--methods", ",", "--methods ',' is empty"),
    ("--methods", "fastv,,random", "entry 2 is empty"),
    ("--flops", "", "--flops '' is empty"),
    ("--flops", ",", "--flops ',' is empty"),
    ("--flops", "0.5,half", "'half' is not a number"),
    ("--flops", "0.5,1.5", "must be in \\(0, 1\\), got 1.5"),
    ("--flops", "0.5,0.5", "0.5 given twice"),
    ("--methods", "fastv:keep=abc", "keep='abc' has the wrong type: keep takes a number"),
    ("--methods", "fastv:layer=two", "layer='two' has the wrong type: layer takes an integer"),
    ("--methods", "fastv:variant=both", "variant takes one of 'code', 'paper'"),
    ("--methods", "fastv:keep=0.25", "'fastv:keep=0.25' cannot run at flops=0.5 .*keep"),
    ("--methods", "pool:stride=2", "'pool:stride=2' cannot run at flops=0.5"),
    ("--methods", "streamingllm:window=8", "'streamingllm:window=8' cannot run at keep=0.75 .*give one of window, keep"),
    ("--methods", "snapkv:keep=0.5", "takes no option 'keep' here \\(the bench sets keep\\)"),
    ("--methods", "fitprune:recipe=r.json", "the bench fits a recipe per budget"),
    ("--methods", "random,random", "random given twice"),
    ("--methods", "none", "unpruned baseline"),
])
def test_bad_bench_input_fails_before_any_model_loads(tmp_path, capsys, no_load, flag, value, message):
    argv = {"--methods": "random", "--flops": "0.5", flag: value}
    code, err = run_cli(capsys, "bench", "--limit", "1", "-o", str(tmp_path / "out"),
                        "--methods", argv["--methods"], "--flops", argv["--flops"])
    assert code == 2 and "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err


def test_bench_output_that_is_a_file_fails_before_any_model_loads(tmp_path, capsys, no_load):
    (tmp_path / "results").write_text("not a folder\n")
    code, err = run_cli(capsys, "bench", "--limit", "1", "--methods", "random", "-o", str(tmp_path / "results"))
    assert code == 2 and "exists and is not a directory" in err


def test_bench_into_a_folder_made_with_other_settings_fails_before_any_model_loads(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    model = build_model(build_tokenizer()).eval()
    processor = build_processor()
    processor.tokenizer.padding_side = "left"
    bench.run_bench(model, evaluation.Prompting(processor, tiny=True), "counting", ["random"], [0.5], 2, 2, tmp_path, "tiny")
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: pytest.fail("a model was loaded"))
    code, err = run_cli(capsys, "bench", "--task", "counting", "--limit", "3", "--methods", "random", "--flops", "0.5",
                        "-o", str(tmp_path))
    assert code == 2 and "--limit 2 (now 3)" in err and "--overwrite" in err


@pytest.mark.parametrize("command", [
    ["bench", "--limit", "1", "--methods", "random"],
    ["calibrate", "--flops", "0.5", "--samples", "2"],
])
def test_device_and_dtype_reach_the_loader(tmp_path, capsys, monkeypatch, command):
    seen = []

    def load(*args, **kwargs):
        seen.append((args, kwargs))
        raise ValueError("stand-in loader")

    monkeypatch.setattr(models, "load", load)
    code, err = run_cli(capsys, *command, "-o", str(tmp_path / "out"), "--model", "tiny", "--device", "cpu",
                        "--dtype", "bfloat16")
    assert code == 2 and "stand-in loader" in err
    assert seen == [(("tiny", "cpu", "bfloat16"), {})]


@pytest.mark.parametrize("where,message", [("file/r.json", "is a file, not a folder"), ("folder", "is a directory")])
def test_calibrate_output_is_checked_before_any_model_loads(tmp_path, capsys, no_load, where, message):
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "folder").mkdir()
    code, err = run_cli(capsys, "calibrate", "--flops", "0.5", "-o", str(tmp_path / where))
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="the shipped checkpoint is not built yet")
def test_calibrate_creates_the_output_folder_and_records_the_runtime(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "r.json"
    code, err = run_cli(capsys, "calibrate", "--model", "tiny", "--device", "cpu", "--task", "counting",
                        "--samples", "2", "--batch-size", "2", "--flops", "0.5", "-o", str(out))
    assert code == 0, err
    extra = json.loads(out.read_text())["extra"]
    assert {k: extra[k] for k in ("device", "dtype", "torch", "transformers", "search")} == {
        "device": "cpu", "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
        "search": "release"}

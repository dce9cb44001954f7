"""The command line as a user meets it: runtime flags, method flags from the registry, output paths
checked first, --version, closed pipes, missing and text-only models, Ctrl-C, the compare table."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

import tokensieve
from tokensieve import methods
from tokensieve.cli import main
from tokensieve.tiny import TINY_DIR

HAS_TINY = (TINY_DIR / "model.safetensors").is_file()
needs_tiny = pytest.mark.skipif(not HAS_TINY, reason="the shipped checkpoint is not built yet")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


class Stop(Exception):
    """Raised by stubs: the command got this far (not a user error, so main does not catch it)."""


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except KeyboardInterrupt:  # would end the whole test session
        pytest.fail("KeyboardInterrupt escaped tokensieve.cli.main")
    out = capsys.readouterr()
    return code, out.out, out.err


def no_model(monkeypatch) -> None:
    """Make loading a model fail the test: what is checked must be checked before any work."""
    def load(*args, **kwargs):
        raise Stop("a model was loaded")

    monkeypatch.setattr("tokensieve.models.load", load)


def fake_result(method: str, options: dict, tasks: list[str], limit: int) -> dict:
    """The fields of an evaluation result that eval and compare print."""
    per_task = {t: {"accuracy": 1.0, "baseline_accuracy": 1.0, "agreement": 1.0} for t in tasks}
    return {"accuracy": 1.0, "baseline_accuracy": 1.0, "agreement": 1.0, "per_task": per_task,
            "visual_tokens_kept": {"mean": 144.0, "per_layer": [144.0]}, "tflops": 1.0, "tflops_unpruned": 1.0,
            "ttft_ms": 1.0, "ttft_ms_unpruned": 1.0, "decode_ms_per_token": 1.0, "kv_bytes": 1024, "samples": limit,
            "items": [], "settings": {"model": "checkpoint/path", "tasks": tasks, "method": method, "options": options,
                                      "limit": limit, "device": "cpu", "dtype": "float32"}}


class Stubbed(list):
    """The (method, options) of every evaluation asked for; ``loads``: the models.load calls."""

    loads: list[tuple]


@pytest.fixture
def stub_run(monkeypatch) -> Stubbed:
    """Stub the model and the evaluation, recording what they were asked for."""
    calls = Stubbed()
    calls.loads = []

    def load(name, device="cpu", dtype=None):
        calls.loads.append((name, device, dtype))
        return object(), object()

    def evaluate(model, prompting, task, method="none", options=None, limit=500, batch_size=16, **kwargs):
        calls.append((method, dict(options or {})))
        return fake_result(method, dict(options or {}), ["counting"] if task != "all" else ["counting", "relation"], limit)

    monkeypatch.setattr("tokensieve.models.load", load)
    monkeypatch.setattr("tokensieve.evaluation.evaluate", evaluate)
    return calls


# 1. --device and --dtype


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_device_and_dtype_reach_the_model_loader(capsys, stub_run, command):
    code, _, err = run_cli(capsys, command, "--task", "counting", "--limit", "1", "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0, err
    assert stub_run.loads == [("tiny", "cpu", "bfloat16")]


@needs_tiny
def test_eval_json_records_the_device_and_dtype_used_in_a_folder_it_creates(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "r.json"
    code, printed, err = run_cli(capsys, "eval", "--task", "counting", "--limit", "1", "--device", "cpu",
                                 "--dtype", "float32", "--json", str(out))
    assert code == 0, err
    settings = json.loads(out.read_text())["settings"]
    assert settings["device"] == "cpu" and settings["dtype"] == "float32" and settings["model"] == "tiny"
    assert "cpu" in printed and "float32" in printed


# 2. every method option is a flag


def test_every_registry_option_is_a_dashed_flag_with_its_methods_and_defaults(capsys):
    takers: dict[str, list[str]] = {}
    for name, cls in methods.REGISTRY.items():
        for option in cls.options():
            takers.setdefault(option, []).append(name)
    for command in ("eval", "compare"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert exit_.value.code == 0
        for option, names in takers.items():
            flag = "--" + option.replace("_", "-")
            assert f" {flag} " in text, (command, flag)
            help_line = text.split(f" {flag} ", 1)[1]
            assert all(n in help_line[:400] for n in names), (command, flag)
        assert "--merge-keep X aim (default 0.25)" in text and "--image-pivots N dart (default 4)" in text
        assert "random (default 0)" in text.split(" --layer N ", 1)[1][:100]
        assert "--merge_keep" not in text


@pytest.mark.parametrize("argv,options", [
    (["--method", "aim", "--merge-keep", "0.5"], {"merge_keep": 0.5}),
    (["--method", "dart", "--image-pivots", "8", "--keep", "0.3"], {"image_pivots": 8, "keep": 0.3}),
    (["--method", "transprune", "--layers", "2,4", "--keep", "0.9,0.5"], {"layers": (2, 4), "keep": (0.9, 0.5)}),
    (["--method", "vflowopt", "--stage-keep", "0.5"], {"stage_keep": (0.5,)}),
    (["--method", "pool", "--positions", "renumber", "--stride", "3"], {"positions": "renumber", "stride": 3}),
])
def test_method_flags_reach_the_method_in_its_types(capsys, stub_run, argv, options):
    code, _, err = run_cli(capsys, "eval", "--task", "counting", "--limit", "1", *argv)
    assert code == 0, err
    assert stub_run == [(argv[1], options)]
    assert all(type(options[k]) is type(v) for k, v in stub_run[0][1].items())


def test_compare_adds_the_method_given_with_its_options(capsys, stub_run):
    code, out, err = run_cli(capsys, "compare", "--task", "counting", "--limit", "1", "--method", "aim", "--merge-keep", "0.5")
    assert code == 0, err
    assert stub_run[-1] == ("aim", {"merge_keep": 0.5}) and stub_run[0][0] == "none"
    assert "| aim | merge_keep=0.5 |" in out


@pytest.mark.parametrize("argv,message", [
    (["eval", "--method", "fastv", "--stride", "2"],
     "method 'fastv' takes no --stride; it takes --layer, --keep, --variant, --flops"),
    (["eval", "--method", "none", "--keep", "0.5"], "method 'none' takes no --keep"),
    (["eval", "--method", "fastv", "--keep", "0.5,0.25"], "--keep for fastv: expected a number"),
    (["compare", "--keep", "0.5"], "--keep: method options need --method"),
    (["eval", "--method", "fastvv"], "did you mean 'fastv'"),
    (["flops", "--model", "llava-1.5-7b", "--schedule", "s.json", "--keep", "0.5"], "--keep: method options need --method"),
])
def test_a_flag_the_method_does_not_take_is_an_error_naming_its_flags(capsys, monkeypatch, argv, message):
    no_model(monkeypatch)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_flops_takes_every_method_option_too(capsys):
    code, out, err = run_cli(capsys, "flops", "--model", "llava-1.5-7b", "--method", "pdrop", "--ratio", "0.5", "--json")
    assert code == 0, err
    assert json.loads(out)["ratio"] < 1


def test_a_method_option_named_like_a_subcommand_flag_leaves_that_flag_alone(tmp_path, capsys, monkeypatch):
    from dataclasses import dataclass

    @dataclass
    class Clash(methods.Method):
        """A method whose options are named like flags of flops and eval."""

        schedule: str = "constant"
        limit: int = 1
        name = "clash"
        stages = ("prefill",)

    monkeypatch.setitem(methods.REGISTRY, "clash", Clash)
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"removed": {"0": 10}}))
    code, out, err = run_cli(capsys, "flops", "--model", "llava-1.5-7b", "--schedule", str(schedule), "--json")
    assert code == 0 and json.loads(out)["ratio"] < 1, err
    code, _, err = run_cli(capsys, "eval", "--method", "clash", "--schedule", "decreasing", "--limit", "0")
    assert code == 2 and "--limit must be at least 1" in err, err


def test_an_underscored_flag_is_answered_with_its_dashed_spelling(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--method", "aim", "--merge_keep", "0.5"])
    assert exit_.value.code == 2 and "--merge-keep" in capsys.readouterr().err


# 6. values: bools stay bools, text is refused by argparse


@pytest.mark.parametrize("value,expected", [(None, True), ("true", True), ("1", True), ("False", False), ("0", False)])
def test_a_bool_option_reads_bool_words_as_bools(capsys, stub_run, value, expected):
    code, _, err = run_cli(capsys, "eval", "--task", "counting", "--limit", "1", "--method", "transprune",
                           "--ttv-only", *([value] if value else []))
    assert code == 0, err
    assert stub_run[0][1]["ttv_only"] is expected


@pytest.mark.parametrize("argv,message", [
    (["--keep", "abc"], "argument --keep: expected a number or comma-separated numbers, got 'abc'"),
    (["--keep", "True"], "argument --keep: expected a number"),
    (["--layer", "1.5"], "argument --layer: expected an integer, got '1.5'"),
    (["--ttv-only", "maybe"], "argument --ttv-only: expected true or false, got 'maybe'"),
    (["--positions", "left"], "argument --positions: expected one of (auto, )?keep, renumber(, auto)?(, shift)?, got 'left'"),
])
def test_a_value_of_the_wrong_type_is_refused_by_argparse(capsys, monkeypatch, argv, message):
    no_model(monkeypatch)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and re.search(message, err) and "Traceback" not in err, err


# 3. output paths


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_an_output_path_that_cannot_be_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch, command):
    no_model(monkeypatch)
    code, _, err = run_cli(capsys, command, "--json", str(tmp_path))
    assert code == 2 and "--json" in err and "is a directory" in err and "Traceback" not in err, err
    (tmp_path / "plain").write_text("x")
    code, _, err = run_cli(capsys, command, "--json", str(tmp_path / "plain" / "out.json"))
    assert code == 2 and "--json" in err and "is a file, not a folder" in err and "Traceback" not in err, err


# 4. --version, pipes, models that cannot run, Ctrl-C


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tokensieve {tokensieve.__version__}"


def test_a_reader_that_closes_the_pipe_ends_the_output_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "tokensieve", "methods", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()  # gone before the first byte is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    piped = subprocess.run(["bash", "-c", f"set -o pipefail; '{sys.executable}' -m tokensieve methods --json | head -1"],
                           capture_output=True, text=True, env=ENV, timeout=120)
    assert piped.returncode == 0 and piped.stdout == "[\n" and "Traceback" not in piped.stderr, piped.stderr


@pytest.mark.parametrize("name", ["./nope", "{tmp}/x/y", "~/no-such-tokensieve-model"])
def test_a_missing_model_path_says_it_does_not_exist(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    name = name.format(tmp=tmp_path)
    code, _, err = run_cli(capsys, "eval", "--model", name, "--limit", "1")
    assert code == 2 and f"model path {name} does not exist" in err and "Traceback" not in err, err


def test_a_text_only_model_runs_the_text_tasks_and_refuses_image_tasks(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokensieve.tiny_text.build import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "eval", "--model", str(tmp_path), "--task", "kv_recall_512", "--limit", "1",
                             "--method", "h2o", "--protocol", "question-after")
    assert code == 0 and "kv_recall_512" in out and "protocol question-after" in out, err
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path), "--task", "counting", "--limit", "1")
    assert code == 2 and "unknown task 'counting'" in err and "kv_recall_512" in err and "Traceback" not in err, err
    code, out, err = run_cli(capsys, "compare", "--model", str(tmp_path), "--task", "kv_recall_512", "--limit", "1")
    rows = [line.split(" | ")[0].strip("| ") for line in out.splitlines() if line.startswith("| ")][1:]
    assert code == 0 and "protocol question-after" in out.splitlines()[0], err  # auto: question-after on text
    assert rows == ["none", "snapkv", "snapkv", "h2o", "streamingllm", "pagedeviction"], out


def test_a_language_model_without_its_tokenizer_is_a_clear_error(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path), "--limit", "1")
    assert code == 2 and "cannot load" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv,target", [
    (["methods"], "tokensieve.cli.methods_cmd.describe"),
    (["eval", "--limit", "1"], "tokensieve.models.load"),
])
def test_ctrl_c_in_a_subcommand_is_one_line_and_status_130(capsys, monkeypatch, argv, target):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    code, _, err = run_cli(capsys, *argv)
    assert code == 130 and f"tokensieve {argv[0]}: interrupted" in err and "Traceback" not in err


TRAIN = ["--init-from", str(TINY_DIR), "--steps", "5", "--time-budget-min", "0", "--pool-per-task", "4",
         "--extra-turns", "1", "--eval-every", "100", "--eval-items", "2", "--batch-size", "4"]


def interrupt_after(monkeypatch, steps: int) -> None:
    """Ctrl-C when the training step after ``steps`` steps draws its batch."""
    from tokensieve.tiny import train

    draw, calls = train.draw_rows, []

    def draw_rows(*args, **kwargs):
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(train, "draw_rows", draw_rows)


@needs_tiny
def test_ctrl_c_in_train_tiny_saves_the_checkpoint_so_far(tmp_path, capsys, monkeypatch):
    from tokensieve.tiny import load_tiny

    out = tmp_path / "run"
    interrupt_after(monkeypatch, 1)
    code, _, err = run_cli(capsys, "train-tiny", "--out", str(out), *TRAIN)
    assert code == 130 and "Traceback" not in err
    assert "interrupted at step 1 of 5" in err and str(out) in err
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps_done"] == 1
    model, _ = load_tiny(path=out)
    assert model.config.text_config.num_hidden_layers == 8


@needs_tiny
def test_ctrl_c_in_train_tiny_before_a_step_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 0)
    code, _, err = run_cli(capsys, "train-tiny", "--out", str(out), *TRAIN)
    assert code == 130 and "interrupted at step 0 of 5; nothing was saved" in err and "Traceback" not in err
    assert not out.exists()


def test_the_optimizer_update_is_never_cut_by_ctrl_c():
    from tokensieve.tiny.train import uninterrupted

    done = []
    with pytest.raises(KeyboardInterrupt):
        with uninterrupted():
            signal.raise_signal(signal.SIGINT)
            done.append(1)
    assert done == [1]


def test_train_tiny_refuses_an_output_that_is_a_file_before_any_work(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    code, _, err = run_cli(capsys, "train-tiny", "--out", str(tmp_path / "plain"))
    assert code == 2 and "--out" in err and "not a directory" in err and "Traceback" not in err


# 5. the compare table


def test_compare_table_names_model_items_device_dtype_and_what_visual_counts(capsys, stub_run):
    code, out, err = run_cli(capsys, "compare", "--task", "counting", "--limit", "3")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "tiny: 3 items per task (counting) on cpu in float32; protocol whole"
    assert "| visual tokens/layer |" in out and "visual kept" not in out
    assert "visual tokens/layer: visual tokens entering each decoder layer during prefill, mean over layers" in lines[-1]

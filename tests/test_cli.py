"""The command line: FLOPs, method listing, evaluation output, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

from tokensieve.cli import main
from tokensieve.tiny import TINY_DIR

FITPRUNE_LLAVA15_7B_50 = {  # the authors' published 50% schedule for LLaVA-1.5-7B (ywh187/FitPrune)
    0: 3, 1: 7, 2: 49, 3: 24, 4: 29, 5: 17, 6: 59, 7: 41, 8: 26, 9: 8, 10: 10, 11: 6, 12: 2, 13: 5, 14: 7, 15: 2,
    16: 30, 17: 3, 18: 13, 19: 27, 20: 5, 21: 23, 22: 2, 23: 1, 24: 0, 25: 0, 26: 1, 27: 1, 28: 2, 29: 0, 30: 0, 31: 0,
}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_flops_of_the_published_fitprune_schedule(tmp_path, capsys):
    schedule = tmp_path / "s.json"
    schedule.write_text(json.dumps({"removed": FITPRUNE_LLAVA15_7B_50, "inside_layer": True}))
    code, out, _ = run_cli(capsys, "flops", "--model", "llava-1.5-7b", "--schedule", str(schedule),
                           "--visual-only", "--image-tokens", "576", "--json")
    assert code == 0
    assert round(json.loads(out)["ratio"], 3) == 0.503


def test_flops_formula_by_hand(capsys):
    # one layer of LLaVA-1.5-7B, 640 tokens: 4nd^2 + 2n^2d + 3ndm MACs, times 2, times 32 layers
    n, d, m = 640, 4096, 11008
    expected = 2 * 32 * (4 * n * d * d + 2 * n * n * d + 3 * n * d * m)
    code, out, _ = run_cli(capsys, "flops", "--model", "llava-1.5-7b", "--method", "fastv", "--layer", "2",
                           "--keep", "1.0", "--image-tokens", "576", "--text-tokens", "64", "--json")
    result = json.loads(out)
    assert code == 0 and result["tflops_unpruned"] * 1e12 == pytest.approx(expected) and result["ratio"] == 1.0


def test_flops_counts_gqa_key_value_width(capsys):
    code, out, _ = run_cli(capsys, "flops", "--model", "qwen2-vl-7b", "--method", "fastv", "--layer", "2",
                           "--keep", "1.0", "--image-tokens", "100", "--text-tokens", "0", "--json")
    n, d, m, dkv = 100, 3584, 18944, 4 * 128
    expected = 2 * 28 * (2 * n * d * d + 2 * n * d * dkv + 2 * n * n * d + 3 * n * d * m)
    assert json.loads(out)["tflops_unpruned"] * 1e12 == pytest.approx(expected)


def test_methods_json_lists_every_method(capsys):
    code, out, _ = run_cli(capsys, "methods", "--json")
    names = {row["name"] for row in json.loads(out)}
    assert code == 0 and {"fastv", "random", "pool", "streamingllm", "fitprune", "none"} <= names


@pytest.mark.parametrize("argv,message", [
    (["flops", "--model", "llava-1.5-7b", "--method", "fastvv"], "did you mean 'fastv'"),
    (["flops", "--model", "no-such-model", "--method", "fastv"], "no config at"),
    (["flops", "--model", "llava-1.5-7b", "--method", "fastv", "--layer", "40"], "outside this model"),
    (["flops", "--model", "llava-1.5-7b", "--method", "fastv", "--keep", "1.5"], "keep must be in"),
    (["eval", "--task", "colours", "--limit", "2"], "unknown task 'colours'"),
    (["eval", "--limit", "0"], "--limit must be at least 1"),
    (["eval", "--model", "nonexistent-model", "--limit", "1"], "unknown model"),
    (["eval", "--method", "fitprune", "--limit", "1"], "needs --recipe"),
    (["calibrate", "--flops", "1.5", "-o", "r.json"], "must be in \\(0, 1\\)"),
])
def test_user_mistakes_exit_nonzero_without_traceback(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "Traceback" not in err
    assert pytest.importorskip("re").search(message, err), err


def test_a_directory_without_a_supported_model_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_head": 1, "n_embd": 8, "vocab_size": 10}))
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path), "--limit", "1")
    assert code == 2 and "Traceback" not in err


def test_a_corrupt_weight_file_is_a_clear_error(tmp_path, capsys):
    from tokensieve.tiny.build import build_model, build_processor, build_tokenizer

    build_model(build_tokenizer()).save_pretrained(tmp_path)
    build_processor().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path), "--limit", "1")
    assert code == 2 and "Traceback" not in err and "cannot load" in err


@pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(), reason="the shipped checkpoint is not built yet")
def test_eval_writes_every_field_and_nothing_pruned_agrees(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, _ = run_cli(capsys, "eval", "--model", "tiny", "--task", "counting", "--limit", "4", "--batch-size", "2",
                         "--json", str(out))
    result = json.loads(out.read_text())
    assert code == 0
    for key in ("accuracy", "baseline_accuracy", "agreement", "visual_tokens_kept", "tflops", "tflops_unpruned",
                "ttft_ms", "decode_ms_per_token", "kv_bytes", "settings"):
        assert result[key] is not None, key
    assert result["agreement"] == 1.0 and result["tflops"] == result["tflops_unpruned"]
    code, _, _ = run_cli(capsys, "eval", "--model", "tiny", "--task", "counting", "--limit", "4", "--method", "fastv",
                         "--layer", "2", "--keep", "0.25", "--json", str(out))
    pruned = json.loads(out.read_text())
    assert code == 0 and pruned["tflops"] < pruned["tflops_unpruned"]
    assert len(pruned["visual_tokens_kept"]["per_layer"]) >= 8

"""Text tasks and the tiny text model: reproducible items, disjoint splits, prompt lengths, answers and
evidence checked by solving each prompt independently, the evaluation wiring, and (when the
checkpoint is present) the shipped model's accuracy."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch

from tokensieve import evaluation
from tokensieve.cli import main as cli_main
from tokensieve.tasks import ALL_TASKS, TASKS, TEXT_TASKS, example_seed, generate
from tokensieve.tasks.text import KEYS, NUMBERS, SLACK, TEXT_LENGTHS, TextExample
from tokensieve.tiny_text import TINY_TEXT_DIR, load_tiny_text
from tokensieve.tiny_text.build import build_config, build_model, build_tokenizer
from tokensieve.tiny_text.data import encode, training_text
from tokensieve.tiny_text.evaluate import greedy_accuracy, teacher_forced_correct
from tokensieve.tiny_text.retrieval import COPIED_BACK, QUESTION_KEY_BACK, lookups

N = 30
SHIPPED = (TINY_TEXT_DIR / "model.safetensors").is_file()
needs_checkpoint = pytest.mark.skipif(not SHIPPED, reason="tiny text checkpoint not trained yet")


def statements(example: TextExample, pattern: str) -> list[tuple[int, int, tuple[str, ...]]]:
    """(start, end, groups) of every statement of the context matching ``pattern`` (a regex over
    space-joined words), with token positions."""
    context_words = len(example.prompt.split()) - len(example.question.split()) - 2
    return _statements(example.prompt, context_words, pattern)


@functools.lru_cache(maxsize=64)
def _statements(prompt: str, context_words: int, pattern: str) -> list[tuple[int, int, tuple[str, ...]]]:
    text = " ".join(prompt.split()[:context_words])
    found = []
    for m in re.finditer(pattern, text):
        start = text.count(" ", 0, m.start())
        found.append((start, start + len(m.group(0).split()), m.groups()))
    return found


def solve_recall(example: TextExample, question: str) -> tuple[str, list[tuple[int, int]]]:
    key = re.fullmatch(r"what is the code of (\w+) \?", question).group(1)
    hits = [(s, e, v) for s, e, (k, v) in statements(example, r"the code of (\w+) is (\d+) \.") if k == key]
    assert len(hits) == 1, "the asked key is in the context exactly once"
    return hits[0][2], [hits[0][:2]]


def solve_hop(example: TextExample, question: str) -> tuple[str, list[tuple[int, int]]]:
    links = {k: (s, e, t) for s, e, (k, t) in statements(example, r"the (\w+) points to (\w+) \.")}
    key = re.fullmatch(r"where does (\w+) lead \?", question).group(1)
    spans = []
    while key in links:
        s, e, key = links[key]
        spans.append((s, e))
    return key, sorted(spans)


def solve_track(example: TextExample, question: str) -> tuple[str, list[tuple[int, int]]]:
    value = re.fullmatch(r"which variables hold (\d+) \?", question).group(1)
    holding, names, spans = {value}, [], []
    for s, e, (name, source) in statements(example, r"var (\w+) = (\w+) \."):
        if source in holding:
            holding.add(name)
            names.append(name)
            spans.append((s, e))
    return " ".join(names), spans


SOLVERS = {"kv_recall": solve_recall, "multikey": solve_recall, "multihop": solve_hop, "vartrack": solve_track}


def kind(task: str) -> str:
    return task.rsplit("_", 1)[0]


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_items_are_reproducible(task):
    a, b = generate(task, "test", 4, start=11), generate(task, "test", 4, start=11)
    assert a == b
    assert generate(task, "test", 1, start=13)[0] == a[2]


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_train_and_test_splits_are_disjoint(task):
    train = {example_seed(task, "train", i) for i in range(1000)}
    assert not train & {example_seed(task, "test", i) for i in range(1000)}
    prompts = {e.prompt for e in generate(task, "train", N)}
    assert not prompts & {e.prompt for e in generate(task, "test", N)}


def test_text_tasks_are_registered_apart_from_the_image_tasks():
    assert len(TEXT_TASKS) == 12 and not set(TEXT_TASKS) & set(TASKS)
    assert len({example_seed(t, "train", 0) for t in ALL_TASKS}) == len(ALL_TASKS)
    assert evaluation.resolve_tasks("all", "text") == list(TEXT_TASKS)
    assert evaluation.resolve_tasks("all") == list(TASKS)
    assert evaluation.resolve_tasks("multihop_1024") == ["multihop_1024"]
    with pytest.raises(ValueError, match="unknown task"):
        evaluation.resolve_tasks("counting", "text")


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_prompts_fill_their_length_and_tokenize_one_token_per_word(task):
    length = int(task.rsplit("_", 1)[1])
    tokenizer = build_tokenizer()
    for e in generate(task, "test", N):
        assert length - SLACK < e.length <= length
        ids = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        assert len(ids) == e.length and tokenizer.unk_token_id not in ids
        assert ids[0] == tokenizer.bos_token_id and e.prompt.endswith(f"{e.question} ASSISTANT :")


@pytest.mark.parametrize("task", TEXT_TASKS)
def test_answers_and_evidence_solve_from_the_prompt(task):
    solve = SOLVERS[kind(task)]
    for e in generate(task, "test", N):
        answer, spans = solve(e, e.question)
        assert answer == e.answer and tuple(spans) == e.evidence
        assert e.evidence_positions == tuple(p for s, t in spans for p in range(s, t))
        assert e.more and all(solve(e, q) == (a, list(ev)) for q, a, ev in e.more)


def test_task_shapes():
    hops = {len(e.evidence) for e in generate("multihop_512", "test", 60)}
    chains = {len(e.answer.split()) for e in generate("vartrack_512", "test", 60)}
    needles = {len(statements(e, r"the code of")) for e in generate("multikey_512", "test", 60)}
    pairs = len(statements(generate("kv_recall_2048", "test", 1)[0], r"the code of"))
    assert hops == {2, 3} and chains == {2, 3, 4} and needles == set(range(3, 9)) and pairs > 280
    assert len(KEYS) > pairs and len(NUMBERS) == 90 and TEXT_LENGTHS == (512, 1024, 2048)


def test_training_batches_supervise_every_answer_and_its_end():
    tokenizer = build_tokenizer()
    examples = generate("vartrack_512", "train", 2) + generate("multihop_512", "train", 2)
    batch = encode(tokenizer, examples, turns=2)
    words = [tokenizer.convert_ids_to_tokens(batch.labels[batch.rows == r].tolist()) for r in range(4)]
    for e, labelled in zip(examples, words):
        expected = [w for a in [e.answer, *(m.answer for m in e.more[:2])] for w in (*a.split(), "</s>")]
        assert labelled == expected
    assert (batch.input_ids[batch.rows, batch.cols - 1] == tokenizer.convert_tokens_to_ids(":")).sum() >= 4 * 2


@pytest.mark.parametrize("task", ["kv_recall_128", "multikey_256", "multihop_512", "vartrack_512"])
def test_retrieval_aid_targets_the_tokens_each_answer_is_read_from(task):
    tokenizer = build_tokenizer()
    kind = task.rsplit("_", 1)[0]
    for e in generate(task, "train", 20):
        plan, words = lookups(e, 3), training_text(e, 3).split()
        batch = encode(tokenizer, [e], 3)
        assert len(plan.words) == len(batch.cols)
        for (hops, first), q, label in zip(plan.words, batch.cols.tolist(), batch.labels.tolist()):
            word = tokenizer.convert_ids_to_tokens(label)
            if word == "</s>":
                assert not hops and not first
                continue
            copied = [words[h - COPIED_BACK[kind]] for h in hops]
            assert copied[-1] == word and all(h < q for h in hops)
            if kind == "multihop":  # each hop reads the key the next link starts from
                assert all(words[h] == words[n - 3] for h, n in zip(hops, hops[1:]))
            if first:
                key = words[q - QUESTION_KEY_BACK[kind]]
                assert key in (w for w in words[q - 8 : q]) and (key in KEYS or key in NUMBERS)
        names = [words[n] for _, n in plan.statements]
        assert all(r - n in (2, 3) for r, n in plan.statements) and set(names) <= set(KEYS)


@pytest.fixture(scope="module")
def untrained():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    model = build_model(build_config(tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, mlp=64)).eval()
    return model, tokenizer


def test_evaluation_runs_a_text_model_with_a_cache_method(untrained):
    model, tokenizer = untrained
    prompting = evaluation.Prompting.for_processor(tokenizer)
    assert prompting.text and prompting.max_new_tokens == 5
    result = evaluation.evaluate(model, prompting, "vartrack_512", "streamingllm", {}, limit=2, batch_size=2,
                                 progress=False)
    assert result["samples"] == 2 and result["settings"]["tasks"] == ["vartrack_512"]
    assert result["settings"]["max_new_tokens"] == 5 and result["kv_bytes"] > 0


def test_train_tiny_text_smoke(tmp_path):
    out = tmp_path / "run"
    status = cli_main(["train-tiny-text", "--out", str(out), "--steps", "2", "--tokens-per-step", "512",
                       "--hidden", "32", "--layers", "5", "--mlp", "64", "--eval-every", "1", "--eval-items", "1",
                       "--final-items", "1", "--curriculum", "512@0"])
    assert status == 0
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps_done"] == 2 and len(summary["history"]) == 2
    assert {"aid_statement", "aid_question", "aid_hop1", "aid_copy1"} <= set(summary["history"][-1]["losses"]) and set(summary["final_greedy_accuracy"]) == set(TEXT_TASKS)
    model, tokenizer = load_tiny_text(path=out)
    assert model.config.max_position_embeddings >= 2048 and tokenizer.padding_side == "left"


def test_kind_weights_repeat_a_kind_in_each_turn_and_keep_the_default_order():
    import argparse

    from tokensieve.tiny_text.train import Sampler, kind_weights

    def kinds(weights):
        sampler = Sampler(0, {512: 0}, 512 * 10, weights)
        return [e.task.rsplit("_", 1)[0] for e in sampler.draw(0)[1]]

    assert kinds(None) == ["kv_recall", "multikey", "multihop", "vartrack"] * 2 + ["kv_recall", "multikey"]
    assert kinds(kind_weights("vartrack=2")) == ["kv_recall", "multikey", "multihop", "vartrack", "vartrack"] * 2
    for bad in ("vartrack=0", "vartrak=2", "vartrack"):
        with pytest.raises(argparse.ArgumentTypeError):
            kind_weights(bad)


@pytest.fixture(scope="module")
def shipped():
    return load_tiny_text()


FIXED_ITEMS = 8
FIXED_BAR = 0.875
"""The shipped model answers at least 7 of test items 0..7 of every task exactly (greedy)."""


@needs_checkpoint
@pytest.mark.parametrize("task", TEXT_TASKS)
def test_the_shipped_model_answers_a_fixed_set_of_test_items(shipped, task):
    model, tokenizer = shipped
    examples = generate(task, "test", FIXED_ITEMS)
    prompting = evaluation.Prompting.for_processor(tokenizer)
    inputs = prompting.inputs(examples)
    out = model.generate(**inputs, max_new_tokens=prompting.max_new_tokens, do_sample=False)
    greedy = [a == e.answer for a, e in zip(prompting.answers(out, inputs["input_ids"].shape[1]), examples)]
    assert sum(greedy) / FIXED_ITEMS >= FIXED_BAR, greedy
    assert teacher_forced_correct(model, tokenizer, examples).tolist() == greedy


@needs_checkpoint
def test_eval_runs_the_shipped_text_model_under_streamingllm(capsys):
    assert cli_main(["eval", "--model", "tiny-text", "--task", "multikey_512", "--limit", "4", "--batch-size", "4",
                     "--method", "streamingllm", "--window", "32"]) == 0
    out = capsys.readouterr().out
    assert "multikey_512" in out and "unpruned 1.000" in out


BELOW_BAR: dict[str, float] = {}
"""The shipped checkpoint's greedy accuracy where it misses the 95% bar (docs/tiny_model.md; none since
stage 7): strict xfails, so that a retrained checkpoint that meets the bar makes them fail until they
are removed."""


@needs_checkpoint
@pytest.mark.slow
@pytest.mark.parametrize("task", [pytest.param(t, marks=pytest.mark.xfail(
    t in BELOW_BAR, reason=f"the shipped model answers {BELOW_BAR.get(t)} of them", strict=True)) for t in TEXT_TASKS])
def test_the_shipped_model_reaches_95_percent_on_100_test_items(shipped, task):
    model, tokenizer = shipped
    assert greedy_accuracy(model, tokenizer, task, 100) >= 0.95

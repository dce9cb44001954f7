"""Prompting protocols: the whole prompt at once, or the context first and the question after it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import untrained as untrained_vlm
from tiny_models import untrained_text

import tokensieve
from tokensieve import evaluation, protocols
from tokensieve.tasks import generate
from tokensieve.timing import ForwardTimer


@pytest.fixture(scope="module")
def text_model():
    return untrained_text()


def mixed_examples() -> list:
    """Two text tasks whose questions differ in length, so the question block has padding inside."""
    return generate("kv_recall_512", "test", 2) + generate("multihop_512", "test", 2)


def mixed_inputs(model, prompting) -> tuple[dict, list[int]]:
    """:func:`mixed_examples` as model inputs, and each row's question length."""
    examples = mixed_examples()
    inputs = prompting.inputs(examples)
    return inputs, protocols.question_lengths(prompting, examples, inputs, model)


def test_the_split_puts_each_row_back_together_and_aligns_the_questions(text_model):
    model, prompting = text_model
    examples = mixed_examples()
    inputs = prompting.inputs(examples)
    question = protocols.question_lengths(prompting, examples, inputs, model)
    assert question == [len(e.prompt[e.prompt.rindex(e.question):].split()) for e in examples]
    assert len(set(question)) == 2
    first, whole = protocols.split_inputs(inputs, question, prompting.tokenizer.pad_token_id)
    width_c = first["input_ids"].shape[1]
    for b, e in enumerate(examples):
        real = whole["input_ids"][b][whole["attention_mask"][b].bool()].tolist()
        assert real == inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        context = first["input_ids"][b][first["attention_mask"][b].bool()].tolist()
        assert prompting.tokenizer.convert_ids_to_tokens(context) == e.prompt[: e.prompt.rindex(e.question)].split()
        assert whole["attention_mask"][b, width_c - 1] == 1  # every context ends at the same column
        assert whole["attention_mask"][b, -1] == 1 and whole["attention_mask"][b, -max(question) :].sum() == question[b]


@torch.no_grad()
def test_unpruned_answers_do_not_depend_on_the_protocol(text_model):
    model, prompting = text_model
    inputs, question = mixed_inputs(model, prompting)
    generation = dict(max_new_tokens=4, do_sample=False)
    whole, width, calls = protocols.generate(model, inputs, generation)
    after, width_after, calls_after = protocols.generate(model, inputs, generation, "question-after", question, 0)
    assert (calls, calls_after) == (1, 2)
    assert torch.equal(whole[:, width:], after[:, width_after:])


@torch.no_grad()
def test_question_after_compresses_the_context_before_the_question_arrives(text_model):
    model, prompting = text_model
    inputs, question = mixed_inputs(model, prompting)
    first, _ = protocols.split_inputs(inputs, question, 0)
    with tokensieve.prune(model, "snapkv", keep=0.25) as run:
        protocols.generate(model, inputs, dict(max_new_tokens=2, do_sample=False), "question-after", question, 0)
    width_c = first["input_ids"].shape[1]
    for b, sample in enumerate(run.report.samples):
        context = int(first["attention_mask"][b].sum())
        # SnapKV keeps per KV head: each head's entries (the cache holds their union)
        for union, heads in zip(sample.cache_kept_prefill, sample.cache_heads_prefill):
            for kept in heads or [union]:
                assert len(kept) == round(0.25 * context) and max(kept) < width_c  # the context only
        for union, heads in zip(sample.cache_kept_end, sample.cache_heads_end):
            for kept in heads or [union]:  # the question and the answer join the compressed context
                assert len(kept) == round(0.25 * context) + question[b] + 1


def test_a_vlm_prompt_splits_after_its_last_image_token():
    model, prompting = untrained_vlm()
    examples = generate("counting", "test", 3)
    inputs = prompting.inputs(examples)
    question = protocols.question_lengths(prompting, examples, inputs, model)
    image = model.config.image_token_id
    for b, q in enumerate(question):
        row = inputs["input_ids"][b]
        assert row[-q - 1] == image and not (row[-q:] == image).any()
    result = evaluation.evaluate(model, prompting, "counting", "h2o", {"keep": 0.5}, limit=3, batch_size=3,
                                 progress=False, protocol="question-after")
    assert result["settings"]["protocol"] == "question-after" and result["samples"] == 3


def test_the_timer_sums_the_forwards_of_a_split_prefill(text_model):
    model, prompting = text_model
    inputs, question = mixed_inputs(model, prompting)
    with ForwardTimer(model) as timer:
        timer.start(2)
        protocols.generate(model, inputs, dict(max_new_tokens=3, do_sample=False), "question-after", question, 0)
    assert len(timer.prefill_ms) == 1 and len(timer.decode_ms) == 2


def test_bad_protocols_and_mismatched_baselines_are_refused(text_model):
    model, prompting = text_model
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluation.evaluate(model, prompting, "kv_recall_512", "none", limit=1, progress=False, protocol="later")
    base = evaluation.evaluate(model, prompting, "kv_recall_512", "none", limit=1, progress=False, protocol="whole")
    with pytest.raises(ValueError, match="another protocol"):
        evaluation.evaluate(model, prompting, "kv_recall_512", "h2o", limit=1, progress=False, baseline=base,
                            protocol="question-after")

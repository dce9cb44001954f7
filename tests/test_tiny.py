"""The tiny model's tokenizer, processor and batching; and the shipped checkpoint, when present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, AutoTokenizer

from tokensieve.tasks import TASKS, generate, vocabulary
from tokensieve.tiny import NUM_IMAGE_TOKENS, TINY_DIR, build_inputs, load_tiny, parse_answers
from tokensieve.tiny.build import build_processor
from tokensieve.tiny.data import normalize
from tokensieve.tiny.prompt import prompt_text


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_tokenizer_round_trips_every_task(processor) -> None:
    tok = processor.tokenizer
    for word in vocabulary():
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id and tok.decode(ids) == word
    for task in TASKS:
        for e in generate(task, "train", 20):
            text = f"{prompt_text(e.question)} {e.answer} </s>"
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            decoded = tok.decode(ids)
            assert decoded == text.replace(":", " :"), "word-level: decoding joins words with spaces"
            assert tok(decoded, add_special_tokens=False)["input_ids"] == ids


def test_saved_processor_loads_offline(tmp_path, processor) -> None:
    processor.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tok.convert_tokens_to_ids("<image>") == processor.tokenizer.convert_tokens_to_ids("<image>")
    loaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    assert type(loaded).__name__ == "LlavaProcessor"
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_build_inputs_image_tokens_and_left_padding(processor) -> None:
    examples = generate("attribute", "test", 1) + generate("relation", "test", 1) + generate("counting", "test", 1)
    batch = build_inputs(processor, examples)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert batch["pixel_values"].shape == (3, 3, 96, 96)
    assert ((batch["input_ids"] == image_id).sum(1) == NUM_IMAGE_TOKENS).all()
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "prompts of different lengths, so padding happens"
    assert (batch["attention_mask"][:, -1] == 1).all()
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == processor.tokenizer.pad_token_id).all()
    for row in batch["attention_mask"]:
        assert torch.equal(row, torch.sort(row).values), "padding on the left"


def test_training_normalisation_matches_processor(processor) -> None:
    examples = generate("detail", "test", 2)
    batch = build_inputs(processor, examples)
    pixels = torch.from_numpy(np.stack([np.asarray(e.image) for e in examples])).permute(0, 3, 1, 2)
    assert torch.allclose(normalize(pixels), batch["pixel_values"], atol=1e-5)


def test_parse_answers(processor) -> None:
    tok = processor.tokenizer
    ids = tok(["<s> USER : yes </s> </s>", "<s> USER : 5 </s> <pad>"], add_special_tokens=False,
              return_tensors="pt")["input_ids"]
    assert parse_answers(tok, ids, 3) == ["yes", "5"]


FIXED_ITEMS = [(task, i) for task in TASKS for i in range(4)]


@pytest.mark.skipif(not (TINY_DIR / "model.safetensors").is_file(),
                    reason="shipped checkpoint absent: tokensieve/tiny/checkpoint/model.safetensors not trained yet")
def test_shipped_model_answers_fixed_items() -> None:
    model, processor = load_tiny()
    examples = [generate(task, "test", 1, start=i)[0] for task, i in FIXED_ITEMS]
    inputs = build_inputs(processor, examples)
    assert inputs["input_ids"].shape[1] > NUM_IMAGE_TOKENS
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    answers = parse_answers(processor.tokenizer, out, inputs["input_ids"].shape[1])
    right = [a == e.answer for a, e in zip(answers, examples)]
    assert sum(right) >= 0.9 * len(right), f"{sum(right)} of {len(right)} held-out items answered right"
    for task in TASKS:  # chance is at most 1/2 per item; the model is at 96-100% per task
        assert sum(r for r, (t, _) in zip(right, FIXED_ITEMS) if t == task) >= 3, task


def test_patch_targets_label_each_object_from_its_pixels() -> None:
    from tokensieve.tasks.generators import COLOUR_NAMES
    from tokensieve.tasks.glyphs import GLYPHS
    from tokensieve.tasks.scene import SHAPES
    from tokensieve.tiny.auxiliary import patch_targets

    for task in TASKS:
        for e in generate(task, "train", 10):
            targets = patch_targets(np.asarray(e.image), e.items)
            assert targets.shape == (NUM_IMAGE_TOKENS, 4)
            occupied = targets[:, 1] > 0
            assert occupied.sum() == 4 * len(e.items), "every object covers exactly 2x2 patches"
            for item in e.items:
                here = occupied & (targets[:, 3] == item.cell)
                assert here.sum() == 4
                if item.glyph is not None:
                    assert (targets[here, 2] == 1 + GLYPHS.index(item.glyph)).all()
                else:
                    assert (targets[here, 0] == 1 + COLOUR_NAMES.index(item.colour)).all()
                    assert (targets[here, 1] == 1 + SHAPES.index(item.shape)).all()
                    assert (targets[here, 2] == 0).all()
            patch = np.arange(NUM_IMAGE_TOKENS)
            assert (targets[:, 3] == (patch // 12 // 4) * 3 + patch % 12 // 4).all()


def test_scene_question_evidence() -> None:
    from tokensieve.tasks.questions import scene_questions
    from tokensieve.tasks.scene import CELL_NAMES

    for e in generate("counting", "train", 10) + generate("attribute", "train", 10):
        for question, answer, cells in scene_questions(e.items, np.random.default_rng(0), 50):
            if question.startswith("how many"):
                assert len(cells) == int(answer)
                assert all(e.items[[it.cell for it in e.items].index(c)].shape + "s" in question for c in cells)
            if question.startswith("what"):
                assert len(cells) == 1 and question.endswith(f"at {CELL_NAMES[cells[0]]} ?")


def test_training_batch_queries_point_at_the_answer_predicting_token(processor) -> None:
    from tokensieve.tiny.data import build_pool, collate

    tok = processor.tokenizer
    pool = build_pool(tok, "train", 3, extra_turns=2, progress=False)
    batch = collate(pool, torch.arange(len(pool.ids)), tok.pad_token_id, with_answer=True)
    rows, positions, bits = batch["evidence"].unbind(-1)
    colon = tok.convert_tokens_to_ids(":")
    assert (batch["input_ids"][rows, positions] == colon).all()
    assert (batch["labels"][rows, positions + 1] != -100).all(), "the next token is a supervised answer"
    assert (bits > 0).all() and (bits < 512).all()


def test_evidence_pointer_loss_matches_its_formula() -> None:
    from tokensieve.tiny.auxiliary import EvidencePointer

    torch.manual_seed(0)
    pointer = EvidencePointer(8, dim=4)
    hidden = torch.randn(2, 150, 8)
    visual = torch.zeros(2, 150, dtype=torch.bool)
    visual[:, 3:147] = True
    targets = torch.zeros(2, NUM_IMAGE_TOKENS, 4, dtype=torch.long)
    targets[:, :, 3] = torch.arange(NUM_IMAGE_TOKENS) % 9
    targets[0, [5, 14], 0] = 1  # occupied patches in cells 5 and 5
    targets[1, [0, 9], 0] = 2  # cells 0 and 0
    evidence = torch.tensor([[0, 149, 1 << 5], [1, 148, 1 << 0], [1, 149, 1 << 3]])  # the last has no evidence
    loss = pointer.loss(hidden, visual, targets, evidence)
    expected = []
    for row, pos, patches in ((0, 149, [5, 14]), (1, 148, [0, 9])):
        scores = pointer.key(hidden[row, 3:147]) @ pointer.query(hidden[row, pos]) / 2.0
        expected.append(-scores.softmax(-1)[patches].sum().log())
    assert torch.allclose(loss, torch.stack(expected).mean(), atol=1e-6)


def test_evidence_head_loss_equals_eager_attention_mass(processor) -> None:
    """The grounding-head loss is -log of the evidence mass in the model's own eager attention."""
    from tokensieve.tiny.auxiliary import evidence_head_loss, evidence_targets
    from tokensieve.tiny.build import build_model
    from tokensieve.tiny.data import build_pool, collate

    torch.manual_seed(0)
    tok = processor.tokenizer
    model = build_model(tok)
    model.model.language_model.config._attn_implementation = "eager"
    pool = build_pool(tok, "train", 2, extra_turns=2, progress=False)
    batch = collate(pool, torch.arange(len(pool.ids)), tok.pad_token_id, with_answer=True)
    targets, evidence = batch.pop("patch_targets"), batch.pop("evidence")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        decoder = model.model.language_model
        layer, head = 4, 1
        hidden = out.hidden_states[layer]
        cos, sin = decoder.rotary_emb(hidden, batch["position_ids"])
        visual = batch["input_ids"] == model.config.image_token_index
        loss = evidence_head_loss(decoder.layers[layer], head, hidden, cos, sin, batch["attention_mask"],
                                  visual, targets, evidence)
    rows, positions, bits = evidence.unbind(-1)
    probs = out.attentions[layer][rows, head, positions]  # (Q, L)
    on_visual = probs[visual[rows]].view(len(rows), -1)
    target = evidence_targets(targets, rows, bits)
    expected = -(on_visual * target).sum(-1)[target.any(-1)].log().mean()
    assert torch.allclose(loss, expected, atol=1e-5)


@pytest.mark.parametrize("flags", [["--pointer-head", "4"], ["--pointer-layers", "8"]])
def test_training_refuses_a_pointer_outside_the_decoder(tmp_path, flags) -> None:
    from tokensieve.tiny.train import main

    with pytest.raises(ValueError, match="--pointer-layers must be in 0..7"):
        main([*flags, "--out", str(tmp_path)])


def test_fine_tuning_with_token_drop_and_several_pointers_saves_a_loadable_checkpoint(tmp_path) -> None:
    import json

    from tokensieve.cli import main

    status = main(["train-tiny", "--out", str(tmp_path), "--init-from", str(TINY_DIR), "--steps", "2", "--time-budget-min", "0",
                    "--pool-per-task", "4", "--extra-turns", "1", "--eval-every", "1", "--eval-items", "2",
                    "--drop-prob", "1", "--pointer-layers", "1,4", "--warmup", "1", "--task-weights", "counting=3"])
    saved = json.loads((tmp_path / "training_summary.json").read_text())
    assert status == 0 and saved["steps_done"] == 2 and [h["step"] for h in saved["history"]] == [1, 2]
    assert set(saved["history"][-1]["aux_losses"]) == {"probe", "pointer"}
    assert saved["settings"]["pointer_layers"] == [1, 4] and saved["settings"]["init_from"] == str(TINY_DIR)
    assert saved["settings"]["task_weights"] == {"counting": 3.0}
    model, _ = load_tiny(path=tmp_path)
    assert model.config.text_config.num_hidden_layers == 8


def test_pointer_layers_must_be_numbers_listed_once(tmp_path) -> None:
    from tokensieve.tiny.train import main

    for bad in ("1,x", "2,2"):
        with pytest.raises(SystemExit):
            main(["--pointer-layers", bad, "--out", str(tmp_path)])


def test_task_weights_parse_and_bias_the_rows_drawn(tmp_path) -> None:
    from tokensieve.tasks import TASKS
    from tokensieve.tiny.train import draw_rows, main, row_weights, task_weights

    assert task_weights("counting=3,relation=0.5") == {"counting": 3.0, "relation": 0.5}
    for bad in ("counting", "countng=2", "counting=0", "counting=x", "counting=2,counting=3"):
        with pytest.raises(SystemExit):
            main(["--task-weights", bad, "--out", str(tmp_path)])
    task = torch.arange(len(TASKS)).repeat_interleave(100)  # 100 rows per task
    generator = torch.Generator().manual_seed(0)
    counting = TASKS.index("counting")
    assert row_weights(task, {}) is None
    heavy = draw_rows(len(task), row_weights(task, {"counting": 1000.0}), 400, generator)
    assert (task[heavy] == counting).float().mean() > 0.95
    uniform = draw_rows(len(task), None, 4000, generator)
    assert 0.15 < (task[uniform] == counting).float().mean() < 0.25

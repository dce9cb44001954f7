"""What a cache-stage method sees: the entries held, their keys and values, attention over them, memory.

The attention a :class:`CacheView` gives is compared with the model's own eager attention weights
(``output_attentions``) of the unpruned model, in prefill and in a decode step, in a left-padded batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from tiny_models import PAD, VOCAB, build

import tokensieve
from tokensieve import compat
from tokensieve.methods.base import CacheView, Method


@dataclass
class Recorder(Method):
    """Keeps everything; records what layer ``layer`` shows, and counts passes in its memory."""

    layer: int = 1
    window: int | None = None
    seen: list = field(default_factory=list)

    name: ClassVar[str] = "recorder"
    stages: ClassVar[tuple[str, ...]] = ("cache",)
    visual: ClassVar[bool] = False

    def evict(self, view: CacheView) -> torch.Tensor | None:
        if view.layer == self.layer:
            memory = view.memory if view.memory is not None else torch.zeros(view.valid.shape)
            view.memory = memory + view.valid.float()
            self.seen.append(dict(attention=view.attention(self.window), keys=view.keys().clone(),
                                  values=view.values().clone(), memory=view.memory.clone(), new=view.new,
                                  prefill=view.prefill, positions=view.positions.clone()))
        return None


def _padded(gen: torch.Generator, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(1, VOCAB, (n,), generator=gen)
    return ids, (ids != PAD).long()


def test_cache_attention_equals_the_models_own_weights_in_prefill_and_decode():
    model = build("llama", "eager")
    gen = torch.Generator().manual_seed(0)
    ids, mask = _padded(gen, [9, 6])
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded batch
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = model(input_ids=token, attention_mask=step_mask, **compat.cache_argument(model, out.past_key_values),
                     position_ids=step_mask.cumsum(-1)[:, -1:] - 1, output_attentions=True)
    recorder = Recorder(layer=1)
    with torch.no_grad(), tokensieve.prune(model, recorder):
        pruned = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert torch.equal(pruned[:, ids.shape[1]], token[:, 0])
    prefill, decode = recorder.seen[:2]
    assert prefill["prefill"] and not decode["prefill"] and prefill["new"] == 9 and decode["new"] == 1
    real = mask.bool()
    expected = out.attentions[1] * real[:, None, :, None]  # padding query rows are zeros in the view
    assert torch.allclose(prefill["attention"], expected, atol=1e-5)
    assert torch.allclose(decode["attention"], step.attentions[1], atol=1e-5)
    full = out.past_key_values.layers[1]  # the plain model's cache, the decode step included
    assert torch.allclose(prefill["keys"], full.keys[:, :, :9], atol=1e-6)
    assert torch.allclose(decode["values"], full.values, atol=1e-6)
    # memory: one row per entry, zeros for the new entries, kept across passes
    assert torch.equal(decode["memory"][:, :-1], torch.full((2, 9), 2.0)) and torch.equal(decode["memory"][:, -1], torch.ones(2))


def test_a_window_of_queries_is_the_last_rows_of_the_pass():
    model = build("llama", "eager")
    gen = torch.Generator().manual_seed(1)
    ids, mask = _padded(gen, [8])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    recorder = Recorder(layer=2, window=3)
    with torch.no_grad(), tokensieve.prune(model, recorder):
        model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert torch.allclose(recorder.seen[0]["attention"], out.attentions[2][:, :, -3:], atol=1e-5)


def test_memory_follows_the_entries_through_evictions():
    """A method that evicts the oldest entry every pass and stores each entry's position in memory:
    after every pass the memory still names the entries held."""

    @dataclass
    class DropOldest(Method):
        seen: list = field(default_factory=list)
        name: ClassVar[str] = "drop-oldest"
        stages: ClassVar[tuple[str, ...]] = ("cache",)
        visual: ClassVar[bool] = False

        def evict(self, view: CacheView) -> torch.Tensor:
            memory = view.memory if view.memory is not None else torch.zeros(view.valid.shape)
            memory[:, -view.new:] = view.positions[:, -view.new:].float()
            view.memory = memory
            if view.layer == 0:
                self.seen.append((view.positions.clone(), memory.clone(), view.valid.clone()))
            first = view.valid.long().cumsum(1) == 1
            return view.valid & ~first

    model = build("llama")
    gen = torch.Generator().manual_seed(2)
    ids, mask = _padded(gen, [7, 5])
    method = DropOldest()
    with torch.no_grad(), tokensieve.prune(model, method):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert len(method.seen) == 4
    for positions, memory, valid in method.seen:
        assert torch.equal(memory[valid], positions[valid].float())


def test_the_report_names_the_entries_held_and_measures_their_storage():
    """StreamingLLM (2 sinks + a window of 4) on a left-padded batch: ``cache_kept_end`` lists, per layer,
    each sample's first two real positions and its last four; ``kv_bytes_stored_*`` equal what the
    cache tensors hold (the batch's padding entries included), and the analytic figure counts real
    entries only."""
    from transformers import DynamicCache

    model = build("llama")
    gen = torch.Generator().manual_seed(4)
    ids, mask = _padded(gen, [9, 6])
    cache = DynamicCache()
    with torch.no_grad(), tokensieve.prune(model, "streamingllm", sinks=2, window=4) as run:
        out = model.generate(input_ids=ids, attention_mask=mask, **compat.cache_argument(model, cache), max_new_tokens=3,
                             min_new_tokens=3, do_sample=False)
    total = out.shape[1]
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    for b, sample in enumerate(run.report.samples):
        first = int((mask[b] == 0).sum())  # left padding
        expected = [first, first + 1] + list(range(total - 1 - 4, total - 1))  # the last token is not cached
        assert sample.cache_kept_end == [expected] * len(model.model.layers)
        assert sample.cache_kept_prefill[0] == [first, first + 1] + list(range(ids.shape[1] - 4, ids.shape[1]))
        assert sample.kv_bytes_stored_end == stored // 2
        assert sample.kv_bytes_end == 6 * len(model.model.layers) * 2 * 2 * 8 * 4  # entries x layers x K,V x heads x dim x fp32
    assert run.report.samples[0].kv_bytes_stored_prefill >= run.report.samples[0].kv_bytes_stored_end


@pytest.mark.parametrize("name", ["h2o", "a2sf", "pagedeviction", "snapkv"])
def test_keep_one_keeps_every_entry_through_decoding(name):
    """``keep=1`` (kvpress's ``compression_ratio=0``) evicts nothing, also while decoding: logits and
    ids equal the plain model's."""
    model = build("llama")
    gen = torch.Generator().manual_seed(5)
    ids, mask = _padded(gen, [20, 14])
    options = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **options)
        with tokensieve.prune(model, name, keep=1.0):
            pruned = model.generate(input_ids=ids, attention_mask=mask, **options)
    assert torch.equal(plain.sequences, pruned.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, pruned.logits))


def test_a_ragged_batch_without_padding_keeps_its_masks():
    """Two unpadded prompts of equal length whose images differ (16 and 32 tokens) under FastV: after
    the drop the rows are ragged, so the engine must pass its own mask (not leave causality to SDPA);
    each sample's logits equal its logits alone."""
    from tiny_models import collate, samples

    model = build("llava")
    parts = samples("llava", model, [1, 2])
    width = max(len(p["ids"]) for p in parts)
    for p in parts:  # pad the text, not the batch: equal lengths, no padding tokens
        p["ids"] = p["ids"][:1] + [5] * (width - len(p["ids"])) + p["ids"][1:]
    with torch.no_grad(), tokensieve.prune(model, "fastv", layer=1, keep=0.5):
        together = model(**collate("llava", parts)).logits[:, -1]
        for i, part in enumerate(parts):
            alone = model(**collate("llava", [part])).logits[0, -1]
            assert torch.allclose(together[i], alone, atol=1e-4), (i, (together[i] - alone).abs().max())


@dataclass
class Receiver(Method):
    """Keeps everything; records, at one layer, what ``received`` gives for random query weights."""

    layer: int = 1
    seen: list = field(default_factory=list)

    name: ClassVar[str] = "receiver"
    stages: ClassVar[tuple[str, ...]] = ("cache",)
    visual: ClassVar[bool] = False

    def evict(self, view: CacheView) -> torch.Tensor | None:
        if view.layer == self.layer:
            weights = torch.rand(view.valid.shape[0], view.new, generator=torch.Generator().manual_seed(view.new))
            self.seen.append((weights, view.received(weights)))
        return None


def test_attention_received_in_blocks_of_queries_is_the_weighted_sum_of_the_models_weights(monkeypatch):
    """``received`` sums the eager attention weights of the unpruned model over the pass's queries, with
    the given weights, also when the queries span several blocks (block of 4 for a 13-token prompt)."""
    from tokensieve.engine import cache_side

    monkeypatch.setattr(cache_side, "QUERY_CHUNK", 4)
    model = build("llama", "eager")
    ids, mask = _padded(torch.Generator().manual_seed(5), [13, 10])
    with torch.no_grad():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, output_attentions=True)
    receiver = Receiver(layer=1)
    with torch.no_grad(), tokensieve.prune(model, receiver):
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    weights, got = receiver.seen[0]
    expected = torch.einsum("bhqm,bq->bhm", out.attentions[1] * mask.bool()[:, None, :, None], weights)
    assert got.shape == (2, 4, 13) and torch.allclose(got, expected, atol=1e-5)

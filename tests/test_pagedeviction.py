"""PagedEviction and its paged KV cache, against a reference written here from the paper.

The reference (:class:`PaperPagedEviction`) is the algorithm of Chitty-Venkata et al., arXiv
2509.04377, on a decoder run layer by layer from its parts (``LayerLoop`` of
``test_reference_kv_methods.py``: batch 1, eager attention, the tiny random Llama with sharpened
attention), its cache one contiguous tensor per layer cut into blocks of consecutive entries: at the
prefill the top-``budget`` token scores stay (in order); whenever a decode step fills the newest block
of a cache holding more than ``budget`` entries, the block of lowest mean score among all but the
first and the newest goes. The token scores are the paper's ``||v|| / ||k||`` and, for the variants,
the authors' prototype's (``modeling_llama.py`` ``get_token_score``: norms averaged over the heads).
Compared: the positions each layer holds after the prefill and after 16 forced decode steps, and the
logits of every step, to 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from test_reference_kv_methods import LOGITS_ATOL, STEPS, LayerLoop, _compare, _model, _prompt, _reference_run
from tiny_models import PAD
from transformers import DynamicCache, StaticCache

import tokensieve
from tokensieve import compat
from tokensieve.cache import LedgerCache
from tokensieve.methods.base import CacheView
from tokensieve.methods.pagedeviction import PagedEviction, token_scores
from tokensieve.paged_cache import PagedCache

PROTOTYPE_EPS = 1e-6  # get_token_score: 1.0 / (key_norms + 1e-6)


def reference_scores(keys: torch.Tensor, values: torch.Tensor, score: str) -> torch.Tensor:
    """``(m,)`` token scores from one layer's ``keys``/``values`` ``(H_kv, m, D)``: the paper's ratio of
    the value's L2 norm to the key's, or a prototype variant, on norms averaged over the heads."""
    k, v = keys.norm(dim=-1).mean(0), values.norm(dim=-1).mean(0)
    return {"paper": v / k, "inv_key": 1.0 / (k + PROTOTYPE_EPS), "value": v, "key_plus_value": k + v}[score]


class PaperPagedEviction(LayerLoop):
    """The paper's prefill eviction to the budget, then one block evicted each time the newest fills."""

    def __init__(self, model, budget: int, block_size: int, score: str) -> None:
        super().__init__(model)
        self.budget, self.block_size, self.score = budget, block_size, score

    def compress(self, i, q, k, probs, n):
        scores = reference_scores(self.keys[i], self.values[i], self.score)
        m, size = scores.shape[0], self.block_size
        if not self.seen:  # prefill: evict tokens down to the budget, before the blocks are filled
            top = scores.argsort(descending=True, stable=True)[: self.budget]  # ties: the earlier token
            return None if m <= self.budget else top.sort().values
        if m % size or m <= self.budget:  # the newest block is not full yet, or nothing is over budget
            return None
        blocks = scores.view(-1, size).mean(1)
        if blocks.shape[0] < 3:
            return None
        evict = 1 + int(blocks[1:-1].argmin())  # never the first block, never the newest
        return torch.cat([torch.arange(evict * size), torch.arange((evict + 1) * size, m)])


def _engine(prompt: list[int], tokens: list[int], **options):
    """Under ``prune()``, one forward for the prompt and one per forced token: (logits, kept after the
    prefill, kept at the end, report), the cache, and its layers' copied-entry counts after the prefill."""
    model = _model()
    cache = DynamicCache()
    keyword = compat.cache_keyword(type(model).forward)
    logits = []
    with torch.no_grad(), tokensieve.prune(model, "pagedeviction", **options) as run:
        ids = torch.tensor([prompt])
        for step in range(len(tokens) + 1):
            out = model(input_ids=ids, attention_mask=torch.ones(1, len(prompt) + step, dtype=torch.long),
                        use_cache=True, **{keyword: cache})
            logits.append(out.logits[0, -1])
            if step == 0:
                copied = [layer.copied for layer in cache.layers]
            if step < len(tokens):
                ids = torch.tensor([[tokens[step]]])
    sample = run.report.samples[0]
    return (logits, sample.cache_kept_prefill, sample.cache_kept_end, run.report), cache, copied


@pytest.mark.parametrize("score,budget,block_size,length", [
    ("paper", 18, 4, 40), ("paper", 20, 5, 36), ("inv_key", 16, 4, 30), ("value", 12, 3, 33),
    ("key_plus_value", 21, 4, 40),
])
def test_kept_positions_and_logits_match_the_reference(score, budget, block_size, length):
    """Prefill eviction to the budget, then whole-block evictions over 16 decode steps; the decode
    evictions free blocks without copying an entry."""
    prompt = _prompt(10 + length, length)
    expected = _reference_run(PaperPagedEviction(_model(), budget, block_size, score), prompt)
    got, cache, copied = _engine(prompt, expected[0], budget=budget, block_size=block_size, score=score)
    _compare(got, expected, "shared")  # one block layout serves every head
    assert isinstance(cache, PagedCache)
    assert max(got[3].samples[0].cache_lengths_end) < budget + STEPS, "some block was evicted"
    assert [layer.copied for layer in cache.layers] == copied, "a decode eviction copied entries"
    for layer, kept in zip(cache.layers, got[2]):
        assert layer.lengths == [len(kept)] and layer.held_blocks() == -(-len(kept) // block_size)


def test_the_paper_score_keeps_a_large_value_with_a_small_key():
    """Pins the orientation: ``||v|| / ||k||``, high kept (a port that swaps the arguments computes
    ``||k|| / ||v||`` and would keep the opposite token)."""
    keys = torch.zeros(1, 2, 3, 4)
    values = torch.zeros(1, 2, 3, 4)
    keys[..., 0] = torch.tensor([0.1, 5.0, 1.0])  # token 0: small key, large value
    values[..., 0] = torch.tensor([5.0, 0.1, 1.0])  # token 1: large key, small value
    scores = token_scores(keys, values, "paper")[0]
    assert scores[0] > scores[2] > scores[1]
    method = PagedEviction(budget=2, block_size=1)
    method.bind(1)
    ones = torch.ones(1, 3, dtype=torch.bool)
    view = CacheView(0, torch.arange(3)[None], ones, ones, 3, prefill=True, new=3,
                     keys=lambda: keys, values=lambda: values)
    assert method.evict(view).tolist() == [[True, False, True]]


def test_a_budget_that_holds_everything_is_the_plain_model():
    """Greedy ids and every step's logits equal the plain model's, bit for bit, through generate()."""
    model = _model()
    ids = torch.tensor([_prompt(7, 15)])
    run_kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 10,
                  "min_new_tokens": 10, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = model.generate(**run_kwargs)
        with tokensieve.prune(model, "pagedeviction", budget=10_000, block_size=4) as run:
            pruned = model.generate(**run_kwargs)
    assert torch.equal(plain.sequences, pruned.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, pruned.logits))
    assert run.report.samples[0].cache_lengths_end == [15 + 9] * 4


def test_a_left_padded_batch_gives_each_sample_its_result_alone():
    """Prompts of 22 and 15 tokens, left-padded, ``keep=0.5``: each sample its own budget and block
    table; its padding entries hold no slot of any block."""
    model = _model()
    prompts = [_prompt(8, 22), _prompt(9, 15)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    cache = DynamicCache()
    options = {"keep": 0.5, "block_size": 3}
    with torch.no_grad(), tokensieve.prune(model, "pagedeviction", **options) as run:
        out = model.generate(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             **{compat.cache_keyword(type(model).forward): cache})
    for b, prompt in enumerate(prompts):
        pad = width - len(prompt)  # the report counts positions in the padded input
        batch_kept = [[p - pad for p in layer] for layer in run.report.samples[b].cache_kept_end]
        (logits, _, kept, _), _, _ = _engine(prompt, out.sequences[b, width:-1].tolist(), **options)
        assert kept == batch_kept, f"sample {b}: kept positions"
        assert [layer.lengths[b] for layer in cache.layers] == [len(k) for k in kept], f"sample {b}: entries stored"
        for step, alone in enumerate(logits):
            assert torch.allclose(out.logits[step][b], alone, atol=LOGITS_ATOL), (b, step)


def test_blocks_held_stay_bounded_over_a_512_token_decode():
    """Prompt 48, budget 32, blocks of 8, 512 decode steps: after every step each layer holds at most
    ``32 / 8 + 1`` blocks and its pool has no more in memory (the prefill's freed blocks were given
    back), the pool stops growing after the first step and the report's stored bytes stay under 40
    entries a layer; without eviction the blocks grow with the text."""
    model = _model()
    prompt, steps, budget, size = _prompt(11, 48), 512, 32, 8
    keyword = compat.cache_keyword(type(model).forward)
    entry = 2 * 2 * 8 * 4  # keys and values, 2 KV heads of 8 fp32 numbers
    for options, bound in (({"budget": budget}, budget // size + 1), ({"budget": 10_000}, None)):
        cache = DynamicCache()
        ids = torch.tensor([prompt])
        with torch.no_grad(), tokensieve.prune(model, "pagedeviction", block_size=size, **options) as run:
            for step in range(steps + 1):
                out = model(input_ids=ids, attention_mask=torch.ones(1, len(prompt) + step, dtype=torch.long),
                            use_cache=True, **{keyword: cache})
                ids = out.logits[:, -1:].argmax(-1)
                if bound is None:
                    continue
                assert max(cache.held_blocks()) <= bound, f"step {step}: {cache.held_blocks()} blocks held"
                assert max(cache.pool_blocks()) <= bound, f"step {step}: pools of {cache.pool_blocks()} blocks"
                if step == 1:
                    pool = cache.stored_bytes()
                if step >= 1:
                    assert cache.stored_bytes() == pool, f"step {step}: the pool grew"
                assert run.report.samples[0].kv_bytes_stored_end <= 4 * (budget + size) * entry
        if bound is None:
            assert cache.held_blocks() == [-(-(len(prompt) + steps) // size)] * 4


def test_gather_frees_whole_blocks_and_copies_only_what_a_block_boundary_forces():
    """Blocks of 4 over 10 entries (``[0-3] [4-7] [8-9]``) in two sequences: dropping the middle block
    copies nothing; keeping 2, 3, 4 moves them to slots 0-2 of one block; the freed blocks leave the
    pool (more are free than there are sequences); the views equal a plain gather."""
    cache = PagedCache(4)
    keys, values = torch.randn(2, 2, 10, 3), torch.randn(2, 2, 10, 3)
    cache.update(keys, values, 0)
    assert cache.held_blocks() == [6] and cache.pool_blocks() == [6]
    cache.gather(0, torch.tensor([[0, 1, 2, 3, 8, 9], [2, 2, 2, 2, 3, 4]]))
    layer = cache.layers[0]
    assert layer.copied == 3 and layer.lengths == [6, 3]
    assert layer.tables == [[0, 1], [2]] and cache.pool_blocks() == [3], "compacted: blocks 0, 2 and 3 renumbered"
    expected = torch.stack([keys[0, :, [0, 1, 2, 3, 8, 9]], keys[1, :, [2, 2, 2, 2, 3, 4]]])
    assert torch.equal(layer.keys, expected)
    assert torch.equal(layer.values[1, :, 3:], values[1, :, 2:5])
    cache.update(keys[:, :, :2], values[:, :, :2], 0)  # sequence 1 needs a second block: the pool grows by one
    assert layer.tables[1] == [2, 3] and cache.pool_blocks() == [4] and layer.copied == 3
    cache.gather(0, torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [7] * 8]))  # sequence 1: its first block goes
    assert layer.copied == 3 and layer.tables == [[0, 1], [3]] and layer.pool.free == [2]
    assert torch.equal(layer.keys[1], keys[1, :, 1:2].expand(-1, 8, -1))  # entry 4 (2nd appended), padding too


def test_rotating_keys_writes_the_entries_back_into_their_blocks():
    """``rotate_keys`` (``LedgerCache``'s, through the view's write-back) on a ragged paged layer gives
    the entries a contiguous ``LedgerCache`` holding the same view gets."""
    model = _model()
    rotary, attn = model.model.rotary_emb, model.model.layers[0].self_attn
    keys, values = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    paged = PagedCache(4)
    paged.update(keys, values, 0)
    paged.gather(0, torch.tensor([[0, 1, 2, 3, 4, 5], [3, 3, 3, 3, 4, 5]]))
    plain = LedgerCache()
    plain.update(paged.layers[0].keys, paged.layers[0].values, 0)
    delta = torch.tensor([[5, -2, 7, 1, 0, 3], [0, 0, 0, 4, -1, 9]])  # padding columns: 0, as the engine gives
    paged.rotate_keys(0, delta, rotary, attn)
    plain.rotate_keys(0, delta, rotary, attn)
    assert not torch.allclose(paged.layers[0].keys[0, :, :4], keys[0, :, :4], atol=1e-3), "the keys were rotated"
    assert torch.equal(paged.layers[0].keys[0], plain.layers[0].keys[0])
    assert torch.equal(paged.layers[0].keys[1, :, 3:], plain.layers[0].keys[1, :, 3:])
    assert torch.equal(paged.layers[0].keys[1, :, :3], plain.layers[0].keys[1, :, 3:4].expand(-1, 3, -1))


def test_another_kind_of_cache_or_a_filled_one_is_refused():
    model = _model()
    ids = torch.tensor([_prompt(12, 8)])
    keyword = compat.cache_keyword(type(model).forward)
    filled = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{keyword: filled})
        with tokensieve.prune(model, "pagedeviction", budget=8, block_size=4):
            with pytest.raises(ValueError, match="empty DynamicCache"):
                model(input_ids=ids, use_cache=True, **{keyword: filled})
            with pytest.raises(TypeError, match="cache_implementation"):
                model(input_ids=ids, use_cache=True, **{keyword: StaticCache(config=model.config, max_cache_len=16)})


@pytest.mark.parametrize("options,error,match", [
    ({"block_size": 0}, ValueError, "block_size"),
    ({"block_size": -2}, ValueError, "block_size"),
    ({"block_size": 2.5}, TypeError, "block_size"),
    ({"score": "ratio"}, TypeError, "score must be one of 'paper'"),
    ({"budget": 31, "block_size": 16}, ValueError, "two blocks"),
    ({"budget": 0}, ValueError, "budget"),
    ({"keep": 0.0}, ValueError, "keep"),
    ({"keep": 0.5, "budget": 64}, ValueError, "not both"),
])
def test_bad_options_raise(options, error, match):
    with pytest.raises(error, match=match):
        PagedEviction(**options)


def test_a_filled_cache_is_refused_and_left_as_it_was():
    from tiny_models import build

    model = build("llama", "eager")
    ids = torch.randint(1, 60, (1, 12), generator=torch.Generator().manual_seed(7))
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids[:, :8], **compat.cache_argument(model, cache), use_cache=True)
        with pytest.raises(ValueError, match="holds 8 tokens"):
            with tokensieve.prune(model, "pagedeviction", budget=32, block_size=8):
                model(input_ids=ids[:, 8:], **compat.cache_argument(model, cache), use_cache=True)
    assert type(cache) is DynamicCache and cache.get_seq_length() == 8

"""H2O, SnapKV and A2SF against references written in this file from the authors' releases.

Each reference is the release's cache update on a decoder whose layers are run from their parts (input
norm, q/k/v projections, rotary embedding, attention, o-projection, residual, post-attention norm,
MLP, residual), batch 1 and without padding, as the releases run. The releases select per attention
head, and so does each reference (``per_head=True``, tokensieve's default ``heads="each"``): each KV
head keeps its own entries, physically, as the releases gather them; the test model has 2 KV heads for
4 query heads, so a KV head selects by its query-head group's summed score (the current A2SF release's
rule for GQA; the H2O and SnapKV releases need one KV head per query head). With ``per_head=False``
each reference makes the change ``heads="shared"`` documents: the scores summed over the layer's query
heads and one selection for every head. Everything else is the release's rule as written.

Compared, on the tiny random Llama (4 layers, 4 query and 2 key-value heads, eager attention, its
attention sharpened: see ``_model``): the original positions each layer's cache holds after the
prefill and after 16 forced decode steps, and the logits of the prompt's last token and of every
step, to ``LOGITS_ATOL`` (measured: 1.2e-7 at most); per head, also each KV head's positions.
Nothing here calls tokensieve's helpers: only ``tokensieve.prune`` is run, and its report
(``cache_kept_*``, ``cache_heads_*``, the cache lengths) and the model's logits are read.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from reference_models import rope, sharpened_llama
from tiny_models import PAD, VOCAB

import tokensieve
from tokensieve import compat

LOGITS_ATOL = 1e-4  # fp32: the engine recomputes attention rows; summation order only
STEPS = 16


def _model() -> torch.nn.Module:
    return sharpened_llama("eager")


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _top_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(R, k)``: :func:`_top` of each row of ``scores`` ``(R, n)``."""
    return torch.stack([_top(row, k) for row in scores])


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest of ``scores`` ``(n,)``, in score order, ties to the earlier index.
    The releases call ``torch.topk``, whose order among equal scores is unspecified (it differs between
    CPU and GPU, and with the tensor's length); SnapKV's max pooling makes equal scores common, and
    tokensieve documents this tie rule, so the references use it in place of ``topk``."""
    return scores.argsort(descending=True, stable=True)[:k]


class LayerLoop:
    """A Llama decoder run layer by layer from its parts, with a KV cache per layer that a release's
    rule (``compress``) trims after each layer's attention, as the releases do inside the attention.

    ``shift=False``: keys are cached rotated at their token's position (every release here by
    default). ``shift=True``: keys are cached unrotated and rotated at their index in the cache at
    every forward, the query at the cache's length (H2O's ``H2OLlamaAttention_streaming``).
    """

    def __init__(self, model, shift: bool = False, per_head: bool = True) -> None:
        self.model, self.shift, self.per_head = model, shift, per_head
        layers = model.model.layers
        self.kv_heads = model.config.num_key_value_heads
        self.keys: list[torch.Tensor | None] = [None] * len(layers)  # (H_kv, m, D), each head its own entries
        self.values: list[torch.Tensor | None] = [None] * len(layers)
        self.positions: list[torch.Tensor] = [torch.zeros(self.kv_heads, 0, dtype=torch.long) for _ in layers]
        self.seen = 0

    def compress(self, i: int, q: torch.Tensor, k: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor | None:
        """``(R, m')`` indices of layer ``i``'s cache entries to keep per KV head (``R = H_kv``), or for
        every head (``R = 1``); None: all. From this forward's rotated queries ``q`` ``(H, n, D)``, the
        keys ``k`` ``(H, m, D)`` (repeated to the query heads) and the attention ``probs`` ``(H, n, m)``;
        ``n`` entries were just appended."""
        raise NotImplementedError

    def reduce(self, scores: torch.Tensor) -> torch.Tensor:
        """``(H, m)`` per query head -> ``(H_kv, m)`` per KV head (its group summed), or ``(1, m)``
        summed over every head where one selection serves them all."""
        if not self.per_head:
            return scores.sum(0, keepdim=True)
        return scores.view(self.kv_heads, -1, scores.shape[-1]).sum(1)

    @staticmethod
    def to_query_heads(keep: torch.Tensor, heads: int) -> torch.Tensor:
        """``(R, m')`` kept indices -> ``(heads, m')``, each query head its KV head's."""
        return keep.expand(heads, -1) if keep.shape[0] == 1 else keep.repeat_interleave(heads // keep.shape[0], 0)

    def _attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        attn = self.model.model.layers[i].self_attn
        d, n = attn.head_dim, x.shape[0]
        q = attn.q_proj(x).view(n, -1, d).transpose(0, 1)
        k = attn.k_proj(x).view(n, -1, d).transpose(0, 1)
        v = attn.v_proj(x).view(n, -1, d).transpose(0, 1)
        past = 0 if self.keys[i] is None else self.keys[i].shape[1]
        text = torch.arange(self.seen, self.seen + n)
        q = rope(q, torch.arange(past, past + n) if self.shift else text, self.model)
        if not self.shift:
            k = rope(k, text, self.model)
        if self.keys[i] is not None:
            k, v = torch.cat([self.keys[i], k], 1), torch.cat([self.values[i], v], 1)
        self.keys[i], self.values[i] = k, v
        self.positions[i] = torch.cat([self.positions[i], text.expand(self.kv_heads, -1)], 1)
        if self.shift:
            k = rope(k, torch.arange(k.shape[1]), self.model)
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(d)
        causal = torch.ones(n, k.shape[1], dtype=torch.bool).tril(k.shape[1] - n)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1, dtype=torch.float32)
        out = attn.o_proj((probs @ v).transpose(0, 1).reshape(n, -1))
        keep = self.compress(i, q, k, probs, n)
        if keep is not None:
            keep = keep.expand(self.kv_heads, -1)
            index = keep[..., None].expand(-1, -1, d)
            self.keys[i], self.values[i] = self.keys[i].gather(1, index), self.values[i].gather(1, index)
            self.positions[i] = self.positions[i].gather(1, keep)
        return out

    @torch.no_grad()
    def forward(self, ids: list[int]) -> torch.Tensor:
        """Logits ``(n, vocab)`` of ``ids`` fed after what the caches hold."""
        lm = self.model.model
        h = lm.embed_tokens(torch.tensor(ids))
        for i, layer in enumerate(lm.layers):
            h = h + self._attention(i, layer.input_layernorm(h))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.seen += len(ids)
        return self.model.lm_head(lm.norm(h))

    def kept(self) -> list[list[int]]:
        """Per layer, the positions some head holds (the union tokensieve's cache stores)."""
        return [sorted(set(p.flatten().tolist())) for p in self.positions]

    def kept_heads(self) -> list[list[list[int]]]:
        """Per layer, per KV head, the positions it holds."""
        return [[sorted(h.tolist()) for h in p] for p in self.positions]


class ReleaseH2O(LayerLoop):
    """FMInference/H2O ``h2o_hf/utils_real_drop/modify_llama.py``: ``H2OKVCache_LayerWise`` as
    ``H2OLlamaAttention.forward`` calls it with each forward's softmax weights.

    ``_update_hh_score``: the weights summed over the batch and the queries, ``(heads, keys)``; from the
    second call on, the earlier score is added to every column but the new ones. ``__call__``: a cache
    of at most ``hh_size + recent_size`` entries is left as it is; else the ``recent_size`` last
    entries and the top ``hh_size`` scores of the others (indices sorted) are kept, with their scores.
    The release takes the top per head (``reduce``: per KV head, or on the scores summed over heads).
    """

    def __init__(self, model, hh_size: int, recent_size: int, shift: bool = False, per_head: bool = True) -> None:
        super().__init__(model, shift, per_head)
        self.hh_size, self.recent_size = hh_size, recent_size
        self.hh_score: list[torch.Tensor | None] = [None] * len(model.model.layers)

    def compress(self, i, q, k, probs, n):
        current = probs.sum(1)  # _update_hh_score: (heads, keys)
        if self.hh_score[i] is not None:
            current[:, :-n] += self.hh_score[i]
        self.hh_score[i] = current
        seq_len = current.shape[-1]
        if seq_len <= self.hh_size + self.recent_size:
            return None
        select_hh_scores = self.reduce(current)[:, : seq_len - self.recent_size]
        keep_topk = _top_rows(select_hh_scores, self.hh_size).sort(-1).values
        recent = torch.arange(seq_len - self.recent_size, seq_len).expand(keep_topk.shape[0], -1)
        keep = torch.cat([keep_topk, recent], 1)
        self.hh_score[i] = current.gather(1, self.to_query_heads(keep, current.shape[0]))
        return keep


class ReleaseSnapKV(LayerLoop):
    """FasterDecoding/SnapKV ``snapkv/monkeypatch/snapkv_utils.py``: ``SnapKVCluster.update_kv``, which
    ``llama_hijack_4_37.py`` ``llama_flash_attn2_forward`` calls in the prefill only, on the rotated
    queries and the keys already repeated to the query heads (``repeat_kv`` moved ahead).

    A prompt shorter than ``max_capacity_prompt`` is kept whole. Else: the last ``window_size``
    queries against every key, a causal mask (``finfo.min``) inside the window, fp32 softmax; the
    weights of the earlier keys summed over the window's queries; ``avg_pool1d`` or ``max_pool1d``
    (``kernel_size``, padding ``kernel_size // 2``, stride 1); the top ``max_capacity_prompt -
    window_size`` earlier entries (in score order, unsorted, as the release gathers them) and the
    window. The release takes the top per head (``reduce``: per KV head, or summed over heads).
    """

    def __init__(self, model, max_capacity_prompt: int, window_size: int, kernel_size: int, pooling: str,
                 per_head: bool = True) -> None:
        super().__init__(model, per_head=per_head)
        self.max_capacity_prompt, self.window_size = max_capacity_prompt, window_size
        self.kernel_size, self.pooling = kernel_size, pooling

    def compress(self, i, q, k, probs, n):
        if self.seen:  # decode: update_kv is only reached when the keys are the whole prompt
            return None
        _, q_len, head_dim = q.shape
        if q_len < self.max_capacity_prompt:
            return None
        w = self.window_size
        attn_weights = q[:, -w:] @ k.transpose(1, 2) / math.sqrt(head_dim)
        mask = torch.full((w, w), torch.finfo(attn_weights.dtype).min)
        cond = torch.arange(w)
        mask.masked_fill_(cond < (cond + 1).view(w, 1), 0)
        attn_weights[:, -w:, -w:] += mask
        attn_weights = torch.softmax(attn_weights, dim=-1, dtype=torch.float32)
        attn_weights_sum = attn_weights[:, -w:, :-w].sum(dim=-2)
        pool = F.avg_pool1d if self.pooling == "avgpool" else F.max_pool1d
        attn_cache = pool(attn_weights_sum, kernel_size=self.kernel_size, padding=self.kernel_size // 2, stride=1)
        indices = _top_rows(self.reduce(attn_cache), self.max_capacity_prompt - w)
        return torch.cat([indices, torch.arange(q_len - w, q_len).expand(indices.shape[0], -1)], 1)


class ReleaseA2SFStep(LayerLoop):
    """Dirac-Notation/A2SF ``utils_real_drop/kv_llama.py`` at commit e86c7e4 (March 2025):
    ``LlamaKVCache.update``, called by ``LlamaAttention.forward`` with each forward's softmax weights.

    Once the tokens seen exceed ``streaming_budget + select_budget + recent_budget``: this forward's
    rows weighted ``forgetting_factor ** (N-1-q)`` and summed over the queries, the earlier score
    times the factor added to every column but the last; the first ``streaming_budget`` entries, the
    top ``select_budget`` of the middle ones (sorted) and the last ``recent_budget`` kept, with their
    scores. The release takes the top per head (``reduce``: per KV head, or summed over heads). (The
    release does nothing, scores included, while the budget is not exceeded: every prompt here exceeds it.)
    """

    def __init__(self, model, streaming: int, select: int, recent: int, forgetting_factor: float,
                 per_head: bool = True) -> None:
        super().__init__(model, per_head=per_head)
        self.streaming, self.select, self.recent, self.alpha = streaming, select, recent, forgetting_factor
        self.score: list[torch.Tensor | float] = [0.0] * len(model.model.layers)
        self.seq_length = [0] * len(model.model.layers)

    def compress(self, i, q, k, probs, n):
        self.seq_length[i] += n
        if self.seq_length[i] <= self.streaming + self.select + self.recent:
            return None
        forgetting = (self.alpha ** (torch.arange(n, 0, -1) - 1)).view(1, -1, 1)
        current = (forgetting * probs).sum(dim=1)
        current[:, :-1] += self.alpha * self.score[i]
        m = current.shape[-1]
        middle = self.reduce(current)[:, self.streaming: m - self.recent]
        chosen = _top_rows(middle, self.select).sort(-1).values + self.streaming
        rows = chosen.shape[0]
        keep = torch.cat([torch.arange(self.streaming).expand(rows, -1), chosen,
                          torch.arange(m - self.recent, m).expand(rows, -1)], 1)
        self.score[i] = current.gather(1, self.to_query_heads(keep, current.shape[0]))
        return keep


class ReleaseA2SFPrefill(LayerLoop):
    """Dirac-Notation/A2SF, current release: ``utils_real_drop/policies/a2sf.py`` ``A2SFPolicy``
    (``prepare_prefill``: query weights ``forgetting_factor ** (seq_len_q - 1 - q)``), ``attention.py``
    ``compressed_attention`` (prefill only: the weighted softmax rows summed over the queries and the
    query heads of each KV head's group) and ``policies/base.py`` ``_topk_with_recent`` (a cache of at
    most ``total_budget`` entries is kept; else the top ``total_budget - recent_budget`` of the entries
    before the last ``recent_budget`` (sorted), and those). The release fixes ``recent_budget`` at 16;
    here it is a parameter so a short prompt exercises it. The release sums a KV head's group
    (``reduce``; or all the layer's heads where one selection serves them all).
    """

    def __init__(self, model, total_budget: int, recent_budget: int, forgetting_factor: float,
                 per_head: bool = True) -> None:
        super().__init__(model, per_head=per_head)
        self.total_budget, self.recent_budget, self.alpha = total_budget, recent_budget, forgetting_factor

    def compress(self, i, q, k, probs, n):
        if self.seen:  # policy.is_prefilled: the fast path, no scores
            return None
        window = self.alpha ** torch.arange(n - 1, -1, -1, dtype=torch.float32)
        acc_scores = self.reduce((probs * window.view(1, n, 1)).sum(dim=1))
        seq_len_k = acc_scores.shape[-1]
        if seq_len_k <= self.total_budget:
            return None
        head_len = seq_len_k - self.recent_budget
        head_idx = _top_rows(acc_scores[:, :head_len], self.total_budget - self.recent_budget).sort(-1).values
        return torch.cat([head_idx, torch.arange(head_len, seq_len_k).expand(head_idx.shape[0], -1)], 1)


def _reference_run(ref: LayerLoop, prompt: list[int], steps: int = STEPS):
    """Greedy tokens, logits of the prompt's last token and of each step, kept positions after the
    prefill and at the end."""
    logits = [ref.forward(prompt)[-1]]
    after_prefill, heads_prefill = ref.kept(), ref.kept_heads()
    tokens = []
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        logits.append(ref.forward([tokens[-1]])[-1])
    return tokens, logits, after_prefill, ref.kept(), heads_prefill, ref.kept_heads()


def _engine_steps(method: str, prompt: list[int], tokens: list[int], **options):
    """Under ``prune()``: logits of the prompt's last token and of each forced token (one forward
    each), the report's kept positions after the prefill and at the end, and the report."""
    from transformers import DynamicCache

    model = _model()
    cache = DynamicCache()
    keyword = compat.cache_keyword(type(model).forward)
    logits = []
    with torch.no_grad(), tokensieve.prune(model, method, **options) as run:
        ids = torch.tensor([prompt])
        for step in range(len(tokens) + 1):
            out = model(input_ids=ids, attention_mask=torch.ones(1, len(prompt) + step, dtype=torch.long),
                        use_cache=True, **{keyword: cache})
            logits.append(out.logits[0, -1])
            if step < len(tokens):
                ids = torch.tensor([[tokens[step]]])
    sample = run.report.samples[0]
    return logits, sample.cache_kept_prefill, sample.cache_kept_end, run.report


def _compare(got, expected, heads: str) -> None:
    logits, after_prefill, end, report = got
    _, ref_logits, ref_prefill, ref_end, ref_heads_prefill, ref_heads_end = expected
    assert after_prefill == ref_prefill, "kept positions after the prefill"
    assert end == ref_end, f"kept positions after {STEPS} decode steps"
    if heads == "each":  # a layer whose heads all kept the same entries reports no per-head sets
        sample = report.samples[0]
        for got_heads, ref_heads, union in ((sample.cache_heads_prefill, ref_heads_prefill, ref_prefill),
                                            (sample.cache_heads_end, ref_heads_end, ref_end)):
            for layer, (g, r, u) in enumerate(zip(got_heads, ref_heads, union)):
                assert g == (r if any(h != u for h in r) else []), f"layer {layer}: positions per KV head"
    assert len(logits) == len(ref_logits) == STEPS + 1
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert torch.allclose(a, b, atol=LOGITS_ATOL), f"step {step}: max diff {(a - b).abs().max():.2e}"


def _held_per_head(report, heads: str, budget: int) -> None:
    """Each head holds ``budget`` entries (per head: the union is what the cache stores, at least that)."""
    sample = report.samples[0]
    if heads == "shared":
        assert sample.cache_lengths_end == [budget] * 4
        return
    assert all(n >= budget for n in sample.cache_lengths_end)
    for layer in sample.cache_heads_end:
        assert all(len(h) == budget for h in layer)


HEADS = ["each", "shared"]


@pytest.mark.parametrize("hh,recent,positions,heads", [(6, 4, "keep", "each"), (7, 0, "keep", "each"),
                                                        (6, 4, "keep", "shared"), (7, 0, "keep", "shared"),
                                                        (5, 3, "shift", "shared")])
def test_h2o_matches_the_release(hh, recent, positions, heads):
    """Eviction at the prefill and at every one of 16 decode steps, each layer back to ``hh + recent``."""
    prompt = _prompt(1, 20)
    expected = _reference_run(ReleaseH2O(_model(), hh, recent, shift=positions == "shift", per_head=heads == "each"),
                              prompt)
    got = _engine_steps("h2o", prompt, expected[0], budget=hh + recent, window=recent, positions=positions, heads=heads)
    _compare(got, expected, heads)
    _held_per_head(got[3], heads, hh + recent)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("capacity,window,kernel,pooling",
                         [(10, 4, 5, "avgpool"), (12, 3, 7, "maxpool"), (9, 2, 1, "avgpool")])
def test_snapkv_matches_the_release(capacity, window, kernel, pooling, heads):
    """One eviction after the prefill; the 16 decode steps only append."""
    prompt = _prompt(2, 24)
    expected = _reference_run(ReleaseSnapKV(_model(), capacity, window, kernel, pooling, per_head=heads == "each"),
                              prompt)
    got = _engine_steps("snapkv", prompt, expected[0], budget=capacity, window=window, kernel_size=kernel,
                        pooling=pooling, heads=heads)
    _compare(got, expected, heads)
    _held_per_head(got[3], heads, capacity + STEPS)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("sinks,select,recent,alpha", [(2, 5, 3, 0.5), (0, 6, 4, 0.9), (1, 6, 2, 0.0)])
def test_a2sf_every_step_matches_the_release(sinks, select, recent, alpha, heads):
    """``mode="step"``: sinks, forgetting-weighted scores and a recent window, evicted after every pass."""
    prompt = _prompt(3, 20)
    expected = _reference_run(ReleaseA2SFStep(_model(), sinks, select, recent, alpha, per_head=heads == "each"),
                              prompt)
    got = _engine_steps("a2sf", prompt, expected[0], budget=sinks + select + recent, sinks=sinks, window=recent,
                        alpha=alpha, heads=heads)
    _compare(got, expected, heads)
    _held_per_head(got[3], heads, sinks + select + recent)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("budget,recent,alpha", [(10, 4, 0.8), (8, 2, 0.95)])
def test_a2sf_at_prefill_matches_the_release(budget, recent, alpha, heads):
    """``mode="prefill"``: one eviction after the prefill; the decode steps only append."""
    prompt = _prompt(4, 22)
    expected = _reference_run(ReleaseA2SFPrefill(_model(), budget, recent, alpha, per_head=heads == "each"), prompt)
    got = _engine_steps("a2sf", prompt, expected[0], budget=budget, window=recent, alpha=alpha, mode="prefill",
                        heads=heads)
    _compare(got, expected, heads)
    _held_per_head(got[3], heads, budget + STEPS)


def test_a2sf_without_forgetting_is_h2o():
    """``alpha=1``, no sinks: the forgetting factor's neutral value gives H2O's cache, step by step."""
    prompt = _prompt(5, 18)
    tokens = _prompt(6, 8)
    h2o = _engine_steps("h2o", prompt, tokens, budget=9, window=3)
    a2sf = _engine_steps("a2sf", prompt, tokens, budget=9, window=3, alpha=1.0)
    assert h2o[1] == a2sf[1] and h2o[2] == a2sf[2]
    assert h2o[3].samples[0].cache_heads_end == a2sf[3].samples[0].cache_heads_end
    assert all(torch.equal(a, b) for a, b in zip(h2o[0], a2sf[0]))


@pytest.mark.parametrize("method,options", [("h2o", {}), ("snapkv", {"window": 4}), ("a2sf", {"sinks": 2}),
                                            ("a2sf", {"mode": "prefill"})])
def test_a_budget_that_holds_everything_is_the_plain_model(method, options):
    """A budget of prompt + new tokens: greedy ids and every step's logits equal the plain model's, bit
    for bit (the scores are computed, nothing is evicted)."""
    model = _model()
    ids = torch.tensor([_prompt(7, 15)])
    run_kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 8,
                  "min_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = model.generate(**run_kwargs)
        with tokensieve.prune(model, method, budget=15 + 8, **options) as run:
            pruned = model.generate(**run_kwargs)
    assert torch.equal(plain.sequences, pruned.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, pruned.logits))
    assert run.report.samples[0].cache_lengths_end == [15 + 7] * 4


@pytest.mark.parametrize("method,options", [
    ("h2o", {"keep": 0.5}),
    ("snapkv", {"budget": 9, "window": 3, "pooling": "maxpool"}),
    ("a2sf", {"keep": 0.5, "sinks": 1, "window": 3, "alpha": 0.7}),
])
def test_a_left_padded_batch_gives_each_sample_its_result_alone(method, options):
    """Prompts of 22 and 15 tokens, left-padded; with ``keep`` each sample gets its own budget."""
    model = _model()
    prompts = [_prompt(8, 22), _prompt(9, 15)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    with torch.no_grad(), tokensieve.prune(model, method, **options) as run:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    for b, prompt in enumerate(prompts):
        pad = width - len(prompt)  # the report counts positions in the padded input
        batch_kept = [[p - pad for p in layer] for layer in run.report.samples[b].cache_kept_end]
        forced = out.sequences[b, width:].tolist()
        logits, _, kept, report = _engine_steps(method, prompt, forced[:-1], **options)
        assert kept == batch_kept, f"sample {b}: kept positions"
        assert run.report.samples[b].cache_lengths_end == report.samples[0].cache_lengths_end
        for step, alone in enumerate(logits):
            assert torch.allclose(out.logits[step][b], alone, atol=LOGITS_ATOL), (b, step)


@pytest.mark.parametrize("method,options,match", [
    ("h2o", {"keep": 0.5, "budget": 8}, "not both"),
    ("h2o", {"keep": 0.0}, "keep"),
    ("h2o", {"keep": 1.5}, "keep"),
    ("h2o", {"budget": 0}, "budget"),
    ("h2o", {"budget": 8, "window": 8}, "below budget"),
    ("h2o", {"window": -1}, "window"),
    ("snapkv", {"budget": 32}, "below budget"),  # the default window is 32
    ("snapkv", {"kernel_size": 4}, "odd"),
    ("snapkv", {"kernel_size": 0}, "odd"),
    ("snapkv", {"window": 0}, "window"),
    ("a2sf", {"alpha": 1.2}, "alpha"),
    ("a2sf", {"alpha": -0.1}, "alpha"),
    ("a2sf", {"sinks": -1}, "sinks"),
    ("a2sf", {"budget": 10, "sinks": 4, "window": 6}, "below budget"),
    ("h2o", {"positions": "shift"}, "heads='shared'"),
])
def test_bad_options_raise_at_construction(method, options, match):
    with pytest.raises(ValueError, match=match):
        tokensieve.methods.get(method, **options)


@pytest.mark.parametrize("method", ["h2o", "snapkv", "a2sf"])
def test_heads_is_each_or_shared(method):
    with pytest.raises(TypeError, match="heads must be one of 'each', 'shared'"):
        tokensieve.methods.get(method, heads="all")


def test_the_methods_are_registered_with_their_defaults():
    """In the registry (so in ``tokensieve methods`` and the CLI flags), with the defaults resolved."""
    from tokensieve.cli.methods_cmd import describe

    assert {"h2o", "snapkv", "a2sf"} <= {row["name"] for row in describe()}
    assert tokensieve.methods.get("h2o").keep == 0.2
    assert {tokensieve.methods.get(m).heads for m in ("h2o", "snapkv", "a2sf")} == {"each"}  # the releases' rule
    snap = tokensieve.methods.get("snapkv")
    assert (snap.budget, snap.window, snap.kernel_size, snap.pooling) == (2048, 32, 5, "avgpool")
    a2sf = tokensieve.methods.get("a2sf")
    assert (a2sf.budget, a2sf.window, a2sf.alpha, a2sf.sinks, a2sf.mode) == (256, 16, 0.95, 0, "step")
    with pytest.raises(TypeError):
        tokensieve.methods.get("h2o", budget=8.5)

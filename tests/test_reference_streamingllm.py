"""StreamingLLM against a reference written in this file from the authors' release.

The reference follows mit-han-lab/streaming-llm:
    * ``streaming_llm/pos_shift/modify_llama.py`` ``llama_pos_shift_attention_forward``: the cache holds
      keys *before* the rotary embedding; at every forward the query rows are rotated at their
      ``position_ids`` (``past_key_values_length + i``: the cache's length, not the text's) and the
      whole key sequence, cached and new, at ``arange(kv_seq_len)``: each key at its index in the cache;
    * ``streaming_llm/kv_cache.py`` ``StartRecentKVCache.__call__``, applied after every forward in
      ``examples/eval_long_ppl.py``: a cache longer than ``start_size + recent_size`` keeps its first
      ``start_size`` and last ``recent_size`` entries.
The decoder layers are run from their parts (input norm, q/k/v projections, attention, o-projection,
residual, post-attention norm, MLP, residual). Batch 1, no padding, as the release. Nothing here calls
tokensieve's helpers: only ``tokensieve.prune`` is run and the model's logits read.
"""

from __future__ import annotations

import pytest
import torch
from reference_models import rope, shipped
from tiny_models import VOCAB, build

import tokensieve
from tokensieve import compat

LOGITS_ATOL = 1e-4  # fp32; the engine re-rotates rotated keys, the release rotates raw keys: rounding only


class ReleaseStreaming:
    """The release's pos-shift attention and start+recent cache on a Llama model, batch 1."""

    def __init__(self, model, start: int, recent: int) -> None:
        self.model, self.start, self.recent = model, start, recent
        layers = model.model.layers
        self.keys: list[torch.Tensor | None] = [None] * len(layers)  # (H_kv, m, D), not rotated
        self.values: list[torch.Tensor | None] = [None] * len(layers)

    def _attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        attn = self.model.model.layers[i].self_attn
        d = attn.head_dim
        n = x.shape[0]
        q = attn.q_proj(x).view(n, -1, d).transpose(0, 1)
        k = attn.k_proj(x).view(n, -1, d).transpose(0, 1)
        v = attn.v_proj(x).view(n, -1, d).transpose(0, 1)
        past = 0 if self.keys[i] is None else self.keys[i].shape[1]
        q = rope(q, torch.arange(past, past + n), self.model)  # position_ids: the cache's length on
        if self.keys[i] is not None:
            k = torch.cat([self.keys[i], k], 1)
            v = torch.cat([self.values[i], v], 1)
        self.keys[i], self.values[i] = k, v
        k = rope(k, torch.arange(k.shape[1]), self.model)  # every key at its index in the cache
        groups = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        scores = q @ k.transpose(1, 2) * d**-0.5
        causal = torch.ones(n, k.shape[1], dtype=torch.bool).tril(k.shape[1] - n)
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        out = (probs @ v).transpose(0, 1).reshape(n, -1)
        return attn.o_proj(out)

    def _trim(self) -> None:
        for i, k in enumerate(self.keys):
            if k.shape[1] > self.start + self.recent:
                keep = list(range(self.start)) + list(range(k.shape[1] - self.recent, k.shape[1]))
                self.keys[i], self.values[i] = k[:, keep], self.values[i][:, keep]

    @torch.no_grad()
    def forward(self, ids: list[int]) -> torch.Tensor:
        """Logits ``(n, vocab)`` of ``ids`` fed after what the cache holds; the cache is trimmed after."""
        lm = self.model.model
        h = lm.embed_tokens(torch.tensor(ids))
        for i, layer in enumerate(lm.layers):
            h = h + self._attention(i, layer.input_layernorm(h))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self._trim()
        return self.model.lm_head(lm.norm(h))


def _engine_steps(model, prompt: list[int], tokens: list[int], **options) -> list[torch.Tensor]:
    """Logits of the prompt's last token and of each forced token, one forward each, inside prune()."""
    from transformers import DynamicCache

    cache = DynamicCache()
    keyword = compat.cache_keyword(type(model).forward)
    out = []
    with torch.no_grad(), tokensieve.prune(model, "streamingllm", **options):
        ids = torch.tensor([prompt])
        for step in range(len(tokens) + 1):
            logits = model(input_ids=ids, attention_mask=torch.ones(1, len(prompt) + step, dtype=torch.long),
                           use_cache=True, **{keyword: cache}).logits
            out.append(logits[0, -1])
            if step < len(tokens):
                ids = torch.tensor([[tokens[step]]])
    return out


@pytest.mark.parametrize("start,recent", [(4, 6), (1, 3), (0, 5)])
def test_shifted_positions_match_the_release(start, recent):
    model = build("llama", "eager")
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, VOCAB, (14,), generator=gen).tolist()
    ref = ReleaseStreaming(model, start, recent)
    expected = [ref.forward(prompt)[-1]]
    tokens = []
    for _ in range(8):  # greedy, as the release's greedy_generate
        tokens.append(int(expected[-1].argmax()))
        expected.append(ref.forward([tokens[-1]])[-1])
    got = _engine_steps(model, prompt, tokens, sinks=start, window=recent, positions="shift")
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=LOGITS_ATOL), f"step {step}: max diff {(a - b).abs().max():.2e}"
    assert _engine_steps(model, prompt, tokens, sinks=start, window=recent)[-1].equal(got[-1])  # "auto" = shift


def shipped_prompts() -> list[list[int]]:
    """Per task, one test item's question as a text-only prompt of the shipped format (its ``<image>``
    left out), tokenised by the shipped processor's tokenizer: 11 to 15 tokens."""
    from tokensieve.tasks import TASKS, generate
    from tokensieve.tiny.prompt import prompt_text

    _, processor = shipped()
    texts = [prompt_text(e.question).replace("<image> ", "") for task in TASKS for e in generate(task, "test", 1)]
    return [processor.tokenizer(text)["input_ids"] for text in texts]


@pytest.mark.parametrize("start,recent", [(4, 6), (2, 3)])
def test_shifted_positions_match_the_release_on_the_shipped_language_model(start, recent):
    """The shipped LLaVA on text-only prompts (one per task): the release's pos-shift attention and
    start+recent cache, run on the LLaVA's inner Llama decoder and its ``lm_head`` (passed to the
    reference as ``model.model`` and ``model.lm_head``), against ``streamingllm`` (positions "shift")
    on the LLaVA itself: the prompt's last logits and 8 forced decode steps, to 1e-4. The forced
    tokens are a second turn: the reference's greedy answer, ``</s>``, then the next task's prompt
    (its first 6 tokens after ``<s>``). Every prompt is longer than ``start + recent``, so the cache is
    trimmed from the prefill on."""
    from types import SimpleNamespace

    model, processor = shipped()
    decoder = SimpleNamespace(model=model.model.language_model, lm_head=model.lm_head)
    prompts = shipped_prompts()
    for i, prompt in enumerate(prompts):
        assert len(prompt) > start + recent and model.config.image_token_id not in prompt
        ref = ReleaseStreaming(decoder, start, recent)
        expected = [ref.forward(prompt)[-1]]
        tokens = [int(expected[0].argmax()), processor.tokenizer.eos_token_id] + prompts[(i + 1) % len(prompts)][1:7]
        for token in tokens:
            expected.append(ref.forward([token])[-1])
        got = _engine_steps(model, prompt, tokens, sinks=start, window=recent, positions="shift")
        assert len(got) == 9
        for step, (a, b) in enumerate(zip(got, expected)):
            assert torch.allclose(a, b, atol=LOGITS_ATOL), f"step {step}: max diff {(a - b).abs().max():.2e}"


def test_original_positions_are_a_named_variant_that_differs_from_the_release():
    """``positions="keep"`` (kvpress's StreamingLLMPress): tokens keep their text positions, so the
    decoded logits differ from the release's positions within the cache."""
    model = build("llama", "eager")
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(1, VOCAB, (12,), generator=gen).tolist()
    tokens = torch.randint(1, VOCAB, (4,), generator=gen).tolist()
    kept = _engine_steps(model, prompt, tokens, sinks=2, window=4, positions="keep")
    shifted = _engine_steps(model, prompt, tokens, sinks=2, window=4, positions="shift")
    assert kept[0].equal(shifted[0])  # the prompt's last token: nothing evicted yet
    assert (kept[-1] - shifted[-1]).abs().max() > 2 * LOGITS_ATOL  # tiny random weights: a small, real gap


def test_shifted_positions_are_refused_on_mrope_models():
    model = build("qwen2-vl")
    with pytest.raises(ValueError, match="M-RoPE"):
        with tokensieve.prune(model, "streamingllm", positions="shift"):
            pass
    with tokensieve.prune(model, "streamingllm") as run:  # auto: original positions there
        assert run.report.positions == "keep"


def test_shifted_positions_in_a_left_padded_batch_match_each_sample_alone():
    """The cache index counts a sample's real entries: padding changes nothing."""
    from tiny_models import PAD

    model = build("llama", "eager")
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (13, 9)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = (ids != PAD).long()
    with torch.no_grad(), tokensieve.prune(model, "streamingllm", sinks=2, window=5, positions="shift"):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    for b, prompt in enumerate(prompts):
        forced = out.sequences[b, width:].tolist()
        alone = _engine_steps(model, prompt, forced[:-1], sinks=2, window=5, positions="shift")
        for step, logits in enumerate(alone):
            assert torch.allclose(out.logits[step][b], logits, atol=LOGITS_ATOL), (b, step)


@pytest.mark.parametrize("budget", [{"keep": 0.5}, {"budget": 7}])
def test_a_budget_in_keep_or_entries_is_the_release_with_that_cache_size(budget):
    """keep=0.5 of a 14-token prompt (7 entries) and budget=7 both keep 2 sinks and a window of 5,
    prefill and every decode step: the release's start_size=2, recent_size=5."""
    model = build("llama", "eager")
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, VOCAB, (14,), generator=gen).tolist()
    ref = ReleaseStreaming(model, 2, 5)
    expected = [ref.forward(prompt)[-1]]
    tokens = []
    for _ in range(6):
        tokens.append(int(expected[-1].argmax()))
        expected.append(ref.forward([tokens[-1]])[-1])
    got = _engine_steps(model, prompt, tokens, sinks=2, positions="shift", **budget)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=LOGITS_ATOL), f"step {step}: max diff {(a - b).abs().max():.2e}"


def test_keep_1_evicts_nothing():
    model = build("llama", "eager")
    prompt = torch.randint(1, VOCAB, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    tokens = [int(plain.argmax())] * 3
    full = []
    with torch.no_grad():
        for step in range(len(tokens) + 1):
            full.append(model(input_ids=torch.tensor([prompt + tokens[:step]])).logits[0, -1])
    got = _engine_steps(model, prompt, tokens, keep=1.0)
    for a, b in zip(got, full):
        assert torch.allclose(a, b, atol=1e-5)

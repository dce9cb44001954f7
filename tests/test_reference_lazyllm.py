"""LazyLLM against a reference written in this file from the paper's algorithm (arXiv 2407.14057, Section 3).

The reference runs a Llama decoder as a plain loop over its layers, batch 1, with explicit sets: per
layer a dict of the keys and values it has computed (position -> k, v), an Aux Cache (position ->
(layer, hidden state)), and in each pass the set of tokens each layer's attention sees. Layers are
run from their parts (input norm, q/k/v projections, rotary at the original positions, softmax per
query over the chosen keys at or before it, o-projection, residual, post-attention norm, MLP,
residual). After each pruning layer's predecessor, the last token's attention row there, averaged over
heads, ranks the chosen tokens; the top ``max(1, round(keep * n))`` stay (the last token always; equal
scores to the earlier position). A chosen token without keys and values at a layer is taken from the
Aux Cache and run from there. Nothing here calls tokensieve's helpers: only ``tokensieve.prune`` is
run, and its report (``attended``, ``cache_kept_*``) and the model's logits are read.

Compared on the tiny random Llama (4 layers, 4 query and 2 key-value heads, SDPA attention, its
attention sharpened as in ``test_reference_kv_methods``): the tokens each layer's attention sees after
the prefill and at each of 16 forced decode steps, the tokens each layer's KV cache holds, and every
pass's logits, to ``LOGITS_ATOL``.
"""

from __future__ import annotations

import pytest
import torch
from reference_models import rope, sharpened_llama
from tiny_models import IMAGE, PAD, VOCAB, batch, build

import tokensieve
from tokensieve import compat

LOGITS_ATOL = 1e-4  # fp32: SDPA against the reference's explicit softmax; summation order only
STEPS = 16


def _model() -> torch.nn.Module:
    return sharpened_llama("sdpa")


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


class ReferenceLazyLLM:
    """The paper's algorithm on a batch-1 Llama causal LM, one pass per :meth:`forward` call.

    ``schedule`` maps each pruning layer ``l`` to the fraction of the tokens layer ``l - 1`` saw that
    layers ``l ..`` see in the pass."""

    def __init__(self, model, schedule: dict[int, float]) -> None:
        self.model, self.schedule = model, schedule
        self.layers = model.model.layers
        self.kv: list[dict[int, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in self.layers]
        self.aux: dict[int, tuple[int, torch.Tensor]] = {}
        self.length = 0
        self.revived = 0  # tokens taken from the Aux Cache, over all passes

    def forward(self, ids: list[int]) -> tuple[torch.Tensor, list[list[int]]]:
        """Logits of the pass's last token and, per layer, the positions its attention saw."""
        model = self.model
        start, self.length = self.length, self.length + len(ids)
        embedded = model.model.embed_tokens(torch.tensor(ids))
        rows = {start + i: embedded[i] for i in range(len(ids))}  # position -> hidden state
        chosen = list(range(self.length))
        last = self.length - 1
        seen = []
        for l, layer in enumerate(self.layers):
            for p in chosen:
                if p not in self.kv[l] and p not in rows:
                    depth, state = self.aux.pop(p)
                    assert depth == l, "a token's keys and values stop where it was pruned"
                    rows[p] = state
                    self.revived += 1
            seen.append(list(chosen))
            rows, probs = self._layer(l, layer, rows, chosen)
            if l + 1 in self.schedule:
                score = {p: float(s) for p, s in zip(chosen, probs)}
                count = max(1, round(self.schedule[l + 1] * len(chosen)))
                ranked = sorted((p for p in chosen if p != last), key=lambda p: (-score[p], p))
                chosen = sorted([last] + ranked[: count - 1])
                for p in list(rows):
                    if p not in chosen:
                        self.aux[p] = (l + 1, rows.pop(p))
        final = model.model.norm(rows[last])
        return model.lm_head(final), seen

    def _layer(self, l: int, layer, rows: dict[int, torch.Tensor], chosen: list[int]):
        """Layer ``l`` on ``rows``; returns the new rows and the last token's head-mean attention over
        ``chosen`` (in that order)."""
        attn = layer.self_attn
        order = sorted(rows)
        h = torch.stack([rows[p] for p in order])
        x = layer.input_layernorm(h)
        n, d_head = len(order), attn.head_dim
        q = attn.q_proj(x).view(n, -1, d_head).transpose(0, 1)
        k = attn.k_proj(x).view(n, -1, d_head).transpose(0, 1)
        v = attn.v_proj(x).view(n, -1, d_head).transpose(0, 1)
        pos = torch.tensor(order)
        q, k = rope(q, pos, self.model), rope(k, pos, self.model)
        for i, p in enumerate(order):
            self.kv[l][p] = (k[:, i], v[:, i])
        groups = q.shape[0] // k.shape[0]
        outs, last_probs = [], None
        for i, p in enumerate(order):
            keys = [c for c in chosen if c <= p]
            K = torch.stack([self.kv[l][c][0] for c in keys], 1).repeat_interleave(groups, 0)
            V = torch.stack([self.kv[l][c][1] for c in keys], 1).repeat_interleave(groups, 0)
            probs = torch.softmax((q[:, i : i + 1] @ K.transpose(1, 2)) / d_head ** 0.5, dim=-1)  # (H, 1, m)
            outs.append((probs @ V)[:, 0].reshape(-1))
            if p == chosen[-1]:
                last_probs = probs[:, 0].mean(0)
        h = h + attn.o_proj(torch.stack(outs))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return {p: h[i] for i, p in enumerate(order)}, last_probs


def _reference_run(schedule: dict[int, float], prompt: list[int], steps: int = STEPS):
    ref = ReferenceLazyLLM(_model(), schedule)
    with torch.no_grad():
        logits, seen = ref.forward(prompt)
        tokens, all_logits, all_seen = [], [logits], [seen]
        for _ in range(steps):
            tokens.append(int(all_logits[-1].argmax()))
            logits, seen = ref.forward([tokens[-1]])
            all_logits.append(logits)
            all_seen.append(seen)
    held = [sorted(layer) for layer in ref.kv]
    return tokens, all_logits, all_seen, held, ref.revived


def _engine_steps(prompt: list[int], tokens: list[int], **options):
    """Under ``prune()``: each pass's last logits and per-layer attended positions, the cache's
    positions per layer at the end, and the report."""
    from transformers import DynamicCache

    model = _model()
    cache = DynamicCache()
    keyword = compat.cache_keyword(type(model).forward)
    logits, seen = [], []
    with torch.no_grad(), tokensieve.prune(model, "lazyllm", **options) as run:
        ids = torch.tensor([prompt])
        for step in range(len(tokens) + 1):
            out = model(input_ids=ids, attention_mask=torch.ones(1, len(prompt) + step, dtype=torch.long),
                        use_cache=True, **{keyword: cache})
            logits.append(out.logits[0, -1])
            seen.append(run.report.samples[0].attended)
            if step < len(tokens):
                ids = torch.tensor([[tokens[step]]])
    held = [sorted(layer) for layer in run.report.samples[0].cache_kept_end]
    return logits, seen, held, run.report


@pytest.mark.parametrize("options,schedule", [
    ({"layers": (1, 2, 3), "keep": 0.6}, {1: 0.6, 2: 0.6, 3: 0.6}),
    ({}, {1: 0.7, 2: 0.7, 3: 0.7}),  # the defaults on 4 layers: a quarter, half, three quarters
    ({"layers": (1, 3), "keep": (0.5, 0.4)}, {1: 0.5, 3: 0.4}),
])
def test_lazyllm_matches_the_papers_algorithm(options, schedule):
    """Per-layer token sets of the prefill and of each of 16 decode steps, each layer's cache, logits."""
    prompt = _prompt(1, 24)
    tokens, ref_logits, ref_seen, ref_held, revived = _reference_run(schedule, prompt)
    assert revived > 0, "the run must revive pruned tokens from the Aux Cache"
    logits, seen, held, report = _engine_steps(prompt, tokens, **options)
    for step, (a, b) in enumerate(zip(seen, ref_seen)):
        assert a == b, f"pass {step}: tokens each layer's attention saw"
    assert held == ref_held, "tokens each layer's KV cache holds after 16 decode steps"
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert torch.allclose(a, b, atol=LOGITS_ATOL), f"pass {step}: max diff {(a - b).abs().max():.2e}"
    counts = [len(s) for s in ref_seen[0]]
    assert report.samples[0].hidden_lengths == counts and counts[0] > counts[-1]


def test_each_layer_holds_a_token_at_most_once_and_only_if_computed_there():
    """The KV cache of layer l holds each token at most once, and a token's layers form a prefix."""
    prompt = _prompt(2, 30)
    tokens = _prompt(3, STEPS)
    _, _, _, report = _engine_steps(prompt, tokens, layers=(1, 2, 3), keep=0.5)
    kept = report.samples[0].cache_kept_end
    assert all(len(layer) == len(set(layer)) for layer in kept)
    for deeper, shallower in zip(kept[1:], kept[:-1]):
        assert set(deeper) <= set(shallower)
    assert len(kept[3]) < len(kept[0]) == len(prompt) + STEPS - 1 + 1


def test_keeping_everything_is_the_plain_model():
    """keep=1: greedy ids and every step's logits equal the plain model's, bit for bit."""
    model = _model()
    ids = torch.tensor([_prompt(4, 15), _prompt(5, 15)])
    ids[1, :4] = PAD
    run_kwargs = {"input_ids": ids, "attention_mask": (ids != PAD).long(), "max_new_tokens": 8,
                  "min_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad():
        plain = model.generate(**run_kwargs)
        with tokensieve.prune(model, "lazyllm", keep=1.0, layers=(1, 2, 3)) as run:
            pruned = model.generate(**run_kwargs)
    assert torch.equal(plain.sequences, pruned.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, pruned.logits))
    assert run.report.samples[0].cache_lengths_end == [15 + 7] * 4


def test_a_left_padded_batch_gives_each_sample_its_result_alone():
    """Prompts of 22 and 15 tokens, left-padded, generate(): each sample's per-step logits, the tokens
    each layer saw in the last pass and its caches equal the sample run alone."""
    model = _model()
    prompts = [_prompt(8, 22), _prompt(9, 15)]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    options = {"layers": (1, 2, 3), "keep": 0.5}
    with torch.no_grad(), tokensieve.prune(model, "lazyllm", **options) as run:
        out = model.generate(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    for b, prompt in enumerate(prompts):
        pad = width - len(prompt)
        forced = out.sequences[b, width:].tolist()
        logits, seen, held, _ = _engine_steps(prompt, forced[:-1], **options)
        sample = run.report.samples[b]
        assert [[p - pad for p in layer] for layer in sample.attended] == seen[-1], f"sample {b}: attended"
        assert [sorted(p - pad for p in layer) for layer in sample.cache_kept_end] == held, f"sample {b}: caches"
        for step, alone in enumerate(logits):
            assert torch.allclose(out.logits[step][b], alone, atol=LOGITS_ATOL), (b, step)


def test_the_tiny_llava_prunes_and_decodes_with_left_padding():
    """LLaVA (images in the prompt, SDPA): a left-padded batch generates, each layer's attention sees
    fewer tokens at depth, and the second sample's logits match it alone."""
    model = build("llava", "sdpa")
    inputs = batch("llava", model, [1, 2])
    with torch.no_grad(), tokensieve.prune(model, "lazyllm", layers=(1, 2, 3), keep=0.5) as run:
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        alone_inputs = batch("llava", model, [1, 2])
        real = alone_inputs["attention_mask"][1].bool()
        alone_inputs = {"input_ids": alone_inputs["input_ids"][1:, real], "attention_mask": alone_inputs["attention_mask"][1:, real],
                        "pixel_values": alone_inputs["pixel_values"][1:]}
        alone = model.generate(**alone_inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                               output_logits=True, return_dict_in_generate=True)
    assert (inputs["input_ids"] == IMAGE).sum() == 48
    lengths = run.report.samples[0].hidden_lengths
    assert lengths[0] > lengths[1] > lengths[2] > lengths[3]
    assert torch.equal(out.sequences[1, inputs["input_ids"].shape[1]:], alone.sequences[0, alone_inputs["input_ids"].shape[1]:])
    for a, b in zip(out.logits, alone.logits):
        assert torch.allclose(a[1], b[0], atol=LOGITS_ATOL)


@pytest.mark.parametrize("options,error,match", [
    ({"keep": 0.0}, ValueError, "keep must be in"),
    ({"keep": 1.5}, ValueError, "keep must be in"),
    ({"keep": (0.5, 0.5)}, ValueError, "2 fractions for 3 pruning layers"),
    ({"keep": ()}, ValueError, "non-empty"),
    ({"layers": (0, 2)}, ValueError, r"must be in 1\.\.3"),
    ({"layers": (1, 4)}, ValueError, r"must be in 1\.\.3"),
    ({"layers": (2, 1)}, ValueError, "must increase"),
    ({"layers": (2, 2)}, ValueError, "must increase"),
    ({"keep": "0.5"}, TypeError, "keep must be"),
    ({"layers": 2}, TypeError, "layers must be"),
])
def test_bad_options_raise_before_the_model_is_touched(options, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        with tokensieve.prune(model, "lazyllm", **options):
            pass
    assert all("forward" not in layer.__dict__ for layer in model.model.layers) and not model._forward_pre_hooks


def test_a_question_fed_after_its_context_matches_the_reference():
    """Protocol question-after: a pass of 6 question tokens after the context, then 8 decode steps.
    The question's tokens (all but its last) can be pruned in their own pass, which the Aux Cache must
    then hold as it holds the prompt's; per pass, the tokens each layer saw and the last logits equal
    the paper's loop."""
    schedule = {1: 0.5, 2: 0.6, 3: 0.5}
    context, question = _prompt(11, 30), _prompt(12, 6)
    ref = ReferenceLazyLLM(_model(), schedule)
    passes, expected = [context, question], []
    with torch.no_grad():
        for step in range(10):
            expected.append(ref.forward(passes[step]))
            if step >= 1 and step < 9:
                passes.append([int(expected[-1][0].argmax())])
    assert ref.revived > 0 and any(p >= 30 for layer in ref.kv for p in range(30, 35) if p not in layer)
    from transformers import DynamicCache

    model, cache = _model(), DynamicCache()
    keyword = compat.cache_keyword(type(model).forward)
    length = 0
    with torch.no_grad(), tokensieve.prune(model, "lazyllm", layers=tuple(schedule), keep=tuple(schedule.values())) as run:
        for ids, (ref_logits, ref_seen) in zip(passes, expected):
            length += len(ids)
            out = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, length, dtype=torch.long),
                        use_cache=True, **{keyword: cache})
            seen = run.report.samples[0].attended
            assert [sorted(s) for s in seen] == ref_seen
            assert torch.allclose(out.logits[0, -1], ref_logits, atol=LOGITS_ATOL)


def test_one_fraction_in_a_tuple_serves_every_pruning_layer():
    """``--keep 0.5`` on the command line arrives as ``(0.5,)``: one fraction for all layers."""
    from tokensieve.methods import LazyLLM

    method = LazyLLM(layers=(2, 4, 6), keep=(0.5,))
    method.bind(8)
    assert method.pruning_layers() == {2: 0.5, 4: 0.5, 6: 0.5}
    with pytest.raises(ValueError, match="2 fractions for 3 pruning layers"):
        LazyLLM(layers=(2, 4, 6), keep=(0.5, 0.6)).bind(8)

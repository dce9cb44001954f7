"""Training-only aid: a retrieval circuit taught head by head through the model's own attention.

Every answer word is read from one context token by a lookup: the predicting position holds a
lookup key, some context token holds the matching key and the word to copy. Three kinds of head
are taught where to look, each with the loss ``-log`` of its attention weight on the right token,
the attention recomputed from the layer's input (``tokensieve.attention.attention_rows``):

- a **statement head** (layer 0, head 0): at each statement's read token, the statement's name
  token (``the code of K is V .``: V looks at K; ``the K points to T .``: T at K;
  ``var X = S .``: S at X), so the read token carries both what matches and what is copied;
- a **question head** (layer 0, head 1): at the position predicting an answer's first word, the
  question's key (K, or for ``vartrack`` the value V); later ``vartrack`` words look up the
  variable just written, which is the token at the predicting position itself;
- **hop heads** (head 0 of layers 2, 3, 4 for hops 1, 2, 3): at the predicting position, the read
  token of the statement that hop uses (V; for ``multihop`` the targets of the chain's links in
  chain order, the value last; for ``vartrack`` word i, the source S of ``var Xi = S .``).

A fourth loss makes each hop head copy what it reads: its value at the read token, through its
slice of ``o_proj``, the final norm and the output head, must predict the token that hop retrieves
(the read token itself; for ``vartrack`` the variable two before it), a logit lens on that one head.

This mirrors the previous-token and retrieval heads of trained LLMs, which attend to the needle
they copy from. It adds no parameters: the checkpoint stays the stock model. Each answer's
``</s>`` has no target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..attention import attention_rows
from ..tasks.text import Ask, TextExample
from ..tiny.auxiliary import query_slots

STATEMENT_HEAD = (0, 0)
QUESTION_HEAD = (0, 1)
HOP_HEADS = ((2, 0), (3, 0), (4, 0))
READ_OFFSET = {"kv_recall": (5, 3), "multikey": (5, 3), "multihop": (4, 1), "vartrack": (3, 1)}
"""Kind -> (read token, name token) offsets inside a statement span."""
COPIED_BACK = {"kv_recall": 0, "multikey": 0, "multihop": 0, "vartrack": 2}
"""Kind -> how far before a hop's read token the token it retrieves is."""
QUESTION_KEY_BACK = {"kv_recall": 3, "multikey": 3, "multihop": 4, "vartrack": 3}
"""Kind -> how far before the first answer's predicting position (``:``) the question's key is."""


@dataclass
class Lookups:
    """What each head of one training sequence should attend to.

    ``statements``: (read position, name position) of every context statement; ``words``: per
    supervised token in order (each answer's words, then its ``</s>``), the positions its hop heads
    should read, hop 1 first (empty for ``</s>``), and whether its question head looks back at the
    question's key (the first word of an answer).
    """

    statements: list[tuple[int, int]]
    words: list[tuple[list[int], bool]]


def _kind(example: TextExample) -> str:
    return example.task.rsplit("_", 1)[0]


def _hops(example: TextExample, ask: Ask, prompt: list[str]) -> list[list[int]]:
    """Per answer word of ``ask``, the read positions of its hops."""
    kind = _kind(example)
    read = READ_OFFSET[kind][0]
    if kind == "vartrack":
        return [[start + read] for start, _ in ask.evidence]
    if kind == "multihop":
        links = {prompt[start + 1]: start for start, _ in ask.evidence}  # name -> span start
        sources = {prompt[start + read] for start, _ in ask.evidence}
        name = next(k for k in links if k not in sources)  # the key the question asks
        chain = []
        while name in links:
            chain.append(links[name] + read)
            name = prompt[links[name] + read]
        return [chain]
    return [[ask.evidence[0][0] + read]]


def lookups(example: TextExample, turns: int) -> Lookups:
    """The aid's targets for ``training_text(example, turns)`` (positions are the same in the prompt
    and in the training sequence, which starts with it)."""
    prompt = example.prompt.split()
    read, name = READ_OFFSET[_kind(example)]
    asks = [Ask(example.question, example.answer, example.evidence), *example.more]
    spans = sorted({span for ask in asks for span in ask.evidence})
    words = []
    for ask in asks[: turns + 1]:
        hops = _hops(example, ask, prompt)
        words += [(h, i == 0) for i, h in enumerate(hops)] + [([], False)]
    return Lookups([(start + read, start + name) for start, _ in spans], words)


def head_nll(model: nn.Module, hidden_states: tuple[torch.Tensor, ...], head: tuple[int, int], rows: torch.Tensor,
             queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean ``-log`` attention weight of ``head`` = (layer, head index) from ``queries`` to ``targets``
    ((N,) positions in batch rows ``rows``), causal, over a right-padded batch.

    ``hidden_states``: the model's ``output_hidden_states`` (``[l]``, (B, L, D), is layer l's input).
    """
    batch, length = hidden_states[0].shape[:2]
    slot, grid = query_slots(rows, queries, batch)
    allowed = torch.arange(length)[None, None] <= grid[..., None]  # (B, slots, L)
    positions = torch.arange(length)[None].expand(batch, length)
    cos, sin = model.model.rotary_emb(hidden_states[0], positions)
    layer, index = head
    probs = attention_rows(model.model.layers[layer], hidden_states[layer], cos, sin, grid, allowed)
    return -probs[rows, index, slot, targets].clamp_min(1e-9).log().mean()


def head_copy_nll(model: nn.Module, hidden_states: tuple[torch.Tensor, ...], head: tuple[int, int],
                  rows: torch.Tensor, reads: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``labels`` (N,) from ``head``'s own output at the read positions ``reads`` (N,)
    of rows ``rows``: its value vector there, its slice of ``o_proj``, the final norm and ``lm_head``."""
    layer, index = head
    block = model.model.layers[layer]
    attn = block.self_attn
    dim = attn.head_dim
    group = index // attn.num_key_value_groups
    x = block.input_layernorm(hidden_states[layer][rows, reads])  # (N, D)
    value = attn.v_proj(x)[:, group * dim : (group + 1) * dim]
    out = value @ attn.o_proj.weight[:, index * dim : (index + 1) * dim].T
    return nn.functional.cross_entropy(model.lm_head(model.model.norm(out)), labels)


def circuit_loss(model: nn.Module, hidden_states: tuple[torch.Tensor, ...], input_ids: torch.Tensor,
                 plans: list[Lookups], rows: torch.Tensor, cols: torch.Tensor,
                 kinds: list[str]) -> dict[str, torch.Tensor]:
    """The statement, question, hop and copy losses of a batch (keys ``statement``, ``question``,
    ``hop1`` ..., ``copy1`` ...; a hop is left out when no token of the batch has it).

    ``input_ids``: (B, L) the batch; ``plans``: per batch row, its :func:`lookups`; ``rows``, ``cols``: (N,) row and predicting
    position of each supervised token, in the order of the plans' ``words``; ``kinds``: per row, its task kind.
    """
    stmt = [(r, t, g) for r, plan in enumerate(plans) for t, g in plan.statements]
    words = [w for plan in plans for w in plan.words]
    r_s, t_s, g_s = torch.tensor(stmt).unbind(-1)
    losses = {"statement": head_nll(model, hidden_states, STATEMENT_HEAD, r_s, t_s, g_s)}
    asking = torch.tensor([first for _, first in words])
    back = torch.tensor([QUESTION_KEY_BACK[kinds[r]] for r in rows.tolist()])
    losses["question"] = head_nll(model, hidden_states, QUESTION_HEAD, rows[asking], cols[asking],
                                  (cols - back)[asking])
    for hop, head in enumerate(HOP_HEADS):
        has = torch.tensor([len(h) > hop for h, _ in words])
        if has.any():
            target = torch.tensor([h[hop] for h, _ in words if len(h) > hop])
            losses[f"hop{hop + 1}"] = head_nll(model, hidden_states, head, rows[has], cols[has], target)
            copied = target - torch.tensor([COPIED_BACK[kinds[r]] for r in rows[has].tolist()])
            losses[f"copy{hop + 1}"] = head_copy_nll(model, hidden_states, head, rows[has], target,
                                                     input_ids[rows[has], copied])
    return losses

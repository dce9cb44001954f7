"""Long-context text tasks for KV-cache methods: recall, multi-key recall, multi-hop and variable tracking.

The task shapes follow RULER (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", 2024): needles hidden in a haystack of repeated noise sentences
or of other needles, asked about after the context; written here in a small word-level language
so that a model trained by the project can solve them.

| kind | context | question | answer |
|---|---|---|---|
| ``kv_recall`` | nothing but ``the code of K is V .`` pairs (RULER's haystack of needles) | ``what is the code of K ?`` | V |
| ``multikey`` | noise with 3-8 such pairs (RULER's multi-key needles) | ``what is the code of K ?`` | V |
| ``multihop`` | noise with 3 chains ``the K1 points to K2 .`` ... ``the Kh points to V .`` of 2-3 keys, links in random order | ``where does K1 lead ?`` | V |
| ``vartrack`` | noise with 3 chains ``var X1 = V .`` ``var X2 = X1 .`` ... of 2-4 variables, each in order (RULER's variable tracking) | ``which variables hold V ?`` | ``X1 X2 ...`` in assignment order |

Each kind exists at prompt lengths 512, 1024 and 2048 tokens (``kv_recall_512`` ...; the evaluated
``TEXT_TASKS``), and at 128 and 256 for a training curriculum (``WARMUP_TASKS``): the prompt
``<s> USER : {context} {question} ASSISTANT :`` has at most that many tokens and at least that
many minus ``SLACK``. Text is words separated by single spaces, punctuation included, so a word-level
tokenizer gives exactly one token per word: ``prompt.split()[p]`` is the token at position ``p``.
Keys and variables are three-letter nonce words (consonant, vowel, consonant), values two-digit numbers.
Within a context every key is distinct and, except in ``kv_recall``, every value too.

Items are drawn like the image tasks': example ``i`` of a split from an RNG seeded with (task
index, split base + i) (:func:`tokensieve.tasks.example_seed`), so they are byte-for-byte
reproducible and the train and test splits never share a seed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import numpy as np

TEXT_LENGTHS: tuple[int, ...] = (512, 1024, 2048)
"""Target prompt lengths in tokens."""
WARMUP_LENGTHS: tuple[int, ...] = (128, 256)
"""Shorter prompts of the same tasks, for a training curriculum only (never evaluated)."""
KINDS: tuple[str, ...] = ("kv_recall", "multikey", "multihop", "vartrack")
SLACK = 7
"""A prompt of target length T has between T - SLACK + 1 and T tokens."""
PREFIX: tuple[str, ...] = ("<s>", "USER", ":")
SUFFIX: tuple[str, ...] = ("ASSISTANT", ":")
NOISE: tuple[str, ...] = (
    "the sea is calm today .",
    "a cat sleeps by the door .",
    "the road goes on and on .",
    "rain falls on the hill .",
    "here we are again .",
)
"""Noise sentences, repeated in this order (from a random one on) to fill a context."""
TEMPLATE_WORDS: tuple[str, ...] = ("the", "code", "of", "is", "what", "?", ".", "points", "to", "where", "does",
                                   "lead", "var", "=", "which", "variables", "hold")
NUMBERS: tuple[str, ...] = tuple(str(n) for n in range(10, 100))
"""Values: one token each."""


def _nonce_words() -> tuple[str, ...]:
    """Consonant-vowel-consonant words that are not template or noise words, sorted."""
    taken = set(TEMPLATE_WORDS) | {w for s in NOISE for w in s.split()}
    words = ("".join(p) for p in itertools.product("bdfgklmnprstvz", "aeiou", "bdfgklmnprstvz"))
    return tuple(w for w in words if w not in taken)


KEYS: tuple[str, ...] = _nonce_words()
"""Keys and variable names: one token each."""
PAIR_TOKENS = 7
"""Tokens of one ``the code of K is V .`` pair."""


class Ask(NamedTuple):
    """A question about a context, its answer, and the (start, end) token spans (end exclusive) of the
    statements the answer depends on, in text order."""

    question: str
    answer: str
    evidence: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class TextExample:
    """One long-context question.

    ``prompt`` is the whole model input ``<s> USER : {context} {question} ASSISTANT :`` (words
    separated by single spaces: one token each); ``answer`` one word, or for ``vartrack`` several
    separated by spaces; ``evidence`` the (start, end) token spans, end exclusive, of the statements
    the answer depends on, in text order (the needle, or every link of the asked chain); ``more``
    further questions about the same context with their answers and evidence, for training on
    several questions per context.
    """

    task: str
    prompt: str
    question: str
    answer: str
    evidence: tuple[tuple[int, int], ...]
    more: tuple[Ask, ...] = ()

    @property
    def length(self) -> int:
        """Tokens in the prompt."""
        return len(self.prompt.split())

    @property
    def evidence_positions(self) -> tuple[int, ...]:
        """Every token position inside the evidence spans, ascending."""
        return tuple(p for start, end in self.evidence for p in range(start, end))


def _draw(rng: np.random.Generator, pool: tuple[str, ...], n: int) -> list[str]:
    """``n`` distinct words of ``pool`` in random order."""
    return [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=False)]


def _noise(rng: np.random.Generator, budget: int) -> list[str]:
    """Noise sentences from a random one on, in order, as many as fit in ``budget`` tokens."""
    sentences = []
    for k in itertools.count(int(rng.integers(len(NOISE)))):
        sentence = NOISE[k % len(NOISE)]
        budget -= len(sentence.split())
        if budget < 0:
            return sentences
        sentences.append(sentence)


_Draft = tuple[str, str, list[int]]
"""A question, its answer and the indices of the statements it depends on."""


def _build(task: str, length: int, rng: np.random.Generator, statements: list[str], asks: list[_Draft],
           noise: bool) -> TextExample:
    """The example whose context holds ``statements`` in this order, spread over noise sentences at
    random slots when ``noise`` (else back to back). ``asks[0]`` is the prompt's question, the rest
    become ``more``; each names its evidence by statement index."""
    tail = asks[0][0].split() + list(SUFFIX)
    budget = length - len(PREFIX) - len(tail) - sum(len(s.split()) for s in statements)
    if budget < 0:
        raise ValueError(f"{task}: the statements do not fit in {length} tokens")
    fillers = _noise(rng, budget) if noise else []
    slots = np.sort(rng.integers(0, len(fillers) + 1, size=len(statements)))
    words, spans = list(PREFIX), []
    cut = 0
    for statement, slot in zip(statements, slots):
        words += " ".join(fillers[cut:slot]).split()
        spans.append((len(words), len(words) + len(statement.split())))
        words += statement.split()
        cut = slot
    words += " ".join(fillers[cut:]).split() + tail
    done = [Ask(q, a, tuple(spans[i] for i in sorted(indices))) for q, a, indices in asks]
    return TextExample(task, " ".join(words), *done[0], more=tuple(done[1:]))


def _pair(key: str, value: str) -> str:
    return f"the code of {key} is {value} ."


def _recall_question(key: str) -> str:
    return f"what is the code of {key} ?"


def kv_recall(rng: np.random.Generator, length: int) -> TextExample:
    """A context of nothing but key-value pairs (distinct keys, values may repeat); ask one key.
    ``more`` asks every other key, in random order."""
    tail = len(PREFIX) + len(_recall_question(KEYS[0]).split()) + len(SUFFIX)
    n = (length - tail) // PAIR_TOKENS
    keys = _draw(rng, KEYS, n)
    values = [NUMBERS[int(i)] for i in rng.integers(len(NUMBERS), size=n)]
    target = int(rng.integers(n))
    order = [target] + [int(i) for i in rng.permutation(n) if i != target]
    asks = [(_recall_question(keys[i]), values[i], [i]) for i in order]
    return _build(f"kv_recall_{length}", length, rng, [_pair(k, v) for k, v in zip(keys, values)], asks, noise=False)


def multikey(rng: np.random.Generator, length: int) -> TextExample:
    """3-8 key-value needles (distinct keys and values) at random depths in noise; ask the first key.
    ``more`` asks the others."""
    n = int(rng.integers(3, 9))
    keys, values = _draw(rng, KEYS, n), _draw(rng, NUMBERS, n)
    order = [int(i) for i in rng.permutation(n)]  # text order of the needles
    asks = [(_recall_question(k), v, [order.index(j)]) for j, (k, v) in enumerate(zip(keys, values))]
    return _build(f"multikey_{length}", length, rng, [_pair(keys[i], values[i]) for i in order], asks, noise=True)


def _hop_question(key: str) -> str:
    return f"where does {key} lead ?"


def multihop(rng: np.random.Generator, length: int) -> TextExample:
    """Three chains ``K1 -> K2 (-> K3) -> V`` of 2-3 keys, their links in random order at random
    depths in noise; ask where the first chain's first key leads. ``more`` asks every other key of
    every chain (where each leads: its chain's value, through the chain's links from that key on),
    the asked chain's later keys included, in random order."""
    sizes = [int(s) for s in rng.integers(2, 4, size=3)]
    keys, values = _draw(rng, KEYS, sum(sizes)), _draw(rng, NUMBERS, 3)
    chains = [keys[sum(sizes[:c]) : sum(sizes[: c + 1])] for c in range(3)]
    links = [(c, i, f"the {chain[i]} points to {(chain + [values[c]])[i + 1]} .")
             for c, chain in enumerate(chains) for i in range(len(chain))]
    order = [int(i) for i in rng.permutation(len(links))]  # text order of the links
    place = {links[i][:2]: j for j, i in enumerate(order)}
    asks = [(_hop_question(chain[i]), values[c], [place[c, h] for h in range(i, len(chain))])
            for c, chain in enumerate(chains) for i in range(len(chain))]
    asks = asks[:1] + [asks[1:][int(i)] for i in rng.permutation(len(asks) - 1)]
    return _build(f"multihop_{length}", length, rng, [links[i][2] for i in order], asks, noise=True)


def _track_question(value: str) -> str:
    return f"which variables hold {value} ?"


def vartrack(rng: np.random.Generator, length: int) -> TextExample:
    """Three chains ``var X1 = V .`` ``var X2 = X1 .`` ... of 2-4 variables, interleaved at random
    with each chain in order, at random depths in noise; ask which variables hold the first chain's
    value (answer: its variables in assignment order). ``more`` asks the other two values."""
    sizes = [int(s) for s in rng.integers(2, 5, size=3)]
    names, values = _draw(rng, KEYS, sum(sizes)), _draw(rng, NUMBERS, 3)
    chains = [names[sum(sizes[:c]) : sum(sizes[: c + 1])] for c in range(3)]
    turns = [int(c) for c in rng.permutation([c for c in range(3) for _ in range(sizes[c])])]
    statements: list[str] = []
    owned: list[list[int]] = [[], [], []]
    for c in turns:
        i = len(owned[c])
        owned[c].append(len(statements))
        statements.append(f"var {chains[c][i]} = {values[c] if i == 0 else chains[c][i - 1]} .")
    asks = [(_track_question(values[c]), " ".join(chains[c]), owned[c]) for c in range(3)]
    return _build(f"vartrack_{length}", length, rng, statements, asks, noise=True)


_KIND_FUNCTIONS: dict[str, Callable[[np.random.Generator, int], TextExample]] = {
    "kv_recall": kv_recall,
    "multikey": multikey,
    "multihop": multihop,
    "vartrack": vartrack,
}
TEXT_GENERATORS: dict[str, Callable[[np.random.Generator], TextExample]] = {
    f"{kind}_{length}": partial(fn, length=length)
    for lengths in (TEXT_LENGTHS, WARMUP_LENGTHS) for kind, fn in _KIND_FUNCTIONS.items() for length in lengths
}
"""Task name (kind and prompt length, e.g. ``multihop_1024``) -> generator of one example from a seeded RNG."""
TEXT_TASKS: tuple[str, ...] = tuple(f"{kind}_{n}" for kind in KINDS for n in TEXT_LENGTHS)
"""The text tasks that are evaluated."""
WARMUP_TASKS: tuple[str, ...] = tuple(f"{kind}_{n}" for kind in KINDS for n in WARMUP_LENGTHS)
"""The same kinds at the warm-up lengths: training curricula only."""


def text_vocabulary() -> list[str]:
    """Every word that can occur in a text task's prompt or answer (specials excluded), sorted."""
    words = set(PREFIX[1:]) | set(SUFFIX) | set(TEMPLATE_WORDS) | set(KEYS) | set(NUMBERS)
    words.update(w for s in NOISE for w in s.split())
    return sorted(words)

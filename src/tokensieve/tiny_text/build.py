"""Build the tiny long-context text model and its word-level tokenizer from scratch (no downloads)."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..tasks.text import text_vocabulary

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
INIT_STD = 0.06
"""Init std of every weight: about 0.7 / sqrt(width), as the tiny LLaVA's decoder (see tiny/build.py)."""
MAX_POSITIONS = 4096
"""RoPE table size: twice the longest trained prompt."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the special tokens and every text-task word; words are split on
    whitespace only, so one space-separated word is one token."""
    words = list(SPECIAL_TOKENS) + text_vocabulary()
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = WhitespaceSplit()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, hidden: int = 128, layers: int = 6, heads: int = 4,
                 kv_heads: int = 2, mlp: int = 384) -> LlamaConfig:
    """A small Llama decoder: RoPE over ``MAX_POSITIONS`` positions, GQA (``heads`` query heads over
    ``kv_heads`` key/value heads), SwiGLU MLP, untied output head."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(config: LlamaConfig) -> LlamaForCausalLM:
    """A freshly initialised model (seed torch before calling for reproducibility), generation
    settings set from the config's special tokens."""
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    return model

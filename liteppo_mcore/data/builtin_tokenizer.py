"""The built-in tasks' tokenizer: one token per character, built in code with the `tokenizers` library.

It is exposed as a transformers ``PreTrainedTokenizerFast`` with BOS/EOS/PAD tokens and a chat
template, so the engines, the run directory (``save_pretrained``) and the conversion tools treat it
exactly like a real model's tokenizer, and nothing is downloaded. The vocabulary is deliberately tiny
(a few dozen ids) so that a randomly initialized model puts visible probability on every answer.

Chat format (no newlines, every role marker one token)::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>

``<|end|>`` closes every turn and is the EOS token: generation stops when the model closes its turn.
"""

from __future__ import annotations

from typing import Dict, List

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS: List[str] = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS.values()]
# Ordinary characters: digits for lists and answers, a few separators, and the letters of the built-in
# tasks' prompt words. Kept lean on purpose: every extra token dilutes a random policy's first guess.
# Anything else maps to <|unk|>.
CHARACTERS: List[str] = list("0123456789") + list(" \n:,.?=+-") + list("amx")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the built-in chat template knows the roles system, user and assistant, not '"
    " + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def builtin_vocab() -> Dict[str, int]:
    """Token -> id: the special tokens first (pad is id 0), then the characters."""
    return {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}


def build_builtin_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer for the built-in tasks (same ids on every call and rank)."""
    core = Tokenizer(models.WordLevel(builtin_vocab(), unk_token=UNK_TOKEN))
    # Every character is its own pre-token; [\s\S] (not '.') so that newlines are characters too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse: decode by plain concatenation (WordLevel would otherwise join tokens with spaces).
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS.values()),
        model_max_length=model_max_length,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

"""The built-in tasks' tokenizer: one token per character, built in code with the `tokenizers` library.

It is exposed as a transformers ``PreTrainedTokenizerFast`` with BOS/EOS/PAD tokens and a chat
template, so the engines, the run directory (``save_pretrained``) and the conversion tools treat it
exactly like a real model's tokenizer, and nothing is downloaded. The vocabulary is deliberately tiny
(a few dozen ids) so that a randomly initialized model puts visible probability on every answer.

Chat format (no newlines, every role marker one token)::

    <|bos|><|system|>...<|end|><|user|>...<|end|><|assistant|>

``<|end|>`` closes every turn and is the EOS token: generation stops when the model closes its turn.

``train_bpe_tokenizer`` learns a byte-level BPE from one's own prompts with the same special tokens
and chat format, for data the built-in characters cannot write (``tools/train_tokenizer.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|end|>"
UNK_TOKEN = "<|unk|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS: list[str] = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN, *ROLE_TOKENS.values()]
# Ordinary characters: digits for lists and answers, a few separators, and the letters of the built-in
# tasks' prompt words. Kept lean on purpose: every extra token dilutes a random policy's first guess.
# Anything else maps to <|unk|>.
CHARACTERS: list[str] = list("0123456789") + list(" \n:,.?=+-") + list("amx")

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


def builtin_vocab() -> dict[str, int]:
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
    return _wrap(core, model_max_length)


def _wrap(core: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """``core`` as a transformers tokenizer with the built-in special tokens and chat template."""
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


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer learned from ``texts``, with the built-in tokenizer's special tokens
    and chat template (so the chat format, EOS and padding are the same as the built-in tasks').

    Byte level: every byte is in the alphabet, so no text maps to the unknown token. ``vocab_size``
    counts the 256 bytes and the special tokens; the rest are merges learned from ``texts``. A small
    vocabulary suits a small model trained from random weights (a random policy spreads its first
    guesses over every token)."""
    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least {floor} "
                         f"(256 bytes and {len(SPECIAL_TOKENS)} special tokens)")
    core = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return _wrap(core, model_max_length)
